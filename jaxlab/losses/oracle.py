"""Exact oracle for MeanFlow on Gaussian-mixture data: marginal velocity, covariance, optimal coefficient.

For ``x ~ sum_k pi_k N(m_k, s_k^2 I)`` and ``z_t = (1 - t) x + t e`` the conditional velocity is
``v_c = e - x = (z - x) / t``, affine in ``x`` given ``z``. Per component ``k``:

    z | k        ~ N((1 - t) m_k, sig_k^2 I),              sig_k^2 = (1 - t)^2 s_k^2 + t^2
    gamma_k(z)   = pi_k N(z; (1 - t) m_k, sig_k^2 I) / sum_j (...)
    v_k(z)       = E[v_c | z, k]   = (z (t - (1 - t) s_k^2) - t m_k) / sig_k^2
    Cov(v_c | z, k)                = (s_k^2 / sig_k^2) I

so the marginal velocity ``v = sum_k gamma_k v_k`` and the conditional covariance
``Sigma = sum_k gamma_k (s_k^2/sig_k^2 I + v_k v_k^T) - v v^T`` are exact (no division by ``t``).
For a network ``u_theta`` with ``A = (t - r) d_z u_theta``, ``eps = v_c - v``, ``delta = vhat - v``:

    M(lam)  = E[ tr((I - lam A) Sigma (I - lam A)^T) + (1 - lam)^2 ||A delta||^2 ]   (target MSE vs T*)
    lam*    = (E tr(A Sigma) + E ||A delta||^2) / (E tr(A Sigma A^T) + E ||A delta||^2)

The outer expectation over ``(z, r, t)`` is a Monte-Carlo average over a fixed draw; everything inside
it is exact. Reference: Lu & Wang, arXiv 2605.09235.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlab.losses.time_sampling import logit_normal_time_pairs

__all__ = ["GMMOracle", "gmm_oracle"]


def _posterior(means, stds, weights, z, t):
    """Responsibilities ``(B, K)``, component velocities ``(B, K, D)`` and variance ratios ``(B, K)``."""
    t = jnp.reshape(t, (-1,))[:, None]  # (B, 1)
    s2 = stds[None, :] ** 2  # (1, K)
    sig2 = (1 - t) ** 2 * s2 + t**2  # (B, K)
    D = z.shape[-1]
    diff = z[:, None, :] - (1 - t)[:, :, None] * means[None]  # (B, K, D)
    logp = jnp.log(weights)[None] - 0.5 * jnp.sum(diff**2, -1) / sig2 - 0.5 * D * jnp.log(sig2)
    gamma = jax.nn.softmax(logp, axis=-1)
    vk = (z[:, None, :] * (t - (1 - t) * s2)[:, :, None] - t[:, :, None] * means[None]) / sig2[:, :, None]
    return gamma, vk, s2 / sig2


@dataclasses.dataclass(frozen=True, eq=False)
class GMMOracle:
    """Exact MeanFlow quantities for an isotropic Gaussian mixture (see the module docstring).

    Attributes:
      means: ``(K, D)``; stds: ``(K,)``; weights: ``(K,)`` (normalised), as jnp arrays.
    """

    means: jax.Array
    stds: jax.Array
    weights: jax.Array

    def marginal_velocity(self, z: jax.Array, t: jax.Array) -> jax.Array:
        """``v(z, t) = E[e - x | z_t = z]``; ``z: (B, D)``, ``t: (B,)`` -> ``(B, D)``. Usable as ``MeanFlowConfig.vhat``."""
        gamma, vk, _ = _posterior(self.means, self.stds, self.weights, z, t)
        return jnp.einsum("bk,bkd->bd", gamma, vk)

    def conditional_covariance(self, z: jax.Array, t: jax.Array) -> jax.Array:
        """``Sigma(z, t) = Cov[e - x | z_t = z]``, shape ``(B, D, D)``."""
        gamma, vk, ratio = _posterior(self.means, self.stds, self.weights, z, t)
        v = jnp.einsum("bk,bkd->bd", gamma, vk)
        D = z.shape[-1]
        second = jnp.einsum("bk,bkd,bke->bde", gamma, vk, vk) + jnp.sum(gamma * ratio, -1)[:, None, None] * jnp.eye(D)
        return second - v[:, :, None] * v[:, None, :]

    def ideal_target(self, apply_fn: Callable, params, z, r, t) -> jax.Array:
        """``T* = v - (t - r)(J v + d_t u_theta)``: the MeanFlow target with the exact marginal velocity."""
        v = self.marginal_velocity(z, t)
        f = lambda z_, r_, t_: apply_fn(params, z_, r_, t_)
        _, dudt = jax.jvp(f, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
        return v - (t - r)[:, None] * dudt

    def coefficient_terms(self, apply_fn: Callable, params, z, r, t, vhat: str | Callable | None = "boundary"):
        """Per-point exact terms ``tr(A Sigma)``, ``tr(A Sigma A^T)``, ``||A delta||^2``, ``delta^T A delta``, ``tr Sigma``, ``||delta||^2``.

        Args:
          apply_fn, params: the network ``u_theta(z, r, t)`` (2D inputs ``(B, D)``).
          z, r, t: evaluation points ``(B, D)``, ``(B,)``, ``(B,)``.
          vhat: ``"boundary"`` (``u_theta(z, t, t)``), ``None``/``"exact"`` (``delta = 0``) or a callable ``(z, t) -> vhat``.
        Returns:
          dict of ``(B,)`` arrays.
        """
        f = lambda zi, ri, ti: apply_fn(params, zi[None], ri[None], ti[None])[0]
        J = jax.vmap(jax.jacfwd(f, argnums=0))(z, r, t)  # (B, D, D)
        A = (t - r)[:, None, None] * J
        Sig = self.conditional_covariance(z, t)
        v = self.marginal_velocity(z, t)
        if vhat is None or vhat == "exact":
            vh = v
        elif isinstance(vhat, str) and vhat == "boundary":
            vh = apply_fn(params, z, t, t)
        elif callable(vhat):
            vh = vhat(z, t)
        else:
            raise ValueError(f"GMMOracle: vhat must be 'boundary', 'exact'/None or a callable, got {vhat!r}")
        delta = vh - v
        Ad = jnp.einsum("bij,bj->bi", A, delta)
        return {
            "tr_A_Sigma": jnp.einsum("bij,bji->b", A, Sig),
            "tr_A_Sigma_At": jnp.einsum("bij,bjk,bik->b", A, Sig, A),
            "Ad2": jnp.sum(Ad**2, -1),
            "dAd": jnp.sum(delta * Ad, -1),
            "tr_Sigma": jnp.trace(Sig, axis1=1, axis2=2),
            "d2": jnp.sum(delta**2, -1),
        }

    def sample_points(self, key: jax.Array, n: int, *, mu: float = -0.4, sigma: float = 1.0):
        """``(x, e, z, r, t)``: ``n`` draws with ``r < t`` from the logit-normal sampler (no ``r = t`` rows)."""
        kx, ke, kt = jax.random.split(key, 3)
        K = self.means.shape[0]
        kc, kn = jax.random.split(kx)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=(n,))
        x = self.means[comp] + self.stds[comp, None] * jax.random.normal(kn, (n, self.means.shape[1]))
        del K
        e = jax.random.normal(ke, x.shape)
        r, t = logit_normal_time_pairs(kt, n, mu=mu, sigma=sigma, flow_matching_fraction=0.0)
        z = (1 - t)[:, None] * x + t[:, None] * e
        return x, e, z, r, t

    def _pooled(self, apply_fn, params, key, n, vhat, mu, sigma, chunk):
        _, _, z, r, t = self.sample_points(key, n, mu=mu, sigma=sigma)
        terms = None
        for s in range(0, n, chunk):
            part = self.coefficient_terms(apply_fn, params, z[s:s + chunk], r[s:s + chunk], t[s:s + chunk], vhat)
            part = {k: jnp.sum(v) for k, v in part.items()}
            terms = part if terms is None else {k: terms[k] + part[k] for k in terms}
        return {k: v / n for k, v in terms.items()}

    def expected_terms(self, apply_fn: Callable, params, key: jax.Array, n: int = 8192, *,
                       vhat: str | Callable | None = "boundary", mu: float = -0.4, sigma: float = 1.0,
                       chunk: int = 4096) -> dict:
        """Averages of :meth:`coefficient_terms` over ``n`` draws of ``(z, r < t)``."""
        return self._pooled(apply_fn, params, key, n, vhat, mu, sigma, chunk)

    @staticmethod
    def optimal_from_terms(terms: dict) -> jax.Array:
        """``lam* = (E tr(A Sigma) + E||A delta||^2) / (E tr(A Sigma A^T) + E||A delta||^2)`` (unclipped)."""
        return (terms["tr_A_Sigma"] + terms["Ad2"]) / (terms["tr_A_Sigma_At"] + terms["Ad2"])

    @staticmethod
    def estimator_limit_from_terms(terms: dict) -> jax.Array:
        """Where the ``"auto"`` estimator (``p = 0``) converges: ``(E tr(A Sigma) + E d^T A d) / (E tr(A Sigma A^T) + E||A d||^2)``.

        It equals :meth:`optimal_from_terms` when ``delta = 0`` (exact ``vhat``); otherwise the two differ
        because the estimator only sees ``epshat = eps - delta``.
        """
        return (terms["tr_A_Sigma"] + terms["dAd"]) / (terms["tr_A_Sigma_At"] + terms["Ad2"])

    @staticmethod
    def target_mse_from_terms(terms: dict, lam) -> jax.Array:
        """``M(lam) = E tr Sigma - 2 lam E tr(A Sigma) + lam^2 E tr(A Sigma A^T) + (1 - lam)^2 E||A delta||^2``."""
        lam = jnp.asarray(lam)
        return (terms["tr_Sigma"] - 2 * lam * terms["tr_A_Sigma"] + lam**2 * terms["tr_A_Sigma_At"]
                + (1 - lam) ** 2 * terms["Ad2"])

    def optimal_coefficient(self, apply_fn: Callable, params, key: jax.Array, n: int = 8192, **kw) -> jax.Array:
        """Exact minimiser ``lam*`` of the target MSE :meth:`target_mse` for this network (unclipped)."""
        return self.optimal_from_terms(self.expected_terms(apply_fn, params, key, n, **kw))

    def target_mse(self, apply_fn: Callable, params, lam, key: jax.Array, n: int = 8192, **kw) -> jax.Array:
        """Exact (per-point) target MSE ``M(lam) = E||T_lam - T*||^2`` on ``r < t`` points; ``lam`` may be an array."""
        return self.target_mse_from_terms(self.expected_terms(apply_fn, params, key, n, **kw), lam)


def gmm_oracle(mixture) -> GMMOracle:
    """Build the exact oracle for an isotropic Gaussian mixture.

    Args:
      mixture: a :class:`jaxlab.data.GaussianMixture` (or anything with ``means (K, D)``, ``stds (K,)``,
        ``weights (K,)``).
    Returns:
      a :class:`GMMOracle` with ``marginal_velocity``, ``conditional_covariance``, ``ideal_target``,
      ``optimal_coefficient``, ``target_mse`` and the per-point ``coefficient_terms``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.data import eight_gaussians
      >>> from jaxlab.losses import MeanFlowConfig, gmm_oracle
      >>> oracle = gmm_oracle(eight_gaussians())
      >>> z, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
      >>> oracle.marginal_velocity(z, t).shape                     # exact E[e - x | z_t = z]
      (4, 2)
      >>> apply = lambda p, z, r, t: jnp.tanh(z @ p) * (1 + t - r)[:, None]
      >>> lam_star = oracle.optimal_coefficient(apply, jnp.eye(2), jax.random.PRNGKey(0), n=1024)
      >>> cfg = MeanFlowConfig(jvp_cond_weight="auto", vhat=oracle.marginal_velocity)

    References:
      Lu & Wang, arXiv 2605.09235.
    """
    for name in ("means", "stds", "weights"):
        if not hasattr(mixture, name):
            raise TypeError(f"gmm_oracle: expected a GaussianMixture with .{name}, got {type(mixture).__name__}")
    means = jnp.asarray(mixture.means, jnp.float32)
    stds = jnp.asarray(mixture.stds, jnp.float32)
    weights = jnp.asarray(mixture.weights, jnp.float32)
    if means.ndim != 2:
        raise ValueError(f"gmm_oracle: mixture.means must have shape (K, D), got {means.shape}")
    K = means.shape[0]
    if stds.shape != (K,) or weights.shape != (K,):
        raise ValueError(f"gmm_oracle: stds and weights must have shape ({K},), got {stds.shape} and {weights.shape}")
    return GMMOracle(means=means, stds=stds, weights=weights / jnp.sum(weights))
