"""Small DiT: patchify round trip, attention reference, adaLN-zero init, JVP support, conditioning, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.losses import MeanFlowConfig, meanflow_loss
from jaxlab.nn import DiT
from jaxlab.nn.dit import dot_product_attention, patchify, unpatchify


@pytest.fixture(scope="module")
def dit():
    m = DiT(patch=2, hidden=32, depth=2, heads=4, time_dim=16, time_scale=1.0, num_classes=3)
    z = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(m.init)(jax.random.PRNGKey(0), z, jnp.zeros(2), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    # Replace the zero-initialised (adaLN-zero) leaves by small random values, so outputs depend on inputs.
    # (jitted: eagerly, every leaf shape compiles its own ops)
    @jax.jit
    def randomise(params):
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
        leaves = [jnp.where(leaf == 0, 0.1 * jax.random.normal(k, leaf.shape), leaf) for leaf, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(tree, leaves)

    return m, params, randomise(params)


def test_patchify_matches_numpy_and_round_trips():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 6, 3))
    tok = patchify(x, 2)
    xn = np.asarray(x)
    ref = xn.reshape(2, 4, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 12, 12)
    np.testing.assert_array_equal(tok, ref)
    np.testing.assert_array_equal(unpatchify(tok, 2, 8, 6), x)


def test_attention_matches_flax_reference():
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 4, 5, 8))
    ours = jax.jit(dot_product_attention)(q, k, v)  # jitted, both sides: one compile, not one per eager op
    t = lambda a: jnp.swapaxes(a, 1, 2)  # flax layout (B, N, heads, d)
    ref = t(jax.jit(nn.dot_product_attention)(t(q), t(k), t(v)))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_output_is_zero_at_init_and_depends_on_inputs(dit):
    m, params0, params = dit
    apply = jax.jit(m.apply)  # one compile per batch size instead of eager dispatch of every op, per call
    z = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 1))
    t, r, y = jnp.array([0.9, 0.5]), jnp.array([0.1, 0.5]), jnp.array([0, 2])
    np.testing.assert_array_equal(apply(params0, z, r, t, y), 0.0)
    u = apply(params, z, r, t, y)
    assert u.shape == z.shape and float(jnp.abs(u).max()) > 0
    for other in ((z, t, t, y), (z, r, t, jnp.array([1, 1])), (z, r, t * 0.5, y), (z * 2, r, t, y)):
        assert float(jnp.abs(apply(params, *other) - u).max()) > 1e-4
    # Rows are independent (no mixing across the batch).
    np.testing.assert_allclose(apply(params, z[:1], r[:1], t[:1], y[:1]), u[:1], rtol=1e-5, atol=1e-6)


def test_jvp_matches_finite_differences(dit):
    m, _, params = dit
    z = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 1))
    w = jax.random.normal(jax.random.PRNGKey(4), z.shape)
    r, t, y = jnp.array([0.2, 0.3]), jnp.array([0.7, 0.9]), jnp.array([1, 2])
    f = jax.jit(lambda z_, r_, t_: m.apply(params, z_, r_, t_, y))  # jitted: eagerly every op compiles alone
    _, dudt = jax.jit(lambda *p: jax.jvp(f, p, (w, jnp.zeros(2), jnp.ones(2))))(z, r, t)
    eps = 1e-2
    fd = (f(z + eps * w, r, t + eps) - f(z - eps * w, r, t - eps)) / (2 * eps)
    np.testing.assert_allclose(dudt, fd, rtol=3e-2, atol=3e-3)


def test_meanflow_loss_on_dit_has_finite_gradients(dit):
    m, _, params = dit
    x = jax.random.normal(jax.random.PRNGKey(5), (8, 8, 8, 1))
    y = jnp.arange(8) % 3
    cfg = MeanFlowConfig(jvp_cond_weight="auto", flow_matching_fraction=0.5, guidance_scale=1.5, num_classes=3)
    (loss, aux), g = jax.jit(jax.value_and_grad(
        lambda p: meanflow_loss(m.apply, p, x, jax.random.PRNGKey(0), config=cfg, y=y), has_aux=True))(params)
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
    assert 0.0 <= float(aux["jvp_cond_weight"]) <= 1.0


def test_bad_inputs_raise():
    # eval_shape: the checks run at trace time, without executing init op by op
    m = DiT(patch=3, hidden=32, depth=1, heads=4)
    with pytest.raises(ValueError, match=r"not a multiple of the patch size 3"):
        jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"expected z of shape \(B, H, W, C\)"):
        jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 64)), jnp.zeros(1), jnp.zeros(1))
    with pytest.raises(ValueError, match="num_classes == 0"):
        jax.eval_shape(DiT(patch=2, hidden=32, depth=1, heads=4).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="not divisible by heads"):
        jax.eval_shape(DiT(patch=2, hidden=36, depth=1, heads=8).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 8, 8, 1)), jnp.zeros(1), jnp.zeros(1))


def test_logical_sharding_rules_and_fsdp_meanflow_step(dit, eight_devices):
    """DiT kernels carry logical names; under FSDP the 'embed' axis goes to 'fsdp', the moments follow,
    and a MeanFlow ("auto") train step on the 8-device mesh equals the single-device step."""
    import optax

    from jaxlab.distributed import make_mesh
    from jaxlab.losses import make_meanflow_loss_fn, meanflow_init_state
    from jaxlab.training import TrainState, make_train_step, state_shardings

    m, boxed, _ = dit
    specs = nn.get_partition_spec(boxed)["params"]
    named = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
             if any(a is not None for a in s)]
    assert len(named) >= 8 and any("embed" in s for s in named)
    params = nn.meta.unbox(boxed)["params"]
    apply = lambda p, z, r, t, y: m.apply({"params": p}, z, r, t, y)
    cfg = MeanFlowConfig(jvp_cond_weight="auto", flow_matching_fraction=0.5, label_dropout=0.0)
    loss_fn = make_meanflow_loss_fn(apply, cfg)
    tx = optax.adam(1e-3)
    x = jax.random.normal(jax.random.PRNGKey(3), (16, 8, 8, 1))
    batch = {"x": x, "y": jnp.arange(16) % 3}
    state = TrainState.create(params=params, tx=tx, rng=0, loss_state=meanflow_init_state(cfg))
    ref, _ = make_train_step(loss_fn, tx, has_loss_state=True)(state, batch)
    mesh = make_mesh(data=1, fsdp=8, devices=eight_devices)
    sh = state_shardings(jax.eval_shape(lambda: state), tx, mesh, boxed_params=boxed["params"])
    flat = jax.tree_util.tree_flatten_with_path(sh.params)[0]
    sharded = [jax.tree_util.keystr(p) for p, s in flat if "fsdp" in s.spec]
    assert len(sharded) >= 8, sharded
    mu = sh.opt_state[0].mu
    assert all(a == b for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(sh.params)))
    step = make_train_step(loss_fn, tx, has_loss_state=True, mesh=mesh, state_sharding=sh)
    out, _ = step(jax.device_put(state, sh), batch)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(out.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.loss_state["auto_num"]), float(ref.loss_state["auto_num"]), rtol=1e-4)
