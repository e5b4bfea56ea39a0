"""Toy 2D distributions for flow matching / MeanFlow experiments.

Every sampler is a pure function ``sample(key, n) -> (n, 2) float32``. Gaussian mixtures are
exposed as :class:`GaussianMixture` with their parameters, so exact oracles (marginal velocity,
posterior covariance) can be computed from them (see ``jaxlab.losses.gmm_oracle``).

All datasets are scaled to roughly unit standard deviation per coordinate, so one model / optimiser
recipe fits all of them and sample-quality metrics are comparable across datasets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "GaussianMixture",
    "eight_gaussians",
    "checkerboard",
    "two_moons",
    "spirals",
    "concentric_rings",
    "TOY2D_DATASETS",
    "toy2d_sampler",
]


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: usable as a jit static/callable
class GaussianMixture:
    """Isotropic Gaussian mixture ``x ~ sum_k pi_k N(m_k, s_k^2 I)``.

    Attributes:
      means: ``(K, D)`` component means ``m_k``.
      stds: ``(K,)`` isotropic standard deviations ``s_k``.
      weights: ``(K,)`` mixture weights ``pi_k`` (normalised on construction).

    Example:
      >>> import jax, jax.numpy as jnp, math
      >>> from jaxlab.data import GaussianMixture
      >>> gm = GaussianMixture(means=[[0.0, 0.0], [4.0, 0.0]], stds=1.0, weights=[3.0, 1.0])
      >>> gm.weights.tolist(), gm.sample(jax.random.PRNGKey(0), 5).shape
      ([0.75, 0.25], (5, 2))
      >>> round(float(GaussianMixture([[0.0, 0.0]], 1.0, 1.0).log_prob(jnp.zeros(2))), 4)  # -log(2 pi)
      -1.8379
    """

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    def __post_init__(self):
        means = np.asarray(self.means, np.float32)
        stds = np.broadcast_to(np.asarray(self.stds, np.float32), (means.shape[0],)).copy()
        weights = np.broadcast_to(np.asarray(self.weights, np.float32), (means.shape[0],)).copy()
        if means.ndim != 2:
            raise ValueError(f"GaussianMixture.means: expected shape (K, D), got {means.shape}")
        if np.any(stds <= 0):
            raise ValueError(f"GaussianMixture.stds: expected all > 0, got {stds}")
        if np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"GaussianMixture.weights: expected non-negative with positive sum, got {weights}")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "stds", stds)
        object.__setattr__(self, "weights", weights / weights.sum())

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """Draw ``n`` samples, shape ``(n, D)``."""
        kc, kn = jax.random.split(key)
        comp = jax.random.categorical(kc, jnp.log(jnp.asarray(self.weights)), shape=(n,))
        eps = jax.random.normal(kn, (n, self.dim), jnp.float32)
        return jnp.asarray(self.means)[comp] + jnp.asarray(self.stds)[comp, None] * eps

    def __call__(self, key: jax.Array, n: int) -> jax.Array:
        return self.sample(key, n)

    def log_prob(self, x: jax.Array) -> jax.Array:
        """Exact log density, shape ``x.shape[:-1]``."""
        x = jnp.asarray(x)
        m, s, w = jnp.asarray(self.means), jnp.asarray(self.stds), jnp.asarray(self.weights)
        d2 = jnp.sum((x[..., None, :] - m) ** 2, -1)
        logn = -0.5 * d2 / s**2 - self.dim * jnp.log(s) - 0.5 * self.dim * math.log(2 * math.pi)
        return jax.scipy.special.logsumexp(logn + jnp.log(w), axis=-1)


def eight_gaussians(radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """Eight equal-weight Gaussians on a circle of ``radius`` (the classic '8gaussians').

    Example:
      >>> import numpy as np
      >>> from jaxlab.data import eight_gaussians
      >>> gm = eight_gaussians()
      >>> gm.num_components, gm.dim, np.linalg.norm(gm.means, axis=1).round(4).tolist() == [2.0] * 8
      (8, 2, True)
    """
    ang = np.arange(8) * (2 * np.pi / 8)
    means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
    return GaussianMixture(means=means, stds=np.full(8, std), weights=np.ones(8))


def checkerboard(key: jax.Array, n: int) -> jax.Array:
    """A 4x4 checkerboard on ``[-2, 2]^2`` (8 filled unit squares), uniform inside each square."""
    k1, k2, k3 = jax.random.split(key, 3)
    x1 = jax.random.uniform(k1, (n,), minval=-2.0, maxval=2.0)
    x2_ = jax.random.uniform(k2, (n,), minval=0.0, maxval=1.0) - 2.0 * jax.random.randint(k3, (n,), 0, 2)
    x2 = x2_ + jnp.floor(x1) % 2
    return jnp.stack([x1, x2], -1) * 1.0


def two_moons(key: jax.Array, n: int, noise: float = 0.08) -> jax.Array:
    """Two interleaved half circles, centred and scaled to about unit std."""
    k1, k2, k3 = jax.random.split(key, 3)
    theta = jax.random.uniform(k1, (n,), minval=0.0, maxval=jnp.pi)
    upper = jax.random.bernoulli(k2, 0.5, (n,))
    xa = jnp.stack([jnp.cos(theta), jnp.sin(theta)], -1)
    xb = jnp.stack([1.0 - jnp.cos(theta), 0.5 - jnp.sin(theta)], -1)
    x = jnp.where(upper[:, None], xa, xb)
    x = x + noise * jax.random.normal(k3, (n, 2))
    return (x - jnp.array([0.5, 0.25])) * 1.6


def spirals(key: jax.Array, n: int, noise: float = 0.05, turns: float = 1.5) -> jax.Array:
    """Two interleaved Archimedean spirals."""
    k1, k2, k3 = jax.random.split(key, 3)
    s = jnp.sqrt(jax.random.uniform(k1, (n,)))
    theta = s * turns * 2 * jnp.pi
    arm = jax.random.bernoulli(k2, 0.5, (n,))
    theta = theta + jnp.where(arm, jnp.pi, 0.0)
    r = 2.0 * s
    x = jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], -1)
    return x + noise * jax.random.normal(k3, (n, 2))


def concentric_rings(key: jax.Array, n: int, radii=(0.6, 1.4, 2.2), noise: float = 0.06) -> jax.Array:
    """Three concentric rings, points spread in proportion to the ring length."""
    k1, k2, k3 = jax.random.split(key, 3)
    radii_a = jnp.asarray(radii, jnp.float32)
    ring = jax.random.categorical(k1, jnp.log(radii_a / radii_a.sum()), shape=(n,))
    theta = jax.random.uniform(k2, (n,), minval=0.0, maxval=2 * jnp.pi)
    r = radii_a[ring]
    x = jnp.stack([r * jnp.cos(theta), r * jnp.sin(theta)], -1)
    return x + noise * jax.random.normal(k3, (n, 2))


TOY2D_DATASETS: dict[str, Callable[[], Callable[[jax.Array, int], jax.Array]]] = {
    "eight_gaussians": eight_gaussians,
    "checkerboard": lambda: checkerboard,
    "two_moons": lambda: two_moons,
    "spirals": lambda: spirals,
    "concentric_rings": lambda: concentric_rings,
}


def toy2d_sampler(name: str) -> Callable[[jax.Array, int], jax.Array]:
    """Return the sampler ``(key, n) -> (n, 2)`` for a dataset name (see ``TOY2D_DATASETS``).

    Example:
      >>> import jax
      >>> from jaxlab.data import toy2d_sampler
      >>> x = toy2d_sampler("two_moons")(jax.random.PRNGKey(0), 16)
      >>> print(x.shape, x.dtype)
      (16, 2) float32
    """
    if name not in TOY2D_DATASETS:
        raise ValueError(f"unknown toy2d dataset {name!r}; expected one of {sorted(TOY2D_DATASETS)}")
    return TOY2D_DATASETS[name]()
