"""GRASP's residual mode: project_cotangent, the bundled models' hook, the Linen interceptor, grasp(mode=...).

Properties: the forward pass is bit-identical with and without the projection; the cotangent reaching every
residual write has no component along span(U) (read off additive probes, compared with an explicit
``I - beta U U^T``); the mode commutes with jit / vmap / scan / shard_map / sharded jit; the interceptor and
the hook give the same gradients; update-mode invariants are unchanged by the mode switch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlab
from jaxlab.nn import (
    Decoder,
    DecoderConfig,
    Transformer,
    TransformerConfig,
    causal_lm_loss,
    grasp_intercept,
    residual_projection_hook,
)
from jaxlab.transforms import project_cotangent

D = 16


def _ortho(seed, d, k):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))[0]


@pytest.fixture(scope="module")
def tiny():
    cfg = TransformerConfig(vocab=20, d_model=D, n_layers=2, n_heads=2, d_ff=32, max_len=12)
    model = Transformer(cfg)
    toks = jax.random.randint(jax.random.PRNGKey(0), (4, 12), 0, 20)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), toks)["params"])
    return model, toks, params, _ortho(0, D, 3)


# ---------------------------------------------------------------------------------------------------- primitive


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_project_cotangent_identity_forward_and_projected_backward(beta):
    U = _ortho(1, 6, 2)
    h = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 6))
    f = lambda x: jnp.sum(jnp.sin(x) * w)
    out = project_cotangent(h, U, beta)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(h))
    g = jax.grad(lambda x: f(project_cotangent(x, U, beta)))(h)
    ref = np.asarray(jax.grad(f)(h)) @ (np.eye(6) - beta * U @ U.T)  # explicit projector, float64
    np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-5, atol=1e-6)
    if beta == 1.0:
        assert np.abs(np.asarray(g) @ U).max() < 1e-6


def test_project_cotangent_orthonormalises_and_checks_width():
    A = np.random.default_rng(0).standard_normal((6, 2)) * 3.0  # not orthonormal: QR'd to span(A)
    g = jax.grad(lambda x: jnp.sum(project_cotangent(x, A) * jnp.arange(6.0)))(jnp.ones(6))
    assert np.abs(np.asarray(g) @ A).max() < 1e-5
    with pytest.raises(ValueError, match=r"h has shape \(2, 5\).*d_model=6"):
        project_cotangent(jnp.ones((2, 5)), A)
    with pytest.raises(ValueError, match="per-layer basis"):
        project_cotangent(jnp.ones((2, 6)), np.stack([_ortho(0, 6, 1), _ortho(1, 6, 1)]))
    with pytest.raises(ValueError, match="beta"):
        project_cotangent(jnp.ones(6), A, beta=2.0)


def test_project_cotangent_under_vmap_scan_and_shard_map():
    U = jnp.asarray(_ortho(2, 8, 2), jnp.float32)
    xs = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 8))
    W = jax.random.normal(jax.random.PRNGKey(1), (8, 8)) / 3

    def loss_scan(x):  # three residual steps, projected each time, inside lax.scan
        def body(h, _):
            h = project_cotangent(h + jnp.tanh(h @ W), U)
            return h, None
        return jnp.sum(jax.lax.scan(body, project_cotangent(x, U), None, length=3)[0] ** 2)

    def loss_unrolled(x):
        h = project_cotangent(x, U)  # the input is a residual write too
        for _ in range(3):
            h = project_cotangent(h + jnp.tanh(h @ W), U)
        return jnp.sum(h ** 2)

    g_scan = jax.jit(jax.vmap(jax.grad(loss_scan)))(xs)
    g_ref = jnp.stack([jax.grad(loss_unrolled)(x) for x in xs])
    np.testing.assert_allclose(np.asarray(g_scan), np.asarray(g_ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(g_scan @ U).max()) < 1e-5
    # shard_map over a 'data' axis (each device projects its rows) and a sharded jit: same numbers
    n = min(4, jax.device_count())
    mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
    sm = jax.jit(jax.shard_map(jax.vmap(jax.grad(loss_scan)), mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    np.testing.assert_allclose(np.asarray(sm(xs)), np.asarray(g_ref), rtol=1e-5, atol=1e-5)
    xs_sharded = jax.device_put(xs, NamedSharding(mesh, P("data")))
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(jax.grad(loss_scan)))(xs_sharded)), np.asarray(g_ref),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ bundled Transformer


def _probed_loss(model, toks, U, beta, sites=("embed", "attn", "mlp")):
    """Loss with an additive zero probe at every residual write: d loss / d probe = the cotangent there,
    *after* the projection hook (the probe is added by the hook's ``then``, before the projection)."""
    def loss(params, probes):
        then = lambda layer, site, h: h + probes[f"{layer}/{site}"]
        hook = then if U is None else residual_projection_hook(U, beta, sites=sites, then=then)
        return causal_lm_loss(model.apply({"params": params}, toks, resid_hook=hook), toks)
    return loss


def _probes(model, toks):
    keys = ["0/embed"] + [f"{i}/{s}" for i in range(model.cfg.n_layers) for s in ("attn", "mlp")]
    return {k: jnp.zeros((*toks.shape, model.cfg.d_model)) for k in keys}


def test_transformer_hook_forward_bit_identical_and_cotangents_orthogonal(tiny):
    model, toks, params, U = tiny
    plain = model.apply({"params": params}, toks)
    hooked = model.apply({"params": params}, toks, resid_hook=residual_projection_hook(U))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(hooked))
    probes = _probes(model, toks)
    g_plain = jax.jit(jax.grad(_probed_loss(model, toks, None, 1.0), argnums=1))(params, probes)
    gp, g_proj = jax.jit(jax.grad(_probed_loss(model, toks, U, 1.0), argnums=(0, 1)))(params, probes)
    for site in probes:
        along_plain = float(jnp.abs(g_plain[site] @ U).max())
        assert along_plain > 1e-4, site  # the loss does push along U without the projection
        assert float(jnp.abs(g_proj[site] @ U).max()) < 1e-6 * max(along_plain, 1.0), site
    # the writers' parameter gradients lose span(U) on their output axis; the embedding rows too
    for w in (gp["block_0"]["attn"]["o"]["kernel"], gp["block_1"]["mlp"]["down"]["kernel"], gp["embed"]["embedding"]):
        assert float(jnp.abs(w @ U).max()) < 1e-6


def test_hook_sites_and_then_order(tiny):
    model, toks, params, U = tiny
    probes = _probes(model, toks)
    g = jax.jit(jax.grad(_probed_loss(model, toks, U, 1.0, sites=("mlp",)), argnums=1))(params, probes)
    assert float(jnp.abs(g["1/mlp"] @ U).max()) < 1e-6
    assert float(jnp.abs(g["1/attn"] @ U).max()) > 1e-4  # not a projected site
    with pytest.raises(ValueError, match="unknown sites"):
        residual_projection_hook(U, sites=("resid",))


def test_grasp_intercept_matches_hook_on_transformer(tiny):
    model, toks, params, U = tiny
    loss = lambda p, **kw: causal_lm_loss(model.apply({"params": p}, toks, **kw), toks)
    g_hook = jax.grad(lambda p: loss(p, resid_hook=residual_projection_hook(U)))(params)
    with grasp_intercept(U):
        out = model.apply({"params": params}, toks)
        g_icpt = jax.jit(jax.grad(loss))(params)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(model.apply({"params": params}, toks)))
    g_plain = jax.grad(loss)(params)
    # the learned position embedding is not a declared writer: its gradient is the one place they differ
    g_hook["pos_embed"] = g_icpt["pos_embed"] = g_plain["pos_embed"] = None
    for a, b, _c in zip(jax.tree.leaves(g_hook), jax.tree.leaves(g_icpt), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(g_hook), jax.tree.leaves(g_plain))) > 1e-4
    # a writer rule given by the user; and errors name the module
    with grasp_intercept(U, modules=r"mlp/down$"):
        g_down = jax.grad(loss)(params)
    assert float(jnp.abs(g_down["block_0"]["mlp"]["down"]["kernel"] @ U).max()) < 1e-6
    assert float(jnp.abs(g_down["block_0"]["attn"]["o"]["kernel"] @ U).max()) > 1e-5
    with pytest.raises(ValueError, match="per-layer"):
        with grasp_intercept(np.stack([U, U])):
            pass
    with pytest.raises(ValueError, match=r"module 'block_0/mlp/up'.*\(4, 12, 32\).*d_model=16"):
        with grasp_intercept(U, modules=r"mlp/up$"):
            model.apply({"params": params}, toks)


# -------------------------------------------------------------------------------------------- Decoder (scan)


def test_decoder_scan_per_layer_bases_equal_unrolled_and_intercept():
    kw = dict(vocab=24, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32)
    toks = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 24)
    scan, unrolled = Decoder(DecoderConfig(**kw, scan_layers=True)), Decoder(DecoderConfig(**kw, scan_layers=False))
    p_scan = nn.meta.unbox(jax.jit(scan.init)(jax.random.PRNGKey(1), toks)["params"])
    stack = p_scan["layers"]["layer"]
    p_unr = {k: v for k, v in p_scan.items() if k != "layers"}
    for i in range(2):
        p_unr[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stack)
    Ul = np.stack([_ortho(3, D, 2), _ortho(4, D, 2)])  # per-layer bases; the embedding uses entry 0
    hook = residual_projection_hook(Ul)
    f = lambda m: lambda p: causal_lm_loss(m.apply({"params": p}, toks, resid_hook=hook), toks)
    g_scan = jax.jit(jax.grad(f(scan)))(p_scan)
    g_unr = jax.jit(jax.grad(f(unrolled)))(p_unr)
    np.testing.assert_allclose(np.asarray(g_scan["layers"]["layer"]["mlp"]["down"]["kernel"][1]),
                               np.asarray(g_unr["layer_1"]["mlp"]["down"]["kernel"]), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_scan["layers"]["layer"]["attn"]["o"]["kernel"][1] @ Ul[1]).max()) < 1e-6
    assert float(jnp.abs(g_scan["layers"]["layer"]["attn"]["o"]["kernel"][0] @ Ul[0]).max()) < 1e-6
    assert float(jnp.abs(g_scan["embed"]["embedding"] @ Ul[0]).max()) < 1e-6
    # the interceptor reaches the modules inside nn.scan (global basis)
    with grasp_intercept(Ul[0]):
        g_i = jax.jit(jax.grad(lambda p: causal_lm_loss(scan.apply({"params": p}, toks), toks)))(p_scan)
    assert float(jnp.abs(g_i["layers"]["layer"]["mlp"]["down"]["kernel"] @ Ul[0]).max()) < 1e-6


# -------------------------------------------------------------------------------------------- grasp(mode=...)


def test_grasp_mode_switch():
    U = _ortho(5, 4, 1)
    upd = {"attn": {"o": {"kernel": jnp.arange(12.0).reshape(3, 4)}}}
    out = {m: jaxlab.grasp(U, mode=m).update(upd, jaxlab.grasp(U, mode=m).init(upd))[0] for m in ("update", "both", "residual")}
    np.testing.assert_array_equal(np.asarray(out["residual"]["attn"]["o"]["kernel"]), np.asarray(upd["attn"]["o"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(out["both"]["attn"]["o"]["kernel"]), np.asarray(out["update"]["attn"]["o"]["kernel"]))
    assert float(jnp.abs(out["update"]["attn"]["o"]["kernel"] @ U).max()) < 1e-6
    tx = jaxlab.grasp_around(optax.adam(1e-2), U, mode="both")  # invariants after Adam, as in update mode
    step, _ = tx.update(upd, tx.init(upd), upd)
    assert float(jnp.abs(step["attn"]["o"]["kernel"] @ U).max()) < 1e-7
    with pytest.raises(ValueError, match=r"mode='resid'.*\('update', 'residual', 'both'\)"):
        jaxlab.grasp(U, mode="resid")
