"""The N:M premise probe against an independent hand-written loop (flip rate, shadow dense v, errors)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.nm import nm_mask as _nm_mask
from jaxlab.training.experiment import data_key, run_training, seed_key
from jaxlab.training.nm_premise import (
    nm_premise_probe,
    optimizer_second_moment,
    premise_summary,
    premise_table,
)
from jaxlab.transforms import sparse_forward_params, sr_ste_adamw, step_adamw

B2 = 0.95
X = jax.random.normal(jax.random.PRNGKey(3), (32, 8))
W_TRUE = jax.random.normal(jax.random.PRNGKey(4), (8, 4))


def loss_fn(params, batch, key):
    idx = batch
    pred = X[idx] @ params["dense"]["kernel"] + params["dense"]["bias"]
    return jnp.mean((pred - X[idx] @ W_TRUE) ** 2), {}


def init_fn(key):
    return {"dense": {"kernel": jax.random.normal(key, (8, 4)), "bias": jnp.zeros(4)}}


def batch_fn(key):
    return jax.random.randint(key, (8,), 0, X.shape[0])


def reference(tx, steps, seed=0, n=1, m=4):
    """The probe's quantities from a plain Python loop (float64 numpy for the statistics; the JAX pieces
    jitted one by one, so the loop does not dispatch every op eagerly)."""
    params = init_fn(seed_key(seed))
    state = tx.init(params)
    update = jax.jit(tx.update)
    nm_mask = jax.jit(_nm_mask, static_argnums=(1, 2, 3))
    dense_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))
    sparse_grad = jax.jit(jax.grad(lambda p, s, b: loss_fn(sparse_forward_params(p, s), b, None)[0]))
    shadow = np.zeros((8, 4))
    prev = np.asarray(nm_mask(params["dense"]["kernel"], n, m, 0))
    out = {"flip_rate": [], "dense_loss": [], "v_rel_err": [], "v_rel_err_kept": [], "v_log_err": [], "v_log_bias": []}
    for t in range(1, steps + 1):
        batch = batch_fn(jax.random.fold_in(data_key(seed), t - 1))
        loss, g_dense = dense_grad(params, batch)
        out["dense_loss"].append(float(loss))
        shadow = B2 * shadow + (1 - B2) * np.asarray(g_dense["dense"]["kernel"], np.float64) ** 2
        u, state = update(sparse_grad(params, state, batch), state, params)
        params = optax.apply_updates(params, u)
        nu, _, horizon = optimizer_second_moment(state)
        v_hat = np.asarray(nu["dense"]["kernel"], np.float64) / (1 - B2 ** int(horizon))
        s_hat = shadow / (1 - B2**t)
        out["v_rel_err"].append(np.linalg.norm(v_hat - s_hat) / np.linalg.norm(s_hat))
        out["v_log_err"].append(np.mean(np.abs(np.log(v_hat + 1e-30) - np.log(s_hat + 1e-30))))
        out["v_log_bias"].append(np.mean(np.log(v_hat + 1e-30) - np.log(s_hat + 1e-30)))
        mask = np.asarray(nm_mask(params["dense"]["kernel"], n, m, 0))
        out["v_rel_err_kept"].append(np.linalg.norm((v_hat - s_hat)[mask]) / np.linalg.norm(s_hat[mask]))
        out["flip_rate"].append(np.mean(mask != prev))
        prev = mask
    return {k: np.asarray(v) for k, v in out.items()}, state


def probed(tx, steps, n=1, m=4):
    return run_training(loss_fn, tx, init_fn, batch_fn, steps=steps, seeds=1, progress=False, vmap=False,
                        forward_params_fn=sparse_forward_params,
                        probe=nm_premise_probe(loss_fn, n=n, m=m, b2=B2, sparsify=r"dense/kernel$"))


@pytest.mark.parametrize("name", ["sr_ste", "step"])
def test_probe_equals_a_hand_written_loop(name):
    kw = dict(n=1, m=4, b2=B2, sparsify=lambda p, x: x.ndim == 2)
    tx = (sr_ste_adamw(0.05, **kw) if name == "sr_ste"
          else step_adamw(0.05, switch_eps=0.0, t_min=0, t_max=12, **kw))
    res = probed(tx, 30)
    ref, state = reference(tx, 30)
    for key in ("flip_rate", "dense_loss", "v_rel_err", "v_rel_err_kept", "v_log_err", "v_log_bias"):
        got = np.asarray(res.trace[key]).reshape(30)
        np.testing.assert_allclose(got, ref[key], rtol=2e-4, atol=1e-6, err_msg=key)
    assert ref["flip_rate"].sum() > 0  # the masks did flip: the flip-rate comparison is not vacuous
    if name == "step":
        # phase 1 (t <= 13) trains dense: its v is the shadow; the frozen v_T0 then drifts away from it
        assert ref["v_rel_err"][:13].max() < 1e-5
        assert ref["v_rel_err"][20:].min() > 1e-3
    else:
        assert ref["v_rel_err"][5:].min() > 1e-4  # the sparse forward's gradients are not the dense ones


def test_dense_adam_matches_the_shadow_and_summary_windows():
    res = run_training(loss_fn, optax.adam(0.05, b2=B2), init_fn, batch_fn, steps=40, seeds=2, progress=False,
                       probe=nm_premise_probe(loss_fn, n=2, m=4, b2=B2, sparsify=r"dense/kernel$"))
    assert np.asarray(res.trace["v_rel_err"]).shape == (2, 40, 1)
    assert float(np.max(res.trace["v_rel_err"])) < 1e-5
    s = premise_summary(res.trace, every=15)  # 2 whole windows, the partial third is dropped
    assert s["step"] == [15, 30]
    np.testing.assert_allclose(s["flip_rate"], np.asarray(res.trace["flip_rate"])[:, :30].reshape(2, 2, 15).mean(-1))


def local_reference(tx, steps, every, k, fwd, seed=0, n=1, m=4):
    """The chunk-end local reference by hand: K fresh-batch squared straight-through gradients at w_t."""
    params = init_fn(seed_key(seed))
    state, rng = tx.init(params), jax.random.fold_in(seed_key(seed), 1)
    update, nm_mask = jax.jit(tx.update), _nm_mask
    out = {"local_rel_err_kept": [], "local_log_bias_kept": [], "local_log_err_kept": []}
    for t in range(1, steps + 1):
        batch = batch_fn(jax.random.fold_in(data_key(seed), t - 1))
        g = jax.grad(lambda p, s=state, b=batch: loss_fn(fwd(p, s), b, None)[0])(params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        if t % every:
            continue
        keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, t), 0x10CA1), k)
        r = np.mean([np.asarray(jax.grad(lambda p, kk=kk, s=state: loss_fn(fwd(p, s), batch_fn(kk), kk)[0])(
            params)["dense"]["kernel"], np.float64) ** 2 for kk in keys], axis=0)
        nu, _, horizon = optimizer_second_moment(state)
        v_hat = np.asarray(nu["dense"]["kernel"], np.float64) / (1 - B2 ** int(horizon))
        mask = np.asarray(nm_mask(params["dense"]["kernel"], n, m, 0))
        lr = np.log(v_hat[mask] + 1e-30) - np.log(r[mask] + 1e-30)
        out["local_rel_err_kept"].append(np.linalg.norm((v_hat - r)[mask]) / np.linalg.norm(r[mask]))
        out["local_log_bias_kept"].append(lr.mean())
        out["local_log_err_kept"].append(np.abs(lr).mean())
    return {key: np.asarray(v) for key, v in out.items()}


@pytest.mark.parametrize("name", ["sr_ste", "adam"])
def test_local_reference_equals_a_hand_computation(name):
    kw = dict(n=1, m=4, b2=B2, sparsify=lambda p, x: x.ndim == 2)
    tx = sr_ste_adamw(0.05, **kw) if name == "sr_ste" else optax.adam(0.05, b2=B2)
    fwd = sparse_forward_params if name == "sr_ste" else None  # None: dense forward (the identity)
    probe = nm_premise_probe(loss_fn, n=1, m=4, b2=B2, sparsify=r"dense/kernel$", local_batches=6,
                             batch_fn=batch_fn, forward_params_fn=fwd)
    res = run_training(loss_fn, tx, init_fn, batch_fn, steps=24, seeds=1, chunk=8, progress=False,
                       forward_params_fn=fwd, probe=probe)
    ref = local_reference(tx, 24, 8, 6, fwd or (lambda p, s: p))
    assert res.trace["chunk_end_step"].tolist() == [[8, 16, 24]]
    for key, want in ref.items():
        np.testing.assert_allclose(np.asarray(res.trace[key]).reshape(3), want, rtol=2e-4, atol=1e-6, err_msg=key)
    s = premise_summary(res.trace, every=8)
    assert s["local_step"] == [8, 16, 24] and np.shape(s["local_rel_err_kept"]) == (1, 3)


def test_without_the_shadow_only_flips_and_the_local_reference_are_recorded():
    kw = dict(n=1, m=4, b2=B2, sparsify=lambda p, x: x.ndim == 2)
    tx = sr_ste_adamw(0.05, **kw)
    full = probed(tx, 20)
    lean = run_training(loss_fn, tx, init_fn, batch_fn, steps=20, seeds=1, chunk=10, progress=False, vmap=False,
                        forward_params_fn=sparse_forward_params,
                        probe=nm_premise_probe(loss_fn, n=1, m=4, b2=B2, sparsify=r"dense/kernel$", shadow=False,
                                               local_batches=3, batch_fn=batch_fn,
                                               forward_params_fn=sparse_forward_params))
    assert "v_rel_err" not in lean.trace and "dense_loss" not in lean.trace
    np.testing.assert_array_equal(lean.trace["flip_rate"], full.trace["flip_rate"])  # the probe never steers
    assert float(np.sum(lean.trace["flip_rate"])) > 0
    s = premise_summary(lean.trace, every=10)
    header, rows = premise_table({"sr_ste": s})
    assert not any("shadow" in h or "v rel. err @" in h for h in header)
    assert any(h.startswith("v vs local r") for h in header) and len(rows[0]) == len(header)


def test_probe_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs batch_fn"):
        nm_premise_probe(loss_fn, n=2, m=4, b2=B2, local_batches=4)
    with pytest.raises(ValueError, match="selects no leaf for 2:4"):
        run_training(loss_fn, optax.adam(0.1), init_fn, batch_fn, steps=1, seeds=1, progress=False,
                     probe=nm_premise_probe(loss_fn, n=2, m=4, b2=B2, sparsify=r"nothing$"))
    with pytest.raises(ValueError, match="expected one Adam-family state"):
        optimizer_second_moment(optax.sgd(0.1).init(init_fn(jax.random.PRNGKey(0))))
