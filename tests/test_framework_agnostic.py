"""The core knows nothing about Flax Linen: the methods run on raw-JAX param dicts and on an NNX model
split into a pure state (``nnx.split``), with the same results as on the equivalent Linen-style tree."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlab
from jaxlab.losses import MeanFlowConfig, meanflow_loss
from jaxlab.transforms import grasp, sparse_forward_params, step_adamw, step_phase, subspace_leakage

D_IN, D_H = 8, 16


class Net(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(D_IN, D_H, rngs=rngs)
        self.out = nnx.Linear(D_H, D_IN, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.inp(x)))


def _raw_from_state(state):
    """The same numbers as a plain nested dict (what a raw-JAX user holds)."""
    return nnx.to_pure_dict(state)


def test_step_and_grasp_on_nnx_state_match_raw_jax_dicts():
    graphdef, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
    raw = _raw_from_state(state)
    x = jax.random.normal(jax.random.PRNGKey(1), (32, D_IN))

    def loss_nnx(st):
        return jnp.mean((nnx.merge(graphdef, st)(x) - x) ** 2)

    def loss_raw(p):  # the same network written by hand
        h = jnp.tanh(x @ p["inp"]["kernel"] + p["inp"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - x) ** 2)

    u = np.linalg.qr(np.random.default_rng(0).normal(size=(D_H, 1)))[0]
    sides = {r"^inp$": "writer", r"^out$": "reader"}  # the hidden layer plays the residual stream
    makers = {
        "step": lambda: step_adamw(1e-2, n=2, m=4, switch_eps=0.0, t_min=1, t_max=2),
        "grasp": lambda: optax.chain(optax.adamw(1e-2, weight_decay=0.1), grasp(u, sides)),
    }
    for name, make in makers.items():
        finals = []
        for params, loss in ((state, loss_nnx), (raw, loss_raw)):
            tx = make()
            opt = tx.init(params)

            @jax.jit  # one compile per (method, tree type), not one per eager op
            def one_step(params, opt, tx=tx, loss=loss, name=name):
                fwd = (lambda p: sparse_forward_params(p, opt)) if name == "step" else (lambda p: p)
                upd, opt = tx.update(jax.grad(lambda p: loss(fwd(p)))(params), opt, params)
                return optax.apply_updates(params, upd), opt

            for _ in range(4):
                params, opt = one_step(params, opt)
            finals.append((params, opt))
        (p_nnx, o_nnx), (p_raw, o_raw) = finals
        got = _raw_from_state(p_nnx)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p_raw)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=name)
        if name == "step":  # the default leaf filter found the NNX kernels (path ends in ".value")
            assert int(step_phase(o_nnx)) == 1
            pruned = _raw_from_state(jaxlab.prune(p_nnx, o_nnx))
            assert np.all((np.asarray(pruned["inp"]["kernel"]) != 0).reshape(2, 4, D_H).sum(1) == 2)
        else:
            delta = jax.tree.map(lambda a, b: a - b, got, raw)
            leak = subspace_leakage(delta, u, sides)
            assert set(leak) == {"['inp']['kernel']", "['inp']['bias']", "['out']['kernel']"}
            assert max(leak.values()) < 1e-5


def test_meanflow_loss_with_a_raw_jax_apply_fn():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": 0.3 * jax.random.normal(k[0], (4, 32)), "w2": 0.3 * jax.random.normal(k[1], (32, 2))}

    def apply_fn(p, z, r, t):  # no module library at all
        inp = jnp.concatenate([z, t[:, None], (t - r)[:, None]], axis=-1)
        return jnp.tanh(inp @ p["w1"]) @ p["w2"]

    x = jax.random.normal(k[2], (64, 2))
    cfg = MeanFlowConfig(jvp_cond_weight=0.5)
    (loss, aux), g = jax.value_and_grad(lambda p: meanflow_loss(apply_fn, p, x, k[3], config=cfg), has_aux=True)(params)
    assert np.isfinite(float(loss)) and float(aux["mse_mf"]) > 0
    assert all(float(jnp.linalg.norm(v)) > 0 for v in jax.tree.leaves(g))
