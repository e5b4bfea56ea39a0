"""MeanFlow loss family: reference transcriptions, reductions to flow matching, JVP checks, oracle, errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlab
from jaxlab.losses import (
    MeanFlowConfig,
    adaptive_loss,
    adaptive_weights,
    control_variate_statistics,
    drop_labels,
    flow_matching_loss,
    gmm_oracle,
    guided_velocity,
    jvp_cond_weight_at,
    logit_normal_time_pairs,
    meanflow_init_state,
    meanflow_loss,
    meanflow_metrics,
    meanflow_sample,
    meanflow_target,
    per_row_error,
    target_variance,
    two_tangent_jvp,
    two_tangent_target,
    update_auto_state,
    update_vhat_ema,
    vhat_estimate,
)
from jaxlab.nn import VelocityMLP

B = 32


@pytest.fixture(scope="module")
def model():
    m = VelocityMLP(hidden=32, depth=2, time_dim=16, time_scale=1.0)
    params = m.init(jax.random.PRNGKey(1), jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2))
    return m, params


@pytest.fixture(scope="module")
def batch():
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    x = jaxlab.data.eight_gaussians().sample(k[0], B)
    e = jax.random.normal(k[1], (B, 2))
    a, b = jax.random.uniform(k[2], (B,)), jax.random.uniform(k[3], (B,))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    r = r.at[:8].set(t[:8])  # a few r = t rows mixed in
    return x, e, r, t


def original_meanflow_loss(apply_fn, params, x, e, r, t, p, c, tangent=(None, 0.0, 1.0)):
    """Row-by-row transcription of Geng et al. 2025, Alg. 1 (u_tgt = v - (t - r) (v d_z u + d_t u)).

    Each row is its own single-example computation (a JVP of the network on that row), mapped over the
    rows with vmap and jitted (a Python loop over the rows dispatched every op of every row eagerly)."""

    def row(xi, ei, ri, ti):
        z = (1 - ti) * xi + ti * ei
        v = ei - xi
        f = lambda z_, r_, t_: apply_fn(params, z_[None], r_[None], t_[None])[0]
        tz = v if tangent[0] is None else tangent[0] * v
        u, dudt = jax.jvp(f, (z, ri, ti), (tz, jnp.asarray(tangent[1]), jnp.asarray(tangent[2])))
        u_tgt = jax.lax.stop_gradient(v - (ti - ri) * dudt)
        d = jnp.sum((u - u_tgt) ** 2)
        return d / jax.lax.stop_gradient((d + c) ** p)

    return jnp.mean(jax.jit(jax.vmap(row))(x, e, r, t))


def test_coefficient_one_equals_original_meanflow(model, batch):
    m, params = model
    x, e, r, t = batch
    cfg = MeanFlowConfig(jvp_cond_weight=1.0, adaptive_p=0.75, adaptive_c=1e-3)
    key = jax.random.PRNGKey(0)
    # both jitted (eager grads dispatch every op on its own); the explicit times stay concrete (validated)
    (loss, aux), g = jax.jit(jax.value_and_grad(
        lambda p: meanflow_loss(m.apply, p, x, key, config=cfg, t=t, r=r, noise=e), has_aux=True))(params)
    ref, g_ref = jax.jit(jax.value_and_grad(
        lambda p: original_meanflow_loss(m.apply, p, x, e, r, t, 0.75, 1e-3)))(params)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), g, g_ref)
    assert float(aux["jvp_cond_weight"]) == 1.0
    # The r = t / r != t split of the unweighted MSE follows the rows.
    eq = np.asarray(r == t)
    assert eq.sum() == 8 and float(aux["mse_fm"]) > 0 and float(aux["mse_mf"]) > 0


def test_sampled_prefix_path_matches_transcription(model, batch):
    """Internal sampling: documented key use and static r = t prefix; JVP only on the r != t slice."""
    m, params = model
    x = batch[0]
    cfg = MeanFlowConfig(jvp_cond_weight=1.0, flow_matching_fraction=0.5, time_mu=-0.2, time_sigma=1.2)
    key = jax.random.PRNGKey(3)
    loss, aux = meanflow_loss(m.apply, params, x, key, config=cfg)
    k_time, k_noise, _ = jax.random.split(key, 3)
    r, t = logit_normal_time_pairs(k_time, B, mu=-0.2, sigma=1.2, flow_matching_fraction=0.5)
    e = jax.random.normal(k_noise, x.shape)
    assert bool(jnp.all(r[:16] == t[:16])) and bool(jnp.all(r[16:] < t[16:]))
    ref = original_meanflow_loss(m.apply, params, x, e, r, t, 1.0, 1e-3)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)


def test_r_equals_t_reduces_to_flow_matching(model, batch):
    m, params = model
    x, e, _, t = batch
    fm, _ = flow_matching_loss(m.apply, params, x, jax.random.PRNGKey(0), t=t, noise=e)
    for lam in (0.0, 0.3, 1.0, "auto"):
        # Explicit r = t: every row goes through the JVP, and h = 0 makes the target exactly v_c.
        cfg = MeanFlowConfig(jvp_cond_weight=lam, adaptive_p=0.0)
        loss, aux = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=t, r=t, noise=e)
        np.testing.assert_allclose(loss, fm, rtol=1e-6)
        np.testing.assert_allclose(aux["mse_fm"], aux["mse"], rtol=1e-6)
    # Sampled path with fraction 1: no JVP at all, identical to flow matching at the sampled t.
    cfg = MeanFlowConfig(flow_matching_fraction=1.0, adaptive_p=0.0)
    key = jax.random.PRNGKey(5)
    loss, _ = meanflow_loss(m.apply, params, x, key, config=cfg)
    k_time, k_noise, _ = jax.random.split(key, 3)
    r_s, t_s = logit_normal_time_pairs(k_time, B, flow_matching_fraction=1.0)
    fm_s, _ = flow_matching_loss(m.apply, params, x, key, t=t_s, noise=jax.random.normal(k_noise, x.shape))
    np.testing.assert_allclose(loss, fm_s, rtol=1e-6)
    # "auto" without any r != t row reports its current estimate (auto_init before statistics exist).
    _, aux_a = meanflow_loss(m.apply, params, x, key, config=MeanFlowConfig(
        jvp_cond_weight="auto", flow_matching_fraction=1.0, auto_init=0.7))
    np.testing.assert_allclose(aux_a["jvp_cond_weight"], 0.7)


def test_wrong_tangent_order_changes_loss(model, batch):
    m, params = model
    x, e, r, t = batch
    cfg = MeanFlowConfig(jvp_cond_weight=1.0, adaptive_p=0.0)
    loss, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=t, r=r, noise=e)
    right = original_meanflow_loss(m.apply, params, x, e, r, t, 0.0, 1e-3, tangent=(None, 0.0, 1.0))
    swapped = original_meanflow_loss(m.apply, params, x, e, r, t, 0.0, 1e-3, tangent=(None, 1.0, 0.0))
    both = original_meanflow_loss(m.apply, params, x, e, r, t, 0.0, 1e-3, tangent=(None, 1.0, 1.0))
    np.testing.assert_allclose(loss, right, rtol=1e-5)
    for wrong in (swapped, both):
        assert abs(float(wrong) - float(loss)) > 1e-3 * float(loss)


def _interpolant(m, params, batch):
    """``z_t = (1 - t) x + t e``, the conditional velocity ``e - x`` and the model's ``u(z_t, t, t)``."""
    x, e, _, t = batch
    z = (1 - t)[:, None] * x + t[:, None] * e
    return z, e - x, m.apply(params, z, t, t)


def test_jvp_matches_central_finite_differences(model, batch):
    m, params = model
    x, e, r, t = batch
    z, v, vhat = _interpolant(m, params, batch)
    lam = 0.4
    u, target, dudt = meanflow_target(m.apply, params, z, r, t, v, vhat, lam)
    w = lam * v + (1 - lam) * vhat
    eps = 1e-2
    fd = (m.apply(params, z + eps * w, r, t + eps) - m.apply(params, z - eps * w, r, t - eps)) / (2 * eps)
    np.testing.assert_allclose(dudt, fd, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(u, m.apply(params, z, r, t), rtol=1e-6)
    np.testing.assert_allclose(target, v - (t - r)[:, None] * fd, rtol=2e-2, atol=2e-3)


def test_family_target_matches_explicit_jacobian(model, batch):
    """T_lam = v_c - h (J (lam v_c + (1 - lam) vhat) + d_t u) with J, d_t u from jacfwd; both JVP code paths."""
    m, params = model
    x, e, r, t = batch
    z, v, vhat = _interpolant(m, params, batch)
    f = lambda zi, ri, ti: m.apply(params, zi[None], ri[None], ti[None])[0]
    J = jax.vmap(jax.jacfwd(f, 0))(z, r, t)
    dt = jax.vmap(jax.jacfwd(f, 2))(z, r, t)
    for lam in (0.0, 0.5, 0.94):
        w = lam * v + (1 - lam) * vhat
        ref = v - (t - r)[:, None] * (jnp.einsum("bij,bj->bi", J, w) + dt)
        _, T, _ = meanflow_target(m.apply, params, z, r, t, v, vhat, lam)
        np.testing.assert_allclose(T, ref, rtol=1e-4, atol=1e-5)
        # The two-tangent (diagnostics) path gives the same loss as the single-tangent path.
        l1, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=MeanFlowConfig(jvp_cond_weight=lam),
                              t=t, r=r, noise=e)
        l2, aux2 = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0),
                                 config=MeanFlowConfig(jvp_cond_weight=lam, diagnostics=True), t=t, r=r, noise=e)
        np.testing.assert_allclose(l1, l2, rtol=1e-5)
        assert "target_var" in aux2 and "lam_hat" in aux2
    # lam = 0 with the boundary vhat is the iMF tangent u(z, t, t); lam = 1 ignores vhat.
    _, T0, _ = meanflow_target(m.apply, params, z, r, t, v, vhat, 0.0)
    _, T0_ref, _ = meanflow_target(m.apply, params, z, r, t, vhat, None, 1.0)
    np.testing.assert_allclose(T0 - v, T0_ref - vhat, rtol=1e-5, atol=1e-6)


def test_scheduled_coefficient_follows_loss_state_step(model, batch):
    m, params = model
    x, e, r, t = batch
    sched = lambda step: jnp.where(step < 1, 1.0, 0.25)
    cfg = MeanFlowConfig(jvp_cond_weight=sched)
    kw = dict(t=t, r=r, noise=e)
    l0, aux0 = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, **kw)
    l1, aux1 = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, loss_state=aux0["loss_state"], **kw)
    f1, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=MeanFlowConfig(jvp_cond_weight=1.0), **kw)
    f2, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=MeanFlowConfig(jvp_cond_weight=0.25), **kw)
    assert int(aux1["loss_state"]["step"]) == 2
    np.testing.assert_allclose([l0, l1], [f1, f2], rtol=1e-6)
    assert float(aux1["jvp_cond_weight"]) == 0.25


def test_ema_vhat_uses_and_updates_ema_params(model, batch):
    m, params = model
    x, e, r, t = batch
    other = jax.tree.map(lambda p: p * 0.5, params)
    cfg = MeanFlowConfig(jvp_cond_weight=0.3, vhat="ema", vhat_ema_decay=0.9)
    st = meanflow_init_state(cfg, other)
    loss, aux = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=t, r=r, noise=e, loss_state=st)
    z = (1 - t)[:, None] * x + t[:, None] * e
    _, T, _ = meanflow_target(m.apply, params, z, r, t, e - x, m.apply(other, z, t, t), 0.3)
    u = m.apply(params, z, r, t)
    d = jnp.sum((u - T) ** 2, -1)
    np.testing.assert_allclose(loss, jnp.mean(d / (d + 1e-3)), rtol=1e-5)
    jax.tree.map(lambda n, o, p: np.testing.assert_allclose(n, 0.9 * o + 0.1 * p, rtol=1e-6),
                 aux["loss_state"]["vhat_params"], other, params)


def test_guidance_target(batch):
    m = VelocityMLP(hidden=32, depth=2, time_dim=16, time_scale=1.0, num_classes=3)
    x, e, r, t = batch
    y = jnp.arange(B) % 3
    params = m.init(jax.random.PRNGKey(1), x, t, t, y)
    cfg = MeanFlowConfig(guidance_scale=2.0, guidance_kappa=0.5, label_dropout=0.0, num_classes=3, adaptive_p=0.0,
                         guidance_interval=(0.0, 0.6), jvp_cond_weight=1.0)
    loss, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=t, r=t, noise=e, y=y)
    z = (1 - t)[:, None] * x + t[:, None] * e
    v = e - x
    vg = 2.0 * v + 0.5 * m.apply(params, z, t, t, y) - 1.5 * m.apply(params, z, t, t, jnp.full((B,), 3))
    tgt = jnp.where((t <= 0.6)[:, None], vg, v)
    ref = jnp.mean(jnp.sum((m.apply(params, z, t, t, y) - tgt) ** 2, -1))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # With full dropout every row is unconditional and unguided: plain flow matching on the null class.
    cfg_d = MeanFlowConfig(guidance_scale=2.0, label_dropout=1.0, num_classes=3, adaptive_p=0.0)
    loss_d, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg_d, t=t, r=t, noise=e, y=y)
    ref_d = jnp.mean(jnp.sum((m.apply(params, z, t, t, jnp.full((B,), 3)) - v) ** 2, -1))
    np.testing.assert_allclose(loss_d, ref_d, rtol=1e-5)


def test_sampler_steps(model):
    m, params = model
    e = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    one = meanflow_sample(m.apply, params, e, steps=1)
    np.testing.assert_allclose(one, e - m.apply(params, e, jnp.zeros(16), jnp.ones(16)), rtol=1e-6)
    two = meanflow_sample(m.apply, params, e, steps=2)
    z = e - 0.5 * m.apply(params, e, jnp.full(16, 0.5), jnp.ones(16))
    z = z - 0.5 * m.apply(params, z, jnp.zeros(16), jnp.full(16, 0.5))
    np.testing.assert_allclose(two, z, rtol=1e-5, atol=1e-6)
    three = meanflow_sample(m.apply, params, e, times=jnp.array([1.0, 0.7, 0.2, 0.0]))
    assert three.shape == e.shape


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(flow_matching_fraction=1.5), "flow_matching_fraction"),
        (dict(flow_matching_fraction=-0.1), "flow_matching_fraction"),
        (dict(jvp_cond_weight=1.2), "jvp_cond_weight"),
        (dict(jvp_cond_weight=-0.1), "jvp_cond_weight"),
        (dict(jvp_cond_weight="best"), "jvp_cond_weight"),
        (dict(guidance_scale=2.0), "num_classes"),
        (dict(reduction="max"), "reduction"),
        (dict(vhat="teacher"), "vhat"),
        (dict(auto_ema_decay=1.0), "auto_ema_decay"),
        (dict(guidance_interval=(0.8, 0.2)), "guidance_interval"),
    ],
)
def test_bad_configs_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"MeanFlowConfig.{field}"):
        MeanFlowConfig(**kwargs)


@pytest.mark.parametrize(
    "old, new, value",
    [("cfg_omega", "guidance_scale", 2.0), ("cfg_kappa", "guidance_kappa", 0.5),
     ("cfg_interval", "guidance_interval", (0.0, 0.5))],
)
def test_renamed_guidance_fields_raise_naming_the_new_field(old, new, value):
    with pytest.raises(TypeError, match=f"^MeanFlowConfig: '{old}' was renamed to '{new}'$"):
        MeanFlowConfig(**{old: value}, num_classes=3)
    with pytest.raises(TypeError, match=f"'{old}' was renamed to '{new}'"):
        dataclasses.replace(MeanFlowConfig(), **{old: value})
    with pytest.raises(AttributeError, match=f"'{old}' was renamed to '{new}'"):
        getattr(MeanFlowConfig(), old)
    assert getattr(MeanFlowConfig(**{new: value}, num_classes=3), new) == value
    with pytest.raises(AttributeError, match="'cfg_on' was renamed to 'guidance_on'"):
        MeanFlowConfig().cfg_on  # noqa: B018
    assert MeanFlowConfig(guidance_scale=1.0, num_classes=3).guidance_on and not MeanFlowConfig().guidance_on


def test_bad_call_inputs_raise(model, batch):
    m, params = model
    x, e, r, t = batch
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="needs labels"):
        meanflow_loss(m.apply, params, x, key, config=MeanFlowConfig(guidance_scale=1.5, num_classes=3))
    with pytest.raises(ValueError, match="both t and r"):
        meanflow_loss(m.apply, params, x, key, t=t)
    with pytest.raises(ValueError, match=r"t must have shape \(32,\)"):
        meanflow_loss(m.apply, params, x, key, t=t[:5], r=r[:5])
    with pytest.raises(ValueError, match="noise must have the shape of x"):
        meanflow_loss(m.apply, params, x, key, noise=e[:, :1])
    with pytest.raises(TypeError, match="jvp_cond_weight"):
        MeanFlowConfig(jvp_cond_weight=[0.5])
    with pytest.raises(ValueError, match='vhat="ema" needs params'):
        meanflow_init_state(MeanFlowConfig(vhat="ema"))


# ---------------------------------------------------------------- the named pieces of meanflow_loss


def _path(batch):
    x, e, r, t = batch
    return (1 - t)[:, None] * x + t[:, None] * e, e - x, r, t


def test_guided_velocity_matches_formula(batch):
    """v = omega v_c + kappa u(z,t,t|y) + (1 - omega - kappa) u(z,t,t|null) on guided rows, v_c elsewhere."""
    m = VelocityMLP(hidden=32, depth=2, time_dim=16, time_scale=1.0, num_classes=3)
    z, v_c, _, t = _path(batch)
    y = jnp.arange(B) % 3
    params = m.init(jax.random.PRNGKey(1), z, t, t, y)
    drop = jnp.arange(B) % 5 == 0
    omega, kappa, (lo, hi) = 1.7, 0.4, (0.2, 0.8)
    kw = dict(scale=omega, kappa=kappa, null_class=3, interval=(lo, hi))
    v, ub = guided_velocity(m.apply, params, z, t, v_c, y, drop=drop, **kw)
    u_y, u_null = np.asarray(m.apply(params, z, t, t, y)), np.asarray(m.apply(params, z, t, t, jnp.full(B, 3)))
    v_g = omega * np.asarray(v_c) + kappa * u_y + (1 - omega - kappa) * u_null
    guided = np.asarray((t >= lo) & (t <= hi) & ~drop)
    assert 0 < guided.sum() < B
    np.testing.assert_allclose(v, np.where(guided[:, None], v_g, v_c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ub, np.where(np.asarray(drop)[:, None], u_null, u_y), rtol=1e-6)
    # Without a drop mask every row in the interval is guided and the boundary is the conditional velocity.
    v_nd, ub_nd = guided_velocity(m.apply, params, z, t, v_c, y, **kw)
    in_iv = np.asarray((t >= lo) & (t <= hi))
    np.testing.assert_allclose(v_nd, np.where(in_iv[:, None], v_g, v_c), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ub_nd, u_y, rtol=1e-6)
    # omega = 1, kappa = 0 is no guidance; the model terms carry no gradient.
    v1, _ = guided_velocity(m.apply, params, z, t, v_c, y, scale=1.0, kappa=0.0, null_class=3)
    np.testing.assert_array_equal(v1, v_c)
    g = jax.grad(lambda p: jnp.sum(guided_velocity(m.apply, p, z, t, v_c, y, **kw)[0]))(params)
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree.leaves(g))
    # Label dropout: dropped rows train on the null class.
    y_in, d = drop_labels(jax.random.PRNGKey(3), y, 0.5, 3)
    assert 0 < int(d.sum()) < B
    np.testing.assert_array_equal(y_in, np.where(d, 3, y))


def test_vhat_estimate_sources(model, batch, oracle):
    m, params = model
    z, _, _, t = _path(batch)
    other = jax.tree.map(lambda p: 0.5 * p, params)
    np.testing.assert_allclose(vhat_estimate(m.apply, params, z, t), m.apply(params, z, t, t), rtol=1e-6)
    np.testing.assert_allclose(vhat_estimate(m.apply, params, z, t, source="ema", ema_params=other),
                               m.apply(other, z, t, t), rtol=1e-6)
    np.testing.assert_allclose(vhat_estimate(m.apply, params, z, t, source=oracle.marginal_velocity),
                               oracle.marginal_velocity(z, t), rtol=1e-6)
    given = jnp.ones_like(z)
    assert vhat_estimate(m.apply, params, z, t, boundary=given) is given
    g = jax.grad(lambda p: jnp.sum(vhat_estimate(m.apply, p, z, t)))(params)
    assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree.leaves(g))
    with pytest.raises(ValueError, match="ema_params"):
        vhat_estimate(m.apply, params, z, t, source="ema")
    with pytest.raises(ValueError, match="source must be"):
        vhat_estimate(m.apply, params, z, t, source="teacher")


def test_two_tangent_corners_equal_single_tangent_jvps(model, batch):
    """base + lam j_eps at lam = 1 is the v_c tangent (MeanFlow), at lam = 0 the vhat tangent (iMF)."""
    m, params = model
    z, v, r, t = _path(batch)
    vhat = m.apply(params, z, t, t)
    f = lambda z_, r_, t_: m.apply(params, z_, r_, t_)
    ones, zeros = jnp.ones_like(t), jnp.zeros_like(t)
    u_ref, d_v = jax.jvp(f, (z, r, t), (v, zeros, ones))
    _, d_vhat = jax.jvp(f, (z, r, t), (vhat, zeros, ones))
    _, d_eps = jax.jvp(f, (z, r, t), (v - vhat, zeros, zeros))
    u, base, j_eps = two_tangent_jvp(m.apply, params, z, r, t, vhat, v - vhat)
    h = t - r
    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(u, u_ref, rtol=1e-6)
    np.testing.assert_allclose(base, d_vhat, **tol)
    np.testing.assert_allclose(j_eps, d_eps, **tol)
    np.testing.assert_allclose(two_tangent_target(v, h, base, j_eps, 1.0), v - h[:, None] * d_v, **tol)
    np.testing.assert_allclose(two_tangent_target(v, h, base, j_eps, 0.0), v - h[:, None] * d_vhat, **tol)
    for lam in (0.3, 0.94):  # interior: the single JVP with w = lam v + (1 - lam) vhat
        _, T_single, _ = meanflow_target(m.apply, params, z, r, t, v, vhat, lam)
        np.testing.assert_allclose(two_tangent_target(v, h, base, j_eps, lam), T_single, **tol)


def test_jvp_cond_weight_modes():
    st = meanflow_init_state(MeanFlowConfig())
    assert jvp_cond_weight_at(MeanFlowConfig(jvp_cond_weight=0.3), st) == 0.3
    sched = MeanFlowConfig(jvp_cond_weight=lambda s: jnp.where(s < 2, 1.0, 0.5))
    assert float(jvp_cond_weight_at(sched, st)) == 1.0
    assert float(jvp_cond_weight_at(sched, {**st, "step": jnp.int32(2)})) == 0.5
    auto = MeanFlowConfig(jvp_cond_weight="auto", auto_init=0.6)
    with_stats = lambda num, den: {**st, "auto_num": jnp.float32(num), "auto_den": jnp.float32(den)}
    np.testing.assert_allclose(jvp_cond_weight_at(auto, st), 0.6)  # no statistics yet
    np.testing.assert_allclose(jvp_cond_weight_at(auto, with_stats(0.2, 0.8)), 0.25)
    np.testing.assert_allclose(jvp_cond_weight_at(auto, with_stats(2.0, 1.0)), 1.0)  # clipped
    np.testing.assert_allclose(jvp_cond_weight_at(auto, with_stats(-1.0, 1.0)), 0.0)
    new = update_auto_state(with_stats(0.2, 0.8), jnp.float32(1.0), jnp.float32(2.0), 0.9)
    np.testing.assert_allclose([new["auto_num"], new["auto_den"]], [0.9 * 0.2 + 0.1, 0.9 * 0.8 + 0.2], rtol=1e-6)
    assert new["step"] is st["step"]


def test_auto_step_matches_explicit_jacobian_computation(model, batch):
    """One "auto" step rebuilt in numpy from jacfwd Jacobians: weights at the previous estimate, pooled
    statistics, EMA, new coefficient, target, loss and the target-variance proxy."""
    m, params = model
    x, e, r, t = batch
    p, c, dcy, num0, den0 = 0.75, 1e-2, 0.9, 0.3, 0.5
    cfg = MeanFlowConfig(jvp_cond_weight="auto", adaptive_p=p, adaptive_c=c, auto_ema_decay=dcy)
    st = {**meanflow_init_state(cfg), "auto_num": jnp.float32(num0), "auto_den": jnp.float32(den0)}
    loss, aux = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=t, r=r, noise=e,
                              loss_state=st)

    z, v, r, t = _path(batch)
    f = lambda zi, ri, ti: m.apply(params, zi[None], ri[None], ti[None])[0]
    J = np.asarray(jax.vmap(jax.jacfwd(f, 0))(z, r, t), np.float64)
    dt = np.asarray(jax.vmap(jax.jacfwd(f, 2))(z, r, t), np.float64)
    u = np.asarray(m.apply(params, z, r, t), np.float64)
    vhat = np.asarray(m.apply(params, z, t, t), np.float64)
    v, h = np.asarray(v, np.float64), np.asarray(t - r, np.float64)[:, None]
    Jv = lambda w: np.einsum("bij,bj->bi", J, w)
    target = lambda lam: v - h * (Jv(lam * v + (1 - lam) * vhat) + dt)
    eps = v - vhat
    a = h * Jv(eps)
    w = 1.0 / (np.sum((u - target(num0 / den0)) ** 2, -1) + c) ** p
    num, den = np.mean(w * np.sum(eps * a, -1)), np.mean(w * np.sum(a * a, -1))
    num1, den1 = dcy * num0 + (1 - dcy) * num, dcy * den0 + (1 - dcy) * den
    lam = float(np.clip(num1 / den1, 0.0, 1.0))
    d = np.sum((u - target(lam)) ** 2, -1)

    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(aux["loss_state"]["auto_num"], num1, rtol=1e-4)
    np.testing.assert_allclose(aux["loss_state"]["auto_den"], den1, rtol=1e-4)
    np.testing.assert_allclose(aux["jvp_cond_weight"], lam, rtol=1e-4)
    np.testing.assert_allclose(aux["lam_hat"], np.clip(num / den, 0, 1), rtol=1e-4)
    np.testing.assert_allclose(loss, np.mean(d / (d + c) ** p), rtol=1e-4)
    rr = np.sum((eps - lam * a) ** 2, -1)
    np.testing.assert_allclose(aux["target_var"], np.sum(w * rr) / np.sum(w), rtol=1e-4)
    # The pooled statistics on their own.
    n_, d_ = control_variate_statistics(jnp.asarray(eps, jnp.float32), jnp.asarray(a, jnp.float32),
                                        jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose([n_, d_], [num, den], rtol=1e-4)


def test_adaptive_weighting_and_metrics():
    rng = np.random.default_rng(0)
    u, T = (rng.normal(size=(6, 3, 2)).astype(np.float32) for _ in range(2))
    sq = ((u - T) ** 2).reshape(6, -1)
    np.testing.assert_allclose(per_row_error(u, T), sq.sum(-1), rtol=1e-6)
    np.testing.assert_allclose(per_row_error(u, T, "mean"), sq.mean(-1), rtol=1e-6)
    d = jnp.asarray(sq.sum(-1))
    p, c = 0.75, 1e-2
    np.testing.assert_allclose(adaptive_weights(d, p, c), 1 / (sq.sum(-1) + c) ** p, rtol=1e-6)
    np.testing.assert_allclose(adaptive_loss(d, p, c), np.mean(sq.sum(-1) / (sq.sum(-1) + c) ** p), rtol=1e-6)
    np.testing.assert_allclose(adaptive_loss(d, 0.0, c), np.mean(sq.sum(-1)), rtol=1e-6)  # p = 0: plain
    # The gradient is the stop-gradient weight times that of the plain mean.
    np.testing.assert_allclose(jax.grad(adaptive_loss)(d, p, c), adaptive_weights(d, p, c) / 6, rtol=1e-6)
    # Metrics split by r = t rows.
    t = jnp.asarray([0.5, 0.5, 0.9, 0.9, 0.2, 0.7])
    r = jnp.asarray([0.5, 0.1, 0.9, 0.3, 0.2, 0.0])
    eq = np.asarray(r == t)
    met = meanflow_metrics(u, T, r, t, 0.25)
    np.testing.assert_allclose(met["mse"], sq.mean(), rtol=1e-6)
    np.testing.assert_allclose(met["mse_fm"], sq[eq].mean(), rtol=1e-6)
    np.testing.assert_allclose(met["mse_mf"], sq[~eq].mean(), rtol=1e-6)
    assert met["jvp_cond_weight"].dtype == jnp.float32 and float(met["jvp_cond_weight"]) == 0.25
    none_eq = meanflow_metrics(u, T, t - 0.05, t, 1.0)
    assert float(none_eq["mse_fm"]) == 0.0
    # Target-variance proxy: weighted mean of ||epshat - lam a||^2.
    eps, a, w = rng.normal(size=(6, 2)), rng.normal(size=(6, 2)), rng.uniform(size=6)
    tv = target_variance(jnp.asarray(eps), jnp.asarray(a), 0.4, jnp.asarray(w))
    np.testing.assert_allclose(tv, np.sum(w * np.sum((eps - 0.4 * a) ** 2, -1)) / np.sum(w), rtol=1e-5)
    # EMA of the vhat params.
    ema = update_vhat_ema({"w": jnp.zeros(3)}, {"w": jnp.ones(3)}, 0.9)
    np.testing.assert_allclose(ema["w"], 0.1, rtol=1e-6)


# ---------------------------------------------------------------- oracle


@pytest.fixture(scope="module")
def oracle():
    return gmm_oracle(jaxlab.data.eight_gaussians(radius=1.5, std=0.3))


def _log_marginal(mix, z, t):
    """log p_t(z) for the mixture pushed through z = (1 - t) x + t e (independent of the oracle code)."""
    m, s, w = jnp.asarray(mix.means), jnp.asarray(mix.stds), jnp.asarray(mix.weights)
    var = (1 - t) ** 2 * s**2 + t**2
    d2 = jnp.sum((z - (1 - t) * m) ** 2, -1)
    return jax.scipy.special.logsumexp(jnp.log(w) - 0.5 * d2 / var - jnp.log(var))  # D = 2


def test_oracle_matches_score_identities(oracle):
    """Tweedie: E[e|z] = -t grad log p_t; Cov(v_c|z) = (I + t^2 Hess log p_t) / (1 - t)^2."""
    mix = jaxlab.data.eight_gaussians(radius=1.5, std=0.3)
    z = jax.random.normal(jax.random.PRNGKey(0), (16, 2)) * 1.5
    t = jnp.linspace(0.05, 0.95, 16)
    score = jax.jit(jax.vmap(jax.grad(lambda zi, ti: _log_marginal(mix, zi, ti))))(z, t)  # jitted: one compile
    hess = jax.jit(jax.vmap(jax.hessian(lambda zi, ti: _log_marginal(mix, zi, ti))))(z, t)
    e_mean = -t[:, None] * score
    x_mean = (z - t[:, None] * e_mean) / (1 - t)[:, None]
    np.testing.assert_allclose(jax.jit(oracle.marginal_velocity)(z, t), e_mean - x_mean, rtol=1e-4, atol=1e-4)
    cov = (jnp.eye(2) + t[:, None, None] ** 2 * hess) / (1 - t)[:, None, None] ** 2
    np.testing.assert_allclose(jax.jit(oracle.conditional_covariance)(z, t), cov, rtol=1e-3, atol=1e-3)


def test_oracle_target_mse_matches_monte_carlo(model, oracle):
    """M(lam) = E||T_lam - T*||^2 from the oracle equals the Monte-Carlo average of the loss's own target."""
    m, params = model
    lams = (0.0, 0.5, 1.0)

    @jax.jit  # one compile (eagerly, every op of the oracle's per-point algebra dispatched on its own)
    def monte_carlo_and_terms(params):
        x, e, z, r, t = oracle.sample_points(jax.random.PRNGKey(11), 65536)
        vhat = m.apply(params, z, t, t)
        T_star = oracle.ideal_target(m.apply, params, z, r, t)
        mc = [jnp.mean(jnp.sum((meanflow_target(m.apply, params, z, r, t, e - x, vhat, lam)[1] - T_star) ** 2, -1))
              for lam in lams]
        return mc, oracle.expected_terms(m.apply, params, jax.random.PRNGKey(11), 65536)

    mcs, terms = monte_carlo_and_terms(params)
    for lam, mc in zip(lams, mcs):
        mc = float(mc)
        exact = float(oracle.target_mse_from_terms(terms, lam))
        assert abs(mc - exact) < 0.03 * exact, (lam, mc, exact)
    # lam* minimises M over a grid.
    lam_star = float(oracle.optimal_from_terms(terms))
    grid = lam_star + jnp.linspace(-1.0, 1.0, 201)
    assert int(jnp.argmin(oracle.target_mse_from_terms(terms, grid))) == 100


def _run_auto(m, params, oracle, cfg, vhat, steps=200, n=1024):
    """Run the "auto" estimator on a fixed network; alongside, pool the oracle's exact per-point terms on
    the very same (z, r, t) draws with the same EMA, so only the eps noise separates the two."""
    dcy = cfg.auto_ema_decay

    def body(carry, k):
        state, ema = carry
        kx, kl = jax.random.split(jax.random.fold_in(k, 1))  # independent of the loss's own split of k
        comp = jax.random.randint(kx, (n,), 0, oracle.means.shape[0])
        x = oracle.means[comp] + oracle.stds[comp, None] * jax.random.normal(kl, (n, 2))
        _, aux = meanflow_loss(m.apply, params, x, k, config=cfg, loss_state=state)
        # The same draws the loss made (documented key use), then the exact conditional terms there.
        k_time, k_noise, _ = jax.random.split(k, 3)
        r, t = logit_normal_time_pairs(k_time, n, flow_matching_fraction=0.0)
        e = jax.random.normal(k_noise, (n, 2))
        z = (1 - t)[:, None] * x + t[:, None] * e
        terms = {key: jnp.mean(v) for key, v in oracle.coefficient_terms(m.apply, params, z, r, t, vhat).items()}
        ema = jax.tree.map(lambda a, b: dcy * a + (1 - dcy) * b, ema, terms)
        return (aux["loss_state"], ema), aux["jvp_cond_weight"]

    zeros = dict.fromkeys(("tr_A_Sigma", "tr_A_Sigma_At", "Ad2", "dAd", "tr_Sigma", "d2"), jnp.zeros(()))
    (_, ema), lams = jax.lax.scan(body, (meanflow_init_state(cfg), zeros),
                                  jax.random.split(jax.random.PRNGKey(4), steps))
    return float(lams[-1]), ema


def test_auto_converges_to_oracle_optimum():
    """Fixed network, exact vhat (delta = 0): the pooled EMA estimate reaches the exact lam*."""
    oracle = gmm_oracle(jaxlab.data.eight_gaussians())
    m = VelocityMLP(hidden=64, depth=3, time_dim=16, time_scale=1.0)
    params = m.init(jax.random.PRNGKey(1), jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2))
    cfg = MeanFlowConfig(jvp_cond_weight="auto", vhat=oracle.marginal_velocity, adaptive_p=0.0,
                         flow_matching_fraction=0.0, auto_ema_decay=0.99)
    lam_auto, terms = _run_auto(m, params, oracle, cfg, "exact")
    lam_star = float(oracle.optimal_from_terms(terms))
    assert 0.05 < lam_star < 0.95  # an interior optimum, so the check is not a clip artefact
    assert abs(lam_auto - lam_star) < 0.03, (lam_auto, lam_star)
    # With the model's own boundary vhat the estimator converges to its documented limit instead,
    # which is not the target-MSE optimum (the estimator cannot see delta = vhat - v).
    cfg_b = MeanFlowConfig(jvp_cond_weight="auto", adaptive_p=0.0, flow_matching_fraction=0.0, auto_ema_decay=0.99)
    lam_b, terms_b = _run_auto(m, params, oracle, cfg_b, "boundary")
    limit = float(oracle.estimator_limit_from_terms(terms_b))
    assert abs(limit - float(oracle.optimal_from_terms(terms_b))) > 0.05
    assert abs(lam_b - limit) < 0.03, (lam_b, limit)


# ---------------------------------------------------------------- explicit times are validated (eagerly)


def test_explicit_times_with_r_above_t_raise_naming_the_first_row(model, batch):
    m, params = model
    x, e, r, t = batch
    key = jax.random.PRNGKey(0)
    t_bad, r_bad = jnp.full(B, 0.5).at[3].set(0.5), jnp.full(B, 0.2).at[3].set(0.7).at[9].set(0.6)
    msg = "meanflow_loss: r must satisfy 0 <= r <= t <= 1; 2 of 32 rows have r > t, first r[3] = 0.7 > t[3] = 0.5"
    with pytest.raises(ValueError) as err:
        meanflow_loss(m.apply, params, x, key, t=t_bad, r=r_bad, noise=e)
    assert str(err.value) == msg
    # swapped arguments (the classic mistake) are caught too
    with pytest.raises(ValueError, match=r"rows have r > t, first r\[\d+\] = "):
        meanflow_loss(m.apply, params, x, key, t=r, r=t, noise=e)


@pytest.mark.parametrize(
    "name, index, value, expected",
    [
        ("t", 5, 1.5, "t must lie in [0, 1] (0 = data, 1 = noise); 1 of 32 values outside, first t[5] = 1.5"),
        ("r", 0, -0.25, "r must lie in [0, 1] (0 = data, 1 = noise); 1 of 32 values outside, first r[0] = -0.25"),
        ("t", 2, float("nan"), "t must lie in [0, 1] (0 = data, 1 = noise); 1 of 32 values outside, first t[2] = nan"),
    ],
)
def test_explicit_times_outside_unit_interval_raise(model, batch, name, index, value, expected):
    m, params = model
    x, e, r, t = batch
    times = {"t": t, "r": r}
    times[name] = times[name].at[index].set(value)
    with pytest.raises(ValueError) as err:
        meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), noise=e, **times)
    assert str(err.value) == "meanflow_loss: " + expected


def test_valid_explicit_times_unchanged_and_edges_accepted(model, batch):
    m, params = model
    x, e, r, t = batch
    cfg = MeanFlowConfig(jvp_cond_weight=1.0, adaptive_p=0.75, adaptive_c=1e-3)
    loss, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=t, r=r, noise=e)
    np.testing.assert_allclose(loss, original_meanflow_loss(m.apply, params, x, e, r, t, 0.75, 1e-3), rtol=1e-5)
    # the closed ends 0 <= r <= t <= 1 (r = t included) are valid; numpy inputs are checked too
    edges = np.linspace(0.0, 1.0, B)
    for tt, rr in ((edges, edges), (np.ones(B, np.float32), np.zeros(B, np.float32)), (jnp.asarray(edges), 0 * edges)):
        loss, _ = meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), config=cfg, t=tt, r=rr, noise=e)
        assert np.isfinite(float(loss))


def test_time_checks_are_skipped_for_traced_times(model, batch):
    """Under jit the times are tracers: only shapes are checked (documented), nothing raises."""
    m, params = model
    x, e, r, t = batch
    f = jax.jit(lambda t_, r_: meanflow_loss(m.apply, params, x, jax.random.PRNGKey(0), t=t_, r=r_, noise=e)[0])
    assert np.isfinite(float(f(r, t)))  # r > t in most rows: not seen at trace time
    with pytest.raises(ValueError, match=r"t must have shape \(32,\)"):
        f(t[:5], r[:5])
