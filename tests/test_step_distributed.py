"""STEP under pmap, on an 8-device mesh with FSDP-sharded state, in the train step, and through orbax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxlab.distributed.mesh import make_mesh
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.training import TrainState, make_train_step, state_shardings
from jaxlab.transforms import sparse_forward_params, step_adamw, step_phase, step_switch_step

# no biases: the key bias has an exactly-zero gradient (softmax shift invariance), and Adam would
# turn its float noise into lr-sized steps that differ between reduction orders
CFG = TransformerConfig(vocab=32, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16, use_bias=False)
KW = dict(n=2, m=4, switch_eps=0.0, t_min=1, t_max=2, window=4)


@pytest.fixture(scope="module")
def lm():
    model = Transformer(CFG)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (16, 16), 0, CFG.vocab)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(1), tokens[:1])["params"]  # jitted: one compile

    def loss_fn(params, batch, key):
        return causal_lm_loss(model.apply({"params": params}, batch), batch), {}

    return model, boxed, nn.meta.unbox(boxed), tokens, loss_fn


def leaves_close(a, b, rtol=2e-5, atol=3e-4):
    """Equal up to reduction-order noise; atol is lr/30 because Adam rescales tiny gradient
    differences on near-zero-gradient entries to O(lr) steps (a real bug would be O(lr) everywhere)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def single(lm):
    """One compiled single-device train step (shared) and the states after each of 5 steps."""
    _, _, params, tokens, loss_fn = lm
    tx = step_adamw(1e-2, **KW)
    step = make_train_step(loss_fn, tx, forward_params_fn=sparse_forward_params)
    states = [TrainState.create(params=params, tx=tx, rng=0)]
    for _ in range(5):
        states.append(step(states[-1], tokens)[0])
    return tx, step, states


def test_train_step_crosses_switch_and_uses_sparse_forward(lm, single):
    _, _, _, tokens, loss_fn = lm
    state = single[2][4]
    assert int(step_phase(single[2][2].opt_state)) == 0
    assert int(step_phase(state.opt_state)) == 1 and int(step_switch_step(state.opt_state)) == 3
    # the phase-2 gradient is the gradient at the masked weights (straight-through)
    fwd = sparse_forward_params(state.params, state.opt_state)
    g_ste = jax.grad(lambda p: loss_fn(sparse_forward_params(p, state.opt_state), tokens, None)[0])(state.params)
    g_masked = jax.grad(lambda p: loss_fn(p, tokens, None)[0])(fwd)
    leaves_close(g_ste, g_masked, rtol=1e-5, atol=1e-7)


def test_pmap_matches_single_device(lm, eight_devices):
    _, _, params, tokens, loss_fn = lm
    tx = step_adamw(1e-2, **KW)

    def grads(params, opt_state, batch):
        return jax.grad(lambda p: loss_fn(sparse_forward_params(p, opt_state), batch, None)[0])(params)

    def pstep(params, opt_state, batch):
        g = jax.lax.pmean(grads(params, opt_state, batch), "d")
        u, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, u), opt_state

    @jax.jit
    def sstep(params, opt_state, batch):
        u, opt_state = tx.update(grads(params, opt_state, batch), opt_state, params)
        return optax.apply_updates(params, u), opt_state

    p_step = jax.pmap(pstep, axis_name="d", devices=eight_devices)
    rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)
    pp, ps = rep(params), rep(tx.init(params))
    sp, ss = params, tx.init(params)
    for _ in range(4):
        pp, ps = p_step(pp, ps, tokens.reshape(8, 2, 16))
        sp, ss = sstep(sp, ss, tokens)
    leaves_close(jax.tree.map(lambda x: x[0], pp), sp)
    assert int(step_switch_step(jax.tree.map(lambda x: x[0], ps))) == 3


def test_fsdp_mesh_matches_single_device(lm, single, eight_devices):
    _, boxed, params, tokens, loss_fn = lm
    tx = single[0]
    mesh = make_mesh(data=2, fsdp=4, devices=eight_devices)
    state = TrainState.create(params=params, tx=tx, rng=0)
    shardings = state_shardings(jax.eval_shape(lambda: state), tx, mesh, boxed_params=boxed)
    state_sh = jax.device_put(state, shardings)
    # the optimizer moments of an FSDP-sharded kernel are sharded like it
    mu_q = state_sh.opt_state[0].mu["block_0"]["attn"]["q"]["kernel"]
    assert mu_q.addressable_shards[0].data.shape == (32 // 4, 32)
    step = make_train_step(loss_fn, tx, forward_params_fn=sparse_forward_params, mesh=mesh, state_sharding=shardings)
    for _ in range(4):
        state_sh, _ = step(state_sh, tokens)
    ref = single[2][4]
    leaves_close(state_sh.params, ref.params)
    leaves_close(state_sh.opt_state[0].nu, ref.opt_state[0].nu, atol=1e-7)
    assert int(step_switch_step(state_sh.opt_state)) == 3


def test_checkpoint_round_trip_mid_phase(lm, single, tmp_path):
    tokens = lm[3]
    _, step, states = single
    state = states[5]  # switched at t = 3; two phase-2 steps done
    assert int(step_phase(state.opt_state)) == 1
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "mid", state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "mid", jax.eval_shape(lambda: state))
    assert int(step_switch_step(restored.opt_state)) == 3
    a, b = state, restored
    for _ in range(2):
        a, _ = step(a, tokens)
        b, _ = step(b, tokens)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
