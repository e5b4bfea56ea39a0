"""A small Diffusion Transformer (DiT) for average-velocity models ``u_theta(z, r, t[, y])``.

Patchify (einops) -> linear patch embedding + fixed 2D sin-cos positions -> ``depth`` DiT blocks with
adaLN-zero conditioning on ``c = emb(t) + emb(t - r) [+ emb(y)]`` -> adaLN-zero final layer -> unpatchify.

MeanFlow needs forward-mode AD (``jax.jvp``) through the whole model, so the attention must support it.
``attention="jnp"`` (default) is plain ``jnp`` ops (einsum + softmax); ``attention="pallas"`` is
:func:`jaxlab.kernels.flash_attention`, a Pallas kernel with a custom JVP whose tangent pass is fused too
(fused ``custom_vjp``-only attention kernels, as shipped with JAX, cannot be pushed through ``jax.jvp``).

Reference: Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT), arXiv 2212.09748,
sec. 3.2 (adaLN-Zero block).
"""

from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.nn.embeddings import TimeEmbedding

__all__ = ["DiT", "DiTBlock", "patchify", "unpatchify", "dot_product_attention"]


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """``(B, H, W, C) -> (B, (H/p)(W/p), p*p*C)`` tokens (row-major patches).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nn.dit import patchify, unpatchify
      >>> x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
      >>> tokens = patchify(x, 2)
      >>> print(tokens.shape, bool(jnp.array_equal(unpatchify(tokens, 2, 4, 6), x)))
      (2, 6, 12) True
    """
    if x.ndim != 4:
        raise ValueError(f"patchify: expected images (B, H, W, C), got shape {x.shape}")
    _, H, W, _ = x.shape
    if H % patch or W % patch:
        raise ValueError(f"patchify: image size {(H, W)} is not a multiple of the patch size {patch}")
    return einops.rearrange(x, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(tokens: jax.Array, patch: int, height: int, width: int) -> jax.Array:
    """Inverse of :func:`patchify`: ``(B, N, p*p*C) -> (B, H, W, C)``."""
    return einops.rearrange(tokens, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=height // patch, w=width // patch,
                            p1=patch, p2=patch)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` on ``(B, heads, N, d)`` arrays, in plain jnp (JVP-compatible)."""
    logits = jnp.einsum("bhnd,bhmd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhnm,bhmd->bhnd", jax.nn.softmax(logits, axis=-1), v)


#: Values of the ``attention`` option of :class:`DiTBlock` / :class:`DiT`.
ATTENTION_IMPLEMENTATIONS = ("jnp", "pallas")


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, attention: str) -> jax.Array:
    """``"jnp"``: :func:`dot_product_attention`; ``"pallas"``: :func:`jaxlab.kernels.flash_attention`
    (fused kernels with a custom JVP, interpret mode on CPU)."""
    if attention == "jnp":
        return dot_product_attention(q, k, v)
    if attention == "pallas":
        from jaxlab.kernels import flash_attention

        return flash_attention(q, k, v, implementation="pallas")
    raise ValueError(f"DiT: attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {attention!r}")


def _sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding ``(h*w, dim)`` (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"DiT: hidden size must be a multiple of 4 for 2D sin-cos positions, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = []
    for g in (gy.reshape(-1), gx.reshape(-1)):
        a = g[:, None] * omega[None]
        out += [np.sin(a), np.cos(a)]
    return np.concatenate(out, axis=1).astype(np.float32)


def _dense(features, name, names, zero=False):
    init = nn.initializers.zeros_init() if zero else nn.initializers.xavier_uniform()
    return nn.Dense(features, name=name, kernel_init=nn.with_logical_partitioning(init, names))


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """One adaLN-zero transformer block.

    ``(s1, a1, g1, s2, a2, g2) = Dense_0(silu(c))`` (zero-initialised), then
    ``x += g1 * Attn(LN(x) (1 + a1) + s1)`` and ``x += g2 * MLP(LN(x) (1 + a2) + s2)``, so every block
    starts as the identity.
    """

    hidden: int
    heads: int
    mlp_ratio: float = 4.0
    attention: str = "jnp"  # "jnp" (plain einsum/softmax) or "pallas" (jaxlab.kernels.flash_attention)

    @nn.compact
    def __call__(self, x, c):
        if self.hidden % self.heads:
            raise ValueError(f"DiTBlock: hidden={self.hidden} is not divisible by heads={self.heads}")
        mod = _dense(6 * self.hidden, "adaLN", ("embed", "mlp"), zero=True)(nn.silu(c))
        s1, a1, g1, s2, a2, g2 = jnp.split(mod, 6, axis=-1)
        h = _modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, name="ln1")(x), s1, a1)
        qkv = _dense(3 * self.hidden, "qkv", ("embed", "heads"))(h)
        q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.heads)
        att = einops.rearrange(_attend(q, k, v, self.attention), "b h n d -> b n (h d)")
        x = x + g1[:, None, :] * _dense(self.hidden, "proj", ("heads", "embed"))(att)
        h = _modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, name="ln2")(x), s2, a2)
        h = nn.gelu(_dense(int(self.hidden * self.mlp_ratio), "fc1", ("embed", "mlp"))(h), approximate=True)
        return x + g2[:, None, :] * _dense(self.hidden, "fc2", ("mlp", "embed"))(h)


class DiT(nn.Module):
    """Small DiT ``u_theta(z, r, t[, y])`` on images ``(B, H, W, C)``, conditioned on ``t`` and ``h = t - r``.

    ``c = TimeEmbedding(t) + TimeEmbedding(t - r) [+ Embed(y)]`` (label index ``num_classes`` is the null
    class used by classifier-free guidance); the output has the input's shape. At initialisation the
    output is exactly zero (adaLN-zero final layer).

    Attributes:
      patch: patch size (``H`` and ``W`` must be multiples).
      hidden: token width (multiple of 4 and of ``heads``).
      depth: number of blocks.
      heads: attention heads.
      mlp_ratio: MLP width / hidden.
      time_dim: sinusoidal width of each time embedding.
      time_scale: scale of ``t`` and ``h`` inside the sinusoidal embedding (it multiplies ``d_t u``).
      num_classes: ``> 0`` adds a label embedding with ``num_classes + 1`` rows.
      attention: ``"jnp"`` (default, plain jnp) or ``"pallas"`` (:func:`jaxlab.kernels.flash_attention`:
        Pallas kernels with a fused JVP; same outputs and ``jax.jvp``).
      guidance_conditioning: add the guidance scale ``omega`` and the guidance interval ``(t_lo, t_hi)`` as
        network inputs (the improved-MeanFlow guidance conditioning, ``MeanFlowConfig.guidance_conditioning``):
        ``c += Dense_0(TimeEmbedding(1 - 1/omega) + TimeEmbedding(t_lo) + TimeEmbedding(t_hi))`` with a
        zero-initialised ``Dense_0`` (``guidance_proj``), so at initialisation the conditioning changes
        nothing (identity-safe). ``1 - 1/omega`` is what the official iMF code embeds (its
        ``omega_embedder(1 - 1 / w)``); it has in-context tokens where this DiT adds to ``c``. Omitted inputs
        mean no guidance: ``omega = 1``, interval ``(0, 1)``.
      aux_v_head: also return an auxiliary instantaneous-velocity head, ``(u, v)`` (the iMF v-head,
        ``MeanFlowConfig.aux_v_head``). Here the v-head is a second adaLN-zero final layer on the shared
        blocks (the official imfDiT gives each head its own last ``aux_head_depth`` blocks).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nn import DiT
      >>> model = DiT(patch=2, hidden=16, depth=1, heads=2, time_dim=8, num_classes=10)
      >>> z = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 1))
      >>> r, t, y = jnp.array([0.0, 0.2]), jnp.array([0.5, 1.0]), jnp.array([3, 10])  # 10: null class
      >>> params = jax.jit(model.init)(jax.random.PRNGKey(0), z, r, t, y)
      >>> u = jax.jit(model.apply)(params, z, r, t, y)
      >>> print(u.shape, bool(jnp.all(u == 0)))   # adaLN-zero: exactly zero at initialisation
      (2, 4, 4, 1) True
    """

    patch: int = 2
    hidden: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    time_dim: int = 64
    time_scale: float = 1000.0
    num_classes: int = 0
    attention: str = "jnp"
    guidance_conditioning: bool = False
    aux_v_head: bool = False

    @nn.compact
    def __call__(self, z, r, t, y=None, *, omega=None, interval=None):
        if z.ndim != 4:
            raise ValueError(f"DiT: expected z of shape (B, H, W, C), got {z.shape}")
        B, H, W, C = z.shape
        r = jnp.broadcast_to(jnp.reshape(r, (-1,)), (B,))
        t = jnp.broadcast_to(jnp.reshape(t, (-1,)), (B,))
        tokens = patchify(z, self.patch)
        x = _dense(self.hidden, "patch_embed", ("mlp", "embed"))(tokens)
        x = x + jnp.asarray(_sincos_2d(H // self.patch, W // self.patch, self.hidden))[None]
        c = TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="t_embed")(t)
        c = c + TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="h_embed")(t - r)
        if self.num_classes > 0:
            if y is None:
                y = jnp.full((B,), self.num_classes, jnp.int32)
            c = c + nn.Embed(self.num_classes + 1, self.hidden, name="y_embed")(y)
        elif y is not None:
            raise ValueError("DiT: labels y given but num_classes == 0")
        if self.guidance_conditioning:
            per_row = lambda a, d: jnp.broadcast_to(jnp.reshape(jnp.asarray(d if a is None else a, jnp.float32), (-1,)), (B,))
            lo, hi = (None, None) if interval is None else interval
            g = TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="omega_embed")(1 - 1 / per_row(omega, 1.0))
            g = g + TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="t_lo_embed")(per_row(lo, 0.0))
            g = g + TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="t_hi_embed")(per_row(hi, 1.0))
            c = c + nn.Dense(self.hidden, kernel_init=nn.initializers.zeros_init(), name="guidance_proj")(g)
        elif omega is not None or interval is not None:
            raise ValueError("DiT: guidance inputs omega/interval given but guidance_conditioning=False")
        for i in range(self.depth):
            x = DiTBlock(self.hidden, self.heads, self.mlp_ratio, attention=self.attention, name=f"block_{i}")(x, c)
        x_blocks = x
        shift, scale = jnp.split(_dense(2 * self.hidden, "final_adaLN", ("embed", "mlp"), zero=True)(nn.silu(c)), 2, -1)
        x = _modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, name="final_ln")(x), shift, scale)
        out = _dense(self.patch * self.patch * C, "final", ("embed", "mlp"), zero=True)(x)
        if not self.aux_v_head:
            return unpatchify(out, self.patch, H, W)
        shift, scale = jnp.split(_dense(2 * self.hidden, "v_final_adaLN", ("embed", "mlp"), zero=True)(nn.silu(c)), 2, -1)
        xv = _modulate(nn.LayerNorm(use_bias=False, use_scale=False, epsilon=1e-6, name="v_final_ln")(x_blocks), shift, scale)
        v = _dense(self.patch * self.patch * C, "v_final", ("embed", "mlp"), zero=True)(xv)
        return unpatchify(out, self.patch, H, W), unpatchify(v, self.patch, H, W)
