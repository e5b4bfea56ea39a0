"""The pretrained decoder family: one Flax Linen module for Llama-2/3, Qwen2/2.5 and Gemma 1/2 checkpoints.

Every block is pre-norm with RMSNorm, rotary positions, grouped-query attention and a gated MLP:

.. math::

    h_0 = s_E\\,E[x],\\qquad
    h \\leftarrow h + \\operatorname{N}_{post}\\Big(W_o\\,\\operatorname{softmax}\\big(
        c\\tanh(\\tfrac{\\alpha\\,Q K^\\top}{c}) + M\\big) V\\Big),\\quad Q, K, V = \\operatorname{RoPE}(\\operatorname{N}(h) W_{q,k,v} + b_{q,k,v}),

    h \\leftarrow h + \\operatorname{N}_{post}\\Big(W_{down}\\big(\\phi(\\operatorname{N}(h) W_{gate}) \\odot \\operatorname{N}(h) W_{up}\\big)\\Big),\\qquad
    \\text{logits} = c_f \\tanh\\!\\big(\\operatorname{N}(h_L) W_{unembed} / c_f\\big),

with :math:`\\operatorname{N}(x) = (o + w)\\odot x / \\sqrt{\\overline{x^2} + \\epsilon}` (``o = 0`` Llama/Qwen,
``o = 1`` Gemma), :math:`\\phi` SiLU (SwiGLU: Llama, Qwen) or tanh-GELU (GeGLU: Gemma),
:math:`s_E = \\sqrt{d}` for Gemma (else 1), :math:`\\alpha = d_h^{-1/2}` (Gemma 2:
``query_pre_attn_scalar^{-1/2}``), the soft caps ``c``/``c_f`` only where configured (Gemma 2), the
``N_post`` norms only in Gemma 2 ("sandwich" norms), ``M`` the causal mask (plus a sliding window on the
layers marked ``"sliding"``, plus segment boundaries for packed sequences), and ``W_k, W_v`` with
``n_kv_heads <= n_heads`` heads shared by groups of query heads (GQA; MQA when ``n_kv_heads = 1``).

Parameter layout (names are API: GRASP's residual-side rules and STEP's leaf filters key on them):
``embed/embedding`` ``(vocab, d)``; per layer ``attn_norm/scale``, ``attn/{q,k,v,o}/{kernel,bias}``,
``mlp_norm/scale``, ``mlp/{gate,up,down}/kernel`` (Gemma 2 adds ``post_attn_norm``, ``post_mlp_norm``);
``final_norm/scale``; ``unembed/kernel`` ``(d, vocab)`` unless the embedding is tied. Kernels are Flax
``(d_in, d_out)``. With ``scan_layers=True`` (default) the layers live under ``layers/...`` with a leading
axis of length ``n_layers`` (logical name ``"layers"``; one compiled block whatever the depth), otherwise
under ``layer_{i}/...``. Logical axis names: ``"vocab"``, ``"embed"``, ``"heads"``, ``"kv_heads"``,
``"mlp"``, ``"layers"``.

Reference (architecture descriptions, verified against ``transformers``' logits by the fixture tests):
Touvron et al., "Llama 2" (2023); Meta, "The Llama 3 Herd of Models" (2024, RoPE scaling); Qwen team,
"Qwen2 Technical Report" (2024); Gemma team, "Gemma" (2024) and "Gemma 2" (2024); Ainslie et al., "GQA"
(2023); Shazeer, "GLU Variants Improve Transformer" (2020).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Decoder", "DecoderConfig", "rope_frequencies"]

ResidHook = Callable[[jax.Array, str, jax.Array], jax.Array]

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
_REMAT = ("none", "full", "dots", "dots_no_batch")
_LAYER_TYPES = ("full", "sliding")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shape and architecture switches of :class:`Decoder` (one field per difference between families).

    Attributes:
      vocab, d_model, n_layers, n_heads, d_ff: sizes.
      n_kv_heads: key/value heads (``None``: ``n_heads``; must divide ``n_heads``).
      head_dim: per-head width (``None``: ``d_model // n_heads``; Gemma sets it explicitly).
      mlp_activation: ``"silu"`` (SwiGLU), ``"gelu_tanh"`` (GeGLU) or ``"gelu"`` (exact GELU gate).
      norm_eps: RMSNorm epsilon.
      norm_offset: RMSNorm scale is ``norm_offset + w`` (Gemma: 1.0, with ``w`` initialised at 0).
      rope_base: RoPE frequency base ``theta``.
      rope_scaling: ``None``, ``"linear"`` (positions divided by ``rope_factor``) or ``"llama3"``
        (frequency-dependent rescaling with ``rope_factor``, ``rope_low_freq_factor``,
        ``rope_high_freq_factor`` and ``rope_original_max_len``; see :func:`rope_frequencies`).
      qkv_bias, o_bias, mlp_bias: biases (Qwen2: q/k/v only; Llama ``attention_bias``: q/k/v/o).
      tie_embeddings: logits use the embedding matrix (no ``unembed`` parameter).
      embed_scale: multiply the embeddings by ``sqrt(d_model)`` (Gemma).
      query_scale: attention logit scale (``None``: ``head_dim ** -0.5``).
      attn_logit_softcap, final_logit_softcap: ``c tanh(x / c)`` caps (Gemma 2), ``None`` for none.
      sandwich_norms: extra RMSNorms on the attention and MLP outputs before the residual add (Gemma 2).
      sliding_window: window length for layers of type ``"sliding"`` (a query attends to the last
        ``sliding_window`` positions, itself included).
      layer_types: per-layer ``"full"``/``"sliding"`` (``None``: all full).
      scan_layers: stack the layers under ``nn.scan`` (one compiled block; leading ``"layers"`` axis).
      remat: rematerialisation of each block: ``"none"``, ``"full"`` (save nothing), ``"dots"``
        (save matmul outputs) or ``"dots_no_batch"`` (save matmuls without batch dims).
      dtype: computation dtype; param_dtype: parameter dtype.
      init_std: std of the random init (only for models not loaded from a checkpoint).
      family: the checkpoint family this config describes (``"llama"``, ``"qwen2"``, ``"gemma"``,
        ``"gemma2"``, or ``"custom"``); used by :mod:`jaxlab.models` to name tensors on export.
      hf_config: the source ``config.json`` as a JSON string (set by :func:`jaxlab.models.load_hf`;
        :func:`jaxlab.models.save_hf` keeps its other keys, e.g. token ids); not compared in ``==``.
    """

    vocab: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    n_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_activation: str = "silu"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0
    rope_base: float = 10000.0
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    embed_scale: bool = False
    query_scale: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sandwich_norms: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    scan_layers: bool = True
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    family: str = "custom"
    hf_config: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        for f in ("vocab", "d_model", "n_layers", "n_heads", "d_ff"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DecoderConfig.{f} must be a positive int, got {v!r}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"DecoderConfig: n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"DecoderConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim"
            )
        if self.dh % 2:
            raise ValueError(f"DecoderConfig: rotary positions need an even head_dim, got {self.dh}")
        if self.mlp_activation not in _ACTIVATIONS:
            raise ValueError(f"DecoderConfig.mlp_activation must be one of {sorted(_ACTIVATIONS)}, got {self.mlp_activation!r}")
        if self.rope_scaling not in (None, "linear", "llama3"):
            raise ValueError(f"DecoderConfig.rope_scaling must be None, 'linear' or 'llama3', got {self.rope_scaling!r}")
        if self.remat not in _REMAT:
            raise ValueError(f"DecoderConfig.remat must be one of {_REMAT}, got {self.remat!r}")
        if self.layer_types is not None:
            if not isinstance(self.layer_types, tuple):
                object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.n_layers or any(t not in _LAYER_TYPES for t in self.layer_types):
                raise ValueError(
                    f"DecoderConfig.layer_types must list {self.n_layers} entries from {_LAYER_TYPES}, "
                    f"got {self.layer_types!r}"
                )
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("DecoderConfig: layer_types has 'sliding' layers but sliding_window is not set")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(t == "sliding" for t in (self.layer_types or ("full",) * self.n_layers))


def rope_frequencies(cfg: DecoderConfig) -> jax.Array:
    """Inverse RoPE frequencies ``theta_i = base^{-2i/d_h}`` (``(d_h/2,)``, float32), scaled as configured.

    ``"llama3"`` scaling (wavelength :math:`\\lambda_i = 2\\pi/\\theta_i`, original context ``L``,
    factor ``s``, low/high frequency factors ``a < b``): long wavelengths :math:`\\lambda_i > L/a` are
    divided by ``s``, short ones :math:`\\lambda_i < L/b` are kept, and in between the two are mixed with
    weight :math:`\\mu = (L/\\lambda_i - a)/(b - a)`: :math:`\\theta_i' = (1-\\mu)\\theta_i/s + \\mu\\theta_i`.
    ``"linear"`` scaling divides every frequency by ``s`` (positions interpolated).

    Example:
      >>> from jaxlab.nn.decoder import DecoderConfig, rope_frequencies
      >>> cfg = DecoderConfig(d_model=16, n_heads=2)                  # head_dim 8 -> 4 frequencies
      >>> [round(float(f), 4) for f in rope_frequencies(cfg)]
      [1.0, 0.1, 0.01, 0.001]
      >>> l3 = DecoderConfig(d_model=16, n_heads=2, rope_scaling="llama3", rope_factor=8.0,
      ...                    rope_original_max_len=64)
      >>> [round(float(f), 6) for f in rope_frequencies(l3)]  # kept | mixed | divided by 8 | divided by 8
      [1.0, 0.013042, 0.00125, 0.000125]
    """
    d = cfg.dh
    inv = 1.0 / (cfg.rope_base ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        s, a, b, L = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
        wavelen = 2 * math.pi / inv
        mu = (L / wavelen - a) / (b - a)
        mixed = (1 - mu) * inv / s + mu * inv
        out = jnp.where(wavelen > L / a, inv / s, inv)
        medium = (wavelen >= L / b) & (wavelen <= L / a)
        return jnp.where(medium, mixed, out)
    return inv


def _rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE of ``x`` ``(B, T, H, d_h)`` at ``positions`` ``(B, T)``."""
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, d_h/2)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


class RMSNorm(nn.Module):
    """``(offset + w) * x / sqrt(mean(x^2) + eps)``, normalised in float32 (parameter ``scale``)."""

    eps: float
    offset: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros_init() if self.offset else nn.initializers.ones_init()
        w = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:  # Gemma: the scale is applied in float32
            return (y * (self.offset + w.astype(jnp.float32))).astype(self.dtype)
        return w.astype(self.dtype) * y.astype(self.dtype)  # Llama/Qwen: cast first, then scale


def _dense(cfg: DecoderConfig, features: int, names: tuple[str, str], bias: bool, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def _norm(cfg: DecoderConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.norm_eps, cfg.norm_offset, cfg.dtype, cfg.param_dtype, name=name)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


class Attention(nn.Module):
    """Grouped-query causal self-attention with projections ``q, k, v, o`` (plain jnp, JVP-able)."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, sliding):
        cfg = self.cfg
        b, t, _ = x.shape
        h, kv, dh = cfg.n_heads, cfg.kv_heads, cfg.dh
        q = _dense(cfg, h * dh, ("embed", "heads"), cfg.qkv_bias, "q")(x).reshape(b, t, h, dh)
        k = _dense(cfg, kv * dh, ("embed", "kv_heads"), cfg.qkv_bias, "k")(x).reshape(b, t, kv, dh)
        v = _dense(cfg, kv * dh, ("embed", "kv_heads"), cfg.qkv_bias, "v")(x).reshape(b, t, kv, dh)
        inv = rope_frequencies(cfg)
        q, k = _rope(q, positions, inv), _rope(k, positions, inv)
        scale = cfg.query_scale if cfg.query_scale is not None else dh**-0.5
        q = q.reshape(b, t, kv, h // kv, dh)  # query head j uses kv head j // (h // kv)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) * scale
        scores = _softcap(scores, cfg.attn_logit_softcap)
        qi, ki = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        mask = (ki <= qi)[None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if cfg.sliding_window:
            in_window = (qi - ki < cfg.sliding_window)[None]
            mask = mask & jnp.where(sliding, in_window, True)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, h * dh)
        return _dense(cfg, cfg.d_model, ("heads", "embed"), cfg.o_bias, "o")(ctx)


class GatedMLP(nn.Module):
    """``down(phi(gate(x)) * up(x))`` (SwiGLU / GeGLU)."""

    cfg: DecoderConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        g = _dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, "gate")(x)
        u = _dense(cfg, cfg.d_ff, ("embed", "mlp"), cfg.mlp_bias, "up")(x)
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), cfg.mlp_bias, "down")(_ACTIVATIONS[cfg.mlp_activation](g) * u)


class DecoderLayer(nn.Module):
    """One pre-norm block; ``resid_hook(layer, site, h)`` runs after the attention and the MLP adds."""

    cfg: DecoderConfig
    resid_hook: ResidHook | None = None

    @nn.compact
    def __call__(self, h, layer_index, sliding, positions, segment_ids):
        cfg = self.cfg
        a = Attention(cfg, name="attn")(_norm(cfg, "attn_norm")(h), positions, segment_ids, sliding)
        if cfg.sandwich_norms:
            a = _norm(cfg, "post_attn_norm")(a)
        h = h + a
        if self.resid_hook is not None:
            h = self.resid_hook(layer_index, "attn", h)
        f = GatedMLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(h))
        if cfg.sandwich_norms:
            f = _norm(cfg, "post_mlp_norm")(f)
        h = h + f
        if self.resid_hook is not None:
            h = self.resid_hook(layer_index, "mlp", h)
        return h


class _ScanBody(nn.Module):
    """``nn.scan`` adaptor: carry ``h``, per-layer inputs ``(index, sliding)``; emits ``h`` per layer."""

    cfg: DecoderConfig
    resid_hook: ResidHook | None = None

    @nn.compact
    def __call__(self, h, xs, positions, segment_ids):
        index, sliding = xs
        h = _layer_cls(self.cfg)(self.cfg, self.resid_hook, name="layer")(h, index, sliding, positions, segment_ids)
        return h, h


def _layer_cls(cfg: DecoderConfig):
    if cfg.remat == "none":
        return DecoderLayer
    policy = {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[cfg.remat]
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """Decoder-only LM of the Llama / Qwen2 / Gemma family (see the module docstring for the math).

    Args (call):
      tokens: int ``(B, T)``.
      positions: optional int ``(B, T)`` RoPE positions (default ``0..T-1``; packed rows restart per
        segment).
      segment_ids: optional int ``(B, T)``; attention stays within equal ids (packed sequences).
      resid_hook: optional ``resid_hook(layer, site, h) -> h`` at every residual write: after the (scaled)
        embedding (``layer=0, site="embed"``, a Python int) and after each attention (``site="attn"``) and
        MLP (``"mlp"``) residual add; ``layer`` is a traced int32 scalar under ``scan_layers`` (use
        ``jnp.where`` on it), a Python int otherwise. GRASP's residual mode:
        :func:`jaxlab.nn.residual_projection_hook`.
      return_residuals: also return the residual stream after the embedding and each layer,
        ``(n_layers + 1, B, T, d_model)``.

    Returns:
      float32 logits ``(B, T, vocab)``, or ``(logits, residuals)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nn import Decoder, DecoderConfig
      >>> cfg = DecoderConfig(vocab=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32)
      >>> model = Decoder(cfg)
      >>> tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
      >>> params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
      >>> params["layers"]["layer"]["attn"]["k"]["kernel"].value.shape    # stacked: (layers, d_in, kv * head_dim)
      (2, 16, 8)
      >>> params["layers"]["layer"]["attn"]["k"]["kernel"].names
      ('layers', 'embed', 'kv_heads')
      >>> logits = jax.jit(model.apply)({"params": params}, tokens)
      >>> logits.shape, logits.dtype
      ((2, 6, 32), dtype('float32'))
      >>> later = jax.jit(model.apply)({"params": params}, tokens.at[:, 4:].set(0))  # causal: prefix unchanged
      >>> bool(jnp.allclose(logits[:, :4], later[:, :4], atol=1e-6))
      True
    """

    cfg: DecoderConfig

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        resid_hook: ResidHook | None = None,
        return_residuals: bool = False,
    ):
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time); got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
        b, t = tokens.shape
        for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
            if arr is not None and tuple(arr.shape) != (b, t):
                raise ValueError(f"{name} must have the tokens' shape {(b, t)}; got {tuple(arr.shape)}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        embed = nn.Embed(
            cfg.vocab,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            name="embed",
        )
        h = embed(tokens)
        if cfg.embed_scale:
            h = h * jnp.asarray(math.sqrt(cfg.d_model), h.dtype)
        if resid_hook is not None:
            h = resid_hook(0, "embed", h)
        h0 = h
        sliding = cfg.sliding_layers
        if cfg.scan_layers:
            stack = nn.scan(
                _ScanBody,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, resid_hook, name="layers")
            xs = (jnp.arange(cfg.n_layers, dtype=jnp.int32), jnp.asarray(sliding))
            h, per_layer = stack(h, xs, positions, segment_ids)
        else:
            per_layer = []
            for i in range(cfg.n_layers):
                h = _layer_cls(cfg)(cfg, resid_hook, name=f"layer_{i}")(h, i, sliding[i], positions, segment_ids)
                per_layer.append(h)
            per_layer = jnp.stack(per_layer)
        h = _norm(cfg, "final_norm")(h)
        if cfg.tie_embeddings:
            logits = embed.attend(h)
        else:
            logits = _dense(cfg, cfg.vocab, ("embed", "vocab"), False, "unembed")(h)
        logits = _softcap(logits.astype(jnp.float32), cfg.final_logit_softcap)
        if not return_residuals:
            return logits
        return logits, jnp.concatenate([h0[None], per_layer], axis=0)
