"""Shared machinery of the N:M optimizers (STEP, STE, SR-STE, ASP): static config, Adam moments,
and the two functions model code needs: :func:`sparse_forward_params` and :func:`prune`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.nm.masks import check_nm, nm_leaf_axes, nm_mask, straight_through
from jaxlab.transforms._tree import find_states, map_leaves, path_str

__all__ = ["NM_STATIC_ARGS", "NMConfig", "nm_static_args", "prune", "register_nm_state", "sparse_forward_params"]

#: Arguments of the N:M optimizer factories that must stay Python values under
#: ``optax.inject_hyperparams`` (pass ``static_args=nm_static_args(factory)``).
NM_STATIC_ARGS = ("n", "m", "window", "b2", "prune_step")


def nm_static_args(factory: Callable) -> tuple[str, ...]:
    """The arguments of ``factory`` to list in ``optax.inject_hyperparams(..., static_args=...)``.

    Example:
      >>> tx = optax.inject_hyperparams(step_adamw, static_args=nm_static_args(step_adamw))(
      ...     learning_rate=1e-3, switch_eps=1e-9, t_min=100, t_max=2000)
    """
    import inspect

    params = inspect.signature(factory).parameters
    return tuple(a for a in NM_STATIC_ARGS if a in params)


def static_int(v, name: str) -> int:
    """A Python int from ``v`` (int or concrete 0-d array); a clear error for tracers."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python int, got a traced value; with optax.inject_hyperparams "
            "pass static_args=jaxlab.transforms.nm_static_args(factory)"
        )
    if isinstance(v, bool) or not isinstance(v, int | np.integer | np.ndarray | jax.Array):
        raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    arr = np.asarray(v)
    if arr.ndim or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an int, got {v!r}")
    return int(arr)


def static_float(v, name: str) -> float:
    """A Python float from ``v``; a clear error for tracers."""
    if isinstance(v, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static Python number, got a traced value; with optax.inject_hyperparams "
            "pass static_args=jaxlab.transforms.nm_static_args(factory)"
        )
    return float(np.asarray(v))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class NMConfig:
    """Static (hashable, leaf-less) N:M configuration stored inside an optimizer state.

    It lets :func:`sparse_forward_params` and :func:`prune` recompute the per-leaf grouping axes
    from ``params`` alone. ``sparsify`` is ``None``, a callable ``(path, leaf) -> bool`` or a
    frozen ``(treedef, flags)`` pair (from a pytree of bools).
    """

    n: int
    m: int
    sparsify: Any = None
    nm_axis: Any = None

    @classmethod
    def make(cls, n, m, sparsify=None, nm_axis=None) -> NMConfig:
        n = static_int(n, "n")
        m = static_int(m, "m")
        check_nm((m,), n, m, 0)
        if sparsify is not None and not callable(sparsify):
            leaves, treedef = jax.tree_util.tree_flatten(sparsify)
            sparsify = (treedef, tuple(bool(x) for x in leaves))
        if nm_axis is not None and not callable(nm_axis):
            nm_axis = static_int(nm_axis, "nm_axis")
        return cls(n, m, sparsify, nm_axis)

    def _filter(self):
        if isinstance(self.sparsify, tuple):
            treedef, flags = self.sparsify
            return jax.tree_util.tree_unflatten(treedef, list(flags))
        return self.sparsify

    def axes(self, params, *, require_any: bool = False):
        """Per-leaf grouping axis (``None`` for dense leaves) of ``params``; validates selections."""
        axes = nm_leaf_axes(params, self.m, sparsify=self._filter(), nm_axis=self.nm_axis, n=self.n)
        n_leaves = len(jax.tree_util.tree_leaves(params))
        n_sparse = sum(a is not None for a in jax.tree_util.tree_structure(params).flatten_up_to(axes)) if n_leaves else 0
        if require_any and n_leaves and not n_sparse:
            shapes = {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
            raise ValueError(
                f"no parameter was selected for {self.n}:{self.m} sparsity (leaves and shapes: {shapes}); "
                f"the default keeps floating 'kernel' leaves whose reduction axis divides by {self.m}; "
                "pass sparsify=/nm_axis= for other layouts"
            )
        return axes


def safe_increment(count: jax.Array) -> jax.Array:
    """``count + 1`` saturating at the int32 maximum (as optax does)."""
    big = jnp.iinfo(jnp.int32).max
    return jnp.where(count < big, count + 1, big).astype(jnp.int32)


def adam_moments(g, mu, nu, b1, b2):
    """``mu' = b1 mu + (1-b1) g``, ``nu' = b2 nu + (1-b2) g^2`` (optax's update order)."""
    return (1 - b1) * g + b1 * mu, (1 - b2) * (g * g) + b2 * nu


def adam_direction(mu, nu, t, b1, b2, eps):
    """``mhat / (sqrt(vhat) + eps)`` with bias correction at step ``t`` (1-based int32)."""
    c1 = (1 - b1**t).astype(mu.dtype)
    c2 = (1 - b2**t).astype(nu.dtype)
    return (mu / c1) / (jnp.sqrt(nu / c2) + eps)


def check_params(params, who: str):
    if params is None:
        raise ValueError(f"{who}.update needs params (the N:M mask is computed from the weights): "
                         "call tx.update(grads, state, params)")


def check_grads(updates, params, who: str):
    gs, ps = jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(params)
    if gs != ps:
        raise ValueError(f"{who}: gradient tree {gs} does not match the params tree {ps}")


# ---- forward / prune dispatch ------------------------------------------------------------------

_FORWARD: dict[type, tuple[Callable, Callable]] = {}


def register_nm_state(state_type: type, forward: Callable, pruned: Callable) -> None:
    """Register how a state type maps ``(params, state)`` to forward params and to pruned params."""
    _FORWARD[state_type] = (forward, pruned)


def _the_state(opt_state):
    types = tuple(_FORWARD)
    states = find_states(opt_state, types)
    if not states:
        raise ValueError(
            "no N:M optimizer state (step_adamw, ste_adamw, sr_ste_adamw, asp_adamw) found in opt_state "
            f"of type {type(opt_state).__name__}"
        )
    if len(states) > 1:
        raise ValueError(f"found {len(states)} N:M optimizer states in opt_state; expected exactly one")
    return states[0]


def sparse_forward_params(params, opt_state):
    """The params the forward pass must use, given the N:M optimizer's state.

    .. math:: \\tilde w = w + \\operatorname{sg}(w \\odot \\operatorname{mask}(w) - w)\\quad
        \\text{(STE, SR-STE, STEP phase 2)},\\qquad \\tilde w = w \\quad \\text{(STEP phase 1)},
        \\qquad \\tilde w = w \\odot M_{fixed} \\quad \\text{(ASP)}

    The mask is recomputed from the current dense ``w`` (straight-through: the gradient w.r.t.
    ``w_tilde`` reaches ``w`` unchanged); STEP selects dense vs masked with ``lax.cond`` on the
    phase stored in the state, so one compiled step serves both phases. Use it as
    ``forward_params_fn`` of :func:`jaxlab.training.make_train_step` or call it inside your loss.

    Args:
      params: dense parameter pytree.
      opt_state: state of a transform containing exactly one of ``step_adamw``, ``ste_adamw``,
        ``sr_ste_adamw``, ``asp_adamw`` (possibly inside ``chain``/``inject_hyperparams``/``MultiSteps``).

    Returns:
      A pytree like ``params``.

    Example:
      >>> loss = lambda p: loss_fn(model.apply({"params": sparse_forward_params(p, opt_state)}, x))

    Reference: STEP (Lu et al., ICML 2023), Sec. 3 (STE forward); SR-STE (Zhou et al., ICLR 2021), Eq. 4.
    """
    state = _the_state(opt_state)
    return _FORWARD[type(state)][0](params, state)


def prune(params, opt_state):
    """Hard-pruned params for deployment: ``w * mask(w)`` on every sparsified leaf (ASP: the fixed mask).

    .. math:: w^{deploy} = w \\odot \\operatorname{mask}(w)

    Feed the result to :func:`jaxlab.nm.compress_params` (with the same ``n, m, sparsify, nm_axis``)
    for the packed format.

    Returns:
      A pytree like ``params`` with exactly ``N`` non-zeros per group of ``M`` on sparsified leaves.
    """
    state = _the_state(opt_state)
    return _FORWARD[type(state)][1](params, state)


def ste_forward(params, cfg: NMConfig):
    """Straight-through masked params for every sparsified leaf of ``params``."""
    return map_leaves(
        lambda p, a, w: w if a is None else straight_through(w, nm_mask(w, cfg.n, cfg.m, a)),
        cfg.axes(params),
        params,
    )


def magnitude_prune(params, cfg: NMConfig):
    """``w * mask(w)`` on every sparsified leaf (no gradient semantics)."""
    return map_leaves(
        lambda p, a, w: w if a is None else jnp.where(nm_mask(w, cfg.n, cfg.m, a), w, jnp.zeros((), w.dtype)),
        cfg.axes(params),
        params,
    )
