"""Time-pair samplers for MeanFlow: logit-normal ``(r, t)`` with a static ``r = t`` prefix.

MeanFlow trains the average velocity ``u(z_t, r, t)`` on pairs ``0 <= r <= t <= 1``. The standard
recipe (Geng et al. 2025, sec. 4 and Table 1) draws two logit-normal times, sorts them, and sets
``r = t`` on a fraction of the batch (those rows are plain flow matching). Here the ``r = t`` rows are
always the *first* ``n_eq`` rows of the batch, where ``n_eq`` is a static Python int: the loss can then
run its JVP (and any extra forward pass) on the static slice ``[n_eq:]`` without dynamic shapes.

``n_eq`` is ``fraction * B`` rounded by one of two rules (:data:`PREFIX_ROUNDINGS`): ``"round"`` (nearest,
ties to even; jaxlab's rule, the default) or ``"floor"`` (the official MeanFlow code's
``int(batch_size * fraction)``). They agree whenever ``fraction * B`` is an integer, e.g. for the default
fraction 0.75 and any ``B`` divisible by 4.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["logit_normal_time_pairs", "num_flow_matching_rows"]

#: The rules that turn a fraction of the batch into a static row count (see :func:`num_flow_matching_rows`).
PREFIX_ROUNDINGS = ("round", "floor")


def _prefix_count(fraction: float, batch_size: int, rounding: str) -> int:
    """``round(fraction * B)`` (ties to even) or ``floor(fraction * B)``; arguments already validated."""
    n = float(fraction) * batch_size
    return int(round(n)) if rounding == "round" else math.floor(n)


def num_flow_matching_rows(batch_size: int, fraction: float, rounding: str = "round") -> int:
    """Static number of leading ``r = t`` rows: ``fraction * batch_size`` rounded by ``rounding``.

        "round":  n_eq = round(fraction * B)    (nearest integer, ties to even; jaxlab's rule, the default)
        "floor":  n_eq = floor(fraction * B)    (the official MeanFlow code, ``int(bz * data_proportion)``)

    Both take the float product as computed, so e.g. ``floor(0.29 * 100) = 28`` exactly as ``int()`` does.
    They agree whenever ``fraction * B`` is an integer (fraction 0.75 and ``B`` divisible by 4); otherwise
    ``"round"`` can give one row more, e.g. ``B = 6``, fraction 0.25: round 2 (1.5 ties to 2), floor 1.

    Args:
      batch_size: rows in the (per-device) batch.
      fraction: fraction of rows with ``r = t``, in ``[0, 1]``.
      rounding: ``"round"`` or ``"floor"``.
    Returns:
      a Python ``int`` in ``[0, batch_size]``.
    Raises:
      ValueError: ``batch_size`` not a non-negative int, ``fraction`` outside ``[0, 1]`` or an unknown
        ``rounding``.

    Example:
      >>> from jaxlab.losses import num_flow_matching_rows
      >>> num_flow_matching_rows(8, 0.75)
      6
      >>> num_flow_matching_rows(6, 0.25), num_flow_matching_rows(6, 0.25, rounding="floor")
      (2, 1)
    """
    if not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"num_flow_matching_rows: batch_size must be a non-negative int, got {batch_size!r}")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"num_flow_matching_rows: fraction must be in [0, 1], got {fraction!r}")
    if rounding not in PREFIX_ROUNDINGS:
        raise ValueError(f'num_flow_matching_rows: rounding must be "round" or "floor", got {rounding!r}')
    return _prefix_count(fraction, batch_size, rounding)


def logit_normal_time_pairs(
    key: jax.Array,
    batch_size: int,
    *,
    mu: float = -0.4,
    sigma: float = 1.0,
    flow_matching_fraction: float = 0.75,
    flow_matching_rounding: str = "round",
    dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Sample ``(r, t)`` pairs: sorted logit-normal times with a static ``r = t`` prefix.

    ``a, b ~ sigmoid(N(mu, sigma^2))`` i.i.d., ``t = max(a, b)``, ``r = min(a, b)``; then
    ``r_i = t_i`` for the first ``n_eq = num_flow_matching_rows(B, flow_matching_fraction,
    flow_matching_rounding)`` rows (``round`` or ``floor`` of ``flow_matching_fraction * B``).

    The key is used as ``ka, kb = jax.random.split(key)``, ``a = sigmoid(mu + sigma N(ka))`` and
    ``b = sigmoid(mu + sigma N(kb))`` (documented so tests can reproduce it).

    Args:
      key: PRNG key.
      batch_size: ``B`` (static).
      mu, sigma: logit-normal location and scale (MeanFlow default ``(-0.4, 1.0)``).
      flow_matching_fraction: fraction of rows with ``r = t``, in ``[0, 1]``.
      flow_matching_rounding: ``"round"`` (jaxlab, default) or ``"floor"`` (official MeanFlow code), see
        :func:`num_flow_matching_rows`.
      dtype: float dtype of the result.
    Returns:
      ``(r, t)``, each ``(B,)``, with ``r <= t`` and ``r[:n_eq] == t[:n_eq]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import logit_normal_time_pairs
      >>> r, t = logit_normal_time_pairs(jax.random.PRNGKey(0), 8, flow_matching_fraction=0.5)
      >>> bool(jnp.all(r[:4] == t[:4])) and bool(jnp.all(r <= t))
      True

    References:
      Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447, sec. 4.3.
    """
    if sigma < 0:
        raise ValueError(f"logit_normal_time_pairs: sigma must be >= 0, got {sigma!r}")
    n_eq = num_flow_matching_rows(batch_size, flow_matching_fraction, flow_matching_rounding)
    ka, kb = jax.random.split(key)
    a = jax.nn.sigmoid(mu + sigma * jax.random.normal(ka, (batch_size,), jnp.float32))
    b = jax.nn.sigmoid(mu + sigma * jax.random.normal(kb, (batch_size,), jnp.float32))
    t = jnp.maximum(a, b)
    r = jnp.minimum(a, b)
    r = jnp.where(jnp.arange(batch_size) < n_eq, t, r)
    return r.astype(dtype), t.astype(dtype)
