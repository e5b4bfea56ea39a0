"""Velocity MLP for 2D (and other low-dimensional) flow matching / MeanFlow."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxlab.nn.embeddings import TimeEmbedding

__all__ = ["VelocityMLP"]


class VelocityMLP(nn.Module):
    """An MLP ``u_theta(z, r, t)`` conditioned on ``t`` and ``h = t - r``.

    The same network serves flow matching (call with ``r = t``, so ``h = 0`` and the output is the
    instantaneous velocity ``v(z, t)``) and MeanFlow (average velocity over ``[r, t]``).

    ``x -> [Dense(hidden) -> SiLU] * depth -> Dense(out)``; the two time embeddings are added to the
    first hidden layer. Kernels carry logical axis names (``"embed"``, ``"mlp"``) for sharding rules.

    Attributes:
      hidden: hidden width.
      depth: number of hidden layers.
      time_dim: sinusoidal embedding width for each of ``t`` and ``h``.
      time_scale: scale applied to ``t`` and ``h`` inside the sinusoidal embedding.
      num_classes: if > 0, a label embedding is added (index ``num_classes`` is the null class).
      fourier_features: if > 0, ``z`` enters as ``[z, sin(2 pi z B), cos(2 pi z B)]`` with a fixed
        ``B ~ N(0, fourier_scale^2)`` of shape ``(dim, fourier_features)`` (random Fourier features,
        Tancik et al. 2020). ``B`` is a constant drawn from ``fourier_seed`` (not a parameter), so the
        same attributes give the same network on every host. Plain coordinate MLPs are slow to fit the
        sharp, many-turn fields of thin 2D data (spirals, rings); the features lift that spectral bias.
      fourier_scale: standard deviation of ``B`` (frequency in cycles per data unit).
      fourier_seed: NumPy seed of ``B``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nn import VelocityMLP
      >>> model = VelocityMLP(hidden=16, depth=2, time_dim=8)
      >>> z, t = jnp.ones((4, 2)), jnp.full((4,), 0.7)
      >>> params = jax.jit(model.init)(jax.random.PRNGKey(0), z, t, t)
      >>> v = jax.jit(model.apply)(params, z, t, t)   # r = t: the instantaneous velocity v(z, t)
      >>> print(v.shape)
      (4, 2)
    """

    hidden: int = 256
    depth: int = 4
    time_dim: int = 64
    time_scale: float = 1000.0
    num_classes: int = 0
    fourier_features: int = 0
    fourier_scale: float = 1.0
    fourier_seed: int = 0

    @nn.compact
    def __call__(self, z, r, t, y=None):
        out_dim = z.shape[-1]
        B = z.shape[0]
        r = jnp.broadcast_to(jnp.reshape(r, (-1,)), (B,))
        t = jnp.broadcast_to(jnp.reshape(t, (-1,)), (B,))
        dense = lambda f, name, names: nn.Dense(
            f, name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)
        )
        cond = TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="t_embed")(t)
        cond = cond + TimeEmbedding(self.time_dim, self.hidden, self.time_scale, name="h_embed")(t - r)
        if self.num_classes > 0:
            if y is None:
                y = jnp.full((B,), self.num_classes, jnp.int32)
            cond = cond + nn.Embed(self.num_classes + 1, self.hidden, name="y_embed")(y)
        if self.fourier_features < 0 or (self.fourier_features > 0 and not self.fourier_scale > 0):
            raise ValueError(
                f"VelocityMLP: fourier_features must be >= 0 and fourier_scale > 0 when features are on, got "
                f"fourier_features={self.fourier_features}, fourier_scale={self.fourier_scale}"
            )
        x = z
        if self.fourier_features > 0:
            B = np.random.default_rng(self.fourier_seed).normal(
                0.0, self.fourier_scale, (out_dim, self.fourier_features)
            ).astype(np.float32)
            zb = 2 * jnp.pi * (z @ jnp.asarray(B, z.dtype))
            x = jnp.concatenate([z, jnp.sin(zb), jnp.cos(zb)], axis=-1)
        h = dense(self.hidden, "in", ("embed", "mlp"))(x) + cond
        h = nn.silu(h)
        for i in range(self.depth - 1):
            h = nn.silu(dense(self.hidden, f"hidden_{i}", ("mlp", "embed"))(h))
        return dense(out_dim, "out", ("mlp", "embed"))(h)
