"""Flow matching end to end: a trained model beats a standard Gaussian on SW2 for every toy dataset."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlab
from jaxlab.losses import euler_sample, flow_matching_loss
from jaxlab.nn import VelocityMLP


def test_loss_matches_direct_transcription():
    model = VelocityMLP(hidden=16, depth=2, time_dim=8)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
    params = model.init(jax.random.PRNGKey(1), x, jnp.zeros(5), jnp.ones(5))["params"]
    apply = lambda p, z, r, t: model.apply({"params": p}, z, r, t)
    t = jnp.linspace(0.1, 0.9, 5)
    e = jax.random.normal(jax.random.PRNGKey(2), (5, 2))
    loss, aux = flow_matching_loss(apply, params, x, jax.random.PRNGKey(3), t=t, noise=e)
    z = (1 - t[:, None]) * x + t[:, None] * e
    ref = np.mean(np.sum((np.asarray(apply(params, z, t, t)) - np.asarray(e - x)) ** 2, -1))
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(aux["mse"]) == pytest.approx(ref / 2, rel=1e-5)


def test_euler_sampler_integrates_a_known_field():
    # v(z, t) = z  =>  z(0) = z(1) * exp(-1); Euler with k steps gives z(1) * (1 - 1/k)^k.
    apply = lambda p, z, r, t: z
    z1 = jnp.ones((3, 2))
    out = euler_sample(apply, None, z1, steps=50)
    np.testing.assert_allclose(np.asarray(out), (1 - 1 / 50) ** 50, rtol=1e-5)


# two datasets in the default suite (a unimodal-ish and a multi-cluster one); every dataset under -m slow
QUICK_DATASETS = ("two_moons", "checkerboard")


@pytest.mark.parametrize("name", [n if n in QUICK_DATASETS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in jaxlab.data.TOY2D_DATASETS])
def test_trained_model_beats_gaussian(name):
    model = VelocityMLP(hidden=128, depth=3, time_dim=32)
    apply = lambda p, z, r, t: model.apply({"params": p}, z, r, t)
    sampler = jaxlab.data.toy2d_sampler(name)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones(1))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, 1200))

    @jax.jit
    def run(params):
        def body(carry, k):
            p, o = carry
            kd, kl = jax.random.split(k)
            g = jax.grad(lambda q: flow_matching_loss(apply, q, sampler(kd, 256), kl)[0])(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(jax.random.PRNGKey(1), 1200))
        return p

    params = run(params)
    kn, kd, kp, kg = jax.random.split(jax.random.PRNGKey(2), 4)
    gen = euler_sample(apply, params, jax.random.normal(kn, (1024, 2)), steps=20)
    ref = sampler(kd, 1024)
    sw_model = float(jaxlab.sliced_wasserstein2(gen, ref, kp, 512))
    sw_gauss = float(jaxlab.sliced_wasserstein2(jax.random.normal(kg, (1024, 2)), ref, kp, 512))
    assert sw_model < 0.7 * sw_gauss, (name, sw_model, sw_gauss)


# ---------------------------------------------------------------- input validation


def _toy():
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
    return (lambda p, z, r, t: z @ p), jnp.eye(2), x


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(t=jnp.full(5, 0.5)), "flow_matching_loss: t must have shape (8,) to match x (8, 2), got (5,)"),
        (dict(t=jnp.full((8, 1), 0.5)), "flow_matching_loss: t must have shape (8,) to match x (8, 2), got (8, 1)"),
        (dict(noise=jnp.zeros((8, 1))), "flow_matching_loss: noise must have the shape of x (8, 2), got (8, 1)"),
        (dict(t=jnp.full(8, 0.5).at[6].set(1.25).at[7].set(-1.0)),
         "flow_matching_loss: t must lie in [0, 1] (0 = data, 1 = noise); 2 of 8 values outside, first t[6] = 1.25"),
        (dict(t=jnp.full(8, 0.5).at[1].set(jnp.nan)),
         "flow_matching_loss: t must lie in [0, 1] (0 = data, 1 = noise); 1 of 8 values outside, first t[1] = nan"),
    ],
)
def test_bad_inputs_raise_with_expected_and_got(kwargs, expected):
    apply, params, x = _toy()
    with pytest.raises(ValueError) as err:
        flow_matching_loss(apply, params, x, jax.random.PRNGKey(1), **kwargs)
    assert str(err.value) == expected


def test_valid_times_unchanged_edges_accepted_and_traced_times_skipped():
    apply, params, x = _toy()
    e = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    t = jnp.linspace(0.0, 1.0, 8)  # both closed ends are valid
    loss, _ = flow_matching_loss(apply, params, x, jax.random.PRNGKey(1), t=t, noise=e)
    tb = np.asarray(t)[:, None]
    z = (1 - tb) * np.asarray(x) + tb * np.asarray(e)
    assert float(loss) == pytest.approx(np.mean(np.sum((z - (np.asarray(e) - np.asarray(x))) ** 2, -1)), rel=1e-5)
    # under jit the times are tracers: only shapes are checked (documented), so nothing raises here
    f = jax.jit(lambda t_: flow_matching_loss(apply, params, x, jax.random.PRNGKey(1), t=t_, noise=e)[0])
    assert np.isfinite(float(f(jnp.full(8, 2.0))))


@pytest.mark.parametrize("steps", [0, -3, 2.5, None])
def test_euler_sample_rejects_non_positive_steps_like_meanflow_sample(steps):
    from jaxlab.losses import meanflow_sample

    noise = jnp.ones((2, 2))
    with pytest.raises(ValueError) as err:
        euler_sample(lambda p, z, r, t: z, None, noise, steps=steps)
    assert str(err.value) == f"euler_sample: steps must be a positive int, got {steps!r}"
    with pytest.raises(ValueError) as ref:
        meanflow_sample(lambda p, z, r, t: z, None, noise, steps=steps)
    assert str(ref.value) == str(err.value).replace("euler_sample", "meanflow_sample")


def test_velocity_mlp_fourier_features_match_a_manual_feature_map():
    # fourier_features = F: the first Dense sees [z, sin(2 pi z B), cos(2 pi z B)] with a constant B drawn
    # from fourier_seed (not a parameter). Reference: a plain VelocityMLP fed the features by hand, with the
    # same parameters (its "in" kernel takes 2 + 2F inputs; its output layer has 2 + 2F columns, of which we
    # compare the first two against a copy of the output layer cut to 2 columns).
    F, s = 8, 0.7
    m = VelocityMLP(hidden=16, depth=2, time_dim=8, fourier_features=F, fourier_scale=s, fourier_seed=3)
    z = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
    t, r = jnp.full((5,), 0.8), jnp.full((5,), 0.3)
    p = nn.unbox(m.init(jax.random.PRNGKey(1), z, r, t))
    assert p["params"]["in"]["kernel"].shape == (2 + 2 * F, 16)
    assert "B" not in str(jax.tree_util.tree_structure(p))
    B = np.random.default_rng(3).normal(0.0, s, (2, F)).astype(np.float32)
    zb = 2 * np.pi * np.asarray(z) @ B
    feats = jnp.asarray(np.concatenate([np.asarray(z), np.sin(zb), np.cos(zb)], -1))
    plain = VelocityMLP(hidden=16, depth=2, time_dim=8)
    pp = jax.tree.map(lambda a: a, p)
    pp["params"]["out"] = {"kernel": jnp.pad(p["params"]["out"]["kernel"], ((0, 0), (0, 2 * F))),
                           "bias": jnp.pad(p["params"]["out"]["bias"], (0, 2 * F))}
    want = plain.apply(pp, feats, r, t)[:, :2]
    np.testing.assert_allclose(m.apply(p, z, r, t), want, rtol=1e-5, atol=1e-5)
    # B comes from fourier_seed (another seed: another map on the same parameters); fourier_features = 0 is
    # the plain network (same parameter shapes as before the option existed).
    other = VelocityMLP(hidden=16, depth=2, time_dim=8, fourier_features=F, fourier_scale=s, fourier_seed=4)
    assert float(jnp.max(jnp.abs(other.apply(p, z, r, t) - m.apply(p, z, r, t)))) > 1e-3
    assert nn.unbox(plain.init(jax.random.PRNGKey(1), z, r, t))["params"]["in"]["kernel"].shape == (2, 16)
    for bad in (dict(fourier_features=-1), dict(fourier_features=4, fourier_scale=0.0)):
        with pytest.raises(ValueError, match="fourier_features must be >= 0 and fourier_scale > 0"):
            VelocityMLP(hidden=16, depth=2, time_dim=8, **bad).init(jax.random.PRNGKey(1), z, r, t)
