"""ASP: one-shot magnitude N:M pruning at ``prune_step`` around any optimizer, masked fine-tuning after.

:func:`asp` wraps an inner optimizer (``optax.adamw``, ``optax.sgd``, ...), which computes the update;
ASP only owns the mask. With the inner update ``U(.)`` (learning rate and weight decay included):

.. math::

    M_t = \\begin{cases}\\operatorname{mask}(w_t) & t = \\text{prune\\_step}\\\\ M_{t-1} & \\text{otherwise}
    \\end{cases},\\qquad M_0 = 1,\\qquad
    u_t = M_t\\odot U(M_t\\odot g_t) - (1 - M_t)\\odot w_t

Before ``prune_step`` the mask is all ones (dense training: exactly the inner optimizer). The update whose
1-based step number is ``prune_step`` computes ``M`` from the params it receives (after ``prune_step - 1``
dense updates) and zeroes the pruned weights exactly; afterwards the mask is fixed, gradients entering the
inner optimizer (its moments) and the updates are masked, so pruned weights stay exactly zero.

Reference: Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA ASP, arXiv 2104.08378):
train dense, prune 2:4 by magnitude once, fine-tune with the mask fixed (the recipe as publicly
described; section numbers not checked).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.nm.masks import nm_mask
from jaxlab.transforms._nm_common import (
    NMConfig,
    check_update,
    magnitude_prune,
    register_nm_state,
    static_int,
)
from jaxlab.transforms.tree import map_leaves

__all__ = ["AspState", "asp", "asp_adamw", "asp_mask"]


class AspState(NamedTuple):
    """State of :func:`asp`.

    Attributes:
      count: int32 number of updates done.
      mask: bool pytree like params (all ones before pruning and on dense leaves).
      pruned: bool, whether the one-shot pruning has happened.
      inner_state: the inner optimizer's state (e.g. ``optax.adamw``'s, moments included).
      config: static N:M configuration (no leaves).
    """

    count: jax.Array
    mask: Any
    pruned: jax.Array
    inner_state: Any
    config: NMConfig


def asp_mask(params, mask, axes, n: int, m: int, prune_now):
    """ASP's mask after this step: the magnitude N:M mask of ``params`` when ``prune_now``, else ``mask``.

    .. math:: M_t = \\operatorname{mask}(w_t)\\ \\text{if prune\\_now, else } M_{t-1}
        \\quad\\text{(sparsified leaves; dense leaves keep theirs)}

    ``prune_now`` is a traced bool; the ranking runs only on that step (``lax.cond``).
    """
    return jax.lax.cond(
        prune_now,
        lambda ws: map_leaves(lambda p, a, w, old: old if a is None else nm_mask(w, n, m, a), axes, ws, mask),
        lambda ws: mask,
        params,
    )


def asp(
    inner: optax.GradientTransformation,
    *,
    prune_step: int,
    n: int = 2,
    m: int = 4,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """ASP around ``inner``: dense until ``prune_step``, then a fixed magnitude N:M mask.

    .. math:: u_t = \\begin{cases} U(M_t \\odot g_t) & M_t = 1\\\\ -w_t & M_t = 0 \\end{cases}

    where ``U`` is ``inner``'s update (it sees the masked gradient and the current params; its moments of
    pruned weights decay towards zero).

    Args:
      inner: the optimizer that computes the update, with its learning rate, e.g.
        ``optax.adamw(1e-3, weight_decay=0.01)`` (any ``optax.GradientTransformation``).
      prune_step: 1-based update number that prunes (``>= 1``; the mask is computed from the params
        passed to that update).
      n, m: the N:M ratio.
      sparsify, nm_axis: leaf filter and grouping axis (see :func:`jaxlab.nm.nm_leaf_axes`).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``. The forward params are
      ``w * M`` (:func:`jaxlab.transforms.sparse_forward_params`).

    Raises:
      ValueError: ``prune_step < 1``, ``n > m``, ``m`` not in :data:`jaxlab.nm.SUPPORTED_M` (it could
        not be compressed for deployment), or a selected leaf that cannot be grouped by ``m``.

    Example:
      >>> from jaxlab.transforms import asp
      >>> params = {"kernel": jnp.array([[1.0], [-3.0], [0.75], [2.0]])}
      >>> tx = asp(optax.sgd(0.5), prune_step=2, n=2, m=4)
      >>> state = tx.init(params)
      >>> for _ in range(3):
      ...     updates, state = tx.update({"kernel": jnp.ones((4, 1))}, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> params["kernel"].ravel()  # a dense step, the prune step (zeroes 0.5 and 0.25), a masked step
      Array([ 0. , -4.5,  0. ,  0.5], dtype=float32)

    Reference: Mishra et al., arXiv 2104.08378 (NVIDIA ASP recipe).
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)
    prune_step = static_int(prune_step, "prune_step")
    if prune_step < 1:
        raise ValueError(f"prune_step must be >= 1 (1-based update number), got {prune_step}")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        cfg.axes(params, require_any=True)
        ones = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
        return AspState(jnp.zeros([], jnp.int32), ones, jnp.zeros([], bool), inner.init(params), cfg)

    def update_fn(updates, state, params=None, **extra_args):
        axes = check_update(updates, params, cfg, "asp")
        t = optax.safe_increment(state.count)
        mask = asp_mask(params, state.mask, axes, cfg.n, cfg.m, t == prune_step)
        zero = lambda x: jnp.zeros((), x.dtype)
        g = map_leaves(lambda p, a, g, mk: g if a is None else jnp.where(mk, g, zero(g)), axes, updates, mask)
        u, inner_state = inner.update(g, state.inner_state, params, **extra_args)
        u = map_leaves(lambda p, a, u, w, mk: u if a is None else jnp.where(mk, u, (-w).astype(u.dtype)),
                       axes, u, params, mask)
        return u, AspState(t, mask, state.pruned | (t >= prune_step), inner_state, cfg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def asp_adamw(
    learning_rate,
    *,
    prune_step: int,
    n: int = 2,
    m: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """ASP baseline optimizer: ``asp(optax.adamw(...), prune_step=...)``.

    .. math:: u_t = \\begin{cases} -\\eta_t\\,(\\hat m_t/(\\sqrt{\\hat v_t}+\\epsilon) + \\lambda_{wd} w_t)
        & M_t = 1\\\\ -w_t & M_t = 0 \\end{cases}

    Args:
      learning_rate: float or optax schedule.
      prune_step: 1-based update number that prunes (see :func:`asp`).
      n, m, b1, b2, eps, weight_decay: ratio and AdamW constants.
      sparsify, nm_axis: leaf filter and grouping axis (see :func:`jaxlab.nm.nm_leaf_axes`).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> from jaxlab.transforms import asp_adamw
      >>> tx = asp_adamw(1e-3, prune_step=1000, n=2, m=4, weight_decay=0.01)
      >>> state = tx.init({"kernel": jnp.ones((8, 4))})
    """
    return asp(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        prune_step=prune_step, n=n, m=m, sparsify=sparsify, nm_axis=nm_axis,
    )


def _forward(params, state: AspState):
    return map_leaves(
        lambda p, a, w, mk: w if a is None else jnp.where(mk, w, jnp.zeros((), w.dtype)),
        state.config.axes(params),
        params,
        state.mask,
    )


def _prune(params, state: AspState):
    """The fixed mask once pruned; before that, the magnitude N:M mask of the current weights."""
    return jax.lax.cond(state.pruned, _forward, lambda p, s: magnitude_prune(p, s.config), params, state)


register_nm_state(AspState, _forward, _prune)
