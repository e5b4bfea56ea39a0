"""Velocity MLP for 2D (and other low-dimensional) flow matching / MeanFlow."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

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
        h = dense(self.hidden, "in", ("embed", "mlp"))(z) + cond
        h = nn.silu(h)
        for i in range(self.depth - 1):
            h = nn.silu(dense(self.hidden, f"hidden_{i}", ("mlp", "embed"))(h))
        return dense(out_dim, "out", ("mlp", "embed"))(h)
