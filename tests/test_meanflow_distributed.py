"""MeanFlow loss and gradient: equal under jit, pmap (8 devices) and jit on an 8-device mesh; train-step wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxlab
from jaxlab.losses import MeanFlowConfig, make_meanflow_loss_fn, meanflow_init_state, meanflow_loss
from jaxlab.nn import VelocityMLP

N = 64


@pytest.fixture(scope="module")
def setup():
    m = VelocityMLP(hidden=32, depth=2, time_dim=16, time_scale=1.0)
    params = m.init(jax.random.PRNGKey(1), jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2))
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    x = jaxlab.data.eight_gaussians().sample(k[0], N)
    e = jax.random.normal(k[1], (N, 2))
    a, b = jax.random.uniform(k[2], (N,)), jax.random.uniform(k[3], (N,))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    r = jnp.where(jnp.arange(N) % 4 == 0, t, r)  # r = t rows spread over every shard
    return m, params, (x, e, r, t)


def _close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-5, atol=1e-6), a, b)


@pytest.mark.parametrize("lam", [0.5, "auto"])
def test_jit_pmap_mesh_agree(setup, eight_devices, lam):
    m, params, (x, e, r, t) = setup
    cfg = MeanFlowConfig(jvp_cond_weight=lam, adaptive_p=1.0, adaptive_c=1e-2)
    st = meanflow_init_state(cfg)
    key = jax.random.PRNGKey(0)

    def f(p, x, e, r, t, axis_name=None):
        return meanflow_loss(m.apply, p, x, key, config=cfg, t=t, r=r, noise=e, loss_state=st, axis_name=axis_name)

    (l_jit, aux_jit), g_jit = jax.jit(jax.value_and_grad(f, has_aux=True))(params, x, e, r, t)

    # pmap: each device takes N/8 rows; mean of equal-size shard means == global mean; "auto" pools via psum.
    def per_device(p, x, e, r, t):
        (l, aux), g = jax.value_and_grad(lambda p_: f(p_, x, e, r, t, axis_name="d"), has_aux=True)(p)
        return jax.lax.pmean(l, "d"), jax.lax.pmean(g, "d"), aux["jvp_cond_weight"]

    sh = lambda a: a.reshape((8, N // 8) + a.shape[1:])
    l_pm, g_pm, lam_pm = jax.pmap(per_device, axis_name="d", in_axes=(None, 0, 0, 0, 0), devices=eight_devices)(
        params, sh(x), sh(e), sh(r), sh(t))
    np.testing.assert_allclose(l_pm[0], l_jit, rtol=2e-5)
    _close(jax.tree.map(lambda a: a[0], g_pm), g_jit)
    np.testing.assert_allclose(lam_pm, np.full(8, float(aux_jit["jvp_cond_weight"])), rtol=1e-5)

    # jit with the batch sharded over an 8-device mesh (XLA inserts the collectives).
    mesh = Mesh(np.array(eight_devices), ("data",))
    bs = NamedSharding(mesh, PartitionSpec("data"))
    put = lambda a: jax.device_put(a, bs)
    (l_m, aux_m), g_m = jax.jit(jax.value_and_grad(f, has_aux=True))(params, put(x), put(e), put(r), put(t))
    np.testing.assert_allclose(l_m, l_jit, rtol=2e-5)
    _close(g_m, g_jit)
    np.testing.assert_allclose(aux_m["jvp_cond_weight"], aux_jit["jvp_cond_weight"], rtol=1e-5)


def test_train_step_carries_auto_state():
    """make_meanflow_loss_fn + make_train_step(has_loss_state=True): the EMA state advances every step."""
    m = VelocityMLP(hidden=32, depth=2, time_dim=16, time_scale=1.0)
    params = m.init(jax.random.PRNGKey(1), jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2))
    cfg = MeanFlowConfig(jvp_cond_weight="auto", flow_matching_fraction=0.5)
    tx = optax.adam(1e-3)
    step = jaxlab.make_train_step(make_meanflow_loss_fn(m.apply, cfg), tx, has_loss_state=True)
    state = jaxlab.TrainState.create(params=params, tx=tx, rng=0, loss_state=meanflow_init_state(cfg))
    x = jaxlab.data.eight_gaussians().sample(jax.random.PRNGKey(3), 64)
    lams = []
    for _ in range(3):
        state, metrics = step(state, x)
        lams.append(float(metrics["jvp_cond_weight"]))
    assert int(state.loss_state["step"]) == 3 and int(state.step) == 3
    assert float(state.loss_state["auto_den"]) > 0
    assert all(0.0 <= v <= 1.0 for v in lams) and {"mse_fm", "mse_mf", "target_var"} <= set(metrics)
