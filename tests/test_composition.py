"""Composition matrix: every method's step under jit, pmap, an 8-device mesh (DP and FSDP) and
shard_map gives the single-device result; optimizer-state shardings survive updates; one compile
per mode (STEP and ASP included: their switch/prune step is data, not a retrace).

Methods come from the method registry (``method_case``; a newly registered method runs through
``check_all_modes_agree``, see tests/test_contract.py): flow matching + AdamW (the runtime's baseline), MeanFlow (fixed coefficient and "auto", whose
pooled statistics are psum'ed over the device axis), STEP (4 steps crossing the AutoSwitch at t = 3),
STE, SR-STE, ASP (pruning at step 2), and GRASP (LoRA on the bundled transformer, base frozen).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _parallel import MODES, assert_close, assert_same_nm_masks, min_nm_gap, run_mode

import jaxlab
from jaxlab.distributed import unbox
from jaxlab.losses import MeanFlowConfig, flow_matching_loss, meanflow_init_state, meanflow_loss
from jaxlab.nm import nm_leaf_axes, nm_mask
from jaxlab.nn import VelocityMLP, lora
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.training import get_method
from jaxlab.transforms import (
    grasp,
    grasp_init_params,
    sparse_forward_params,
    step_phase,
    step_switch_step,
    subspace_leakage,
)

# Adam turns reduction-order noise on near-zero gradient entries into O(lr) steps, so transformer
# cases compare with an absolute tolerance of lr / 30 (a wrong update would be off by O(lr) everywhere).
LR = 1e-2
LM_TOL = dict(rtol=2e-5, atol=LR / 30)


# ----------------------------------------------------------------------------------------- 2D cases


def _mlp():
    model = VelocityMLP(hidden=32, depth=2, time_dim=8, time_scale=1.0)
    apply = lambda p, z, r, t: model.apply({"params": p}, z, r, t)
    params = unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones(1))["params"])
    return apply, params


def _fm_case():
    apply, params = _mlp()

    def loss_fn(params, batch, key):
        x, t, e = batch  # explicit t and noise: the loss is a deterministic function of the batch
        return flow_matching_loss(apply, params, x, key, t=t, noise=e)

    def batch(i):
        k = jax.random.PRNGKey(100 + i)
        return (jax.random.normal(k, (32, 2)), jax.random.uniform(jax.random.fold_in(k, 1), (32,)),
                jax.random.normal(jax.random.fold_in(k, 2), (32, 2)))

    return dict(loss_fn=loss_fn, params=params, batches=[batch(i) for i in range(3)])


def _meanflow_case(lam):
    apply, params = _mlp()
    cfg = MeanFlowConfig(jvp_cond_weight=lam, adaptive_p=1.0, adaptive_c=1e-2)

    def make_loss(axis_name):
        def loss_fn(params, batch, key, loss_state):
            x, e, r, t = batch
            loss, aux = meanflow_loss(apply, params, x, key, config=cfg, t=t, r=r, noise=e,
                                      loss_state=loss_state, axis_name=axis_name)
            return loss, ({"mse": aux["mse"], "jvp_cond_weight": aux["jvp_cond_weight"]}, aux["loss_state"])

        return loss_fn

    def batch(i):
        k = jax.random.split(jax.random.PRNGKey(200 + i), 4)
        x = jaxlab.data.eight_gaussians().sample(k[0], 32)
        a, b = jax.random.uniform(k[2], (32,)), jax.random.uniform(k[3], (32,))
        t, r = jnp.maximum(a, b), jnp.minimum(a, b)
        r = jnp.where(jnp.arange(32) % 4 == 0, t, r)  # r = t rows on every shard
        return x, jax.random.normal(k[1], (32, 2)), r, t

    return dict(loss_fn=make_loss(None), loss_fn_axis=make_loss, params=params,
                batches=[batch(i) for i in range(3)],
                kw=dict(has_loss_state=True, loss_state=meanflow_init_state(cfg)))


# ----------------------------------------------------------------------------------------- LM cases

# no biases: the key bias has an exactly-zero gradient (softmax shift invariance)
LM_CFG = TransformerConfig(vocab=32, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16, use_bias=False)
NM = dict(n=2, m=4)


@functools.cache  # shared by the LM cases (immutable arrays); jitted init: one compile, not one per eager op
def _lm(seed=1):
    model = Transformer(LM_CFG)
    params = unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, 16), jnp.int32))["params"])
    batches = [jax.random.randint(jax.random.PRNGKey(300 + i), (16, 16), 0, LM_CFG.vocab) for i in range(4)]
    return model, params, batches


# N:M cases. The mask is a discontinuous function of |w|: with the plain init (|w| ~ 0.02) groups of M hold
# near-ties down to ~1e-6, while the modes' rounding differences reach ~1e-4 on some entries (Adam turns
# reduction-order noise on near-zero gradient entries into O(lr / 30) steps, and STEP's first frozen-v step
# is ~100 lr), so a mask could flip and the runs part. The N:M leaves therefore start with the N kept
# entries of every group NM_GAP above the pruned ones. Before the last mask is taken (w_{T-1}) an entry has
# moved by at most T - 1 Adam steps of <= 1.01 lr (|m_hat / sqrt(v_hat)| <= 1.01 for t <= 4), so every
# gap stays >= NM_GAP - 2 (T - 1) 1.01 lr ~ 0.04 (T = 4), orders of magnitude above any cross-mode
# difference: each mode applies the same masks. The test asserts that (masks first, a flip named by leaf,
# step and group, then the values). The larger kernels also move the gradients away from Adam's eps
# (attention q/k median |g| 1e-5 -> 2e-3), which keeps the value differences well inside LM_TOL.
NM_GAP = 0.1
NM_MIN_GAP = 0.03  # asserted on the reference run's pre-update params (the construction's guarantee)


def _separate_nm_groups(params, gap=NM_GAP):
    """Add ``gap`` to |w| of the ``N`` kept entries of every group on the N:M leaves (sign kept)."""
    flat, treedef = jax.tree_util.tree_flatten(params)
    axes = treedef.flatten_up_to(nm_leaf_axes(params, NM["m"], n=NM["n"]))
    flat = [w if a is None else jnp.where(nm_mask(w, NM["n"], NM["m"], a), w + jnp.where(w < 0, -gap, gap), w)
            for w, a in zip(flat, axes)]
    return jax.tree_util.tree_unflatten(treedef, flat)


@functools.cache  # the N:M cases' common start (jitted: one compile instead of eager ops per leaf shape)
def _nm_params():
    return jax.jit(_separate_nm_groups)(_lm()[1])


def _nm_case(make_tx):
    model, _, batches = _lm()
    params = _nm_params()

    def loss_fn(params, batch, key):
        return causal_lm_loss(model.apply({"params": params}, batch), batch), {}

    return dict(loss_fn=loss_fn, params=params, batches=batches, tx=make_tx(),
                kw=dict(forward_params_fn=sparse_forward_params), tol=LM_TOL, nm=NM)


U_GRASP = np.linalg.qr(np.random.default_rng(0).normal(size=(LM_CFG.d_model, 2)))[0].astype(np.float32)


def _grasp_case():
    model, base, batches = _lm()
    params = lora.inject(base, ["attn/(q|k|v|o)$", "mlp/(up|down)$"], 2, key=jax.random.PRNGKey(7))
    # B = 0 at init would give A an exactly-zero gradient in the first step; start from a nonzero B
    # so every LoRA factor moves, then project A0 once (reader constraint from step 0)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat = [0.05 * jax.random.normal(jax.random.PRNGKey(i), x.shape) if jax.tree_util.keystr(p).endswith("['lora_b']")
            else x for i, (p, x) in enumerate(flat)]
    params = grasp_init_params(jax.tree.unflatten(treedef, flat), U_GRASP)

    def loss_fn(params, batch, key):
        return causal_lm_loss(model.apply({"params": lora.merge(params)}, batch), batch), {}

    tx = optax.chain(lora.freeze_base(optax.adamw(LR, weight_decay=0.1), params), grasp(U_GRASP))
    return dict(loss_fn=loss_fn, params=params, batches=batches, tx=tx, tol=LM_TOL)


def method_case(name: str, **hyper):
    """The composition case of registered method ``name`` (:mod:`jaxlab.training.methods`): N:M methods
    train the transformer LM through the sparse forward, dense ones the flow-matching MLP."""
    method = get_method(name)
    if method.sparse:
        return _nm_case(lambda: method.make(LR, **NM, **hyper))
    return {**_fm_case(), "tx": method.make(1e-2, **hyper)}


CASES = {
    "flow_matching+adamw": lambda: method_case("adamw", weight_decay=1e-3),
    "meanflow_lam0.5+adam": lambda: {**_meanflow_case(0.5), "tx": get_method("adam").make(1e-2)},
    "meanflow_auto+adam": lambda: {**_meanflow_case("auto"), "tx": get_method("adam").make(1e-2)},
    "step_adamw (both phases)": lambda: method_case("step", switch_eps=0.0, t_min=1, t_max=2, window=4),
    "ste_adamw": lambda: method_case("ste"),
    "sr_ste_adamw": lambda: method_case("sr_ste"),
    "asp_adamw (prune at 2)": lambda: method_case("asp", prune_step=2),
    "grasp+lora+adamw": _grasp_case,
}
AXIS = {"pmap": "batch", "shard_map": "data"}  # the axis names of make_pmap/shard_map_train_step


# Cases whose code the default cases already run, so they go under -m slow (suite time): STE is SR-STE's
# lambda = 0 corner of the same factory (equal bitwise: test_step_baselines'
# test_ste_is_sr_ste_with_lambda_zero_exactly); SR-STE's update is STEP's phase 2 (sr_ste_phase2), which the
# STEP case crosses into; the fixed-lambda MeanFlow loss is the auto case's loss with lambda given.
SLOW_CASES = {"ste_adamw", "sr_ste_adamw", "meanflow_lam0.5+adam"}


@pytest.mark.parametrize("case", [c if c not in SLOW_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_all_modes_agree(case, eight_devices):
    check_all_modes_agree(case, CASES[case](), eight_devices)


def check_all_modes_agree(case: str, c: dict, eight_devices):
    """Every mode of ``MODES`` gives the single-device result of case ``c``, with one trace each."""
    tx, kw, tol, nm = c["tx"], c.get("kw", {}), c.get("tol", {}), c.get("nm")

    def trajectory():  # N:M cases: the params each update starts from (the ones its masks are taken of)
        seen = [jax.tree.map(np.asarray, c["params"])]
        return seen, (lambda state: seen.append(jax.tree.map(np.asarray, state.params))) if nm else None

    ref_traj, on_step = trajectory()
    ref, traces, _ = run_mode("single", c["loss_fn"], tx, c["params"], c["batches"], eight_devices, **kw,
                              on_step=on_step)
    assert traces == 1
    if nm:  # the construction holds on this run: no near-tie in |w| that rounding could resolve either way
        gap, where = min_nm_gap(ref_traj[:-1], **nm)
        assert gap >= NM_MIN_GAP, f"{case}: N:M tie gap {gap:.2e} < {NM_MIN_GAP} at {where}; masks may flip by rounding"
    for mode in MODES[1:]:
        loss_fn = c["loss_fn_axis"](AXIS[mode]) if "loss_fn_axis" in c and mode in AXIS else c["loss_fn"]
        traj, on_step = trajectory()
        state, traces, info = run_mode(mode, loss_fn, tx, c["params"], c["batches"], eight_devices, **kw,
                                       on_step=on_step)
        assert traces == 1, f"{mode} retraced: {traces}"
        if nm:  # a different mask is reported as such, before the values it changes
            assert_same_nm_masks(ref_traj[:-1], traj[:-1], what=f"{case}/{mode}", **nm)
        assert_close(ref.params, state.params, what=f"{case}/{mode} params", **tol)
        assert_close(ref.opt_state, state.opt_state, what=f"{case}/{mode} opt_state",
                     **({**tol, "atol": 1e-6} if tol else {}))
        if ref.loss_state is not None:
            assert_close(ref.loss_state, state.loss_state, what=f"{case}/{mode} loss_state")
        if info is not None:
            assert info["opt_state_shardings_kept"], f"{case}/{mode}: optimizer-state shardings changed"
    # the method did what it is for during these steps (so the equalities above covered it)
    if case.startswith("step"):
        assert int(step_phase(ref.opt_state)) == 1 and int(step_switch_step(ref.opt_state)) == 3
    if case.startswith("meanflow_auto"):
        assert float(ref.loss_state["auto_den"]) > 0
    if case.startswith("grasp"):
        delta = jax.tree.map(lambda a, b: a - b, lora.merge(ref.params), lora.merge(c["params"]))
        leak = subspace_leakage(delta, U_GRASP)
        assert leak and max(leak.values()) < 1e-4, leak


def test_fsdp_shards_method_state_like_params(eight_devices):
    """FSDP: STEP's moments follow their kernel's sharding; GRASP's basis is a constant (replicated)."""
    from jax.sharding import NamedSharding

    from jaxlab.distributed import make_mesh
    from jaxlab.training import TrainState, state_shardings

    c = method_case("step", switch_eps=0.0, t_min=1, t_max=2, window=4)
    mesh = make_mesh(data=1, fsdp=8, devices=eight_devices)
    state = TrainState.create(params=c["params"], tx=c["tx"], rng=0)
    sh = state_shardings(jax.eval_shape(lambda: state), c["tx"], mesh)
    kernel = sh.params["block_0"]["mlp"]["up"]["kernel"]
    assert "fsdp" in kernel.spec
    st = sh.opt_state[0]
    for moments in (st.mu, st.nu):
        assert moments["block_0"]["mlp"]["up"]["kernel"] == kernel
    for leaf in jax.tree.leaves(st._replace(mu=None, nu=None), is_leaf=lambda x: isinstance(x, NamedSharding)):
        assert all(ax is None for ax in leaf.spec)  # count, phase, ring buffer: replicated
