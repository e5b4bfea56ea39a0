"""Flow matching (rectified-flow path) loss and Euler sampler.

Path: ``z_t = (1 - t) x + t e`` with ``t = 0`` data and ``t = 1`` noise, conditional velocity
``v_c = e - x``. The network ``apply_fn(params, z, r, t)`` is the average-velocity model shared with
MeanFlow; flow matching is its ``r = t`` case (``h = t - r = 0``), so ``u(z, t, t) = v(z, t)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["flow_matching_loss", "euler_sample"]


def _concrete(a) -> np.ndarray | None:
    """``a`` as a numpy array when its values are known now; ``None`` for a tracer (under ``jit``/``vmap``)."""
    if isinstance(a, jax.core.Tracer):
        return None
    return np.asarray(a)


def _check_unit_times(fn: str, name: str, a) -> None:
    """Raise if concrete times ``a`` have values outside ``[0, 1]`` (NaN included); tracers are skipped."""
    v = _concrete(a)
    if v is None:
        return
    bad = ~((v >= 0) & (v <= 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{fn}: {name} must lie in [0, 1] (0 = data, 1 = noise); {int(bad.sum())} of {v.size} values "
            f"outside, first {name}[{i}] = {v[i]!s}"
        )


def _check_inputs(x, t, noise) -> None:
    if not hasattr(x, "shape"):
        raise TypeError(f"flow_matching_loss: x must be an array (B, ...), got {type(x).__name__}")
    if len(x.shape) < 1:
        raise ValueError(f"flow_matching_loss: x must have shape (B, ...), got {x.shape}")
    B = x.shape[0]
    if t is not None:
        if tuple(jnp.shape(t)) != (B,):
            raise ValueError(f"flow_matching_loss: t must have shape ({B},) to match x {x.shape}, got {jnp.shape(t)}")
        _check_unit_times("flow_matching_loss", "t", t)
    if noise is not None and tuple(jnp.shape(noise)) != tuple(x.shape):
        raise ValueError(f"flow_matching_loss: noise must have the shape of x {x.shape}, got {jnp.shape(noise)}")


def flow_matching_loss(
    apply_fn: Callable,
    params,
    x: jax.Array,
    key: jax.Array,
    *,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
):
    """Conditional flow-matching loss ``E || u_theta(z_t, t, t) - (e - x) ||^2`` (sum over dims, mean over batch).

    Args:
      apply_fn: ``apply_fn(params, z, r, t) -> u`` with ``z: (B, ...)`` and ``r, t: (B,)``.
      params: model parameters (any pytree).
      x: ``(B, ...)`` data batch.
      key: PRNG key for ``t ~ U(0, 1)`` and ``e ~ N(0, I)``; unused parts may be passed explicitly.
      t, noise: optional explicit times ``(B,)`` in ``[0, 1]`` and noise (same shape as ``x``).
    Returns:
      ``(loss, aux)`` with ``aux = {"mse": per-dim mean squared error}``.
    Raises:
      ValueError: ``t`` or ``noise`` of the wrong shape; ``t`` with values outside ``[0, 1]``. The value
        check runs eagerly only: under ``jit``/``vmap`` the times are tracers and only shapes are checked.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import flow_matching_loss
      >>> apply = lambda p, z, r, t: z @ p
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
      >>> loss, aux = flow_matching_loss(apply, jnp.eye(2), x, jax.random.PRNGKey(1))
      >>> bool(jnp.isclose(loss, 2 * aux["mse"]))                 # sum over 2 dims vs per-dim mean
      True
      >>> flow_matching_loss(apply, jnp.eye(2), x, jax.random.PRNGKey(1), t=jnp.full(8, 1.5))
      Traceback (most recent call last):
        ...
      ValueError: flow_matching_loss: t must lie in [0, 1] (0 = data, 1 = noise); 8 of 8 values outside, first t[0] = 1.5
    """
    _check_inputs(x, t, noise)
    kt, ke = jax.random.split(key)
    B = x.shape[0]
    t = jax.random.uniform(kt, (B,), x.dtype) if t is None else t
    e = jax.random.normal(ke, x.shape, x.dtype) if noise is None else noise
    tb = jnp.reshape(t, (B,) + (1,) * (x.ndim - 1))
    z = (1 - tb) * x + tb * e
    u = apply_fn(params, z, t, t)
    err = (u - (e - x)) ** 2
    per_ex = jnp.sum(jnp.reshape(err, (B, -1)), -1)
    return jnp.mean(per_ex), {"mse": jnp.mean(err)}


def euler_sample(apply_fn: Callable, params, noise: jax.Array, *, steps: int = 100) -> jax.Array:
    """Integrate ``dz/dt = v(z, t)`` from ``t = 1`` (noise) to ``t = 0`` (data) with ``steps`` Euler steps.

    ``steps`` must be a positive int (``ValueError`` otherwise, as in ``meanflow_sample``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import euler_sample
      >>> apply = lambda p, z, r, t: z                            # v = z: z(0) = z(1) (1 - 1/k)^k
      >>> euler_sample(apply, None, jnp.ones((1, 2)), steps=2).tolist()
      [[0.25, 0.25]]
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"euler_sample: steps must be a positive int, got {steps!r}")
    B = noise.shape[0]
    ts = jnp.linspace(1.0, 0.0, steps + 1)

    def body(z, i):
        t, t_next = ts[i], ts[i + 1]
        tv = jnp.full((B,), t, noise.dtype)
        v = apply_fn(params, z, tv, tv)
        return z - (t - t_next) * v, None

    z, _ = jax.lax.scan(body, noise, jnp.arange(steps))
    return z
