"""SR-STE and STE: an always-sparse straight-through forward, Adam on the (refined) gradient.

One factory, :func:`scale_by_sr_ste`, serves both baselines: the SR-STE coefficient ``lambda_w`` is an
argument and STE is its ``lambda_w = 0`` corner (:func:`scale_by_ste_adam`, :func:`ste_adamw`).

.. math::

    \\tilde w = w + \\operatorname{sg}(w\\odot\\operatorname{mask}(w) - w),\\qquad
    g \\leftarrow \\nabla_{\\tilde w} L + \\lambda_w\\,(1 - \\operatorname{mask}(w))\\odot w,\\qquad
    w \\leftarrow w - \\eta\\Big(\\frac{\\hat m_t}{\\sqrt{\\hat v_t}+\\epsilon} + \\lambda_{wd} w\\Big)

with the mask recomputed from the current dense ``w`` every step and a live Adam second moment
(``optax.scale_by_adam``). The forward ``w_tilde`` is what :func:`jaxlab.transforms.sparse_forward_params`
derives from this transform's state.

Reference: Zhou, Ma, Zhu, Liu, Zhang, Yuan, Sun, Li, "Learning N:M Fine-grained Structured Sparse
Neural Networks From Scratch", ICLR 2021 (default ``lambda_w = 2e-4``; ``sr_ste_adamw`` equals the original
SR-STE code's update to 7e-16); STE: Bengio, Leonard,
Courville, "Estimating or Propagating Gradients Through Stochastic Neurons" (2013).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from jaxlab.nm.masks import nm_mask
from jaxlab.transforms._nm_common import (
    NMConfig,
    check_update,
    magnitude_prune,
    register_nm_state,
    sr_ste_refine,
    ste_forward,
    uses_sr_ste,
    with_lr_and_decay,
)
from jaxlab.transforms.tree import map_leaves

__all__ = [
    "SrSteState",
    "SteState",
    "scale_by_sr_ste",
    "scale_by_sr_ste_adam",
    "scale_by_ste_adam",
    "sr_ste_adamw",
    "sr_ste_gradient",
    "ste_adamw",
]


class SrSteState(NamedTuple):
    """State of :func:`scale_by_sr_ste` (``count``, ``mu``, ``nu`` as in ``optax.ScaleByAdamState``)."""

    count: jax.Array
    mu: Any
    nu: Any
    config: NMConfig


#: STE's state is SR-STE's (STE is ``sr_ste_lambda = 0``).
SteState = SrSteState


def sr_ste_gradient(grads, params, axes, n: int, m: int, sr_ste_lambda):
    """The SR-STE refined gradient tree: the decay term on the pruned weights of every sparsified leaf.

    .. math:: g \\leftarrow g + \\lambda_w\\,(1 - \\operatorname{mask}(w))\\odot w
        \\quad\\text{(sparsified leaves; others unchanged)}

    Args:
      grads: gradient pytree (w.r.t. the straight-through forward params).
      params: the dense params (the mask is recomputed from them).
      axes: per-leaf grouping axis, ``None`` for dense leaves (:meth:`NMConfig.axes`).
      n, m: the N:M ratio.
      sr_ste_lambda: ``lambda_w``.

    Returns:
      A pytree like ``grads``.
    """
    return map_leaves(
        lambda p, a, g, w: g if a is None else sr_ste_refine(g, w, ~nm_mask(w, n, m, a), sr_ste_lambda),
        axes, grads, params,
    )


def scale_by_sr_ste(
    *,
    n: int = 2,
    m: int = 4,
    sr_ste_lambda: float = 2e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """Adam direction of the SR-STE-refined gradient; its state marks the params for an N:M STE forward.

    .. math::

        g_t' = g_t + \\lambda_w (1 - \\operatorname{mask}(w_t)) \\odot w_t,\\quad
        m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t',\\quad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t'^2,\\quad
        d_t = \\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_t/(1-\\beta_2^t)} + \\epsilon}

    ``sr_ste_lambda = 0`` is plain STE (a static ``0`` skips the mask: Adam on the raw gradient, bit for
    bit ``optax.scale_by_adam``).

    Args:
      n, m: the N:M ratio.
      sr_ste_lambda: the refinement coefficient ``lambda_w`` (``0``: STE).
      b1, b2, eps: Adam's constants.
      sparsify, nm_axis: leaf filter and grouping axis (see :func:`jaxlab.nm.nm_leaf_axes`).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Raises:
      ValueError: ``n > m`` or ``m`` not in :data:`jaxlab.nm.SUPPORTED_M` (the trained weights could not
        be compressed for deployment); at ``init``/``update``, a selected leaf that cannot be grouped by ``m``.

    Example:
      >>> from jaxlab.transforms import scale_by_sr_ste
      >>> params = {"kernel": jnp.array([[1.0], [-3.0], [0.5], [2.0]])}
      >>> tx = scale_by_sr_ste(n=2, m=4, sr_ste_lambda=0.5)
      >>> state = tx.init(params)
      >>> d, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> state.mu["kernel"].ravel() / (1 - 0.9)  # the refined gradient: 0.5 * w on the pruned weights
      Array([0.5 , 0.  , 0.25, 0.  ], dtype=float32)

    Reference: Zhou et al., ICLR 2021 (checked against the original SR-STE code).
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    refine = uses_sr_ste(sr_ste_lambda)

    def init_fn(params):
        cfg.axes(params, require_any=True)
        s = adam.init(params)
        return SrSteState(s.count, s.mu, s.nu, cfg)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        axes = check_update(updates, params, cfg, "scale_by_sr_ste")
        g = sr_ste_gradient(updates, params, axes, cfg.n, cfg.m, sr_ste_lambda) if refine else updates
        d, s = adam.update(g, optax.ScaleByAdamState(state.count, state.mu, state.nu))
        d = jax.tree.map(lambda x, gi: x.astype(gi.dtype), d, g)
        return d, SrSteState(s.count, s.mu, s.nu, cfg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: The former name of :func:`scale_by_sr_ste` (same function).
scale_by_sr_ste_adam = scale_by_sr_ste


def scale_by_ste_adam(
    *, n: int = 2, m: int = 4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, sparsify=None, nm_axis=None
) -> optax.GradientTransformationExtraArgs:
    """STE direction: :func:`scale_by_sr_ste` with ``sr_ste_lambda = 0`` (Adam on the raw gradient).

    .. math:: d_t = \\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_t/(1-\\beta_2^t)} + \\epsilon}

    Example:
      >>> from jaxlab.transforms import scale_by_ste_adam
      >>> tx = scale_by_ste_adam(n=1, m=4, b2=0.99)
    """
    return scale_by_sr_ste(n=n, m=m, sr_ste_lambda=0.0, b1=b1, b2=b2, eps=eps, sparsify=sparsify, nm_axis=nm_axis)


def sr_ste_adamw(
    learning_rate,
    *,
    n: int = 2,
    m: int = 4,
    sr_ste_lambda: float = 2e-4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """SR-STE baseline optimizer: STE forward, ``g + lambda_w (1 - mask) w``, AdamW with a live ``v``.

    .. math:: w \\leftarrow w - \\eta_t\\,(d_t + \\lambda_{wd}\\, w)

    with :func:`scale_by_sr_ste`'s ``d_t``; train with the forward params from
    :func:`jaxlab.transforms.sparse_forward_params`.

    Args:
      learning_rate: float or optax schedule.
      weight_decay: decoupled weight decay (all leaves, as ``optax.adamw`` with ``mask=None``).
      Others: see :func:`scale_by_sr_ste`.

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> from jaxlab.transforms import sparse_forward_params, sr_ste_adamw
      >>> params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 3))}
      >>> tx = sr_ste_adamw(1e-2, n=1, m=4, sr_ste_lambda=2e-4)
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(sparse_forward_params(p, state)["kernel"] ** 2)
      >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
      >>> params = optax.apply_updates(params, updates)

    Reference: Zhou et al., ICLR 2021 (checked against the original SR-STE code).
    """
    return with_lr_and_decay(
        scale_by_sr_ste(
            n=n, m=m, sr_ste_lambda=sr_ste_lambda, b1=b1, b2=b2, eps=eps, sparsify=sparsify, nm_axis=nm_axis
        ),
        learning_rate,
        weight_decay,
    )


def ste_adamw(
    learning_rate,
    *,
    n: int = 2,
    m: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """STE baseline optimizer: :func:`sr_ste_adamw` with ``sr_ste_lambda = 0`` (AdamW, sparse forward).

    .. math:: w \\leftarrow w - \\eta\\,(\\hat m_t/(\\sqrt{\\hat v_t}+\\epsilon) + \\lambda_{wd} w),
        \\quad g = \\nabla_{\\tilde w} L(\\tilde w)

    Example:
      >>> from jaxlab.transforms import sparse_forward_params, ste_adamw
      >>> params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 3))}
      >>> tx = ste_adamw(1e-3, n=2, m=4)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(sparse_forward_params(p, state)["kernel"] ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
    """
    return sr_ste_adamw(
        learning_rate, n=n, m=m, sr_ste_lambda=0.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
        sparsify=sparsify, nm_axis=nm_axis,
    )


register_nm_state(
    SrSteState,
    lambda params, state: ste_forward(params, state.config),
    lambda params, state: magnitude_prune(params, state.config),
)
