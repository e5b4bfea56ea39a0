"""The optimizer contract: every registered method obeys optax's conventions, checked by one case list.

Modelled on optax's ``optax/contrib/_common_test.py``: one list, :data:`CONTRACT_CASES`, of
``(method name, hyper-parameters for a tiny problem)`` drives every check in :data:`CONTRACT_CHECKS`
(the tests below are their cross product). A method registered in :data:`jaxlab.training.METHODS` without
a case fails :func:`test_every_registered_method_has_a_contract_case`, so no method skips the suite.

The checks (each compares against a manual computation or asserts a property, so each can fail):

1. ``jit_extra_args``: ``jax.jit`` around ``update`` with extra keyword arguments the method does not use
   (``value=``, ``step_index=``) runs 6 steps with exactly one trace (``chex.assert_max_traces``); the
   factory returns an ``optax.GradientTransformationExtraArgs``; the run reaches both phases of STEP/ASP.
2. ``inject_hyperparams``: ``optax.inject_hyperparams(factory, static_args=...)`` (every numeric
   hyper-parameter injected, the learning rate included; N:M structure arguments static) gives the plain
   factory's updates and state at every step, and the injected learning rate is live.
3. ``multisteps``: ``optax.MultiSteps(tx, k)`` returns zero updates between boundaries and, at every
   k-th step, ``tx``'s update of the mean gradient (manual reference).
4. ``chain_clip``: ``optax.chain(optax.clip_by_global_norm(1.0), tx)`` equals manual clipping then ``tx``
   (clipping is active: the gradient norm exceeds 1).
5. ``dtypes``: float32 and bfloat16 params (jitted steps): updates keep the params' dtype, the state's
   tree of dtypes is the same at init and after 1 and 5 steps, every ``count`` is int32.
6. ``convergence``: 200 steps inside ``lax.scan`` cut the deployed model's loss at least 10x
   (:data:`CONVERGENCE_FACTOR`).
7. ``sharding``: on an 8-device mesh, params sharded over ``fsdp``; after init and after jitted updates the
   opt-state leaves that mirror a param (same key-path suffix and shape) keep that param's sharding.

Plus a toy method registered in one line, run through every check, the composition matrix
(tests/test_composition.py) and ``jaxlab train``.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlab.transforms as T
from jaxlab.distributed import make_mesh
from jaxlab.distributed.sharding import batch_sharding, opt_state_shardings
from jaxlab.training import METHODS, get_method, load_config, read_metrics, register_method, train

# ------------------------------------------------------------------------------------------ the problem

D_IN, D_OUT, GROUP = 16, 8, 4  # kernel (d_in, d_out): N:M groups of 4 along d_in (the reduction axis)
LR = 3e-2
N_BATCHES, BATCH = 12, 32


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))[0].astype(np.float32)


#: GRASP's spurious subspace for the test params: 2 directions of the 8-wide output (residual) axis.
U = _orthonormal(D_OUT, 2, seed=7)
#: The test layer ``dense`` writes the residual stream: GRASP projects its kernel and bias on axis -1.
SIDES = {r"(^|/)dense$": "writer"}

# One entry per registered method. Hyper-parameters make every phase happen within a 6-step run:
# STEP switches at t = t_max + 1 = 4, ASP prunes at update 3. STEP's b2 = 0.9 lets v settle before the
# switch, as AutoSwitch intends (with 0.999 the frozen, uncorrected v_3 is 0.3 % of g^2: 18x larger steps).
CONTRACT_CASES: list[tuple[str, dict]] = [
    ("adam", {}),
    ("adamw", {"weight_decay": 1e-3}),
    ("sgd", {"b1": 0.9}),
    ("step", {"switch_eps": 1e-9, "t_min": 2, "t_max": 3, "window": 2, "b2": 0.9}),
    ("ste", {}),
    ("sr_ste", {"sr_ste_lambda": 2e-2}),
    ("asp", {"prune_step": 3}),
    ("grasp", {"subspace": U, "sides": SIDES}),
    ("grasp_around", {"subspace": U, "sides": SIDES}),
]


def _group_sum(kernel):
    return kernel.reshape(D_IN // GROUP, GROUP, D_OUT).sum(axis=1)


@functools.cache
def _problem_np(seed: int = 0):
    """A least-squares problem every method can solve exactly.

    Inputs repeat within each N:M group (``x[:, 4g + j] = z[:, g]``), so the model only sees the group sums
    of the kernel and every N:M mask with N >= 1 represents the target; the target's component along
    GRASP's ``U`` equals the initial params' (GRASP never moves it), and the gradients do have components
    along ``U`` (the projection is exercised).
    """
    rng = np.random.default_rng(seed)
    kernel0 = 0.1 * rng.standard_normal((D_IN, D_OUT))
    bias0 = np.zeros(D_OUT)
    proj = np.eye(D_OUT) - U @ U.T  # off span(U)
    along = U @ U.T
    a = rng.standard_normal((D_IN // GROUP, D_OUT)) @ proj + _group_sum(kernel0) @ along
    b = rng.standard_normal(D_OUT) @ proj + bias0 @ along
    z = rng.standard_normal((N_BATCHES, BATCH, D_IN // GROUP))
    x = np.repeat(z, GROUP, axis=-1)
    y = z @ a + b
    return kernel0, bias0, x, y


def problem(dtype=jnp.float32):
    """``(params, (xs, ys))``: params ``{"dense": {"kernel": (16, 8), "bias": (8,)}}``, 12 batches of 32."""
    kernel0, bias0, x, y = _problem_np()
    params = {"dense": {"kernel": jnp.asarray(kernel0, dtype), "bias": jnp.asarray(bias0, dtype)}}
    return params, (jnp.asarray(x, dtype), jnp.asarray(y, dtype))


def loss_fn(params, x, y):
    pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    return 0.5 * jnp.mean(jnp.sum(jnp.square(pred - y), axis=-1))


def value_and_grad(name, params, opt_state, x, y):
    """Loss and gradient at the method's forward params (N:M: straight-through through the masks)."""
    fwd = get_method(name).forward_params_fn
    return jax.value_and_grad(lambda p: loss_fn(fwd(p, opt_state) if fwd else p, x, y))(params)


def deployed(name, params, opt_state):
    """The params the method deploys: N:M methods prune with the masks in their state."""
    return T.prune(params, opt_state) if get_method(name).sparse else params


def make_tx(name, hyper, learning_rate=LR):
    return get_method(name).make(learning_rate, **hyper)


def _fast_compile_options() -> dict:
    """XLA CPU options that compile these tiny programs ~3x faster (the suite is compile-bound: each
    program runs a few microseconds). Tracing, dtypes and sharding propagation are unaffected; an option
    the installed XLA does not know is dropped."""
    out = {}
    for key, value in (("xla_backend_optimization_level", 0), ("xla_cpu_use_fusion_emitters", False)):
        try:
            jax.jit(lambda x: x + 1).lower(1.0).compile({key: value})
        except Exception:  # noqa: BLE001  (an unknown option is an XlaRuntimeError)
            continue
        out[key] = value
    return out


jit = functools.partial(jax.jit, compiler_options=_fast_compile_options())


def stepper(name, tx, **extra_args):
    """One jitted training step of ``tx``: gradient at the method's forward params, update, apply."""

    @jit
    def step(params, state, x, y):
        grads = value_and_grad(name, params, state, x, y)[1]
        updates, state = tx.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state, updates

    return step


_REFERENCE: dict[str, tuple] = {}


def reference(name, hyper):
    """``(tx, grad, update)``: the plain method and two jitted pieces every manual reference computation
    shares (one compilation per method and dtype for the whole suite): ``grad(params, state, x, y)`` at
    the forward params and ``update(params, state, grads) -> (params, state, updates)``."""
    if name not in _REFERENCE:
        tx = make_tx(name, hyper)

        def update(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state, updates

        _REFERENCE[name] = (tx, jit(lambda p, s, x, y: value_and_grad(name, p, s, x, y)[1]), jit(update))
    return _REFERENCE[name]


def _static_args(name, hyper) -> tuple[str, ...]:
    """What ``inject_hyperparams`` must not trace: the N:M structure (``nm_static_args``) and data
    (array-valued arguments such as GRASP's subspace basis)."""
    factory = get_method(name).factory
    arrays = tuple(k for k, v in hyper.items() if np.ndim(v) > 0)
    return T.nm_static_args(factory) + arrays if get_method(name).sparse else arrays


def _close(a, b, rtol=1e-5, atol=1e-6):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def _find(opt_state, state_type):
    leaves = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type))
    return [x for x in leaves if isinstance(x, state_type)]


def _assert_phases_covered(name, opt_state):
    """STEP switched to mask learning and ASP pruned: the run exercised both sides of the switch."""
    if states := _find(opt_state, T.StepState):
        assert int(states[0].phase) == 1, f"{name}: STEP did not switch within the run; shorten t_max"
    if states := _find(opt_state, T.AspState):
        assert bool(states[0].pruned), f"{name}: ASP did not prune within the run; lower prune_step"


# ---------------------------------------------------------------------------------------------- checks


def check_jit_extra_args(name, hyper, steps=6):
    tx = make_tx(name, hyper)
    assert isinstance(tx, optax.GradientTransformationExtraArgs), type(tx)
    params, (xs, ys) = problem()
    chex.clear_trace_counter()

    @jit
    @chex.assert_max_traces(n=1)
    def step(params, state, x, y, i):
        value, grads = value_and_grad(name, params, state, x, y)
        # extra arguments meant for other members of a chain: every transform must accept and ignore them
        updates, state = tx.update(grads, state, params, value=value, step_index=i)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(steps):
        params, state = step(params, state, xs[i], ys[i], jnp.asarray(i, jnp.int32))
    chex.assert_tree_all_finite((params, state))
    _assert_phases_covered(name, state)


def check_inject_hyperparams(name, hyper, steps=6):
    injected = optax.inject_hyperparams(get_method(name).factory, static_args=_static_args(name, hyper))(
        learning_rate=LR, **hyper
    )
    tx, grad, update = reference(name, hyper)
    step_inj = stepper(name, injected)
    params, (xs, ys) = problem()
    p_plain, s_plain = params, tx.init(params)
    p_inj, s_inj = params, injected.init(params)
    # Equal up to rounding: Python-float hyper-parameters are folded into the plain program, injected ones
    # are float32 arrays, and Adam turns rounding-level gradient differences on entries whose gradient is
    # ~0 into ~1e-6 steps; atol = 1e-5 is lr / 3000, a real difference is O(lr).
    first = None
    for i in range(steps):
        p_plain, s_plain, u_plain = update(p_plain, s_plain, grad(p_plain, s_plain, xs[i], ys[i]))
        p_inj, s_inj, u_inj = step_inj(p_inj, s_inj, xs[i], ys[i])
        _close(u_inj, u_plain, rtol=1e-4, atol=1e-5)
        first = u_plain if first is None else first
    assert float(s_inj.hyperparams["learning_rate"]) == pytest.approx(LR)
    _close(p_inj, p_plain, rtol=1e-4, atol=1e-5)
    _close(s_inj.inner_state, s_plain, rtol=1e-4, atol=1e-5)

    # the injected learning rate is live: doubling it in the state doubles the first update
    s0 = injected.init(params)
    s0 = s0._replace(hyperparams={**s0.hyperparams, "learning_rate": jnp.asarray(2 * LR, jnp.float32)})
    doubled = step_inj(params, s0, xs[0], ys[0])[2]
    _close(doubled, jax.tree.map(lambda u: 2 * u, first), rtol=1e-4, atol=1e-5)


def check_multisteps(name, hyper, k=3, macro_steps=4):
    tx, grad, update = reference(name, hyper)
    ms = optax.MultiSteps(tx, every_k_schedule=k)
    ms_step = stepper(name, ms)
    params, (xs, ys) = problem()
    p_ms, s_ms = params, ms.init(params)
    p_ref, s_ref = params, tx.init(params)
    for j in range(macro_steps):
        micro = range(j * k, (j + 1) * k)
        for i in micro:
            p_ms, s_ms, u = ms_step(p_ms, s_ms, xs[i], ys[i])
            if i < micro[-1]:  # between boundaries nothing moves
                chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, u))
        # reference: tx on the mean of the k micro-batch gradients, all taken at the same params and state
        grads = [grad(p_ref, s_ref, xs[i], ys[i]) for i in micro]
        p_ref, s_ref, u_ref = update(p_ref, s_ref, jax.tree.map(lambda *g: sum(g) / k, *grads))
        _close(u, u_ref, rtol=1e-4, atol=1e-6)
    _close(p_ms, p_ref, rtol=1e-4, atol=1e-6)
    _close(s_ms.inner_opt_state, s_ref, rtol=1e-4, atol=1e-6)
    assert int(s_ms.gradient_step) == macro_steps
    _assert_phases_covered(name, s_ref)


def check_chain_clip(name, hyper, steps=6, max_norm=1.0):
    tx, grad, update = reference(name, hyper)
    chained = optax.chain(optax.clip_by_global_norm(max_norm), tx)
    step_chain = stepper(name, chained)
    params, (xs, ys) = problem()
    p_c, s_c = params, chained.init(params)
    p_r, s_r = params, tx.init(params)
    norms = []
    for i in range(steps):
        p_c, s_c, u_c = step_chain(p_c, s_c, xs[i], ys[i])
        g = grad(p_r, s_r, xs[i], ys[i])
        norms.append(float(optax.tree.norm(g)))
        clipped = jax.tree.map(lambda x: x * min(1.0, max_norm / norms[-1]), g)  # manual clipping
        p_r, s_r, u_r = update(p_r, s_r, clipped)
        _close(u_c, u_r)
    assert max(norms) > max_norm, f"clipping never active (gradient norms {norms}); the check would be vacuous"
    _close(s_c[1], s_r)


def _dtypes(tree):
    return jax.tree.map(lambda x: jnp.asarray(x).dtype, tree)


def _counts(state):
    """Every ``count`` field of the (nested) optax states."""
    out = []

    def visit(node):
        if isinstance(node, tuple):
            if hasattr(node, "_fields") and "count" in node._fields:
                out.append(node.count)
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return out


def check_dtypes(name, hyper, steps=5):
    tx, grad, update = reference(name, hyper)
    for dtype in (jnp.float32, jnp.bfloat16):
        params, (xs, ys) = problem(dtype)
        params0, state = params, tx.init(params)
        seen = {0: _dtypes(state)}
        for t in range(1, steps + 1):
            params, state, updates = update(params, state, grad(params, state, xs[t], ys[t]))
            chex.assert_trees_all_equal_dtypes(updates, params0)
            seen[t] = _dtypes(state)
        chex.assert_trees_all_equal_dtypes(params, params0)
        chex.assert_tree_all_finite(params)
        what = f"{name} with {jnp.dtype(dtype).name} params"
        assert seen[1] == seen[0], f"{what}: state dtypes changed at step 1:\n{seen[0]}\n->\n{seen[1]}"
        assert seen[steps] == seen[1], f"{what}: state dtypes changed by step {steps}:\n{seen[1]}\n->\n{seen[steps]}"
        counts = [jnp.asarray(c).dtype for c in _counts(state)]  # optax.sgd (trace + scale) keeps none
        assert all(c == jnp.int32 for c in counts), f"{what}: count dtypes {counts}"


#: Loss reduction factor the convergence check demands (loss of the deployed params, N:M methods pruned,
#: on all 384 samples, after 200 steps at lr = 3e-2). The problem is exactly solvable by every method (see
#: :func:`_problem_np`); measured: AdamW, SGD, ASP, GRASP > 1e7x, STE / SR-STE / STEP > 3000x, and the
#: sign-based toy (its loss floor grows with lr^2) ~30x. 10x keeps a 3x margin below the weakest and
#: fails an optimizer that stalls or diverges.
CONVERGENCE_FACTOR = 10.0


def check_convergence(name, hyper, steps=200):
    tx = make_tx(name, hyper)
    params, (xs, ys) = problem()
    x_all, y_all = xs.reshape(-1, D_IN), ys.reshape(-1, D_OUT)

    @jit
    def run(params):
        def body(carry, i):
            p, s = carry
            b = i % N_BATCHES
            grads = value_and_grad(name, p, s, xs[b], ys[b])[1]
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        (p, s), _ = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(steps))
        return p, s

    p, s = run(params)
    start = float(loss_fn(params, x_all, y_all))
    end = float(loss_fn(deployed(name, p, s), x_all, y_all))
    assert np.isfinite(end)
    assert end * CONVERGENCE_FACTOR < start, f"{name}: loss {start:.4g} -> {end:.4g} (needs a {CONVERGENCE_FACTOR}x drop)"


def _mirrors(params, opt_state):
    """``[(path, state_leaf, param_path)]`` for state leaves whose key path ends with a param's and whose
    shape matches it (``...mu['dense']['kernel']`` mirrors ``params['dense']['kernel']``)."""
    p_flat = [(jax.tree_util.keystr(p), tuple(x.shape)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        key = jax.tree_util.keystr(path)
        for p_key, shape in p_flat:
            if key.endswith(p_key) and tuple(jnp.shape(leaf)) == shape:
                out.append((key, leaf, p_key))
    return out


def check_sharding(name, hyper, steps=3):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = make_mesh(data=2, fsdp=4, devices=devices[:8])
    tx = make_tx(name, hyper)
    params, (xs, ys) = problem()
    # FSDP over d_in: 4 rows (one N:M group) per shard; the bias over its only axis
    p_sh = {"dense": {"kernel": NamedSharding(mesh, P("fsdp", None)), "bias": NamedSharding(mesh, P("fsdp"))}}
    params = jax.device_put(params, p_sh)
    s_sh = opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_sh, mesh, params=params)
    state = jit(tx.init, out_shardings=s_sh)(params)
    by_key = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(p_sh)[0]}

    def assert_sharded(params, state, when):
        for (path, x), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(p_sh)):
            assert x.sharding.is_equivalent_to(want, x.ndim), f"{when}: param {jax.tree_util.keystr(path)}"
        mirrors = _mirrors(params, state)
        if not mirrors:  # a state with per-parameter arrays must have them found, or the check is vacuous
            assert not any(np.ndim(x) for x in jax.tree.leaves(state)), f"{name}: no opt-state leaf mirrors a param"
        for key, leaf, p_key in mirrors:
            assert leaf.sharding.is_equivalent_to(by_key[p_key], leaf.ndim), (
                f"{name} {when}: opt_state{key} has {leaf.sharding.spec}, its param {p_key} {by_key[p_key].spec}"
            )

    assert_sharded(params, state, "after init")

    @jit  # no shardings pinned: XLA's propagation decides, and the state must come out sharded
    def step(params, state, x, y):
        grads = value_and_grad(name, params, state, x, y)[1]
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        x, y = (jax.device_put(a, batch_sharding(mesh, a.ndim)) for a in (xs[i], ys[i]))
        params, state = step(params, state, x, y)
        assert_sharded(params, state, f"after update {i + 1}")
    chex.assert_tree_all_finite(state)


CONTRACT_CHECKS = {
    "jit_extra_args": check_jit_extra_args,
    "inject_hyperparams": check_inject_hyperparams,
    "multisteps": check_multisteps,
    "chain_clip": check_chain_clip,
    "dtypes": check_dtypes,
    "convergence": check_convergence,
    "sharding": check_sharding,
}

#: (check, method) pairs that fail today, with the measured cause. strict: a fix turns them into failures
#: (XPASS) until the entry is removed.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params():
    out = []
    for check in CONTRACT_CHECKS:
        for name, hyper in CONTRACT_CASES:
            reason = KNOWN_FAILURES.get((check, name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(check, name, hyper, marks=marks, id=f"{check}-{name}"))
    return out


@pytest.mark.parametrize(("check", "name", "hyper"), _params())
def test_contract(check, name, hyper):
    CONTRACT_CHECKS[check](name, hyper)


# ----------------------------------------------------------------------------------- registry coverage


def missing_cases(cases) -> list[str]:
    named = {name for name, _ in cases}
    return sorted(set(METHODS) - named)


def _missing_message(missing):
    return (
        f"registered method(s) {missing} have no entry in tests/test_contract.py CONTRACT_CASES; add one line "
        f"per method, e.g. ({missing[0]!r}, {{...hyper-parameters for a 16x8 least-squares problem...}})"
    )


def test_every_registered_method_has_a_contract_case():
    missing = missing_cases(CONTRACT_CASES)
    assert not missing, _missing_message(missing)
    assert len({n for n, _ in CONTRACT_CASES}) == len(CONTRACT_CASES), "duplicate case names"


TOY = "toy_signum"

#: A tiny flow-matching run (tests/test_training.py's config, shrunk) for ``jaxlab train``.
TOY_RUN = {
    "name": "toy",
    "seed": 0,
    "data": {"name": "two_moons", "batch_size": 32, "eval_size": 64},
    "model": {"name": "velocity_mlp", "options": {"hidden": 16, "depth": 2, "time_dim": 8}},
    "optim": {"name": TOY, "learning_rate": 1e-2},
    "task": {"name": "flow_matching", "options": {"sample_steps": 2, "sw_projections": 8}},
    "train": {"steps": 6, "log_every": 1, "eval_every": 0, "ckpt_every": 0, "progress": False},
    "mesh": {"data": 1},
}


@pytest.fixture
def toy_method():
    """Signum (sign of the momentum, Bernstein et al. 2018) registered in one line; unregistered after."""
    try:
        register_method(TOY, lambda learning_rate, b1=0.9: optax.chain(optax.trace(b1), optax.scale_by_sign(), optax.scale_by_learning_rate(learning_rate)))  # noqa: E501
        yield TOY
    finally:
        METHODS.pop(TOY, None)
        _REFERENCE.pop(TOY, None)


def test_one_line_method_runs_the_contract_composition_and_jaxlab_train(toy_method, tmp_path, eight_devices):
    missing = missing_cases(CONTRACT_CASES)
    assert missing == [toy_method], "the coverage test must flag a newly registered method"
    assert toy_method in _missing_message(missing)
    cases = CONTRACT_CASES + [(toy_method, {"b1": 0.9})]
    assert not missing_cases(cases)
    name, hyper = cases[-1]
    for check in CONTRACT_CHECKS.values():
        check(name, hyper)

    # the composition matrix: single device == pmap == mesh DP == mesh FSDP == shard_map, one trace each
    from test_composition import check_all_modes_agree, method_case

    check_all_modes_agree(name, method_case(name, **hyper), eight_devices)

    cfg = load_config(base=TOY_RUN, sets=[f"out_dir={tmp_path}"])
    state, _ = train(cfg, devices=jax.devices()[:1])
    assert int(state.step) == 6
    assert type(state.opt_state[0]).__name__ == "TraceState"  # the toy method's state: it really ran
    rows = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert len(rows) >= 2 and all(np.isfinite(r["loss"]) for r in rows)
