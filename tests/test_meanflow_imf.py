"""Improved MeanFlow (iMF) as options of meanflow_loss: auxiliary v-head, vhat="head", guidance conditioning.

The reference is an independent transcription of the official iMF training step (Lyy-iiis/imeanflow,
``imf.py``: ``sample_cfg_scale``, ``sample_cfg_interval``, ``guidance_fn``, ``cond_drop``, ``forward``),
written here in plain jnp on fixed inputs, against which the library's loss value and parameter gradients
are compared.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.losses import (
    MeanFlowConfig,
    conditioned_guided_velocity,
    logit_normal_time_pairs,
    meanflow_loss,
    meanflow_sample,
    sample_guidance_conditions,
)
from jaxlab.nn import DiT

NUM_CLASSES = 3
NULL = NUM_CLASSES
B, N_EQ, N_DROP = 8, 4, 2

# ---------------------------------------------------------------- a toy two-head model with guidance inputs
# net(z, t, h, omega, t_min, t_max, y) -> (u, v), the official imfDiT argument order (h = t - r).


def toy_params(seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    n = lambda k, s, sc=0.5: sc * jax.random.normal(k, s)
    return {"A": n(ks[0], (2, 6)), "b": n(ks[1], (NUM_CLASSES + 1, 6), 1.0), "kh": n(ks[2], (6,)),
            "kt": n(ks[3], (6,)), "m": n(ks[4], (6,)), "n1": n(ks[5], (6,)), "n2": n(ks[6], (6,)),
            "U": n(ks[7], (6, 2)), "V": n(ks[8], (6, 2)), "C": n(ks[9], (2, 2))}


def toy_net(p, z, t, h, omega, t_min, t_max, y):
    col = lambda a: a[:, None]
    feat = jnp.tanh(z @ p["A"] + p["b"][y] + col(h) * p["kh"] + col(t) * p["kt"] + col(1 - 1 / omega) * p["m"]
                    + col(t_min) * p["n1"] + col(t_max) * p["n2"])
    return feat @ p["U"], feat @ p["V"] + z @ p["C"]


def toy_apply(p, z, r, t, y, *, omega, interval):
    """The jaxlab protocol: ``apply_fn(params, z, r, t, y, omega=, interval=) -> (u, v_aux)``."""
    return toy_net(p, z, t, t - r, omega, interval[0], interval[1], y)


def fixed_inputs():
    kx, ke = jax.random.split(jax.random.PRNGKey(7))
    x, e = jax.random.normal(kx, (B, 2)), jax.random.normal(ke, (B, 2))
    t = jnp.array([0.3, 0.7, 0.45, 0.9, 0.35, 0.6, 0.8, 0.55])
    r = jnp.array([0.3, 0.7, 0.45, 0.9, 0.1, 0.2, 0.5, 0.05])  # rows 0-3: r = t (the flow-matching prefix)
    y = jnp.array([0, 1, 2, 0, 1, 2, 0, 1], jnp.int32)
    omega = jnp.array([1.5, 7.0, 3.0, 2.0, 5.0, 1.2, 6.0, 4.0])
    # rows 2 and 3 (r = t) and row 6 (r < t) have t outside their drawn interval
    lo = jnp.array([0.1, 0.2, 0.48, 0.4, 0.3, 0.4, 0.1, 0.2])
    hi = jnp.array([0.6, 0.7, 0.6, 0.8, 0.55, 0.9, 0.7, 0.95])
    return x, e, t, r, y, omega, (lo, hi)


def official_imf_loss(p, x, e, t, r, y, omega, t_min, t_max, *, n_eq=N_EQ, n_drop=N_DROP, norm_p=1.0,
                      norm_eps=0.01, v_weight=1.0, v_p=None, v_eps=None, interval_on_fm=False):
    """Transcription of the official iMeanFlow.forward on given (t, r, e, omega, interval, drop count).

    (Extended by ``v_weight``/``v_p``/``v_eps``, the v-term's own weighting, and by ``interval_on_fm``;
    the official code is ``v_weight = 1``, the same ``p``/``eps``, ``interval_on_fm = False``.)
    """
    col = lambda a: a[:, None]
    fm_mask = jnp.arange(x.shape[0]) < n_eq
    z_t = (1 - col(t)) * x + col(t) * e
    v_t = e - x
    if not interval_on_fm:  # sample_cfg_interval: t_min = where(fm_mask, 0, .), t_max = where(fm_mask, 1, .)
        t_min, t_max = jnp.where(fm_mask, 0.0, t_min), jnp.where(fm_mask, 1.0, t_max)

    def v_cond_fn(z, tt, w, yy):  # h = 0, t_min = 0, t_max = 1, the v output
        return toy_net(p, z, tt, jnp.zeros_like(tt), w, jnp.zeros_like(tt), jnp.ones_like(tt), yy)[1]

    # guidance_fn
    v_c = v_cond_fn(z_t, t, omega, y)
    v_u = v_cond_fn(z_t, t, jnp.ones_like(omega), jnp.full_like(y, NULL))
    v_g_fm = v_t + col(1 - 1 / omega) * (v_c - v_u)
    w = jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)
    v_c = v_cond_fn(z_t, t, w, y)
    v_g = v_t + col(1 - 1 / w) * (v_c - v_u)
    if not interval_on_fm:
        v_g = jnp.where(col(fm_mask), v_g_fm, v_g)
    # cond_drop: the first num_drop rows
    drop = jnp.arange(x.shape[0]) < n_drop
    labels = jnp.where(drop, NULL, y)
    v_g = jnp.where(col(drop), v_t, v_g)
    # forward
    u_fn = lambda z, tt, rr: toy_net(p, z, tt, tt - rr, omega, t_min, t_max, labels)
    u, du_dt, v = jax.jvp(u_fn, (z_t, t, r), (v_c, jnp.ones_like(t), jnp.zeros_like(t)), has_aux=True)
    V = u + col(t - r) * jax.lax.stop_gradient(du_dt)
    v_g = jax.lax.stop_gradient(v_g)
    adp = lambda d, pp, eps: d / jax.lax.stop_gradient((d + eps) ** pp)
    loss_u = adp(jnp.sum((V - v_g) ** 2, 1), norm_p, norm_eps)
    loss_v = adp(jnp.sum((v - v_g) ** 2, 1), norm_p if v_p is None else v_p, norm_eps if v_eps is None else v_eps)
    return jnp.mean(loss_u + v_weight * loss_v)


def imf_config(**kw):
    # label_dropout 0.25 of B = 8 -> the first 2 rows (the official code's count is random; here fixed to 2)
    return MeanFlowConfig.imf(num_classes=NUM_CLASSES, label_dropout=0.25, **kw)


def jaxlab_loss(p, cfg, x, e, t, r, y, omega, interval):
    return meanflow_loss(toy_apply, p, x, jax.random.PRNGKey(0), config=cfg, t=t, r=r, noise=e, y=y,
                         omega=omega, interval=interval, prefix=N_EQ)[0]


# ---------------------------------------------------------------- the loss against the transcription


@pytest.mark.parametrize("variant", [
    {},                                                                   # the official setting
    {"aux_v_weight": 0.5, "aux_v_adaptive_p": 0.5, "aux_v_adaptive_c": 0.1, "adaptive_c": 0.05},
    {"guidance_interval_on_fm_rows": True},
])
def test_loss_and_gradients_match_official_transcription(variant):
    x, e, t, r, y, omega, (lo, hi) = fixed_inputs()
    p = toy_params()
    cfg = imf_config(**variant)
    ref_kw = dict(norm_eps=cfg.adaptive_c, v_weight=cfg.aux_v_weight, v_p=cfg.aux_v_adaptive_p,
                  v_eps=cfg.aux_v_adaptive_c, interval_on_fm=cfg.guidance_interval_on_fm_rows)
    ref = lambda p: official_imf_loss(p, x, e, t, r, y, omega, lo, hi, **ref_kw)
    ours = lambda p: jaxlab_loss(p, cfg, x, e, t, r, y, omega, (lo, hi))
    (l_ref, g_ref), (l_ours, g_ours) = jax.jit(jax.value_and_grad(ref))(p), jax.jit(jax.value_and_grad(ours))(p)
    np.testing.assert_allclose(l_ours, l_ref, rtol=1e-5)
    for k in p:
        np.testing.assert_allclose(g_ours[k], g_ref[k], rtol=2e-4, atol=1e-6, err_msg=k)


def test_each_imf_ingredient_changes_the_loss():
    """The head's tangent, the v-term and the interval rule are each live (a wrong wiring would not move it)."""
    x, e, t, r, y, omega, (lo, hi) = fixed_inputs()
    p = toy_params()
    cfgs = [imf_config(), imf_config(vhat="boundary"), imf_config(aux_v_weight=0.0),
            imf_config(guidance_interval_on_fm_rows=True)]
    fs = [jax.jit(lambda p, lo, hi, c=c: jaxlab_loss(p, c, x, e, t, r, y, omega, (lo, hi))) for c in cfgs]
    f = lambda p, lo, hi, i: fs[i](p, lo, hi)
    base, tangent_u, no_v, fm_interval = (float(f(p, lo, hi, i)) for i in range(4))
    assert abs(base - tangent_u) > 1e-4 and abs(base - no_v) > 1e-2 and abs(base - fm_interval) > 1e-4
    # Moving the interval of the r = t rows changes nothing under the official rule (their input is (0, 1)).
    lo2 = lo.at[:N_EQ].set(0.49)
    assert float(f(p, lo2, hi, 0)) == base
    # ... while moving a r < t row's interval so that row 6 (t = 0.8) becomes guided does.
    assert abs(float(f(p, lo, hi.at[6].set(0.85), 0)) - base) > 1e-4


def test_aux_head_with_zero_weight_leaves_the_plain_loss_unchanged():
    """aux_v_head=True, aux_v_weight=0: same loss as the u-only model (fixed lambda and the two-tangent path)."""
    x, e, t, r, y, _, _ = fixed_inputs()
    p = toy_params()

    def u_only(p, z, r, t):
        n = z.shape[0]
        return toy_net(p, z, t, t - r, jnp.ones(n), jnp.zeros(n), jnp.ones(n), jnp.zeros(n, jnp.int32))[0]

    pair = lambda p, z, r, t: (u_only(p, z, r, t), 3.0 * z)
    for lam in (0.5, "auto"):
        kw = dict(jvp_cond_weight=lam, flow_matching_fraction=0.5, adaptive_c=0.01)
        run = lambda fn, cfg: jax.jit(lambda p: meanflow_loss(fn, p, x, jax.random.PRNGKey(3), config=cfg, t=t, r=r,
                                                              noise=e, prefix=N_EQ))(p)
        l0, a0 = run(u_only, MeanFlowConfig(**kw))
        l1, a1 = run(pair, MeanFlowConfig(aux_v_head=True, aux_v_weight=0.0, **kw))
        assert float(l0) == float(l1) == float(a1["loss_u"])
        v_c = e - x
        np.testing.assert_allclose(a1["mse_v"], jnp.mean((3.0 * ((1 - t[:, None]) * x + t[:, None] * e) - v_c) ** 2),
                                   rtol=1e-6)
        assert "loss_v" not in a0 and float(a1["loss_v"]) > 0


# ---------------------------------------------------------------- the guidance conditions


def test_guidance_scale_and_interval_distribution_and_official_power_formula():
    key = jax.random.PRNGKey(11)
    omega, (lo, hi) = sample_guidance_conditions(key, 20000)
    log8 = np.log(8.0)
    lw = np.log(np.asarray(omega))
    assert lw.min() >= 0 and lw.max() <= log8 + 1e-6
    # log-uniform: log omega / log 8 ~ U[0, 1] (mean 1/2, var 1/12; quartiles 1/4, 3/4)
    np.testing.assert_allclose([np.mean(lw / log8), np.var(lw / log8)], [0.5, 1 / 12], atol=0.01)
    np.testing.assert_allclose(np.quantile(lw / log8, [0.25, 0.75]), [0.25, 0.75], atol=0.02)
    lo, hi = np.asarray(lo), np.asarray(hi)
    assert lo.min() >= 0 and lo.max() <= 0.5 and hi.min() >= 0.5 and hi.max() <= 1.0
    np.testing.assert_allclose([lo.mean(), hi.mean()], [0.25, 0.75], atol=0.01)
    # beta != 1: the official sample_cfg_scale formula on the same uniforms (documented key use)
    u = jax.random.uniform(jax.random.split(key, 3)[2], (20000,), jnp.float32)
    for beta in (0.5, 2.0):
        smax, b = 7.0, beta
        official = jnp.exp(jnp.log1p(u * jnp.expm1((1.0 - b) * jnp.log1p(smax))) / (1.0 - b))
        ours, _ = sample_guidance_conditions(key, 20000, beta=beta)
        np.testing.assert_allclose(ours, official, rtol=1e-5)
    np.testing.assert_allclose(omega, jnp.exp(u * jnp.log1p(7.0)), rtol=1e-6)  # beta = 1, official branch


def test_sampled_conditions_use_the_documented_key():
    x, e, t, r, y, _, _ = fixed_inputs()
    p, key = toy_params(), jax.random.PRNGKey(5)
    cfg = imf_config()
    omega, interval = sample_guidance_conditions(jax.random.fold_in(key, 0x494D46), B)
    run = jax.jit(lambda om, iv: meanflow_loss(toy_apply, p, x, key, config=cfg, t=t, r=r, noise=e, y=y,
                                               prefix=N_EQ, omega=om, interval=iv)[0])
    drawn = jax.jit(lambda: meanflow_loss(toy_apply, p, x, key, config=cfg, t=t, r=r, noise=e, y=y, prefix=N_EQ)[0])
    assert float(drawn()) == float(run(omega, interval))
    # official transcription on those drawn conditions
    ref = jax.jit(official_imf_loss)(p, x, e, t, r, y, omega, *interval)
    np.testing.assert_allclose(drawn(), ref, rtol=1e-5)
    # all drawn (times, noise, scale, interval), reproduced from the documented key use
    k_time, k_noise, _ = jax.random.split(key, 3)
    r_s, t_s = logit_normal_time_pairs(k_time, B, flow_matching_fraction=0.5, flow_matching_rounding="floor")
    e_s = jax.random.normal(k_noise, x.shape)
    full = jax.jit(lambda: meanflow_loss(toy_apply, p, x, key, config=cfg, y=y)[0])()
    np.testing.assert_allclose(full, jax.jit(official_imf_loss)(p, x, e_s, t_s, r_s, y, omega, *interval), rtol=1e-5)
    # (that the r = t rows' interval input is (0, 1) is shown by test_each_imf_ingredient_changes_the_loss)


def test_conditioned_guided_velocity_hand_values():
    # V(z, t, t | y, omega) = z + y (omega - 1): the model's guided velocity; null label 3.
    apply = lambda p, z, r, t, y, *, omega, interval: z + (y * (omega - 1.0))[:, None]
    z, t, v_c = jnp.zeros((3, 1)), jnp.array([0.3, 0.9, 0.3]), jnp.ones((3, 1))
    y, omega = jnp.array([2, 2, 1]), jnp.array([4.0, 4.0, 4.0])
    v, bnd, om = conditioned_guided_velocity(apply, None, z, t, v_c, y, omega=omega, null_class=3,
                                             interval=(jnp.full(3, 0.2), jnp.full(3, 0.6)),
                                             drop=jnp.array([False, False, True]))
    # row 0: V_cond = 2 * 3 = 6, V_unc = 0 -> 1 + 0.75 * 6; row 1: outside -> v_c; row 2: dropped -> v_c
    np.testing.assert_allclose(v.ravel(), [5.5, 1.0, 1.0])
    np.testing.assert_allclose(bnd.ravel(), [6.0, 0.0, 0.0])  # dropped row: the null-label velocity
    np.testing.assert_allclose(om, [4.0, 1.0, 1.0])


# ---------------------------------------------------------------- sampling and validation


def test_sampler_passes_guidance_inputs_and_uses_the_u_output():
    def apply(p, z, r, t, y, *, omega, interval):  # exact average velocity toward a point that depends on omega
        target = (omega + interval[0] - interval[1])[:, None] * p
        return (z - target) / t[:, None], jnp.zeros_like(z)

    noise = jnp.array([[0.5, -1.0], [2.0, 1.0]])
    y = jnp.array([0, 1])
    out = meanflow_sample(apply, 1.0, noise, y=y, omega=8.0, interval=(0.4, 0.65))
    np.testing.assert_allclose(out, np.full((2, 2), 8.0 + 0.4 - 0.65), rtol=1e-6)
    out2 = meanflow_sample(apply, 1.0, noise, y=y, steps=2, omega=jnp.array([2.0, 3.0]))  # interval -> (0, 1)
    np.testing.assert_allclose(out2, [[1.0, 1.0], [2.0, 2.0]], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"vhat": "head"}, "MeanFlowConfig.vhat"),
    ({"guidance_conditioning": True}, "MeanFlowConfig.num_classes"),
    ({"guidance_conditioning": True, "num_classes": 3, "guidance_scale": 2.0}, "MeanFlowConfig.guidance_scale"),
    ({"guidance_conditioning": True, "num_classes": 3, "guidance_kappa": 0.5}, "MeanFlowConfig.guidance_kappa"),
    ({"guidance_scale_range": (0.0, 8.0)}, "MeanFlowConfig.guidance_scale_range"),
    ({"guidance_t_hi_range": (0.5, 1.5)}, "MeanFlowConfig.guidance_t_hi_range"),
    ({"aux_v_weight": -1.0}, "MeanFlowConfig.aux_v_weight"),
    ({"aux_v_adaptive_c": 0.0}, "MeanFlowConfig.aux_v_adaptive_c"),
])
def test_bad_imf_options_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeanFlowConfig(**kwargs)


def test_bad_calls_raise():
    x, e, t, r, y, omega, interval = fixed_inputs()
    p = toy_params()
    with pytest.raises(ValueError, match="guidance_conditioning=True; it is off"):
        meanflow_loss(lambda p, z, r, t: z, p, x, jax.random.PRNGKey(0), omega=omega)
    with pytest.raises(ValueError, match="apply_fn to return a pair"):
        meanflow_loss(lambda p, z, r, t: z, p, x, jax.random.PRNGKey(0), config=MeanFlowConfig(aux_v_head=True))
    with pytest.raises(ValueError, match=r"omega must have shape \(8,\)"):
        meanflow_loss(toy_apply, p, x, jax.random.PRNGKey(0), config=imf_config(), y=y, omega=omega[:3])


# ---------------------------------------------------------------- the bundled DiT


def _tiny_dit(**kw):
    return DiT(patch=2, hidden=16, depth=1, heads=2, time_dim=8, time_scale=1.0, num_classes=NUM_CLASSES, **kw)


def _randomise(tree, skip=None):
    """Random values in the zero leaves (adaLN-zero, zero-init projections), except paths containing ``skip``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.PRNGKey(2), len(flat))
    new = [leaf if skip is not None and skip in jax.tree_util.keystr(path) else
           jnp.where(leaf == 0, 0.1 * jax.random.normal(k, leaf.shape), leaf) for (path, leaf), k in zip(flat, keys)]
    return jax.tree_util.tree_unflatten(treedef, new)


def test_dit_guidance_inputs_run_and_conditioning_starts_at_zero():
    """Cheap default check (one compile): init and apply with the inputs; the conditioning's projection and the
    v-head start at zero, so the new inputs leave the network unchanged at initialisation."""
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
    r, t, y, omega = jnp.array([0.1, 0.5]), jnp.array([0.6, 0.5]), jnp.array([0, 3]), jnp.array([2.0, 8.0])
    m = _tiny_dit(guidance_conditioning=True, aux_v_head=True)

    @jax.jit
    def run():
        params = m.init(jax.random.PRNGKey(0), z, r, t, y, omega=omega, interval=(0.3, 0.7))
        return params, m.apply(params, z, r, t, y, omega=omega, interval=(0.3, 0.7))

    params, (u, v) = run()
    p = nn.unbox(params)["params"]
    assert {"omega_embed", "t_lo_embed", "t_hi_embed", "guidance_proj", "v_final", "v_final_adaLN"} <= set(p)
    for leaf in jax.tree.leaves(p["guidance_proj"]):
        np.testing.assert_array_equal(leaf, 0.0)
    assert u.shape == v.shape == z.shape and float(jnp.abs(u).max()) == float(jnp.abs(v).max()) == 0.0


# slow: compiles three DiT forwards and an init (7 s on a quiet 2-core box, ~20 s loaded); the default test above checks
# the zero start structurally, this one checks the behaviour (identity vs the plain DiT, inputs reach u)
@pytest.mark.slow
def test_dit_guidance_conditioning_is_identity_safe_at_init():
    # Rows are independent, so the input variants are rows of one batch (one compile of each model).
    z = jnp.tile(jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 1)), (4, 1, 1, 1))
    r, t, y = jnp.full(4, 0.1), jnp.full(4, 0.6), jnp.array([0, 0, 0, 3])
    omega = jnp.array([2.0, 8.0, 2.0, 1.0])
    interval = (jnp.array([0.3, 0.3, 0.3, 0.0]), jnp.array([0.7, 0.7, 0.9, 1.0]))
    m, m0 = _tiny_dit(guidance_conditioning=True, aux_v_head=True), _tiny_dit()
    params = jax.jit(m.init)(jax.random.PRNGKey(0), z, r, t, y)

    @jax.jit
    def outputs(params):
        pr = _randomise(params, skip="guidance_proj")  # guidance_proj stays at its (zero) initial value
        shared = {"params": {k: v for k, v in pr["params"].items() if not k.startswith(
            ("omega_embed", "t_lo_embed", "t_hi_embed", "guidance_proj", "v_final"))}}
        return (m.apply(params, z, r, t, y, omega=omega, interval=interval),
                m.apply(pr, z, r, t, y, omega=omega, interval=interval), m0.apply(shared, z, r, t, y),
                m.apply(_randomise(pr), z, r, t, y, omega=omega, interval=interval)[0])

    (u0, v0), (u1, v1), u_plain, ug = outputs(params)
    assert u0.shape == v0.shape == z.shape and float(jnp.abs(u0).max()) == float(jnp.abs(v0).max()) == 0.0
    # with the conditioning's zero-initialised projection the scale and interval change nothing, and u is
    # the plain DiT's on the shared params (identity-safe); the v-head is a separate output
    np.testing.assert_array_equal(u1[:3], jnp.broadcast_to(u1[:1], u1[:3].shape))
    np.testing.assert_allclose(u1, u_plain, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(u1 - v1).max()) > 1e-4
    # once the projection moves, the scale (rows 0, 1) and the interval (rows 0, 2) reach the output
    assert float(jnp.abs(ug[0] - ug[1]).max()) > 1e-5 and float(jnp.abs(ug[0] - ug[2]).max()) > 1e-5
    with pytest.raises(ValueError, match="guidance_conditioning=False"):
        m0.apply(params, z, r, t, y, omega=2.0)


# slow: the imf loss on a DiT compiles a DiT forward + JVP with two heads (6 s quiet, ~18 s loaded); the loss
# itself is covered on the toy model above and the DiT's conditioning/heads by the test before
@pytest.mark.slow
def test_imf_loss_on_dit_has_finite_gradients_and_samples():
    m = _tiny_dit(guidance_conditioning=True, aux_v_head=True)
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 4, 4, 1))
    y = jnp.arange(8, dtype=jnp.int32) % NUM_CLASSES
    params = jax.jit(m.init)(jax.random.PRNGKey(0), x, jnp.zeros(8), jnp.ones(8), y)
    cfg = MeanFlowConfig.imf(num_classes=NUM_CLASSES)
    f = jax.jit(jax.value_and_grad(lambda p: meanflow_loss(m.apply, p, x, jax.random.PRNGKey(2), config=cfg, y=y)[0]))
    loss, g = f(params)
    assert np.isfinite(float(loss))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(g))
    assert float(jnp.abs(nn.unbox(g)["params"]["v_final"]["kernel"]).max()) > 0  # the v-head term trains the v-head
    out = jax.jit(lambda p: meanflow_sample(m.apply, p, x, y=y, omega=8.0, interval=(0.4, 0.65)))(params)
    assert out.shape == x.shape
