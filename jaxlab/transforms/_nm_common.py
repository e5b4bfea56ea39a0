"""Shared machinery of the N:M optimizers (STEP, SR-STE and its STE corner, ASP): the static N:M
configuration, argument checks, the SR-STE term, the AdamW tail, and the two functions model code
needs: :func:`sparse_forward_params` and :func:`prune` (dispatched on the registered state types).

Adam itself is optax's: SR-STE/STE run ``optax.scale_by_adam`` and ASP wraps any optax optimizer, so
their moments are laid out and computed as in ``optax.adamw``; STEP updates its moments with
``optax.tree.update_moment``/``update_moment_per_elem_norm`` and writes out only its (partly frozen)
bias-corrected direction (:func:`jaxlab.transforms.step.frozen_v_direction`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.nm.compress import SUPPORTED_M
from jaxlab.nm.masks import check_nm, nm_leaf_axes, nm_mask, straight_through
from jaxlab.paths import key_path
from jaxlab.transforms.tree import find_states, map_leaves

__all__ = ["NM_STATIC_ARGS", "NMConfig", "nm_static_args", "prune", "register_nm_state", "sparse_forward_params"]

#: Arguments of the N:M optimizer factories that must stay Python values under
#: ``optax.inject_hyperparams`` (pass ``static_args=nm_static_args(factory)``).
NM_STATIC_ARGS = ("n", "m", "window", "z_every", "z_stride", "b2", "prune_step")


def nm_static_args(factory: Callable) -> tuple[str, ...]:
    """The arguments of ``factory`` to list in ``optax.inject_hyperparams(..., static_args=...)``.

    Example:
      >>> from jaxlab.transforms import nm_static_args, step_adamw
      >>> nm_static_args(step_adamw)
      ('n', 'm', 'window', 'z_every', 'z_stride', 'b2')
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

    :meth:`make` (called by every N:M optimizer factory) rejects a group size ``m`` outside
    :data:`jaxlab.nm.SUPPORTED_M`: what the optimizer trains must be exportable with
    :func:`jaxlab.nm.compress_params`, so an unpackable ``m`` fails when the optimizer is built, not at
    export after training.
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
        if m not in SUPPORTED_M:
            raise ValueError(
                f"{n}:{m} sparsity (n={n}, m={m}): M={m} has no packed index format, so the trained weights "
                f"could not be exported (jaxlab.nm.compress_params, NMDense); supported M: {SUPPORTED_M}"
            )
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
            shapes = {key_path(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
            raise ValueError(
                f"no parameter was selected for {self.n}:{self.m} sparsity (leaves and shapes: {shapes}); "
                f"the default keeps floating 'kernel' leaves whose reduction axis divides by {self.m}; "
                "pass sparsify=/nm_axis= for other layouts"
            )
        return axes


def check_update(updates, params, cfg: NMConfig, who: str):
    """Validate an N:M ``update(grads, state, params)`` call; the per-leaf grouping axes of ``params``.

    Raises ``ValueError`` when ``params`` is missing, when the gradient tree does not match the params
    tree, or when no leaf is selected for N:M sparsity (naming the leaves and their shapes).
    """
    if params is None:
        raise ValueError(f"{who}.update needs params (the N:M mask is computed from the weights): "
                         "call tx.update(grads, state, params)")
    gs, ps = jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(params)
    if gs != ps:
        raise ValueError(f"{who}: gradient tree {gs} does not match the params tree {ps}")
    return cfg.axes(params, require_any=True)


def uses_sr_ste(sr_ste_lambda) -> bool:
    """Whether the SR-STE term is computed: a traced coefficient (``inject_hyperparams``) keeps it, a
    static ``0`` skips the mask entirely (then the gradient passes through bit for bit)."""
    return isinstance(sr_ste_lambda, jax.core.Tracer) or bool(sr_ste_lambda != 0)


def sr_ste_refine(g, w, pruned, sr_ste_lambda):
    """The SR-STE refined gradient of one leaf: the decay term on the pruned weights added to ``g``.

    .. math:: g \\leftarrow g + \\lambda_w\\,(1 - \\operatorname{mask}(w))\\odot w

    Args:
      g: gradient (w.r.t. the straight-through forward weights).
      w: the dense weights.
      pruned: bool array like ``w``, ``True`` where ``mask(w) = 0``.
      sr_ste_lambda: the coefficient ``lambda_w``.

    Returns:
      The refined gradient, in ``g``'s dtype.

    Example:
      >>> from jaxlab.transforms._nm_common import sr_ste_refine
      >>> w = jnp.array([3.0, -1.0, 0.5, 2.0])
      >>> sr_ste_refine(jnp.zeros(4), w, jnp.array([False, True, True, False]), 0.1)
      Array([ 0.  , -0.1 ,  0.05,  0.  ], dtype=float32)

    Reference: Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From
    Scratch", ICLR 2021 (the refinement term as in the original SR-STE code, checked against it).
    """
    return g + jnp.where(pruned, sr_ste_lambda * w, jnp.zeros((), w.dtype)).astype(g.dtype)


def with_lr_and_decay(direction, learning_rate, weight_decay) -> optax.GradientTransformationExtraArgs:
    """``chain(direction, add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))``.

    .. math:: u_t = -\\eta_t\\,(d_t + \\lambda_{wd}\\, w)

    The AdamW tail of every ``*_adamw`` N:M optimizer (decoupled weight decay on all leaves, as
    ``optax.adamw`` with ``mask=None``).
    """
    return optax.chain(
        direction,
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


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
            "no N:M optimizer state (step_adamw, sr_ste_adamw/ste_adamw, asp/asp_adamw) found in opt_state "
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
      opt_state: state of a transform containing exactly one of ``step_adamw``/``scale_by_step``,
        ``sr_ste_adamw``/``ste_adamw``/``scale_by_sr_ste``, ``asp``/``asp_adamw`` (possibly inside
        ``chain``/``inject_hyperparams``/``MultiSteps``).

    Returns:
      A pytree like ``params``.

    Example:
      >>> from jaxlab.transforms import sparse_forward_params, ste_adamw
      >>> params = {"kernel": jnp.array([[1.0], [-3.0], [0.5], [2.0]])}  # (d_in, d_out): groups along d_in
      >>> opt_state = ste_adamw(1e-3, n=2, m=4).init(params)
      >>> sparse_forward_params(params, opt_state)["kernel"].ravel()
      Array([ 0., -3.,  0.,  2.], dtype=float32)
      >>> loss = lambda p: jnp.sum(sparse_forward_params(p, opt_state)["kernel"] ** 2)
      >>> jax.grad(loss)(params)["kernel"].ravel()  # straight-through: reaches the pruned weights too
      Array([ 0., -6.,  0.,  4.], dtype=float32)

    Reference: STEP (Lu et al., ICML 2023; abstract and the project's reference reading) for the STE
    forward; SR-STE (Zhou et al., ICLR 2021).
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

    Example:
      >>> from jaxlab.transforms import prune, sr_ste_adamw
      >>> params = {"kernel": jnp.array([[1.0], [-3.0], [0.5], [2.0]]), "bias": jnp.ones(1)}
      >>> opt_state = sr_ste_adamw(1e-3, n=1, m=4).init(params)
      >>> jax.tree.map(jnp.ravel, prune(params, opt_state))
      {'bias': Array([1.], dtype=float32), 'kernel': Array([ 0., -3.,  0.,  0.], dtype=float32)}
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
