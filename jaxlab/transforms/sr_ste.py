"""SR-STE baseline: STE forward plus the sparse-refined regulariser on the pruned weights.

.. math::

    g \\leftarrow \\nabla_{\\tilde w} L + \\lambda_w\\,(1 - \\operatorname{mask}(w))\\odot w,\\qquad
    w \\leftarrow w - \\eta\\Big(\\frac{\\hat m_t}{\\sqrt{\\hat v_t}+\\epsilon} + \\lambda_{wd} w\\Big)

with the mask recomputed from the current dense ``w`` every step and a live Adam second moment.

Reference: Zhou, Ma, Zhu, Liu, Zhang, Yuan, Sun, Li, "Learning N:M Fine-grained Structured Sparse
Neural Networks From Scratch", ICLR 2021, Eq. 4 (default ``lambda_w = 2e-4``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.transforms._nm_common import NMConfig, magnitude_prune, register_nm_state, ste_forward
from jaxlab.transforms.ste import nm_adam_update

__all__ = ["SrSteState", "scale_by_sr_ste_adam", "sr_ste_adamw"]


class SrSteState(NamedTuple):
    """State of :func:`scale_by_sr_ste_adam` (``count``, ``mu``, ``nu`` as in ``optax.ScaleByAdamState``)."""

    count: jax.Array
    mu: Any
    nu: Any
    config: NMConfig


def scale_by_sr_ste_adam(
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
    """Adam direction of the SR-STE-refined gradient ``g + lambda (1 - mask(w)) w`` (sparsified leaves).

    Args:
      n, m: the N:M ratio.
      sr_ste_lambda: the refinement coefficient ``lambda_w``.
      b1, b2, eps: Adam's constants.
      sparsify, nm_axis: leaf filter and grouping axis (see :func:`jaxlab.nm.nm_leaf_axes`).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)

    def init_fn(params):
        cfg.axes(params, require_any=True)
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return SrSteState(jnp.zeros([], jnp.int32), zeros(), zeros(), cfg)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        d, t, mu, nu = nm_adam_update(updates, state, params, cfg, b1, b2, eps, sr_ste_lambda, "scale_by_sr_ste_adam")
        return d, SrSteState(t, mu, nu, cfg)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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

    Example:
      >>> tx = sr_ste_adamw(1e-3, n=1, m=4, sr_ste_lambda=2e-4)
      >>> grads = jax.grad(lambda p: loss(sparse_forward_params(p, state)))(params)

    Reference: Zhou et al., ICLR 2021, Eq. 4.
    """
    return optax.chain(
        scale_by_sr_ste_adam(
            n=n, m=m, sr_ste_lambda=sr_ste_lambda, b1=b1, b2=b2, eps=eps, sparsify=sparsify, nm_axis=nm_axis
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


register_nm_state(
    SrSteState,
    lambda params, state: ste_forward(params, state.config),
    lambda params, state: magnitude_prune(params, state.config),
)
