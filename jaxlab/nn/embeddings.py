"""Time embeddings shared by the velocity models."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

__all__ = ["sinusoidal_embedding", "TimeEmbedding"]


def sinusoidal_embedding(t: jnp.ndarray, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0):
    """Sinusoidal embedding of a scalar per example.

    ``emb(t) = [cos(scale * t * f_i), sin(scale * t * f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.

    The ``scale`` is explicit on purpose: MeanFlow differentiates the network in ``t``, so the
    embedding's scale multiplies ``d_t u`` (specs/meanflow.md, section 1).

    Args:
      t: ``(B,)`` or ``(B, 1)`` times.
      dim: even embedding width.
      scale: multiplier applied to ``t`` before the frequencies.
      max_period: the slowest period.
    Returns:
      ``(B, dim)`` float32 embedding.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    t = jnp.reshape(t, (-1,)).astype(jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer SiLU MLP (as in DiT)."""

    dim: int = 64
    hidden: int = 128
    scale: float = 1000.0

    @nn.compact
    def __call__(self, t):
        e = sinusoidal_embedding(t, self.dim, scale=self.scale)
        e = nn.Dense(self.hidden, name="fc1")(e)
        e = nn.silu(e)
        return nn.Dense(self.hidden, name="fc2")(e)
