"""STE baseline: always-sparse straight-through forward from step 0, plain AdamW with a live ``v``.

.. math::

    \\tilde w = w + \\operatorname{sg}(w\\odot\\operatorname{mask}(w) - w),\\qquad
    g = \\partial L/\\partial \\tilde w,\\qquad
    w \\leftarrow w - \\eta\\Big(\\frac{\\hat m_t}{\\sqrt{\\hat v_t}+\\epsilon} + \\lambda_{wd} w\\Big)

The update itself is AdamW's; what makes it STE is the forward, which
:func:`jaxlab.transforms.sparse_forward_params` derives from this transform's state.

Reference: Bengio, Leonard, Courville, "Estimating or Propagating Gradients Through Stochastic
Neurons" (2013); used as the N:M baseline in Zhou et al. (ICLR 2021) and Lu et al. (STEP, ICML 2023).
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
    ste_forward,
)

__all__ = ["SteState", "scale_by_ste_adam", "ste_adamw"]


class SteState(NamedTuple):
    """State of :func:`scale_by_ste_adam` (``count``, ``mu``, ``nu`` as in ``optax.ScaleByAdamState``)."""

    count: jax.Array
    mu: Any
    nu: Any
    config: NMConfig


def nm_adam_update(updates, state, params, cfg: NMConfig, b1, b2, eps, sr_ste_lambda, who: str):
    """Adam direction after adding ``sr_ste_lambda * (1 - mask(w)) * w`` to sparsified leaves' grads."""
    check_params(params, who)
    check_grads(updates, params, who)
    treedef = jax.tree_util.tree_structure(params)
    axes = treedef.flatten_up_to(cfg.axes(params, require_any=True))
    gs, ws = treedef.flatten_up_to(updates), treedef.flatten_up_to(params)
    mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
    t = safe_increment(state.count)
    mu_o, nu_o, d_o = [], [], []
    for a, g, w, mu, nu in zip(axes, gs, ws, mus, nus):
        if a is not None and sr_ste_lambda is not None:
            mask = nm_mask(w, cfg.n, cfg.m, a)
            g = g + jnp.where(mask, jnp.zeros((), w.dtype), sr_ste_lambda * w).astype(g.dtype)
        mu2, nu2 = adam_moments(g, mu, nu, b1, b2)
        mu_o.append(mu2)
        nu_o.append(nu2)
        d_o.append(adam_direction(mu2, nu2, t, b1, b2, eps).astype(g.dtype))
    unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
    return unflat(d_o), t, unflat(mu_o), unflat(nu_o)


def scale_by_ste_adam(
    *, n: int = 2, m: int = 4, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, sparsify=None, nm_axis=None
) -> optax.GradientTransformationExtraArgs:
    """Adam direction ``mhat / (sqrt(vhat) + eps)`` whose state marks the params for an STE N:M forward.

    Args:
      n, m: the N:M ratio.
      b1, b2, eps: Adam's constants.
      sparsify, nm_axis: leaf filter and grouping axis (see :func:`jaxlab.nm.nm_leaf_axes`).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)

    def init_fn(params):
        cfg.axes(params, require_any=True)
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return SteState(jnp.zeros([], jnp.int32), zeros(), zeros(), cfg)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        d, t, mu, nu = nm_adam_update(updates, state, params, cfg, b1, b2, eps, None, "scale_by_ste_adam")
        return d, SteState(t, mu, nu, cfg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
    """STE baseline optimizer: AdamW; the forward is ``w * mask(w)`` with straight-through gradients.

    .. math:: w \\leftarrow w - \\eta\\,(\\hat m_t/(\\sqrt{\\hat v_t}+\\epsilon) + \\lambda_{wd} w),
        \\quad g = \\nabla_{\\tilde w} L(\\tilde w)

    Example:
      >>> tx = ste_adamw(1e-3, n=2, m=4)
      >>> grads = jax.grad(lambda p: loss(sparse_forward_params(p, state)))(params)
    """
    return optax.chain(
        scale_by_ste_adam(n=n, m=m, b1=b1, b2=b2, eps=eps, sparsify=sparsify, nm_axis=nm_axis),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


register_nm_state(
    SteState,
    lambda params, state: ste_forward(params, state.config),
    lambda params, state: magnitude_prune(params, state.config),
)
