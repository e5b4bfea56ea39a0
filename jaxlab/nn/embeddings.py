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
    embedding's scale multiplies ``d_t u`` (MeanFlow identity, Geng et al. 2025, arXiv 2505.13447).

    Args:
      t: ``(B,)`` or ``(B, 1)`` times.
      dim: even embedding width.
      scale: multiplier applied to ``t`` before the frequencies.
      max_period: the slowest period.
    Returns:
      ``(B, dim)`` float32 embedding.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nn import sinusoidal_embedding
      >>> e = sinusoidal_embedding(jnp.array([0.0, 0.5]), 8)
      >>> print(e.shape, e[0].tolist())   # t = 0: cos = 1, sin = 0
      (2, 8) [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    """
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    t = jnp.reshape(t, (-1,)).astype(jnp.float32)
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding followed by a two-layer SiLU MLP (as in DiT).

    .. math:: e(t) = W_2\\,\\operatorname{silu}(W_1\\,\\operatorname{emb}(t) + b_1) + b_2

    Attributes:
      dim: sinusoidal width (even).
      hidden: output (and hidden) width.
      scale: multiplier of ``t`` inside :func:`sinusoidal_embedding`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nn import TimeEmbedding
      >>> emb = TimeEmbedding(dim=8, hidden=16)
      >>> t = jnp.array([0.1, 0.9])
      >>> params = emb.init(jax.random.PRNGKey(0), t)
      >>> print(emb.apply(params, t).shape)
      (2, 16)
    """

    dim: int = 64
    hidden: int = 128
    scale: float = 1000.0

    @nn.compact
    def __call__(self, t):
        e = sinusoidal_embedding(t, self.dim, scale=self.scale)
        e = nn.Dense(self.hidden, name="fc1")(e)
        e = nn.silu(e)
        return nn.Dense(self.hidden, name="fc2")(e)
