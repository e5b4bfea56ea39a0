"""STEP (step_adamw) semantics, pinned against independent reference computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab import nm
from jaxlab.transforms import (
    StepState,
    find_states,
    nm_static_args,
    prune,
    sparse_forward_params,
    step_adamw,
    step_phase,
    step_statistics,
    step_switch_step,
)
from jaxlab.transforms.step import autoswitch, frozen_v_direction, z_rows, z_statistic

B1, B2, EPS = 0.9, 0.99, 1e-8


def make_params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": 0.1 * jax.random.normal(k[1], (6,))},
        "conv": {"kernel": jax.random.normal(k[2], (3, 3, 4, 2))},
        "embed": {"embedding": jax.random.normal(k[3], (5, 8))},
    }


def grads_at(params, i):
    """Deterministic, param-dependent pseudo-gradients (varying in size, so v moves)."""
    return jax.tree.map(lambda x: jnp.sin(3.0 * x + 0.7 * i) * (1.0 + 0.5 * np.cos(i)), params)


def run(tx, params, steps, grad_fn=grads_at, jit=True):
    state = tx.init(params)
    upd = jax.jit(tx.update) if jit else tx.update
    hist = []
    for i in range(steps):
        g = grad_fn(params, i)
        u, new_state = upd(g, state, params)
        hist.append(dict(g=g, u=u, params=params, state=state, new_state=new_state))
        params = optax.apply_updates(params, u)
        state = new_state
    return params, state, hist


def inner(state) -> StepState:
    return find_states(state, StepState)[0]


def close(a, b, rtol=1e-6, atol=1e-7):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_phase1_equals_optax_adamw():
    params = make_params()
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    tx = step_adamw(sched, n=2, m=4, b1=B1, b2=B2, eps=EPS, weight_decay=0.05, switch_eps=0.0, t_min=100, t_max=100)
    ref = optax.adamw(sched, b1=B1, b2=B2, eps=EPS, weight_decay=0.05)
    p, s, hist = run(tx, params, 8)
    p_ref, s_ref, hist_ref = run(ref, params, 8)
    for h, r in zip(hist, hist_ref):
        close(h["u"], r["u"])
    close(p, p_ref)
    close(inner(s).mu, s_ref[0].mu)
    close(inner(s).nu, s_ref[0].nu)
    assert int(step_phase(s)) == 0 and int(step_switch_step(s)) == -1
    # forward params are the dense params in phase 1 (exactly)
    for a, b in zip(jax.tree.leaves(sparse_forward_params(p, s)), jax.tree.leaves(p)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_after_switch_frozen_nu_moving_mu_and_update_formula():
    params = make_params(1)
    lr, wd, lam = 3e-3, 0.01, 2e-4
    tx = step_adamw(lr, n=2, m=4, b1=B1, b2=B2, eps=EPS, weight_decay=wd, switch_eps=0.0, t_min=1, t_max=3,
                    sr_ste_lambda=lam, bias_correct_frozen_v=False)  # the reference reading
    _, s, hist = run(tx, params, 8)
    assert int(step_switch_step(s)) == 4  # first t with t > t_max
    sw = [int(inner(h["new_state"]).phase) for h in hist]
    assert sw == [0, 0, 0, 1, 1, 1, 1, 1]
    nu_T0 = inner(hist[3]["new_state"]).nu
    eps_f = EPS**0.75
    for k in range(4, 8):
        h = hist[k]
        prev, new = inner(h["state"]), inner(h["new_state"])
        t = k + 1
        # frozen v on sparsifiable leaves; live v elsewhere; mu moves everywhere
        for name in ("dense", "conv"):
            np.testing.assert_array_equal(np.asarray(new.nu[name]["kernel"]), np.asarray(nu_T0[name]["kernel"]))
        assert not np.allclose(new.nu["dense"]["bias"], prev.nu["dense"]["bias"])
        assert not np.allclose(new.nu["embed"]["embedding"], prev.nu["embed"]["embedding"])
        for a, b in zip(jax.tree.leaves(new.mu), jax.tree.leaves(prev.mu)):
            assert not np.allclose(a, b)
        # independent NumPy formula for the sparse leaves
        for name in ("dense", "conv"):
            w = np.asarray(h["params"][name]["kernel"], np.float64)
            g = np.asarray(h["g"][name]["kernel"], np.float64)
            axis = 0 if w.ndim == 2 else 2
            mask = np.asarray(nm.nm_mask(jnp.asarray(w, jnp.float32), 2, 4, axis))
            g_ref = g + lam * (1 - mask) * w
            mu = B1 * np.asarray(prev.mu[name]["kernel"]) + (1 - B1) * g_ref
            np.testing.assert_allclose(np.asarray(new.mu[name]["kernel"]), mu, rtol=1e-5, atol=1e-8)
            d = (mu / (1 - B1**t)) / (np.sqrt(np.asarray(nu_T0[name]["kernel"])) + eps_f)
            np.testing.assert_allclose(np.asarray(h["u"][name]["kernel"]), -lr * (d + wd * w), rtol=1e-5, atol=1e-8)
        # dense leaves: ordinary AdamW with the global t
        g = np.asarray(h["g"]["dense"]["bias"], np.float64)
        mu = B1 * np.asarray(prev.mu["dense"]["bias"]) + (1 - B1) * g
        nu = B2 * np.asarray(prev.nu["dense"]["bias"]) + (1 - B2) * g * g
        d = (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
        w = np.asarray(h["params"]["dense"]["bias"])
        np.testing.assert_allclose(np.asarray(h["u"]["dense"]["bias"]), -lr * (d + wd * w), rtol=1e-5, atol=1e-8)


def test_frozen_v_flags_bias_correction_and_eps():
    params = make_params(2)
    kw = dict(n=1, m=4, b1=B1, b2=B2, switch_eps=0.0, t_min=0, t_max=2, sr_ste_lambda=0.0)
    _, s, hist = run(step_adamw(1.0, bias_correct_frozen_v=True, eps_frozen=1e-3, **kw), params, 5)
    h = hist[4]
    t, t0 = 5, 3
    mu = np.asarray(inner(h["new_state"]).mu["dense"]["kernel"])
    v = np.asarray(inner(h["new_state"]).nu["dense"]["kernel"])
    d = (mu / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t0)) + 1e-3)
    np.testing.assert_allclose(np.asarray(h["u"]["dense"]["kernel"]), -d, rtol=1e-5)


@pytest.mark.parametrize("z_every,window", [(3, 7), (2, 4)])
def test_z_every_samples_the_same_window_in_time(z_every, window):
    """Zbar with z_every = k is the mean of the per-step Z_t at the sampled steps t % k == 0 of the window."""
    params = make_params(1)
    kw = dict(b2=0.9, switch_eps=0.0, t_min=50, t_max=50, window=window)
    _, _, every = run(step_adamw(1e-3, **kw), params, 14)
    _, _, sampled = run(step_adamw(1e-3, z_every=z_every, **kw), params, 14)
    z = [float(inner(h["new_state"]).z) for h in every]  # Z_t, t = 1..14 (phase 1: same trajectory)
    samples = -(-window // z_every)  # ceil: the buffer length
    for t, h in enumerate(sampled, start=1):
        s = inner(h["new_state"])
        picked = [z[u - 1] for u in range(1, t + 1) if u % z_every == 0][-samples:]
        if not picked:
            assert np.isinf(float(s.zbar))
        else:
            np.testing.assert_allclose(float(s.zbar), np.mean(picked), rtol=1e-6)
        assert s.z_buffer.shape == (samples,)
    # the updates do not depend on the sampling (phase 1 is AdamW either way)
    close(every[-1]["u"], sampled[-1]["u"], rtol=0, atol=0)


@pytest.mark.parametrize("shape,stride", [((7, 2), 3), ((12, 5), 4), ((3, 3, 4, 2), 5), ((10,), 3), ((2, 3), 4)])
def test_z_rows_visit_every_row_exactly_once_over_a_rotation(shape, stride):
    """The samples of offsets 0..k-1 partition the rows (leading axes flattened); offset o is rows o::k."""
    x = jnp.arange(int(np.prod(shape)), dtype=jnp.float32).reshape(shape)
    x2 = np.asarray(x).reshape(-1, 1) if len(shape) < 2 else np.asarray(x).reshape(-1, shape[-1])
    seen = []
    for o in range(stride):
        rows, valid = jax.jit(z_rows, static_argnums=1)(x, stride, jnp.int32(o))
        rows = np.asarray(rows)[np.ones(len(rows), bool) if valid is None else np.asarray(valid)]
        np.testing.assert_array_equal(rows, x2[o::stride])
        seen.append(rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen), axis=0), x2)


def test_z_statistic_rotation_averages_to_the_full_statistic():
    """With k dividing every leaf's rows, the mean over the k offsets of the sampled Z is the full Z."""
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    gs = [jax.random.normal(k[0], (8, 6)), jax.random.normal(k[1], (12, 4))]
    nus = [jax.random.uniform(k[2], (8, 6)), jax.random.uniform(k[3], (12, 4))]
    for geometric in (False, True):
        full = float(z_statistic(gs, nus, B2, geometric=geometric))
        sampled = [float(z_statistic(gs, nus, B2, geometric=geometric, stride=4, offset=o)) for o in range(4)]
        avg = np.exp(np.mean(np.log(sampled))) if geometric else np.mean(sampled)
        np.testing.assert_allclose(avg, full, rtol=1e-5)
        assert max(abs(z / full - 1) for z in sampled) > 1e-3  # each sample alone is not the full statistic


def test_z_stride_measures_the_rotating_row_sample():
    """Z_t with z_stride = k: the mean of (1-b2)/b2 |g^2 - v_t| over rows (t mod k)::k of every N:M leaf."""
    params, k = make_params(1), 3
    kw = dict(b2=0.9, switch_eps=0.0, t_min=50, t_max=50)
    _, _, ref = run(step_adamw(1e-3, **kw), params, 7)
    _, _, hist = run(step_adamw(1e-3, z_stride=k, **kw), params, 7)
    for t, h in enumerate(hist, start=1):
        s = inner(h["new_state"])
        terms = []
        for name in ("dense", "conv"):  # the N:M leaves (the embedding is not a kernel)
            g, nu = (np.asarray(x[name]["kernel"], np.float64) for x in (h["g"], s.nu))
            d = (1 - 0.9) / 0.9 * np.abs(g * g - nu)
            terms.append(d.reshape(-1, d.shape[-1])[t % k::k].ravel())
        np.testing.assert_allclose(float(s.z), np.concatenate(terms).mean(), rtol=1e-5)
        close(h["u"], ref[t - 1]["u"], rtol=0, atol=0)  # phase 1 does not depend on the sampling
    with pytest.raises(ValueError, match="z_stride must be >= 1, got 0"):
        step_adamw(1e-3, t_min=0, t_max=5, z_stride=0)
    with pytest.raises(ValueError, match="z_rows: stride must be >= 1, got 0"):
        z_rows(jnp.zeros((4, 2)), 0)


def test_defaults_switch_at_adam_eps_and_bias_correct_the_frozen_v():
    """switch_eps=None is Adam's eps; the frozen v_T0 is divided by 1 - b2^T0 unless asked otherwise."""
    params = make_params(2)
    # Zbar of these O(1) gradients is far below eps = 10 and far above eps = 1e-12: the default switches at
    # t_min + 1 with the first and at t_max + 1 with the second (as an explicit threshold equal to eps does)
    for eps, t0 in ((10.0, 3), (1e-12, 6)):
        _, s, _ = run(step_adamw(1e-3, eps=eps, t_min=2, t_max=5, window=2), params, 8)
        _, s_explicit, _ = run(step_adamw(1e-3, eps=eps, switch_eps=eps, t_min=2, t_max=5, window=2), params, 8)
        assert int(step_switch_step(s)) == int(step_switch_step(s_explicit)) == t0
    kw = dict(n=1, m=4, b1=B1, b2=B2, switch_eps=0.0, t_min=0, t_max=2, sr_ste_lambda=0.0, eps_frozen=1e-3)
    u = {flag: run(step_adamw(1.0, **({} if flag is None else {"bias_correct_frozen_v": flag}), **kw),
                   params, 5)[2][4]["u"]["dense"]["kernel"] for flag in (None, True, False)}
    np.testing.assert_array_equal(np.asarray(u[None]), np.asarray(u[True]))
    # uncorrected: the denominator sqrt(v_T0) is smaller by sqrt(1 - b2^T0), so steps are larger
    assert float(jnp.abs(u[False]).mean()) > 1.5 * float(jnp.abs(u[True]).mean())


def np_delta_v(g, v_prev, b2):
    """|v_t - v_{t-1}| per element, in float64 from the raw gradient and the previous moment."""
    g, v_prev = np.asarray(g, np.float64), np.asarray(v_prev, np.float64)
    return np.abs((1 - b2) * (g * g - v_prev))


def np_z(deltas, statistic):
    """Z_t over all elements of the sparsifiable leaves: arithmetic or geometric (floored at 1e-30) mean."""
    d = np.concatenate([x.ravel() for x in deltas])
    return d.mean() if statistic == "mean" else np.exp(np.log(np.maximum(d, 1e-30)).mean())


@pytest.mark.parametrize("statistic", ["mean", "geometric"])
@pytest.mark.parametrize("b2", [B2, 0.0])  # 0: no memory, Z from the old moment (no back-substitution)
def test_z_per_step_statistic_and_windowed_mean(b2, statistic):
    """Z_t is the per-step mean (or per-step geometric mean) over elements of |v_t - v_{t-1}|; Zbar the
    arithmetic mean over the last ``window`` steps, for both statistics."""
    params = make_params(3)
    window = 3

    def grads(p, i):  # step 0 has exact zeros on the dense kernel (|v_1 - v_0| = 0: the floor is exercised)
        g = grads_at(p, i)
        if i == 0:
            g["dense"]["kernel"] = g["dense"]["kernel"].at[:2].set(0.0)
        return g

    tx = step_adamw(1e-3, b2=b2, switch_eps=0.0, t_min=50, t_max=50, window=window, statistic=statistic)
    _, _, hist = run(tx, params, 7, grad_fn=grads)
    zs = []
    for h in hist:
        prev, new = inner(h["state"]), inner(h["new_state"])
        # the independent definition: elementwise |v_t - v_{t-1}| from g_t and v_{t-1}
        deltas = [np_delta_v(h["g"][k]["kernel"], prev.nu[k]["kernel"], b2) for k in ("dense", "conv")]
        # ... which is what the state's moments moved by
        for k, d in zip(("dense", "conv"), deltas):
            moved = np.abs(np.asarray(new.nu[k]["kernel"], np.float64) - np.asarray(prev.nu[k]["kernel"]))
            np.testing.assert_allclose(moved, d, rtol=1e-4, atol=1e-7)
        z = np_z(deltas, statistic)
        zs.append(z)
        np.testing.assert_allclose(float(new.z), z, rtol=1e-4)
        np.testing.assert_allclose(float(new.zbar), np.mean(zs[-window:]), rtol=1e-4)
        assert int(new.z_fill) == min(len(zs), window) and int(new.z_pos) == len(zs) % window
    # the geometric statistic is a per-step mean over elements, not a mean over time of per-step means
    if statistic == "geometric":
        mean_z = [np_z([np_delta_v(h["g"][k]["kernel"], inner(h["state"]).nu[k]["kernel"], b2)
                        for k in ("dense", "conv")], "mean") for h in hist]
        old_rule = np.exp(np.log(mean_z[-window:]).mean())
        assert not np.isclose(float(inner(hist[-1]["new_state"]).zbar), old_rule, rtol=1e-2)


@pytest.mark.parametrize(
    "switch_eps,t_min,t_max,expected",
    [
        (1e9, 4, 10, 5),  # the statistic is always below: the switch waits for t > t_min
        (0.0, 0, 6, 7),  # never below: forced at t = t_max + 1
        (1e9, 0, 10, 1),  # t_min = 0: the first step may switch
    ],
)
def test_switch_respects_t_min_t_max(switch_eps, t_min, t_max, expected):
    tx = step_adamw(1e-3, switch_eps=switch_eps, t_min=t_min, t_max=t_max, window=4)
    _, s, hist = run(tx, make_params(), 12)
    assert int(step_switch_step(s)) == expected
    phases = [int(inner(h["new_state"]).phase) for h in hist]
    assert phases == [0] * (expected - 1) + [1] * (12 - expected + 1)
    assert int(step_statistics(s)["switch_step"]) == expected


def test_switch_by_threshold_between_bounds():
    """With decaying gradients Z falls; the switch happens at the first t > t_min with Zbar < eps."""
    params = make_params(4)
    decay = lambda p, i: jax.tree.map(lambda x: jnp.sin(x + i) * 0.5**i, p)
    tx = step_adamw(1e-3, b2=B2, switch_eps=1e-4, t_min=2, t_max=40, window=2)
    _, s, hist = run(tx, params, 20, grad_fn=decay)
    zbars = [float(inner(h["new_state"]).zbar) for h in hist]
    first = next(t for t, zb in enumerate(zbars, start=1) if zb < 1e-4 and t > 2)
    assert 2 < first < 20
    assert int(step_switch_step(s)) == first


def test_one_compilation_across_the_switch():
    traces = []
    tx = step_adamw(1e-2, switch_eps=0.0, t_min=0, t_max=2)

    @jax.jit
    def update(g, state, params):
        traces.append(1)
        return tx.update(g, state, params)

    params = make_params()
    state = tx.init(params)
    for i in range(6):
        u, state = update(grads_at(params, i), state, params)
        params = optax.apply_updates(params, u)
    assert int(step_phase(state)) == 1 and int(step_switch_step(state)) == 3
    assert len(traces) == 1


def test_sparse_forward_params_and_prune():
    params = make_params(5)
    tx = step_adamw(1e-2, n=1, m=4, switch_eps=0.0, t_min=0, t_max=0)
    p, s, _ = run(tx, params, 2)
    assert int(step_phase(s)) == 1
    fwd = sparse_forward_params(p, s)
    w = p["dense"]["kernel"]
    mask = nm.nm_mask(w, 1, 4, 0)
    np.testing.assert_array_equal(np.asarray(fwd["dense"]["kernel"]), np.asarray(jnp.where(mask, w, 0)))
    np.testing.assert_array_equal(np.asarray(fwd["dense"]["bias"]), np.asarray(p["dense"]["bias"]))
    np.testing.assert_array_equal(np.asarray(fwd["embed"]["embedding"]), np.asarray(p["embed"]["embedding"]))
    # straight-through: the gradient w.r.t. the dense weight is dL/dw_tilde, unmasked
    x = jnp.ones((2, 8))
    g = jax.grad(lambda q: jnp.sum(x @ sparse_forward_params(q, s)["dense"]["kernel"]))(p)
    np.testing.assert_allclose(np.asarray(g["dense"]["kernel"]), 2.0 * np.ones((8, 6)))
    pr = prune(p, s)
    per_group = np.asarray(pr["conv"]["kernel"] != 0).reshape(3, 3, 1, 4, 2).sum(3)
    assert (per_group == 1).all()
    np.testing.assert_array_equal(np.asarray(pr["dense"]["kernel"]), np.asarray(fwd["dense"]["kernel"]))
    # the deployment format round-trips the pruned weights
    c = nm.compress_params(pr, 1, 4)
    np.testing.assert_array_equal(np.asarray(nm.decompress(c["dense"]["kernel"])), np.asarray(pr["dense"]["kernel"]))


def test_composes_with_chain_inject_hyperparams_and_multisteps():
    params = make_params(6)
    kw = dict(n=2, m=4, switch_eps=0.0, t_min=1, t_max=2)
    base = step_adamw(1e-2, **kw)
    # chain: clipping before STEP changes only the gradient it sees
    clip = optax.chain(optax.clip_by_global_norm(1e-3), step_adamw(1e-2, **kw))
    clip_g = lambda p, i: optax.clip_by_global_norm(1e-3).update(grads_at(p, i), optax.EmptyState())[0]
    _, s1, h1 = run(clip, params, 5)
    _, s2, h2 = run(base, params, 5, grad_fn=clip_g)
    for a, b in zip(h1, h2):
        close(a["u"], b["u"])
    assert int(step_switch_step(s1)) == 3
    # inject_hyperparams: learning rate as state; other numeric args static
    inj = optax.inject_hyperparams(step_adamw, static_args=nm_static_args(step_adamw))(
        learning_rate=1e-2, **kw
    )
    _, s3, h3 = run(inj, params, 5)
    for a, b in zip(h3, run(base, params, 5)[2]):
        close(a["u"], b["u"], rtol=1e-5)
    assert int(step_phase(s3)) == 1
    st = inj.init(params)
    st.hyperparams["learning_rate"] = jnp.asarray(2e-2)
    u2, _ = inj.update(grads_at(params, 0), st, params)
    u1, _ = base.update(grads_at(params, 0), base.init(params), params)
    close(u2, jax.tree.map(lambda x: 2 * x, u1), rtol=1e-5)
    # MultiSteps: the inner STEP state advances every k mini-steps on the mean gradient
    ms = optax.MultiSteps(step_adamw(1e-2, **kw), every_k_schedule=2)
    _, s4, h4 = run(ms, params, 6)
    assert int(inner(s4).count) == 3 and int(step_switch_step(s4)) == 3
    mean_g = lambda p, i: jax.tree.map(lambda a, b: (a + b) / 2, grads_at(p, 2 * i), grads_at(p, 2 * i + 1))
    # on the mini-steps that apply, the update equals STEP on the averaged gradient (params fixed in between)
    ref_params = params
    ref_state = base.init(params)
    for k in range(3):
        u_ref, ref_state = base.update(mean_g(ref_params, k), ref_state, ref_params)
        close(h4[2 * k + 1]["u"], u_ref, rtol=1e-5)
        ref_params = optax.apply_updates(ref_params, u_ref)


@pytest.mark.parametrize("b2", [B2, 0.0])
def test_named_pieces_z_statistic_frozen_direction_autoswitch(b2):
    k = jax.random.split(jax.random.PRNGKey(8), 4)
    gs = [jax.random.normal(k[0], (8, 4)), jax.random.normal(k[1], (3, 4))]
    olds = [jax.random.uniform(k[2], (8, 4)), jax.random.uniform(k[3], (3, 4))]
    news = [b2 * v + (1 - b2) * g * g for g, v in zip(gs, olds)]
    # Z_t = mean over all elements of |v_t - v_{t-1}| (from the new moments; the old ones when b2 = 0)
    z = z_statistic(gs, olds if b2 == 0.0 else news, b2)
    delta = np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b)).ravel() for a, b in zip(news, olds)])
    np.testing.assert_allclose(float(z), delta.mean(), rtol=1e-5)
    # geometric: exp of the mean over elements of log max(|v_t - v_{t-1}|, 1e-30)
    zg = z_statistic(gs, olds if b2 == 0.0 else news, b2, geometric=True)
    np.testing.assert_allclose(float(zg), np.exp(np.log(np.maximum(delta, 1e-30)).mean()), rtol=1e-4)
    # live direction = optax's Adam direction; frozen = m_hat / (sqrt(v_T0) + eps_frozen), v_T0 not corrected
    kw = dict(b1=B1, b2=b2, eps=EPS, eps_frozen=1e-4, bias_correct_frozen_v=False)
    t, mus = jnp.asarray(5, jnp.int32), [0.1 * g for g in gs]
    live = frozen_v_direction(mus, news, t, False, jnp.asarray(-1), **kw)
    mu_old = [(m - (1 - B1) * g) / B1 for m, g in zip(mus, gs)]  # so that optax's m_t is mus
    ref, _ = optax.scale_by_adam(b1=B1, b2=b2, eps=EPS).update(gs, optax.ScaleByAdamState(t - 1, mu_old, olds))
    close(live, ref, rtol=1e-5)
    frozen = frozen_v_direction(mus, olds, t, jnp.asarray(True), jnp.asarray(3), **kw)
    close(frozen, [(m / (1 - B1**5)) / (jnp.sqrt(v) + 1e-4) for m, v in zip(mus, olds)], rtol=1e-6)
    # AutoSwitch: a no-op in phase 2; in phase 1 it records Z_t and switches by the rule
    p1 = inner(step_adamw(1e-3, switch_eps=1.0, t_min=2, t_max=9, window=2).init(make_params()))
    p2 = p1._replace(phase=jnp.asarray(1, jnp.int32), switch_step=jnp.asarray(4, jnp.int32))
    for a, b in zip(jax.tree.leaves(autoswitch(p2, jnp.float32(0.5), jnp.asarray(7), window=2,
                                               switch_eps=1.0, t_min=2, t_max=9)), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rule = dict(window=2, switch_eps=1.0, t_min=2, t_max=9)
    s = autoswitch(p1, jnp.float32(0.5), jnp.asarray(2), **rule)  # Zbar < eps but t <= t_min: no switch
    assert int(s.phase) == 0 and float(s.zbar) == 0.5 and int(s.z_fill) == 1 and int(s.z_pos) == 1
    s = autoswitch(s, jnp.float32(0.25), jnp.asarray(3), **rule)
    assert int(s.phase) == 1 and int(s.switch_step) == 3 and float(s.zbar) == 0.375 and int(s.z_pos) == 0
    s = autoswitch(p1, jnp.float32(5.0), jnp.asarray(10), **rule)  # above the threshold, but t > t_max
    assert int(s.phase) == 1 and int(s.switch_step) == 10


def test_bad_arguments():
    params = make_params()
    with pytest.raises(ValueError, match="1 <= n <= m"):
        step_adamw(1e-3, n=5, m=4, switch_eps=0.0, t_min=0, t_max=1)
    with pytest.raises(ValueError, match="t_min=10 must be <= t_max=5"):
        step_adamw(1e-3, switch_eps=0.0, t_min=10, t_max=5)
    with pytest.raises(TypeError):
        step_adamw(1e-3, switch_eps=0.0, t_max=5)  # t_min (and t_max) are required
    with pytest.raises(ValueError, match="statistic"):
        step_adamw(1e-3, switch_eps=0.0, t_min=0, t_max=5, statistic="median")
    with pytest.raises(TypeError, match="switch_eps must be a number, got the string '3e-8'"):
        step_adamw(1e-3, t_min=0, t_max=5, switch_eps="3e-8")
    with pytest.raises(ValueError, match="z_every must be >= 1, got 0"):
        step_adamw(1e-3, t_min=0, t_max=5, z_every=0)
    # a group size without a packed index format fails when the optimizer is built, not at export
    for m in (3, 32):
        with pytest.raises(ValueError, match=rf"1:{m} sparsity \(n=1, m={m}\).*supported M: \(2, 4, 8, 16\)"):
            step_adamw(1e-3, n=1, m=m, switch_eps=0.0, t_min=0, t_max=5)
    forced = step_adamw(1e-3, m=4, switch_eps=0.0, t_min=0, t_max=5, sparsify=lambda p, x: x.ndim >= 2)
    with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\]: shape \(5, 8\) has length 5 on axis 0"):
        forced.init(params)
    tx = step_adamw(1e-3, switch_eps=0.0, t_min=0, t_max=5)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="no parameter was selected"):
        tx.init({"bias": jnp.zeros(4)})
    with pytest.raises(ValueError, match="no N:M optimizer state"):
        sparse_forward_params(params, optax.adam(1e-3).init(params))


def test_z_statistic_traces_for_more_than_2_31_elements():
    """8B-parameter models have more elements than an int32 holds: the mean must not divide by an int."""
    from jaxlab.transforms.step import z_statistic

    big = [jax.ShapeDtypeStruct((2**16, 2**15), jnp.bfloat16)] * 3  # 6.4e9 elements in all
    for geometric in (False, True):
        out = jax.eval_shape(lambda g, v, geo=geometric: z_statistic(g, v, 0.999, geometric=geo), big, big)
        assert out.shape == () and out.dtype == jnp.float32
