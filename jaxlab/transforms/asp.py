"""ASP baseline: dense AdamW, a one-shot magnitude N:M mask at ``prune_step``, masked fine-tuning after.

.. math::

    M = \\operatorname{mask}(w_{\\text{prune\\_step}}),\\qquad
    g \\leftarrow M\\odot g,\\qquad
    w \\leftarrow M\\odot\\Big(w - \\eta\\big(\\tfrac{\\hat m_t}{\\sqrt{\\hat v_t}+\\epsilon} + \\lambda_{wd} w\\big)\\Big)

Before ``prune_step`` the mask is all ones (dense training). The update whose 1-based step number is
``prune_step`` computes ``M`` from the params it receives (after ``prune_step - 1`` dense updates) and
zeroes the pruned weights exactly; afterwards the mask is fixed, gradients entering the moments and the
updates are masked, so pruned weights stay exactly zero.

Reference: Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA ASP, arXiv 2104.08378),
Sec. 4 (train dense, prune 2:4 by magnitude once, fine-tune with the mask fixed).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.nm.masks import nm_mask
from jaxlab.transforms._nm_common import (
    NMConfig,
    adam_direction,
    adam_moments,
    check_grads,
    check_params,
    magnitude_prune,
    register_nm_state,
    safe_increment,
    static_int,
)
from jaxlab.transforms._tree import map_leaves

__all__ = ["AspState", "asp_adamw"]


class AspState(NamedTuple):
    """State of :func:`asp_adamw`: Adam's ``count, mu, nu``, the bool mask (all ones before pruning), ``pruned``."""

    count: jax.Array
    mu: Any
    nu: Any
    mask: Any
    pruned: jax.Array
    config: NMConfig


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
    """ASP baseline optimizer: AdamW, one-shot magnitude N:M pruning at ``prune_step``, then masked.

    .. math:: u_t = \\begin{cases} -\\eta(d_t + \\lambda_{wd} w) & M = 1\\\\ -w & M = 0 \\end{cases}

    Args:
      learning_rate: float or optax schedule.
      prune_step: 1-based update number that prunes (``>= 1``; the mask is computed from the params
        passed to that update).
      n, m, b1, b2, eps, weight_decay: ratio and AdamW constants.
      sparsify, nm_axis: leaf filter and grouping axis (see :func:`jaxlab.nm.nm_leaf_axes`).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> tx = asp_adamw(1e-3, prune_step=1000, n=2, m=4)
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)
    prune_step = static_int(prune_step, "prune_step")
    if prune_step < 1:
        raise ValueError(f"prune_step must be >= 1 (1-based update number), got {prune_step}")
    lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

    def init_fn(params):
        cfg.axes(params, require_any=True)
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        ones = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)
        return AspState(jnp.zeros([], jnp.int32), zeros(), zeros(), ones, jnp.zeros([], bool), cfg)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(params, "asp_adamw")
        check_grads(updates, params, "asp_adamw")
        axes = cfg.axes(params, require_any=True)
        t = safe_increment(state.count)
        lr = lr_fn(state.count)
        mask = jax.lax.cond(
            t == prune_step,
            lambda ws: map_leaves(lambda p, a, w, old: old if a is None else nm_mask(w, cfg.n, cfg.m, a), axes, ws, state.mask),
            lambda ws: state.mask,
            params,
        )

        def leaf(path, a, g, w, mu, nu, mk):
            zero = jnp.zeros((), g.dtype)
            g = g if a is None else jnp.where(mk, g, zero)
            mu2, nu2 = adam_moments(g, mu, nu, b1, b2)
            u = -lr * (adam_direction(mu2, nu2, t, b1, b2, eps) + weight_decay * w)
            u = u.astype(w.dtype)
            return (u if a is None else jnp.where(mk, u, -w)), mu2, nu2

        res = map_leaves(leaf, axes, updates, params, state.mu, state.nu, mask)
        treedef = jax.tree_util.tree_structure(params)
        flat = treedef.flatten_up_to(res)
        unflat = lambda k: jax.tree_util.tree_unflatten(treedef, [r[k] for r in flat])
        return unflat(0), AspState(t, unflat(1), unflat(2), mask, state.pruned | (t >= prune_step), cfg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
