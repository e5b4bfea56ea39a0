"""step_adamw over a whole run (both phases, the AutoSwitch in between) equals a straightforward NumPy
float64 transcription of the spec, step by step: updates, moments, Z_t, Zbar, the phase and the switch step.

It pins the numbers of the implementation, whatever shape its update takes for speed (how the Z_t
reduction and the phase-2-only SR-STE work are arranged), to float32 tolerance.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.transforms import StepState, find_states, step_adamw

B1, B2, EPS, LR, WD, LAM = 0.9, 0.9, 1e-8, 1e-2, 0.01, 2e-4
N, M, T_MIN, T_MAX, WINDOW = 2, 4, 5, 45, 4
SWITCH_EPS = 2e-3  # Zbar crosses it between t_min and t_max on these gradients (asserted below)
STEPS = 50


def make_params():
    k = jax.random.split(jax.random.PRNGKey(11), 4)
    return {
        "dense": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": 0.1 * jax.random.normal(k[1], (6,))},
        "conv": {"kernel": jax.random.normal(k[2], (3, 3, 4, 2))},
        "embed": {"embedding": jax.random.normal(k[3], (5, 8))},
    }


def grads_at(params, i):
    """Param-dependent gradients that shrink over time, so that Z_t decays and the threshold fires."""
    return jax.tree.map(lambda x: jnp.sin(3.0 * x + 0.7 * i) * (0.2 + 0.8 * 0.85**i), params)


def np_pruned(w, axis):
    """Independent N:M mask complement: per group of M along ``axis`` keep the N largest |w| (lower index on ties)."""
    x = np.moveaxis(w, axis, 0)
    g = x.reshape((x.shape[0] // M, M) + x.shape[1:])
    order = np.argsort(-np.abs(g), axis=1, kind="stable")
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[:, :N], True, axis=1)
    return np.moveaxis(~keep.reshape(x.shape), 0, axis)


SPARSE = {("dense", "kernel"): 0, ("conv", "kernel"): 2}  # the default selection and reduction axes


def test_step_adamw_equals_a_float64_transcription_over_a_run_with_a_switch():
    tx = step_adamw(LR, n=N, m=M, b1=B1, b2=B2, eps=EPS, weight_decay=WD, switch_eps=SWITCH_EPS,
                    t_min=T_MIN, t_max=T_MAX, window=WINDOW, sr_ste_lambda=LAM)
    params = make_params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    paths = [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    get = lambda tree, path: np.asarray(tree[path[0]][path[1]], np.float64)

    # the reference's own state, carried in float64 (moments start at the implementation's zeros)
    mu = {p: np.zeros(get(params, p).shape) for p in paths}
    nu = {p: np.zeros(get(params, p).shape) for p in paths}
    phase, t0, zs = 0, -1, []
    eps_frozen = EPS**0.75
    for i in range(STEPS):
        t = i + 1
        g_tree = grads_at(params, i)
        u_tree, state = update(g_tree, state, params)
        s = find_states(state, StepState)[0]
        deltas, upd = [], {}
        for p in paths:
            w, g = get(params, p), get(g_tree, p)
            sparse = p in SPARSE
            g_m = g + LAM * np_pruned(w, SPARSE[p]) * w if (sparse and phase == 1) else g
            mu[p] = B1 * mu[p] + (1 - B1) * g_m
            if sparse and phase == 1:  # frozen v_T0, bias-corrected with T0 (the default), eps^(3/4)
                d = (mu[p] / (1 - B1**t)) / (np.sqrt(nu[p] / (1 - B2**t0)) + eps_frozen)
            else:
                nu_new = B2 * nu[p] + (1 - B2) * g * g
                if sparse:
                    deltas.append(np.abs(nu_new - nu[p]).ravel())
                nu[p] = nu_new
                d = (mu[p] / (1 - B1**t)) / (np.sqrt(nu[p] / (1 - B2**t)) + EPS)
            upd[p] = -LR * (d + WD * w)
        if phase == 0:  # AutoSwitch: Z_t over all sparse elements, Zbar over the last WINDOW values
            zs.append(np.concatenate(deltas).mean())
            zbar = np.mean(zs[-WINDOW:])
            np.testing.assert_allclose(float(s.z), zs[-1], rtol=2e-5, err_msg=f"Z at t={t}")
            np.testing.assert_allclose(float(s.zbar), zbar, rtol=2e-5, err_msg=f"Zbar at t={t}")
            if (zbar < SWITCH_EPS and t > T_MIN) or t > T_MAX:
                phase, t0 = 1, t
        assert int(s.phase) == phase and int(s.switch_step) == t0, f"phase/switch step at t={t}"
        assert int(s.count) == t
        for p in paths:  # float32 tolerance, relative to each array's scale (m_t cancels towards 0 in places)
            for name, a, b in (("update", u_tree, upd), ("mu", s.mu, mu), ("nu", s.nu, nu)):
                np.testing.assert_allclose(get(a, p), b[p], rtol=2e-5, atol=1e-5 * np.abs(b[p]).max(),
                                           err_msg=f"{name} {p} at t={t}")
        params = optax.apply_updates(params, u_tree)
        # the implementation's params drive both (so float32 rounding in w cannot accumulate into the masks)
    assert T_MIN < t0 <= T_MAX, f"the switch must fire by the threshold, got T0={t0}"
    assert STEPS - t0 >= 10, "enough phase-2 steps to exercise the frozen v and the SR-STE term"
