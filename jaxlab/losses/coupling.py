"""Minibatch optimal-transport coupling of data and noise for flow matching / MeanFlow.

Flow matching and MeanFlow pair each data row ``x_i`` with a noise row ``e_i`` and regress on the
conditional velocity ``v_c = e_i - x_i``. With independent pairs the conditional paths cross, so ``v_c``
scatters widely around the marginal velocity ``v(z_t, t) = E[v_c | z_t]``. Re-pairing the rows of a
minibatch by optimal transport (Tong et al. 2023, Pooladian et al. 2023: minibatch OT flow matching)

    sigma = argmin_{permutation sigma} sum_i ||x_i - e_sigma(i)||^2,      e'_i = e_sigma(i)

keeps both marginals (the noise rows are only reordered) and makes the paths nearly straight and
non-crossing, so ``v_c`` is close to ``v``: a lower-variance regression target, and a one-step map
that is closer to a straight line. :func:`ot_couple` returns the reordered noise; pass it as ``noise=`` to
:func:`jaxlab.losses.meanflow_loss` or :func:`jaxlab.losses.flow_matching_loss`.

Two solvers:

* ``"exact"``: the assignment problem above, solved on the host by SciPy's
  ``linear_sum_assignment`` (Jonker-Volgenant, ``O(B^3)``). Under ``jit`` it is a ``jax.pure_callback``;
  under ``vmap`` the callback receives every run's batch at once and solves each *distinct* problem
  once (paired runs that see the same batch, e.g. a coefficient sweep, share one solve).
* ``"sinkhorn"``: entropic OT on the device (pure JAX, shards and compiles anywhere), ``iters`` log-domain
  Sinkhorn iterations at ``epsilon_abs = epsilon * mean_ij C_ij``, then for each row a partner drawn from
  its row of the plan, ``sigma(i) ~ P_i. / sum_j P_ij``. The draw is with replacement, so the paired
  noise's marginal is ``N(0, I)`` only in expectation over the plan (exact for ``epsilon -> inf``, where
  it is an independent resampling).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ot_couple", "OT_METHODS"]

OT_METHODS = ("exact", "sinkhorn")


def _pair_cost(xf, ef, xp=jnp):
    """``C_ij = ||x_i - e_j||^2`` of ``(B, D)`` rows, ``(B, B)``; ``xp`` is ``jnp`` (device) or ``np`` (host)."""
    return xp.maximum(xp.sum(xf**2, -1)[:, None] + xp.sum(ef**2, -1)[None, :] - 2.0 * xf @ ef.T, 0.0)


def _exact_host(ndim: int):
    """The host function of the exact solver: ``(x, e) -> e[sigma]`` on arrays with any leading run dims."""
    from scipy.optimize import linear_sum_assignment

    def solve(x, e) -> np.ndarray:
        x, e = np.asarray(x), np.asarray(e)  # the callback may hand over jax arrays
        lead = x.shape[: x.ndim - ndim]
        B = x.shape[x.ndim - ndim]
        xs = x.reshape((-1, B, math.prod(x.shape[x.ndim - ndim + 1 :])))
        es = e.reshape((-1, B, xs.shape[-1]))
        out = np.empty_like(es)
        solved: dict[bytes, np.ndarray] = {}
        for i in range(xs.shape[0]):
            key = xs[i].tobytes() + es[i].tobytes()
            if key not in solved:
                rows, cols = linear_sum_assignment(_pair_cost(xs[i].astype(np.float64), es[i].astype(np.float64), np))
                perm = np.empty(B, np.int64)
                perm[rows] = cols
                solved[key] = perm
            out[i] = es[i][solved[key]]
        return out.reshape(lead + e.shape[x.ndim - ndim :])

    return solve


def _sinkhorn_pairs(key: jax.Array, x: jax.Array, e: jax.Array, epsilon: float, iters: int) -> jax.Array:
    C = _pair_cost(jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32),
                   jnp.reshape(e, (e.shape[0], -1)).astype(jnp.float32))
    log_k = -C / (epsilon * jnp.maximum(jnp.mean(C), 1e-12))
    B = x.shape[0]

    def body(_, fg):
        f, g = fg
        f = -jax.nn.logsumexp(log_k + g[None, :], axis=1)  # uniform marginals: the log(1/B) terms cancel
        g = -jax.nn.logsumexp(log_k + f[:, None], axis=0)
        return f, g

    f, g = jax.lax.fori_loop(0, iters, body, (jnp.zeros(B), jnp.zeros(B)))
    return jax.random.categorical(key, log_k + f[:, None] + g[None, :], axis=1)


def ot_couple(
    x: jax.Array,
    noise: jax.Array,
    *,
    method: str = "exact",
    key: jax.Array | None = None,
    epsilon: float = 0.05,
    iters: int = 50,
) -> jax.Array:
    """Reorder ``noise`` so that row ``i`` is ``x[i]``'s minibatch-OT partner (squared Euclidean cost).

    Args:
      x: ``(B, ...)`` data rows.
      noise: ``(B, ...)`` noise rows, the shape of ``x``.
      method: ``"exact"`` (host Hungarian; a permutation of ``noise``) or ``"sinkhorn"`` (on device; rows of
        ``noise`` drawn from the entropic plan, with replacement). See the module docstring.
      key: PRNG key for the ``"sinkhorn"`` draw (required there, unused by ``"exact"``).
      epsilon: ``"sinkhorn"`` entropic regularisation relative to the mean pair cost.
      iters: ``"sinkhorn"`` log-domain iterations.

    Returns:
      ``(B, ...)`` noise rows paired with ``x``, dtype of ``noise``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import ot_couple
      >>> x = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
      >>> e = jnp.array([[0.0, 9.0], [0.1, 0.0], [9.0, 1.0]])   # x0 <- e1, x1 <- e2, x2 <- e0
      >>> ot_couple(x, e).tolist()
      [[0.10000000149011612, 0.0], [9.0, 1.0], [0.0, 9.0]]
    """
    if method not in OT_METHODS:
        raise ValueError(f"ot_couple: method must be one of {OT_METHODS}, got {method!r}")
    if not hasattr(x, "shape") or not hasattr(noise, "shape"):
        raise TypeError(f"ot_couple: x and noise must be arrays, got {type(x).__name__} and {type(noise).__name__}")
    if len(x.shape) < 1 or tuple(x.shape) != tuple(noise.shape):
        raise ValueError(f"ot_couple: x and noise must have the same shape (B, ...), got x {tuple(x.shape)} "
                         f"and noise {tuple(noise.shape)}")
    if method == "sinkhorn":
        if key is None:
            raise ValueError("ot_couple: method='sinkhorn' draws each row's partner from the plan and needs key=")
        if not (epsilon > 0 and iters >= 1):
            raise ValueError(f"ot_couple: sinkhorn needs epsilon > 0 and iters >= 1, got epsilon={epsilon}, "
                             f"iters={iters}")
        return jnp.take(noise, _sinkhorn_pairs(key, x, noise, float(epsilon), int(iters)), axis=0)
    if x.shape[0] <= 1:
        return noise
    return jax.pure_callback(_exact_host(len(x.shape)), jax.ShapeDtypeStruct(noise.shape, noise.dtype), x, noise,
                             vmap_method="broadcast_all")
