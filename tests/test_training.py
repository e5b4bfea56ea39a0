"""Training runtime: resume == uninterrupted, sharded == single device, NaN stop keeps the last good checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlab
from jaxlab.training import (
    Checkpointer,
    NonFiniteError,
    RunConfig,
    Task,
    load_config,
    read_metrics,
    register_task,
    train,
)

BASE = {
    "name": "t",
    "seed": 3,
    "data": {"name": "two_moons", "batch_size": 64, "eval_size": 256},
    "model": {"name": "velocity_mlp", "options": {"hidden": 64, "depth": 3, "time_dim": 16}},
    "optim": {"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 2},
    "task": {"name": "flow_matching", "options": {"sample_steps": 4, "sw_projections": 64}},
    "train": {"steps": 12, "log_every": 2, "eval_every": 6, "ckpt_every": 4, "keep": 5, "progress": False,
              "ema_decay": 0.9},
    "mesh": {"data": 1},
}


def make_cfg(tmp_path, name, base=None, **over) -> RunConfig:
    sets = [f"name={name}", f"out_dir={tmp_path}"] + [f"{k}={v}" for k, v in over.items()]
    return load_config(base=base or BASE, sets=sets)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full, _ = train(make_cfg(tmp_path, "full"))
    cfg = make_cfg(tmp_path, "resumed")
    part, _ = train(cfg, stop_at=7)  # "preempted" after step 7; last checkpoint is step 4
    assert int(part.step) == 7
    assert Checkpointer(cfg.run_dir / "checkpoints").latest_step() == 4
    resumed, _ = train(cfg)  # the same command again resumes from step 4
    assert int(resumed.step) == 12
    assert_trees_equal(full.params, resumed.params)
    assert_trees_equal(full.opt_state, resumed.opt_state)
    assert_trees_equal(full.ema_params, resumed.ema_params)
    assert _strip(read_metrics(tmp_path / "full")) == _strip(read_metrics(cfg.run_dir))
    # the run dir holds what a run writes
    for f in ("config.yaml", "metrics.jsonl", "report.md", "plots/samples.png", "plots/train_metrics.png"):
        assert (cfg.run_dir / f).exists(), f


def test_restore_brings_back_optax_namedtuples(tmp_path):
    cfg = make_cfg(tmp_path, "types", **{"train.steps": 4})
    state, _ = train(cfg)
    restored = Checkpointer(cfg.run_dir / "checkpoints").restore(state)
    assert type(restored.opt_state) is type(state.opt_state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_trees_equal(restored, state)


SHARDED_OVER = {"train.steps": 6, "train.ckpt_every": 0, "train.eval_every": 0}


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, eight_devices):
    """The one-device run every mesh below must reproduce (trained once for the three meshes)."""
    state, _ = train(make_cfg(tmp_path_factory.mktemp("single"), "single", **SHARDED_OVER), devices=eight_devices[:1])
    return state


@pytest.mark.parametrize("mesh", [{"data": 8, "fsdp": 1}, {"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_sharded_step_matches_single_device(tmp_path, eight_devices, single_device_run, mesh):
    over, single = SHARDED_OVER, single_device_run
    sets = {**over, "mesh.data": mesh["data"], "mesh.fsdp": mesh["fsdp"]}
    sharded, _ = train(make_cfg(tmp_path, f"m{mesh['data']}x{mesh['fsdp']}", **sets), devices=eight_devices)
    assert_trees_equal(single.params, sharded.params, rtol=2e-5, atol=2e-6)
    kernel = sharded.params["hidden_0"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    if mesh["fsdp"] > 1:
        # FSDP really shards: the (64, 64) kernel's "embed" axis is split, and Adam's moments follow it
        assert kernel.sharding.spec[1] == "fsdp"
        assert kernel.addressable_shards[0].data.shape == (64, 64 // mesh["fsdp"])
        mu = sharded.opt_state[0].mu["hidden_0"]["kernel"]
        assert mu.sharding.spec == kernel.sharding.spec
    else:
        assert kernel.sharding.is_fully_replicated


# ----------------------------------------------------------------------------- NaN / Inf detection


@jax.custom_vjp
def _poison(b, flag):
    """Value 0; gradient w.r.t. ``b`` is +inf where ``flag`` > 0 (a non-finite gradient, finite loss)."""
    return jnp.sum(b) * 0.0


def _poison_fwd(b, flag):
    return _poison(b, flag), (b, flag)


def _poison_bwd(res, g):
    b, flag = res
    return jnp.where(flag > 0, jnp.inf, 0.0) * jnp.ones_like(b) * g, jnp.zeros_like(flag)


_poison.defvjp(_poison_fwd, _poison_bwd)


@dataclasses.dataclass
class PoisonOptions:
    bad_step: int = 5
    kind: str = "grad"


def _build_poison(cfg, opts, model):
    def loss_fn(params, batch, key):
        x, flag = batch
        loss = jnp.mean((params["a"] - x) ** 2) + _poison(params["b"], flag[0])
        if opts.kind == "loss":
            loss = loss + jnp.log(1.0 - flag[0])  # -inf at the bad step
        return loss, {}

    def batch_fn(step):
        return np.ones((8, 3), np.float32), np.full((8,), float(step == opts.bad_step), np.float32)

    return Task(init_params=lambda k: {"a": jnp.zeros((3,)), "b": jnp.ones((2, 2))}, loss_fn=loss_fn, batch_fn=batch_fn)


register_task("test_poison", _build_poison, PoisonOptions)


@pytest.mark.parametrize("kind, needle", [("grad", "the gradient of params['b']"), ("loss", "the loss")])
def test_nonfinite_stops_with_step_and_leaf_and_keeps_last_checkpoint(tmp_path, kind, needle):
    base = {**BASE, "task": {"name": "test_poison", "options": {"kind": kind}}}
    cfg = make_cfg(tmp_path, f"nan_{kind}", base=base, **{"train.ckpt_every": 2, "train.steps": 10})
    with pytest.raises(NonFiniteError) as e:
        train(cfg)
    # batch 5 (0-based) feeds the 6th update: errors count steps from 1, like metrics and checkpoints
    assert "at step 6" in str(e.value) and needle in str(e.value)
    assert str(e.value).endswith("the last good checkpoint is step 4")
    ck = Checkpointer(cfg.run_dir / "checkpoints")
    assert ck.latest_step() == 4  # the bad state (step 6) was never written
    abstract = jaxlab.TrainState(
        step=jnp.zeros((), jnp.int32), params={"a": jnp.zeros((3,)), "b": jnp.ones((2, 2))},
        opt_state=jaxlab.build_optimizer(cfg.optim, 10).init({"a": jnp.zeros((3,)), "b": jnp.ones((2, 2))}),
        rng=jnp.zeros((2,), jnp.uint32), ema_params={"a": jnp.zeros((3,)), "b": jnp.ones((2, 2))}, loss_state={},
    )
    good = ck.restore(abstract)
    assert int(good.step) == 4
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(good.params))


def test_trainable_mask_freezes_leaves_without_gradients(eight_devices):
    """``trainable``: frozen leaves get exact-zero gradients (not computed, so nothing to all-reduce),
    trained leaves follow the same updates as an optimizer that masks the frozen ones."""
    import optax

    from jaxlab.distributed import make_mesh
    from jaxlab.distributed.sharding import batch_sharding
    from jaxlab.training import TrainState, make_train_step, state_shardings
    from jaxlab.training.dry_run import collective_traffic

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"a": jax.random.normal(k[0], (64, 64)), "b": jax.random.normal(k[1], (64, 64))}
    x = jax.random.normal(k[2], (32, 64))
    loss_fn = lambda p, batch, key: (jnp.mean(jnp.tanh(batch @ p["a"]) @ p["b"] ** 2), {})
    mask = {"a": True, "b": False}
    tx = optax.multi_transform({True: optax.adam(1e-2), False: optax.set_to_zero()}, mask)
    plain = make_train_step(loss_fn, tx)
    frozen = make_train_step(loss_fn, tx, trainable=mask)
    s0 = TrainState.create(params=params, tx=tx, rng=0)
    s1, m1 = plain(s0, x)
    s2, m2 = frozen(s0, x)
    assert_trees_equal(s1.params, s2.params)  # same trained leaves, untouched frozen ones
    np.testing.assert_array_equal(np.asarray(s2.params["b"]), np.asarray(params["b"]))
    g_a = jax.grad(lambda a: loss_fn({"a": a, "b": params["b"]}, x, None)[0])(params["a"])
    np.testing.assert_allclose(float(m2["grad_norm"]), float(jnp.linalg.norm(g_a)), rtol=1e-5)
    assert float(m1["grad_norm"]) > float(m2["grad_norm"])  # the plain step also differentiated b
    with pytest.raises(ValueError, match="trainable mask structure"):
        make_train_step(loss_fn, tx, trainable={"a": True})(s0, x)
    # data parallel on 8 devices: only the trained leaf's gradient crosses the interconnect
    mesh = make_mesh(data=8, devices=eight_devices)
    sh = state_shardings(jax.eval_shape(lambda: s0), tx, mesh)
    for trainable, n_floats in ((None, 2 * 64 * 64), (mask, 64 * 64)):
        step = make_train_step(loss_fn, tx, trainable=trainable, mesh=mesh, state_sharding=sh, jit=False)
        hlo = jax.jit(step, in_shardings=(sh, batch_sharding(mesh, 2))).lower(s0, x).compile().as_text()
        traffic = collective_traffic(hlo, 8)
        assert traffic["all-reduce"] == pytest.approx(2 * 7 / 8 * 4 * n_floats, rel=0.01), (trainable, traffic)


def test_run_training_reports_the_runs_that_met_nan():
    """A vmapped grid in which one run's loss turns NaN: named (seed, first step, what) by a warning or an
    error; the other runs are unaffected; ``"ignore"`` stays silent."""
    import warnings

    import optax

    from jaxlab.training.experiment import run_training

    def loss_fn(p, batch, key):  # batch = the run's input: log of a negative number is NaN from step 1 on
        return jnp.sum((p["w"] - 1.0) ** 2) + 0.0 * jnp.log(batch), {}

    kw = dict(init_fn=lambda key: {"w": jnp.zeros(3)}, batch_fn=lambda key, r: r, steps=4, seeds=[3, 7, 9],
              run_inputs=jnp.asarray([1.0, -1.0, 2.0]), progress=False)
    with pytest.warns(RuntimeWarning, match=r"1 of 3 runs met NaN/Inf:\n  seed 7: non-finite value \(NaN/Inf\) "
                                            r"at step 1: the loss is the first non-finite value \(4 steps in all\)"):
        res = run_training(loss_fn, optax.sgd(0.1), **kw)
    assert np.all(np.isfinite(np.asarray(res.trace["loss"])[[0, 2]]))
    with pytest.raises(jaxlab.training.NonFiniteError, match="seed 7"):
        run_training(loss_fn, optax.sgd(0.1), on_nonfinite="raise", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_training(loss_fn, optax.sgd(0.1), on_nonfinite="ignore", **kw)
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        run_training(loss_fn, optax.sgd(0.1), on_nonfinite="skip", **kw)
