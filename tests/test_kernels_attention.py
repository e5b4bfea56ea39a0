"""JVP-capable fused attention (jaxlab.kernels.attention): Pallas kernels (interpret mode on CPU) vs the
jnp reference for the primal, jax.jvp, jax.grad, the gradient of a MeanFlow-style loss and jax.vmap of
jax.jvp; the DiT / Transformer ``attention="pallas"`` option; lowering for TPU and CUDA from CPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.kernels import attention_reference, flash_attention

TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def _close(a, b, dtype, scale=1.0):
    tol = TOL[jnp.dtype(dtype)] * scale
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(b)))))


def _inputs(seq, dtype, seed=0, kv_seq=None, d=16):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    shp = lambda s: (2, 2, s, d)  # noqa: E731
    q = jax.random.normal(keys[0], shp(seq))
    k, v = (jax.random.normal(kk, shp(kv_seq or seq)) for kk in keys[1:3])
    tq = jax.random.normal(keys[3], shp(seq))
    tk, tv = (jax.random.normal(kk, shp(kv_seq or seq)) for kk in keys[4:6])
    return tuple(a.astype(dtype) for a in (q, k, v)), tuple(a.astype(dtype) for a in (tq, tk, tv))


class TestFlashAttention:
    """Kernels vs reference; interpret mode here, compiled in the device subclass."""

    INTERPRET = True
    BACKEND = "cpu"

    def fns(self, causal, block):
        kw = dict(causal=causal, block_q=block, block_k=block, implementation="pallas",
                  interpret=self.INTERPRET, backend=self.BACKEND)
        return (lambda q, k, v: flash_attention(q, k, v, **kw),
                lambda q, k, v: attention_reference(q, k, v, causal=causal))

    def check_primal_and_jvp(self, seq, block, causal, dtype):
        f, r = self.fns(causal, block)
        p, t = _inputs(seq, dtype)
        jvp = jax.jit(lambda p, t: jax.jvp(f, p, t))
        o, do = jvp(p, t)
        ro, rdo = jax.jvp(r, p, t)
        assert o.dtype == do.dtype == jnp.dtype(dtype) and o.shape == p[0].shape
        _close(o, ro, dtype)
        _close(do, rdo, dtype, scale=4.0)
        _close(jax.jit(f)(*p), ro, dtype)

    def check_grads(self, seq, block, causal, dtype):
        """jax.grad alone, and the MeanFlow pattern: grad of ||u - sg(target built from jax.jvp)||^2."""
        f, r = self.fns(causal, block)
        p, t = _inputs(seq, dtype, seed=1)

        def plain(fn):
            return lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))

        def meanflow(fn):
            def loss(*a):
                u, du = jax.jvp(fn, a, t)
                target = jax.lax.stop_gradient(jnp.cos(u) - 0.5 * du)
                return jnp.sum((u - target).astype(jnp.float32) ** 2)
            return loss

        for make in (plain, meanflow):
            gk = jax.jit(jax.grad(make(f), argnums=(0, 1, 2)))(*p)
            gr = jax.grad(make(r), argnums=(0, 1, 2))(*p)
            for a, b in zip(gk, gr):
                _close(a, b, dtype, scale=4.0)

    @pytest.mark.parametrize(
        "seq,block,causal,dtype",
        [(13, 8, True, jnp.float32), (7, 8, False, jnp.float32), (33, 16, True, jnp.bfloat16)],
        ids=["13-b8-causal-f32", "7-b8-f32", "33-b16-causal-bf16"],
    )
    def test_primal_and_jvp(self, seq, block, causal, dtype):
        self.check_primal_and_jvp(seq, block, causal, dtype)

    # non-causal grads run in the slow sweep (the default run stays cheap; the causal case covers the code)
    @pytest.mark.parametrize("seq,block,causal", [(13, 8, True), pytest.param(7, 8, False, marks=pytest.mark.slow)],
                             ids=["13-causal", "7"])
    def test_grad_and_meanflow_loss_grad(self, seq, block, causal):
        self.check_grads(seq, block, causal, jnp.float32)

    def test_grad_of_tangent_and_vmap_of_jvp(self):
        """Second order through the tangent (grad of a function of dO) and vmap over tangents
        (MeanFlow's two-tangent "auto" mode)."""
        f, r = self.fns(True, 8)
        p, t = _inputs(9, jnp.float32, seed=2)

        def of_tangent(fn):
            return lambda *a: jnp.sum(jnp.sin(jax.jvp(fn, a, (t[0], t[1], a[0]))[1]))

        gk = jax.jit(jax.grad(of_tangent(f), argnums=(0, 1, 2)))(*p)
        gr = jax.grad(of_tangent(r), argnums=(0, 1, 2))(*p)
        for a, b in zip(gk, gr):
            _close(a, b, jnp.float32, scale=10.0)
        tq = jnp.stack([t[0], -2.0 * t[0]])
        vk = jax.jit(jax.vmap(lambda x: jax.jvp(f, p, (x, t[1], t[2]))[1]))(tq)
        vr = jax.vmap(lambda x: jax.jvp(r, p, (x, t[1], t[2]))[1])(tq)
        _close(vk, vr, jnp.float32, scale=4.0)

    def test_cross_attention_lengths(self):
        """seq_q != seq_k (padded keys get probability 0), non-causal."""
        f, r = self.fns(False, 8)
        p, t = _inputs(5, jnp.float32, seed=3, kv_seq=11)
        o, do = jax.jit(lambda p, t: jax.jvp(f, p, t))(p, t)
        ro, rdo = jax.jvp(r, p, t)
        _close(o, ro, jnp.float32)
        _close(do, rdo, jnp.float32, scale=4.0)

    # slow: the full ragged sweep (3 lengths x 2 blocks x causal x 2 dtypes = 24 interpret-mode
    # compiles, ~2-3 min on 2 cores); the default cases above cover every code path.
    @pytest.mark.slow
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
    @pytest.mark.parametrize("block", [8, 16])
    @pytest.mark.parametrize("seq", [7, 13, 33])
    def test_ragged_sweep(self, seq, block, causal, dtype):
        self.check_primal_and_jvp(seq, block, causal, dtype)
        self.check_grads(seq, block, causal, dtype)


@pytest.mark.gpu
class TestFlashAttentionGPU(TestFlashAttention):
    """The same cases compiled for the GPU (Pallas Triton backend)."""

    INTERPRET = False
    BACKEND = "gpu"


# --------------------------------------------------------------------------------- model wiring


def test_dit_pallas_attention_matches_jnp_output_and_jvp():
    from jaxlab.nn import DiT

    kw = dict(patch=2, hidden=16, depth=1, heads=2, time_dim=8, time_scale=1.0)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 1))  # 9 tokens: ragged for block 8
    r, t = jnp.array([0.1, 0.3]), jnp.array([0.5, 0.9])
    m_jnp, m_pal = DiT(**kw), DiT(attention="pallas", **kw)
    params = jax.jit(m_jnp.init)(jax.random.PRNGKey(1), z, r, t)
    # adaLN-zero: randomise the zero leaves so the attention output matters
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.jit(lambda leaves: jax.tree_util.tree_unflatten(
        tree, [jnp.where(a == 0, 0.2 * jax.random.normal(k_, a.shape), a) for a, k_ in zip(leaves, keys)]
    ))(leaves)
    tang = (jnp.ones_like(z), jnp.zeros_like(r), jnp.ones_like(t))
    jvps = [jax.jit(lambda p, m=m: jax.jvp(lambda z, r, t: m.apply(p, z, r, t), (z, r, t), tang))
            for m in (m_jnp, m_pal)]
    (u0, du0), (u1, du1) = (f(params) for f in jvps)
    assert float(jnp.max(jnp.abs(du0))) > 1e-3
    _close(u1, u0, jnp.float32, scale=5.0)
    _close(du1, du0, jnp.float32, scale=20.0)
    with pytest.raises(ValueError, match=r"attention must be one of \('jnp', 'pallas'\), got 'flash'"):
        jax.eval_shape(DiT(attention="flash", **kw).init, jax.random.PRNGKey(1), z, r, t)


def test_transformer_pallas_attention_matches_jnp():
    from jaxlab.nn.transformer import Transformer, TransformerConfig

    base = dict(vocab=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=16)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 11), 0, 32)
    m_jnp = Transformer(TransformerConfig(**base))
    m_pal = Transformer(TransformerConfig(attention="pallas", **base))
    params = jax.jit(m_jnp.init)(jax.random.PRNGKey(1), tokens)
    l0, l1 = (jax.jit(m.apply)(params, tokens) for m in (m_jnp, m_pal))
    _close(l1, l0, jnp.float32, scale=5.0)
    with pytest.raises(ValueError, match="TransformerConfig.attention must be 'jnp' or 'pallas'"):
        TransformerConfig(attention="cudnn", **base)


# --------------------------------------------------------------------------------------- errors


def test_errors_and_xla_path():
    (q, k, v), _ = _inputs(8, jnp.float32)
    with pytest.raises(ValueError, match="implementation must be"):
        flash_attention(q, k, v, implementation="triton")
    with pytest.raises(ValueError, match="block_q must be a positive multiple of 8"):
        flash_attention(q, k, v, block_q=12, implementation="pallas")
    with pytest.raises(ValueError, match=r"must be \(batch, heads, seq, head_dim\)"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[..., :8])
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        flash_attention(q.astype(jnp.int32), k, v)
    # auto / "xla" is the jnp reference (no pallas_call)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda a: flash_attention(a, k, v))(q))
    assert "pallas_call" in str(jax.make_jaxpr(lambda a: flash_attention(a, k, v, implementation="pallas"))(q))


# ------------------------------------------------------------------------------------- lowering


def _export(platform, backend, causal, **kw):
    q = jnp.zeros((2, 4, 256, 64), jnp.bfloat16)
    f = lambda q, k, v: flash_attention(  # noqa: E731
        q, k, v, causal=causal, implementation="pallas", interpret=False, backend=backend)
    g = lambda q, k, v, t: jax.jvp(f, (q, k, v), (t, t, t))  # noqa: E731
    return jax.export.export(jax.jit(g), platforms=[platform], **kw)(q, q, q, q).mlir_module()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward_and_jvp_lower_to_mosaic_tpu_from_cpu(causal):
    text = _export("tpu", "tpu", causal)
    assert len(re.findall(r"tpu_custom_call", text)) >= 2  # flash forward + fused tangent kernel


def test_forward_and_jvp_lower_to_triton_for_cuda_from_cpu():
    """CUDA lowering through Pallas' Triton backend (Triton IR inside the custom call; PTX generation
    needs the CUDA plugin and is not checked). Mosaic GPU does not lower this kernel (module docs)."""
    check = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = _export("cuda", "gpu", True, disabled_checks=[check])
    assert len(re.findall(r"custom_call @__gpu\$xla\.gpu\.triton", text)) >= 2
