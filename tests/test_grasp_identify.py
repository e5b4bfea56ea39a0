"""Unsupervised identification: thin SVD of s A B, planted directions, failure reporting, per-layer."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlab
from jaxlab.nn import lora
from jaxlab.nn.transformer import Transformer, TransformerConfig
from jaxlab.transforms.grasp_identify import (
    choose_k,
    collect_lora_modules,
    common_residual_width,
    direction_weights,
    eigengap_and_energy,
    identify_spurious_subspace,
    lora_svd,
    pool_directions,
    residual_directions,
)

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


# ---------------------------------------------------------------- the pieces, each against numpy

_TARGETS = [r"attn/(q|k|v|o)$", r"mlp/(up|down)$", r"embed$", r"^unembed$"]  # embed$ also hits pos_embed


@functools.cache
def _transformer_lora(seed=0, d_model=16, rank=2):
    """The bundled transformer with LoRA on every projection, embed and pos_embed; random (trained-like) B."""
    cfg = TransformerConfig(vocab=24, d_model=d_model, n_layers=2, n_heads=2, d_ff=32, max_len=8)
    # The base values do not enter identification: take the param tree's structure and shapes only.
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
    base = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.meta.unbox(shapes["params"]))
    p = lora.inject(base, _TARGETS, rank, key=jax.random.PRNGKey(seed + 1))
    rng = np.random.default_rng(seed + 2)
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.standard_normal(x.shape).astype(np.float32) if path[-1].key == "lora_b" else x, p
    )
    return p, cfg


def _projector(v):
    v = np.asarray(v, np.float64)
    return v @ v.T


def test_collect_lora_modules_sides_of_the_bundled_transformer():
    p, cfg = _transformer_lora()
    mods = collect_lora_modules(p)
    got = {m.path: (m.side, m.layer, m.width) for m in mods}
    want = {"embed": ("writer", None, cfg.d_model), "unembed": ("reader", None, cfg.d_model)}
    for i in range(cfg.n_layers):
        for name, side in (("attn/q", "reader"), ("attn/k", "reader"), ("attn/v", "reader"),
                           ("attn/o", "writer"), ("mlp/up", "reader"), ("mlp/down", "writer")):
            want[f"block_{i}/{name}"] = (side, i, cfg.d_model)
    assert got == want  # pos_embed carries LoRA but no residual side: excluded
    assert "pos_embed" in lora.lora_modules(p)
    assert [m.path for m in mods] == sorted(want)
    assert common_residual_width(mods) == cfg.d_model
    by_path = {m.path: m for m in mods}
    np.testing.assert_array_equal(by_path["block_1/mlp/down"].b, p["block_1"]["mlp"]["down"]["lora_b"])
    assert by_path["block_0/attn/q"].residual_leaf == "['block_0']['attn']['q']['lora_a']"
    assert by_path["embed"].residual_leaf == "['embed']['lora_b']"
    # A rule set that excludes attention keeps only the MLP and embedding modules.
    no_attn = collect_lora_modules(p, {r"attn/\w+$": None})
    assert {m.path for m in no_attn} == {k for k in want if "/attn/" not in k}


@pytest.mark.parametrize("side", ["reader", "writer"])
def test_residual_directions_match_dense_svd(side):
    rng = np.random.default_rng(5)
    d_other, r, s = 7, 3, 0.5
    if side == "reader":
        a, b = rng.standard_normal((2, D, r)), rng.standard_normal((2, r, d_other))
        params = {"blocks": {"attn": {"q": {"lora_a": a, "lora_b": b}}}}
    else:
        a, b = rng.standard_normal((2, d_other, r)), rng.standard_normal((2, r, D))
        params = {"blocks": {"attn": {"o": {"lora_a": a, "lora_b": b}}}}
    (mod,) = collect_lora_modules(params)
    assert mod.side == side and mod.stacked and mod.width == D
    for weighting in ("energy", "sigma", "uniform"):
        dirs = residual_directions(mod, scale=s, weighting=weighting)
        assert [d.layer for d in dirs] == [0, 1]  # a stack's slice index is its layer
        for i, d in enumerate(dirs):
            lu, sig, rvt = np.linalg.svd(s * a[i] @ b[i])  # dense reference
            ref_v = lu[:, :r] if side == "reader" else rvt[:r].T
            np.testing.assert_allclose(d.sigma, sig[:r], rtol=1e-10)
            for j in range(r):  # vectors up to sign: compare rank-1 projectors
                np.testing.assert_allclose(_projector(d.vectors[:, j : j + 1]), _projector(ref_v[:, j : j + 1]),
                                           atol=1e-10)
            ref_w = {"energy": sig[:r] ** 2 / np.sum(sig**2), "sigma": sig[:r] / np.sum(sig),
                     "uniform": np.full(r, 1.0 / r)}[weighting]
            np.testing.assert_allclose(d.weights, ref_w, rtol=1e-10)
    top = residual_directions(mod, top_per_module=1)
    assert all(d.vectors.shape == (D, 1) and d.weights.shape == (1,) and d.sigma.shape == (r,) for d in top)
    np.testing.assert_array_equal(direction_weights(np.zeros(3), "energy"), np.zeros(3))
    with pytest.raises(ValueError, match="weighting='bogus'"):
        direction_weights(np.ones(2), "bogus")


def test_pooling_and_diagnostics_match_dense_eigh():
    rng = np.random.default_rng(6)
    vecs = [np.linalg.qr(rng.standard_normal((D, r)))[0] for r in (3, 2, 4)]
    wts = [rng.uniform(0.1, 1.0, v.shape[1]) for v in vecs]
    u, lam = pool_directions(vecs, wts, D)
    c = sum(v @ np.diag(w) @ v.T for v, w in zip(vecs, wts))  # C formed densely, only here
    ev, evec = np.linalg.eigh(c)
    ev, evec = ev[::-1], evec[:, ::-1]
    np.testing.assert_allclose(lam, ev[: lam.size], atol=1e-12)
    np.testing.assert_allclose(ev[lam.size :], 0.0, atol=1e-12)
    for k in (1, 2, 3):
        np.testing.assert_allclose(_projector(u[:, :k]), _projector(evec[:, :k]), atol=1e-8)
        gap, energy = eigengap_and_energy(lam, k)
        assert gap == pytest.approx(ev[k - 1] / ev[k], rel=1e-10)
        assert energy == pytest.approx(ev[:k].sum() / np.trace(c), rel=1e-10)
    ratios = [ev[j] / ev[j + 1] for j in range(3)]
    assert choose_k(lam, None, max_k=3) == int(np.argmax(ratios)) + 1
    assert choose_k(lam, 2, max_k=3) == 2
    assert choose_k(np.array([1.0, 0.0]), None, max_k=3) == 1
    assert np.isnan(eigengap_and_energy(lam, 0)[0]) and eigengap_and_energy(lam, 0)[1] == 0.0
    assert eigengap_and_energy(np.array([2.0, 0.0]), 1) == (float("inf"), 1.0)


def test_identify_matches_a_dense_reference_on_the_bundled_transformer():
    """End to end: U U^T equals the top eigenvectors of C built from dense dW = s A B by numpy alone."""
    p, cfg = _transformer_lora()
    scale, k = 0.5, 2
    res = identify_spurious_subspace(p, k=k, scale=scale, aggregation="per_layer")
    reader = {"q", "k", "v", "up", "unembed"}
    c_all = np.zeros((cfg.d_model, cfg.d_model))
    c_layer = {i: np.zeros_like(c_all) for i in range(cfg.n_layers)}
    n_mod = 0
    for path, mod in [("embed", p["embed"]), ("unembed", p["unembed"])] + [
        (f"block_{i}/{g}/{n}", p[f"block_{i}"][g][n]) for i in range(cfg.n_layers)
        for g, names in (("attn", "qkvo"), ("mlp", ("up", "down"))) for n in names
    ]:
        dw = scale * np.asarray(mod["lora_a"], np.float64) @ np.asarray(mod["lora_b"], np.float64)
        lu, sig, rvt = np.linalg.svd(dw, full_matrices=False)
        r = mod["lora_a"].shape[-1]
        v = lu[:, :r] if path.split("/")[-1] in reader else rvt[:r].T
        c = v @ np.diag(sig[:r] ** 2 / np.sum(sig**2)) @ v.T
        c_all += c
        if path.startswith("block_"):
            c_layer[int(path[6])] += c
        n_mod += 1
        np.testing.assert_allclose(res.module_singular_values[path], sig[:r], rtol=1e-8)
    assert n_mod == len(res.module_singular_values) == 2 + 6 * cfg.n_layers
    ev, evec = np.linalg.eigh(c_all)
    ev, evec = ev[::-1], evec[:, ::-1]
    np.testing.assert_allclose(res.eigenvalues, ev[: res.eigenvalues.size], atol=1e-10)
    assert res.eigenvalues.sum() == pytest.approx(n_mod, rel=1e-10)  # unit energy per module
    np.testing.assert_allclose(_projector(res.U), _projector(evec[:, :k]), atol=1e-6)
    assert res.eigengap == pytest.approx(ev[k - 1] / ev[k], rel=1e-10)
    assert res.layer_ids == (0, 1)
    for i in range(cfg.n_layers):
        ev_l, evec_l = np.linalg.eigh(c_layer[i])
        np.testing.assert_allclose(_projector(res.U_layers[i]), _projector(evec_l[:, ::-1][:, :k]), atol=1e-6)
        assert res.layer_explained_energy[i] == pytest.approx(ev_l[::-1][:k].sum() / ev_l.sum(), rel=1e-8)
