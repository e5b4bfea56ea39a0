"""A small decoder-only transformer LM (Flax Linen) with a residual-stream intervention hook.

Pre-LayerNorm blocks, causal multi-head attention written with plain ``jnp`` ops (so ``jax.jvp``,
``jax.grad`` and ``jax.linear_transpose`` all go through), learned or rotary positions:

.. math::

    h_0 = E[x] (+ P),\\qquad
    h \\leftarrow h + W_o\\,\\operatorname{softmax}\\!\\Big(\\frac{QK^\\top}{\\sqrt{d_h}} + M_{causal}\\Big)V,
    \\quad Q,K,V = \\operatorname{LN}(h) W_{q,k,v},\\qquad
    h \\leftarrow h + W_{down}\\,\\operatorname{gelu}(\\operatorname{LN}(h) W_{up}),\\qquad
    \\text{logits} = \\operatorname{LN}(h_L) W_{unembed}.

Parameter layout (module names are part of the API: GRASP's residual-side rules and STEP's leaf
filters key on them): ``embed`` (``nn.Embed``), optional ``pos_embed``, ``block_{i}/ln1``,
``block_{i}/attn/{q,k,v,o}``, ``block_{i}/ln2``, ``block_{i}/mlp/{up,down}``, ``ln_f``, ``unembed``;
all projections are ``nn.Dense`` with kernels ``(d_in, d_out)`` carrying logical axis names
(``"embed"``, ``"heads"``, ``"mlp"``, ``"vocab"``) for :mod:`jaxlab.distributed` sharding rules.

Reference: Vaswani et al., "Attention Is All You Need" (2017); Radford et al., GPT-2 (2019,
pre-LN); Su et al., "RoFormer" (2021, rotary positions, Eq. 34).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["Transformer", "TransformerConfig", "causal_lm_loss", "rotary_embedding"]

ResidHook = Callable[[int, str, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of :class:`Transformer`.

    Attributes:
      vocab: vocabulary size (256 for bytes).
      d_model: residual width.
      n_layers: number of blocks.
      n_heads: attention heads (``d_model % n_heads == 0``).
      d_ff: MLP hidden width.
      max_len: longest sequence (size of the learned position table).
      positions: ``"learned"`` (added table ``pos_embed``) or ``"rotary"`` (RoPE on q, k).
      rope_base: RoPE frequency base.
      use_bias: biases in the projections.
      dtype: computation dtype; params are kept in ``param_dtype``.
      param_dtype: parameter dtype.
      init_std: std of the normal init of embeddings and projections (``down``/``o`` are scaled by
        ``1/sqrt(2 n_layers)``, GPT-2 style).
      attention: ``"jnp"`` (plain einsum/softmax) or ``"pallas"`` (:func:`jaxlab.kernels.flash_attention`,
        causal, with a fused JVP; interpret mode on CPU).
    """

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    positions: str = "learned"
    rope_base: float = 10000.0
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    init_std: float = 0.02
    attention: str = "jnp"

    def __post_init__(self):
        for f in ("vocab", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TransformerConfig.{f} must be a positive int, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if self.positions not in ("learned", "rotary"):
            raise ValueError(f"TransformerConfig.positions must be 'learned' or 'rotary', got {self.positions!r}")
        if self.attention not in ("jnp", "pallas"):
            raise ValueError(f"TransformerConfig.attention must be 'jnp' or 'pallas', got {self.attention!r}")
        if self.positions == "rotary" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.d_model // self.n_heads}")


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of ``x`` (``(..., T, H, d_h)``) at integer ``positions`` (``(T,)``).

    .. math:: (x_{2i}, x_{2i+1})\\mapsto \\text{rotate half: } x\\cos(p\\theta_i) + \\operatorname{rot}(x)\\sin(p\\theta_i),
        \\quad \\theta_i = \\text{base}^{-2i/d_h}

    Uses the "rotate half" pairing (first half with second half of the head dim).
    """
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / d)
    ang = positions.astype(jnp.float32)[:, None] * inv[None, :]  # (T, half)
    cos = jnp.cos(ang)[:, None, :].astype(x.dtype)
    sin = jnp.sin(ang)[:, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _dense(features: int, names: tuple[str, str], cfg: TransformerConfig, name: str, std: float) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=cfg.use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def _layernorm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with projections ``q, k, v, o`` (plain jnp softmax)."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        b, t, d = x.shape
        h, dh = cfg.n_heads, d // cfg.n_heads
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        q = _dense(d, ("embed", "heads"), cfg, "q", cfg.init_std)(x).reshape(b, t, h, dh)
        k = _dense(d, ("embed", "heads"), cfg, "k", cfg.init_std)(x).reshape(b, t, h, dh)
        v = _dense(d, ("embed", "heads"), cfg, "v", cfg.init_std)(x).reshape(b, t, h, dh)
        if cfg.positions == "rotary":
            pos = jnp.arange(t)
            q = rotary_embedding(q, pos, cfg.rope_base)
            k = rotary_embedding(k, pos, cfg.rope_base)
        if cfg.attention == "pallas":  # fused kernels on (b, h, t, dh), custom JVP (jaxlab.kernels)
            from jaxlab.kernels import flash_attention

            heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731
            ctx = flash_attention(*map(heads_first, (q, k, v)), causal=True, implementation="pallas")
            ctx = heads_first(ctx).reshape(b, t, d)
            return _dense(d, ("heads", "embed"), cfg, "o", out_std)(ctx)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(dh, q.dtype))
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return _dense(d, ("heads", "embed"), cfg, "o", out_std)(ctx)


class MLP(nn.Module):
    """Two-layer GELU MLP with projections ``up`` and ``down``."""

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        u = _dense(cfg.d_ff, ("embed", "mlp"), cfg, "up", cfg.init_std)(x)
        return _dense(cfg.d_model, ("mlp", "embed"), cfg, "down", out_std)(jax.nn.gelu(u))


class Block(nn.Module):
    """Pre-LN transformer block; calls the residual hook after the attention and the MLP writes."""

    cfg: TransformerConfig
    index: int

    @nn.compact
    def __call__(self, h: jax.Array, resid_hook: ResidHook | None = None) -> jax.Array:
        h = h + CausalSelfAttention(self.cfg, name="attn")(_layernorm(self.cfg, "ln1")(h))
        if resid_hook is not None:
            h = resid_hook(self.index, "attn", h)
        h = h + MLP(self.cfg, name="mlp")(_layernorm(self.cfg, "ln2")(h))
        if resid_hook is not None:
            h = resid_hook(self.index, "mlp", h)
        return h


class Transformer(nn.Module):
    """Decoder-only transformer language model.

    .. math:: p(x_{t+1} \\mid x_{\\le t}) = \\operatorname{softmax}(\\text{logits}_t)

    Args (call):
      tokens: int array ``(B, T)`` with ``T <= cfg.max_len`` and values in ``[0, vocab)``.
      resid_hook: optional ``resid_hook(layer_index, site, h) -> h`` called at every residual write: after
        the token (+ position) embedding (``layer_index=0, site="embed"``), then after block
        ``layer_index``'s attention write (``site="attn"``) and MLP write (``site="mlp"``), with the
        residual stream ``h`` (``(B, T, d_model)``); what it returns continues down the network
        (ablation, steering, probes, GRASP's residual mode via
        :func:`jaxlab.nn.residual_projection_hook` -- no model fork needed). Hooks that act at one place
        test ``(layer_index, site)``.
      return_residuals: also return the residual stream after the embedding and after each block,
        stacked as ``(n_layers + 1, B, T, d_model)`` (index 0: embeddings; ``i + 1``: after block
        ``i``; all post-hook).

    Returns:
      ``logits`` ``(B, T, vocab)`` in float32, or ``(logits, residuals)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nn import Transformer, TransformerConfig
      >>> cfg = TransformerConfig(vocab=16, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_len=8)
      >>> model = Transformer(cfg)
      >>> tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
      >>> params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]  # boxed: logical axis names
      >>> params["block_0"]["attn"]["q"]["kernel"].names
      ('embed', 'heads')
      >>> u = jnp.zeros(cfg.d_model).at[0].set(1.0)   # a residual direction to steer along
      >>> steer = lambda i, site, h: h + 3.0 * u if (i, site) == (1, "mlp") else h
      >>> @jax.jit
      ... def run(params, tokens):
      ...     plain = model.apply({"params": params}, tokens, return_residuals=True)
      ...     return plain, model.apply({"params": params}, tokens, resid_hook=steer, return_residuals=True)
      >>> (logits, resid), (steered, resid_s) = run(params, tokens)
      >>> print(logits.shape, resid.shape)            # (B, T, vocab), (n_layers + 1, B, T, d_model)
      (2, 8, 16) (3, 2, 8, 8)
      >>> bool(jnp.allclose(resid_s[2] - resid[2], 3.0 * u, atol=1e-5)), bool(jnp.allclose(steered, logits))
      (True, False)

    Reference: Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2, 2019).
    """

    cfg: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, *, resid_hook: ResidHook | None = None, return_residuals: bool = False):
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time); got shape {tuple(tokens.shape)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"tokens must be integers, got dtype {tokens.dtype}")
        t = tokens.shape[1]
        if t > cfg.max_len:
            raise ValueError(f"tokens of shape {tuple(tokens.shape)} exceed max_len={cfg.max_len}")
        embed = nn.Embed(
            cfg.vocab,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            name="embed",
        )
        h = embed(tokens)
        if cfg.positions == "learned":
            pos = nn.Embed(
                cfg.max_len,
                cfg.d_model,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), (None, "embed")),
                name="pos_embed",
            )
            h = h + pos(jnp.arange(t))[None]
        if resid_hook is not None:
            h = resid_hook(0, "embed", h)
        residuals = [h]
        for i in range(cfg.n_layers):
            h = Block(cfg, i, name=f"block_{i}")(h, resid_hook)
            residuals.append(h)
        h = _layernorm(cfg, "ln_f")(h)
        logits = _dense(cfg.vocab, ("embed", "vocab"), cfg, "unembed", cfg.init_std)(h).astype(jnp.float32)
        if return_residuals:
            return logits, jnp.stack(residuals)
        return logits


def causal_lm_loss(logits: jax.Array, tokens: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy in nats: position ``t`` predicts ``tokens[:, t + 1]``.

    .. math:: L = -\\frac{1}{B(T-1)} \\sum_{b,t<T-1} \\log \\operatorname{softmax}(\\text{logits}_{b,t})_{x_{b,t+1}}

    Divide by ``ln 2`` for bits per token (bits per byte on a byte vocabulary).

    Args:
      logits: ``(B, T, V)``.
      tokens: ``(B, T)`` integer targets (the model's own input).
      mask: optional ``(B, T - 1)`` weights for the predicted positions.

    Returns:
      Scalar float32 loss.

    Example:
      >>> import math, jax.numpy as jnp
      >>> from jaxlab.nn import causal_lm_loss
      >>> tokens = jnp.array([[1, 2, 3, 0]])
      >>> round(float(causal_lm_loss(jnp.zeros((1, 4, 16)), tokens)), 4), round(math.log(16), 4)  # uniform
      (2.7726, 2.7726)
      >>> logits = 20.0 * jnp.eye(16)[jnp.array([[2, 3, 0, 0]])]   # predicts each next token
      >>> round(float(causal_lm_loss(logits, tokens)), 4)
      0.0
    """
    if logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on (B, T)")
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    if mask is None:
        return jnp.mean(nll)
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
