"""jaxlab.nn.transformer: layout, numerics vs an independent NumPy forward, causality, hooks, RoPE."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss, rotary_embedding

CFG = TransformerConfig(vocab=17, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=12)


@pytest.fixture(scope="module", params=["learned", "rotary"])
def model_params(request):
    cfg = TransformerConfig(**{**CFG.__dict__, "positions": request.param})
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 9), 0, cfg.vocab)
    boxed = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]  # jitted: one compile, not one per op
    # non-trivial biases and norms so the reference check covers them
    params = nn.meta.unbox(boxed)

    @jax.jit
    def perturb(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
        return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    return cfg, model, boxed, perturb(params), tokens


def _np_ln(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_rope(x, base):
    t, d = x.shape[1], x.shape[-1]
    half = d // 2
    inv = base ** (-np.arange(half) * 2.0 / d)
    ang = np.arange(t)[:, None] * inv[None]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _np_forward(cfg, params, tokens):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    dense = lambda x, q: x @ q["kernel"] + q["bias"]
    gelu = lambda x: np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32)), np.float64)
    h = p["embed"]["embedding"][np.asarray(tokens)]
    b, t, d = h.shape
    nh, dh = cfg.n_heads, d // cfg.n_heads
    if cfg.positions == "learned":
        h = h + p["pos_embed"]["embedding"][:t][None]
    for i in range(cfg.n_layers):
        blk = p[f"block_{i}"]
        x = _np_ln(h, blk["ln1"])
        q, k, v = (dense(x, blk["attn"][n]).reshape(b, t, nh, dh) for n in "qkv")
        if cfg.positions == "rotary":
            q, k = _np_rope(q, cfg.rope_base), _np_rope(k, cfg.rope_base)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        h = h + dense(np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d), blk["attn"]["o"])
        x = _np_ln(h, blk["ln2"])
        h = h + dense(gelu(dense(x, blk["mlp"]["up"])), blk["mlp"]["down"])
    return dense(_np_ln(h, p["ln_f"]), p["unembed"])


def test_layout_and_logical_names(model_params):
    cfg, _, boxed, params, _ = model_params
    blk = params["block_0"]
    assert set(blk["attn"]) == {"q", "k", "v", "o"} and set(blk["mlp"]) == {"up", "down"}
    assert blk["attn"]["q"]["kernel"].shape == (cfg.d_model, cfg.d_model)
    assert blk["mlp"]["up"]["kernel"].shape == (cfg.d_model, cfg.d_ff)
    assert blk["mlp"]["down"]["kernel"].shape == (cfg.d_ff, cfg.d_model)
    assert params["unembed"]["kernel"].shape == (cfg.d_model, cfg.vocab)
    assert params["embed"]["embedding"].shape == (cfg.vocab, cfg.d_model)
    assert ("pos_embed" in params) == (cfg.positions == "learned")
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["block_0"]["attn"]["q"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["block_1"]["mlp"]["down"]["kernel"]) == ("mlp", "embed")
    assert tuple(specs["unembed"]["kernel"]) == ("embed", "vocab")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")


def test_forward_matches_numpy_reference(model_params):
    cfg, model, _, params, tokens = model_params
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 9, cfg.vocab) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), _np_forward(cfg, params, tokens), rtol=2e-4, atol=2e-4)


def test_causal(model_params):
    cfg, model, _, params, tokens = model_params
    changed = tokens.at[:, 5].set((tokens[:, 5] + 1) % cfg.vocab)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :5]), np.asarray(b[:, :5]))
    assert not np.allclose(np.asarray(a[:, 5:]), np.asarray(b[:, 5:]))


def test_resid_hook_order_identity_and_intervention(model_params):
    cfg, model, _, params, tokens = model_params
    calls = []

    def record(i, site, h):
        calls.append((i, site, h.shape))
        return h

    base, resid = model.apply({"params": params}, tokens, return_residuals=True)
    hooked = model.apply({"params": params}, tokens, resid_hook=record)
    assert [(i, s) for i, s, _ in calls] == [(0, "embed"), (0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    assert all(shape == (2, 9, cfg.d_model) for *_, shape in calls)
    np.testing.assert_array_equal(np.asarray(base), np.asarray(hooked))
    assert resid.shape == (cfg.n_layers + 1, 2, 9, cfg.d_model)
    # residuals[-1] is the final stream: ln_f + unembed of it reproduces the logits
    p = params
    ref = nn.Dense(cfg.vocab).apply({"params": p["unembed"]}, nn.LayerNorm().apply({"params": p["ln_f"]}, resid[-1]))
    np.testing.assert_allclose(np.asarray(ref), np.asarray(base), rtol=1e-5, atol=1e-5)
    # steering the last MLP write by u changes the stream exactly by u
    u = jnp.linspace(-1.0, 1.0, cfg.d_model)
    steer = lambda i, s, h: h + u if (i, s) == (cfg.n_layers - 1, "mlp") else h
    _, r2 = model.apply({"params": params}, tokens, resid_hook=steer, return_residuals=True)
    np.testing.assert_allclose(np.asarray(r2[-1] - resid[-1]), np.broadcast_to(u, resid[-1].shape), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(r2[:-1]), np.asarray(resid[:-1]))


def test_forward_mode_ad_and_loss(model_params):
    cfg, model, _, params, tokens = model_params
    f = lambda p: causal_lm_loss(model.apply({"params": p}, tokens), tokens)
    tangent = jax.tree.map(jnp.ones_like, params)
    _, jvp = jax.jvp(f, (params,), (tangent,))
    grad = jax.grad(f)(params)
    vjp_dot = sum(jnp.vdot(g, t) for g, t in zip(jax.tree.leaves(grad), jax.tree.leaves(tangent)))
    np.testing.assert_allclose(float(jvp), float(vjp_dot), rtol=1e-3)
    logits = model.apply({"params": params}, tokens)
    lp = jax.nn.log_softmax(logits, -1)
    manual = -np.mean([lp[b, t, tokens[b, t + 1]] for b in range(2) for t in range(8)])
    np.testing.assert_allclose(float(f(params)), manual, rtol=1e-6)
    assert float(f(params)) > 0


def test_rotary_is_relative():
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
    def score(pq, pk):
        qr = rotary_embedding(jnp.tile(q, (1, 20, 1, 1)), jnp.arange(20))[0, pq, 0]
        kr = rotary_embedding(jnp.tile(k, (1, 20, 1, 1)), jnp.arange(20))[0, pk, 0]
        return float(qr @ kr)
    np.testing.assert_allclose(score(7, 3), score(14, 10), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(q.ravel() @ k.ravel()), rtol=1e-5)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="d_model=10 is not divisible by n_heads=3"):
        TransformerConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="positions"):
        TransformerConfig(positions="alibi")
    model = Transformer(CFG)
    with pytest.raises(ValueError, match=r"shape \(1, 13\) exceed max_len=12"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 13), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
