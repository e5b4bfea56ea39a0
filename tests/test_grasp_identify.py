"""Unsupervised identification: thin SVD of s A B, planted directions, failure reporting, per-layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlab
from jaxlab.transforms.grasp_identify import lora_svd

D, R = 16, 4


def _unit(rng, n):
    v = rng.standard_normal(n)
    return v / np.linalg.norm(v)


def _module(rng, side, u, strength, task, decoy=None, d_other=12):
    """LoRA factors of a rank-R update: spurious `strength * u` on the residual side + R-1 task directions.

    A decoy direction (shared across modules) is planted on the *non-residual* side, so reading the wrong
    side would find it instead of u.
    """
    cols_res = [strength * u] + [t * _unit(rng, D) for t in task]
    other = [decoy if decoy is not None else _unit(rng, d_other)] + [_unit(rng, d_other) for _ in task]
    res = np.stack(cols_res, 1)  # (D, R)
    oth = np.stack(other, 1)  # (d_other, R)
    if side == "reader":  # kernel (d_model, d_out): A (D, R), B (R, d_out)
        return {"lora_a": jnp.asarray(res), "lora_b": jnp.asarray(oth.T)}
    return {"lora_a": jnp.asarray(oth), "lora_b": jnp.asarray(res.T)}  # writer: (d_in, R), (R, D)


def _params(seed, strength, task, per_layer_u=None, decoy=True):
    rng = np.random.default_rng(seed)
    u = _unit(rng, D)
    z = _unit(rng, 12)
    p = {}
    for layer in range(2):
        ul = u if per_layer_u is None else per_layer_u[layer]
        blk = {"attn": {}, "mlp": {}}
        for grp, name, side in (("attn", "q", "reader"), ("attn", "v", "reader"), ("attn", "o", "writer"),
                                ("mlp", "up", "reader"), ("mlp", "down", "writer")):
            blk[grp][name] = _module(rng, side, ul, strength, task, decoy=3.0 * z if decoy else None)
        p[f"block_{layer}"] = blk
    return p, u


def test_lora_svd_matches_dense_svd():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((9, 3)), rng.standard_normal((3, 7))
    left, s, right = lora_svd(a, b, scale=0.5)
    dw = 0.5 * a @ b
    np.testing.assert_allclose(s, np.linalg.svd(dw, compute_uv=False)[:3], rtol=1e-10)
    np.testing.assert_allclose(left @ np.diag(s) @ right.T, dw, atol=1e-10)
    np.testing.assert_allclose(left.T @ left, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(right.T @ right, np.eye(3), atol=1e-10)


def test_recovers_planted_direction_on_the_right_side():
    p, u = _params(0, strength=3.0, task=[1.0, 0.8, 0.6])
    res = jaxlab.identify_spurious_subspace(p)
    assert res.k == 1
    cos = abs(float(np.asarray(res.U)[:, 0] @ u))
    assert cos > 0.99, cos
    assert res.trustworthy and res.eigengap > 5
    assert 0.5 < res.explained_energy < 1.0
    assert len(res.module_singular_values) == 10
    # Unit energy per module: eigenvalues sum to the number of modules.
    assert res.eigenvalues.sum() == pytest.approx(10.0, rel=1e-6)
    assert "trustworthy" in res.summary()


def test_reports_failure_when_signal_below_task():
    rng = np.random.default_rng(1)
    q = np.linalg.qr(rng.standard_normal((D, 4)))[0]
    task_dirs, u = [q[:, 0], q[:, 1], q[:, 2]], q[:, 3]
    p = {}
    for layer in range(2):
        for name, side in (("q", "reader"), ("o", "writer")):
            # A shared 3-dim task subspace with equal strength dominates a weak spurious direction.
            res_cols = np.stack([0.3 * u] + task_dirs, 1)
            oth = np.stack([_unit(rng, 12) for _ in range(4)], 1)
            f = ({"lora_a": jnp.asarray(res_cols), "lora_b": jnp.asarray(oth.T)} if side == "reader"
                 else {"lora_a": jnp.asarray(oth), "lora_b": jnp.asarray(res_cols.T)})
            p.setdefault(f"block_{layer}", {}).setdefault("attn", {})[name] = f
    res = jaxlab.identify_spurious_subspace(p, k=1)
    assert abs(float(np.asarray(res.U)[:, 0] @ u)) < 0.1
    assert res.eigengap < 1.2 and not res.trustworthy
    strong = jaxlab.identify_spurious_subspace(_params(1, 3.0, [1.0, 1.0, 1.0])[0], k=1)
    assert strong.trustworthy


def test_per_layer_and_stacked():
    rng = np.random.default_rng(2)
    us = [_unit(rng, D), _unit(rng, D)]
    p, _ = _params(2, strength=3.0, task=[1.0, 0.5, 0.5], per_layer_u=us, decoy=False)
    res = jaxlab.identify_spurious_subspace(p, aggregation="per_layer", k=1)
    assert res.layer_ids == (0, 1) and res.U_layers.shape == (2, D, 1)
    for i in range(2):
        assert abs(float(np.asarray(res.U_layers[i])[:, 0] @ us[i])) > 0.99
        assert res.layer_eigengaps[i] > 5
    # The same factors stacked on a leading layer axis give the same per-layer bases.
    stacked = {"blocks": jax.tree.map(lambda a, b: jnp.stack([a, b]), p["block_0"], p["block_1"])}
    rs = jaxlab.identify_spurious_subspace(stacked, aggregation="per_layer", k=1)
    assert rs.layer_ids == (0, 1)
    for i in range(2):
        assert abs(float(np.asarray(rs.U_layers[i])[:, 0] @ us[i])) > 0.99


def test_identification_errors():
    p, _ = _params(3, 3.0, [1.0])
    p["block_0"]["attn"]["o"]["lora_b"] = jnp.ones((2, 10))  # a writer with residual width 10, not 16
    p["block_0"]["attn"]["o"]["lora_a"] = jnp.ones((12, 2))
    with pytest.raises(ValueError, match=r"writer leaf \['block_0'\]\['attn'\]\['o'\]\['lora_b'\].*width 10"):
        jaxlab.identify_spurious_subspace(p)
    with pytest.raises(ValueError, match="no lora_a/lora_b pair"):
        jaxlab.identify_spurious_subspace({"foo": {"lora_a": jnp.ones((4, 1)), "lora_b": jnp.ones((1, 4))}})
    with pytest.raises(ValueError, match="aggregation"):
        jaxlab.identify_spurious_subspace(p, aggregation="mean")
    q, _ = _params(3, 3.0, [1.0])
    q["block_0"]["attn"]["q"]["lora_b"] = jnp.ones((3, 12))
    with pytest.raises(ValueError, match=r"lora_a.*\(16, 2\).*lora_b.*\(3, 12\)"):
        jaxlab.identify_spurious_subspace(q)
