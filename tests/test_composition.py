"""Composition matrix: every method's step under jit, pmap, an 8-device mesh (DP and FSDP) and
shard_map gives the single-device result; optimizer-state shardings survive updates; one compile."""

import jax
import jax.numpy as jnp
import optax
import pytest
from _parallel import MODES, assert_close, run_mode

from jaxlab.distributed import unbox
from jaxlab.losses import flow_matching_loss
from jaxlab.nn import VelocityMLP


def _fm_case():
    model = VelocityMLP(hidden=32, depth=2, time_dim=8)
    apply = lambda p, z, r, t: model.apply({"params": p}, z, r, t)
    params = unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2)), jnp.zeros(1), jnp.ones(1))["params"])

    def loss_fn(params, batch, key):
        x, t, e = batch  # explicit t and noise: the loss is a deterministic function of the batch
        return flow_matching_loss(apply, params, x, key, t=t, noise=e)

    def batch(i):
        k = jax.random.PRNGKey(100 + i)
        return (jax.random.normal(k, (32, 2)), jax.random.uniform(jax.random.fold_in(k, 1), (32,)),
                jax.random.normal(jax.random.fold_in(k, 2), (32, 2)))

    return dict(loss_fn=loss_fn, params=params, batches=[batch(i) for i in range(3)])


CASES = {
    "flow_matching+adamw": (_fm_case, lambda: optax.adamw(1e-2, weight_decay=1e-3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_modes_agree(case, eight_devices):
    build, make_tx = CASES[case]
    c = build()
    tx = make_tx()
    ref, traces, _ = run_mode("single", c["loss_fn"], tx, c["params"], c["batches"], eight_devices,
                              **c.get("kw", {}))
    assert traces == 1
    for mode in MODES[1:]:
        state, traces, info = run_mode(mode, c["loss_fn"], tx, c["params"], c["batches"], eight_devices,
                                       **c.get("kw", {}))
        assert traces == 1, f"{mode} retraced: {traces}"
        assert_close(ref.params, state.params, what=f"{case}/{mode} params")
        assert_close(ref.opt_state, state.opt_state, what=f"{case}/{mode} opt_state")
        if info is not None:
            assert info["opt_state_shardings_kept"], f"{case}/{mode}: optimizer-state shardings changed"
