"""N:M masks along a chosen axis, the default reduction-axis rule, leaf selection and the STE helper.

An N:M mask keeps, in every group of ``M`` consecutive entries along one axis, the ``N`` entries
of largest magnitude:

.. math::

    \\operatorname{mask}(w)_{g,p} = \\mathbb 1\\big[\\operatorname{rank}_g(p) < N\\big],\\qquad
    \\operatorname{rank}_g(p) = \\#\\{q : |w_{g,q}| > |w_{g,p}|\\}
        + \\#\\{q < p : |w_{g,q}| = |w_{g,p}|\\}.

**Tie rule: among equal magnitudes the lower index wins** (the rank counts equal entries that come
*before* ``p``), so the mask is a deterministic function of ``w`` and exactly ``N`` entries per group
are kept, ties included. ``-0.0`` and ``+0.0`` tie. **NaN ranks as an infinite magnitude**
(:math:`|w| := +\\infty` for NaN, so it ties with ``±inf`` and the lower index wins): a group keeps exactly
``N`` entries whatever it holds, and NaN weights are kept first (up to ``N`` per group) rather than
hidden by the mask: they show in the forward pass instead of being silently zeroed in the deployed model.

Reference: Lu et al., "STEP: Learning N:M Structured Sparsity Masks from Scratch with
Precondition" (ICML 2023, arXiv 2302.01172; abstract); Zhou et al., "Learning N:M Fine-grained
Structured Sparse Neural Networks From Scratch" (ICLR 2021) -- the N:M pattern as both define it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.paths import key_path, leaf_name, path_keys  # noqa: F401  (path_keys, leaf_name re-exported)

__all__ = [
    "check_nm",
    "default_sparsify",
    "is_nm",
    "leaf_name",
    "nm_leaf_axes",
    "nm_mask",
    "nm_pruned_bits",
    "path_keys",
    "reduction_axis",
    "straight_through",
    "unpack_pruned",
]

LeafFn = Callable[[Any, Any], Any]


def _where(name: str | None) -> str:
    return f"{name}: " if name else ""


def check_nm(shape, n: int, m: int, axis: int, *, name: str | None = None) -> int:
    """Validate an N:M request for an array of ``shape``; return the non-negative axis.

    Args:
      shape: the array's shape.
      n, m: keep ``n`` of every ``m`` (``1 <= n <= m``).
      axis: grouping axis (negative counts from the end).
      name: leaf path used in error messages.

    Returns:
      ``axis`` normalised to ``0 <= axis < len(shape)``.

    Raises:
      TypeError: ``n`` or ``m`` is not an int.
      ValueError: ``n > m``, ``n < 1``, axis out of range, or ``shape[axis] % m != 0``.

    Example:
      >>> from jaxlab.nm import check_nm
      >>> check_nm((3, 3, 16, 8), 2, 4, axis=-2)
      2
      >>> check_nm((6, 8), 2, 4, axis=0, name="['dense']['kernel']")
      Traceback (most recent call last):
        ...
      ValueError: ['dense']['kernel']: shape (6, 8) has length 6 on axis 0, not a multiple of M=4; 2:4 sparsity needs groups of 4 along that axis
    """
    shape = tuple(shape)
    for label, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise TypeError(f"{_where(name)}N:M needs integer {label}, got {v!r} ({type(v).__name__})")
    if not 1 <= n <= m:
        raise ValueError(f"{_where(name)}N:M needs 1 <= n <= m, got n={n}, m={m}")
    nd = len(shape)
    if not -nd <= axis < nd or nd == 0:
        raise ValueError(f"{_where(name)}axis {axis} is out of range for an array of shape {shape}")
    axis = axis % nd
    if shape[axis] % m:
        raise ValueError(
            f"{_where(name)}shape {shape} has length {shape[axis]} on axis {axis}, "
            f"not a multiple of M={m}; {n}:{m} sparsity needs groups of {m} along that axis"
        )
    return axis


def nm_mask(w: jax.Array, n: int, m: int, axis: int = 0, *, name: str | None = None) -> jax.Array:
    """Boolean N:M mask of ``w``: per group of ``m`` consecutive entries along ``axis``, keep ``n``.

    .. math:: \\operatorname{mask}_{g,p} = \\mathbb 1[\\#\\{q: |w_q|>|w_p|\\} + \\#\\{q<p: |w_q|=|w_p|\\} < n]

    Magnitude decides; among equal magnitudes the lower index wins, and a NaN counts as magnitude
    ``+inf`` (tied with ``±inf``), so every group holds exactly ``n`` ones. The rank is computed by
    ``m (m - 1)`` elementwise compares (no sort, no transpose), which XLA fuses.

    Args:
      w: array (any float dtype).
      n, m: keep ``n`` of every ``m``.
      axis: the grouping axis; for a Flax ``Dense`` kernel ``(d_in, d_out)`` the hardware axis is
        the reduction axis 0 (see :func:`reduction_axis`).
      name: leaf path for error messages.

    Returns:
      Boolean array of ``w.shape``.

    Raises:
      ValueError: ``n > m`` or ``w.shape[axis]`` not a multiple of ``m``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nm import nm_mask
      >>> nm_mask(jnp.array([[1.0], [-3.0], [2.0], [0.5]]), 2, 4, axis=0)[:, 0].tolist()
      [False, True, True, False]
      >>> nm_mask(jnp.array([[2.0], [-1.0], [1.0], [1.0]]), 2, 4)[:, 0].tolist()  # tie: lower index wins
      [True, True, False, False]
      >>> nm_mask(jnp.array([[1.0], [jnp.nan], [2.0], [-jnp.inf]]), 2, 4)[:, 0].tolist()  # NaN ties with inf
      [False, True, False, True]

    Reference: STEP (Lu et al., ICML 2023); SR-STE (Zhou et al., ICLR 2021).
    """
    w = jnp.asarray(w)
    axis = check_nm(w.shape, n, m, axis, name=name)
    if n == m:
        return jnp.ones(w.shape, bool)
    shape = w.shape
    return jnp.stack(_keep_slots(w, n, m, axis), axis=axis + 1).reshape(shape)


def _keep_slots(w: jax.Array, n: int, m: int, axis: int) -> list[jax.Array]:
    """``[keep_0, ..., keep_{m-1}]``: for each slot p of the groups along ``axis`` (a non-negative, checked
    axis), whether it is kept; each of shape ``w.shape`` with ``axis`` shortened to ``K / m``.

    Groups in place -- ``(..., K, ...) -> (..., K/m, m, ...)`` -- so no transpose of the kernel is needed,
    then ranks each slot against the others with ``m (m - 1)`` compares of strided slices (one fused
    elementwise loop in XLA; no sort, no ``(m, m)``-sized intermediate).
    """
    shape = w.shape
    a = jnp.abs(w)
    if jnp.issubdtype(a.dtype, jnp.floating):  # NaN ranks as +inf: compares are then a total order
        a = jnp.where(jnp.isnan(a), jnp.asarray(jnp.inf, a.dtype), a)
    a = a.reshape(shape[:axis] + (shape[axis] // m, m) + shape[axis + 1 :])
    slots = [jax.lax.index_in_dim(a, p, axis + 1, keepdims=False) for p in range(m)]
    keep = []
    for p in range(m):
        rank = jnp.zeros(slots[p].shape, jnp.int32)
        for q in range(m):
            if q != p:  # q beats p if larger, or equal with a lower index (the tie rule)
                beats = slots[q] >= slots[p] if q < p else slots[q] > slots[p]
                rank = rank + beats.astype(jnp.int32)
        keep.append(rank < n)
    return keep


def nm_pruned_bits(w: jax.Array, n: int, m: int, axis: int = 0) -> jax.Array:
    """The complement of :func:`nm_mask`, packed: one unsigned integer per group, bit ``p`` set when slot
    ``p`` of the group is pruned. Shape ``w.shape`` with ``axis`` shortened to ``K / m``; dtype uint8
    (``m <= 8``), uint16 (``m <= 16``) or uint32 (``m <= 32``).

    A compact form for code that needs the mask only transiently (the optimizers' SR-STE term):
    ``1 / m`` of the bytes of a boolean mask. Unpack with :func:`unpack_pruned`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nm.masks import nm_mask, nm_pruned_bits, unpack_pruned
      >>> w = jnp.array([[1.0], [-3.0], [2.0], [0.5]])
      >>> bits = nm_pruned_bits(w, 2, 4, axis=0)   # slots 0 and 3 pruned: 0b1001
      >>> print(bits.shape, bits.dtype, int(bits[0, 0]))
      (1, 1) uint8 9
      >>> bool(jnp.array_equal(unpack_pruned(bits, 4, 0, w.shape), ~nm_mask(w, 2, 4, axis=0)))
      True
    """
    w = jnp.asarray(w)
    axis = check_nm(w.shape, n, m, axis)
    dt = _bits_dtype(m)
    bits = jnp.zeros(w.shape[:axis] + (w.shape[axis] // m,) + w.shape[axis + 1 :], dt)
    if n == m:
        return bits
    for p, k in enumerate(_keep_slots(w, n, m, axis)):
        bits = bits | jnp.where(k, dt(0), dt(1 << p))
    return bits


def unpack_pruned(bits: jax.Array, m: int, axis: int, shape) -> jax.Array:
    """Boolean "pruned" array of ``shape`` from :func:`nm_pruned_bits` (``axis`` non-negative)."""
    slot = jnp.arange(m, dtype=bits.dtype).reshape((m,) + (1,) * (len(shape) - axis - 1))
    pruned = (jnp.expand_dims(bits, axis + 1) >> slot) & 1
    return pruned.astype(bool).reshape(shape)


def _bits_dtype(m: int):
    for dt, width in ((jnp.uint8, 8), (jnp.uint16, 16), (jnp.uint32, 32)):
        if m <= width:
            return dt
    raise ValueError(f"packed N:M bits support m <= 32, got m={m}")


def reduction_axis(path, leaf) -> int:
    """Default N:M grouping axis of a parameter: a contracted (input) axis of the layer's matmul.

    N:M groups must run along an axis that the layer sums over, never along an output axis. Flax's
    kernel layouts are

    * ``Dense`` ``(d_in, d_out)``: contracted axis 0;
    * ``DenseGeneral`` ``(*in_axes, *out_axes)`` -- e.g. the ``(d_in, heads, head_dim)`` q/k/v kernels of
      ``DenseGeneral(features=(heads, head_dim))`` and ``MultiHeadDotProductAttention``: the *leading*
      axes are contracted, so axis 0;
    * ``Conv`` ``(*kernel_size, in, out)`` (HWIO, also ``ConvTranspose``/``ConvLocal``): ``kernel_size``
      and ``in`` are contracted; by convention the groups run along the input channels, axis ``ndim - 2``.

    Shape alone cannot tell a ``DenseGeneral`` ``(d_in, heads, head_dim)`` from a 1-D conv
    ``(k, in, out)``, so for ``ndim >= 3`` the rule reads the name of the module that owns the leaf
    (the path key before ``kernel``; Flax names unnamed modules ``Conv_0``, ``DenseGeneral_0``, ...):

    .. math::

        \\operatorname{axis} = \\begin{cases}
          0 & \\text{ndim} = 2\\\\
          \\text{ndim} - 2 & \\text{ndim} \\ge 3,\\ \\text{module name contains ``conv''}\\\\
          0 & \\text{ndim} = 3,\\ \\text{or module name contains ``dense''}\\\\
          \\text{ndim} - 2 & \\text{otherwise (ndim} \\ge 4\\text{, neither name: taken as a 2-D/3-D conv)}
        \\end{cases}

    (the first case that matches; names compared case-insensitively). Axis 0 is contracted in every
    Flax layout, so the fallback for a 3-D kernel is never an output axis. A path key named ``layers``
    (the ``nn.scan`` stack of :class:`jaxlab.nn.Decoder`, also MaxText's name) marks a leading layer
    axis: the rule is applied to the per-layer kernel and shifted by one. Cases the rule cannot see need
    an explicit ``nm_axis`` (an int, or ``(path, leaf) -> int``; it always wins over this rule): a 1-D
    conv whose module name lacks ``conv`` (axis 0 is then its kernel width: contracted, but not the
    input channels), kernels stacked by ``nn.scan``/``nn.vmap`` under another name, or a multi-input
    ``DenseGeneral`` such as attention's ``out`` ``(heads, head_dim, d)`` when the groups should run
    along ``head_dim`` (axis 1) rather than ``heads``.

    Args:
      path: the leaf's pytree path (``tree_flatten_with_path`` keys or a tuple of names; may be ``()``).
      leaf: the parameter.

    Returns:
      The non-negative grouping axis.

    Raises:
      ValueError: the leaf has fewer than 2 dimensions (no reduction axis).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nm import reduction_axis
      >>> reduction_axis(("dense", "kernel"), jnp.zeros((64, 32)))
      0
      >>> reduction_axis(("Conv_0", "kernel"), jnp.zeros((3, 3, 16, 8)))   # HWIO: input channels
      2
      >>> reduction_axis(("attn", "query", "kernel"), jnp.zeros((64, 4, 16)))   # (d_in, heads, head_dim)
      0
      >>> reduction_axis(("Conv_1", "kernel"), jnp.zeros((5, 16, 8)))   # 1-D conv (k, in, out)
      1
      >>> reduction_axis(("layers", "layer", "mlp", "up", "kernel"), jnp.zeros((4, 64, 32)))  # scanned
      1
    """
    shape = tuple(np.shape(leaf))
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{key_path(path)}: shape {shape} has no reduction axis "
            "(N:M needs a matrix or conv kernel with ndim >= 2)"
        )
    keys = path_keys(path)
    if ndim >= 3 and "layers" in keys[:-1]:  # a scanned stack (jaxlab.nn.Decoder): leading layer axis
        inner = tuple(k for k in keys if k != "layers")
        return 1 + reduction_axis(inner, jax.ShapeDtypeStruct(shape[1:], jnp.float32))
    if ndim == 2:
        return 0
    module = keys[-2].lower() if len(keys) >= 2 else ""
    if "conv" in module:
        return ndim - 2
    if ndim == 3 or "dense" in module:
        return 0
    return ndim - 2


def is_nm(leaf) -> bool:
    """True for a floating array leaf (the only kind N:M can apply to)."""
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def default_sparsify(path, leaf, m: int, axis_fn: LeafFn = reduction_axis) -> bool:
    """Default leaf filter: a floating Flax ``kernel`` (ndim >= 2) whose grouping axis divides by ``m``.

    Biases, norm scales and embeddings (``embedding``) stay dense; so do kernels whose reduction axis
    is not a multiple of ``m`` (e.g. a first layer with 3 input channels).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.tree_util import DictKey
      >>> from jaxlab.nm import default_sparsify
      >>> path = (DictKey("dense"), DictKey("kernel"))
      >>> default_sparsify(path, jnp.zeros((8, 2)), 4), default_sparsify(path, jnp.zeros((3, 2)), 4)
      (True, False)
      >>> default_sparsify((DictKey("dense"), DictKey("bias")), jnp.zeros((8, 2)), 4)
      False
    """
    if leaf_name(path) != "kernel" or not is_nm(leaf) or np.ndim(leaf) < 2:
        return False
    ax = axis_fn(path, leaf) % np.ndim(leaf)
    return np.shape(leaf)[ax] % m == 0


def nm_leaf_axes(params, m: int, *, sparsify=None, nm_axis=None, n: int | None = None):
    """Resolve which leaves are N:M and along which axis: a pytree of ``int`` axis or ``None`` (dense).

    Args:
      params: the parameter pytree.
      m: group size (used by the default filter and for validation).
      sparsify: ``None`` (:func:`default_sparsify`), a callable ``(path, leaf) -> bool``, or a pytree
        of bools with the structure of ``params``.
      nm_axis: ``None`` (:func:`reduction_axis`), an int for all leaves, or ``(path, leaf) -> int``.
      n: if given, also validate ``1 <= n <= m``.

    Returns:
      A pytree (structure of ``params``) whose leaves are the non-negative grouping axis of each
      sparsified leaf and ``None`` for dense leaves (``None`` leaves are static in JAX).

    Raises:
      ValueError: a selected leaf is not floating / has ndim < 1 / its axis is not a multiple of
        ``m`` -- the message names the leaf path and its shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nm import nm_leaf_axes
      >>> params = {"conv": {"kernel": jnp.zeros((3, 3, 16, 8))}, "stem": {"kernel": jnp.zeros((3, 8))},
      ...           "dense": {"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros(2)}}
      >>> nm_leaf_axes(params, 4, n=2)   # the 3-input stem and the bias stay dense (None)
      {'conv': {'kernel': 2}, 'dense': {'bias': None, 'kernel': 0}, 'stem': {'kernel': None}}
    """
    if n is not None:
        check_nm((m,), n, m, 0)
    if nm_axis is None:
        axis_fn = reduction_axis
    elif callable(nm_axis):
        axis_fn = nm_axis
    elif isinstance(nm_axis, int | np.integer) and not isinstance(nm_axis, bool):
        axis_fn = lambda path, leaf: int(nm_axis)
    else:
        raise TypeError(f"nm_axis must be None, an int or a callable (path, leaf) -> int; got {nm_axis!r}")

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if sparsify is None:
        chosen = [default_sparsify(p, x, m, axis_fn) for p, x in flat]
    elif callable(sparsify):
        chosen = [bool(sparsify(p, x)) for p, x in flat]
    else:
        try:
            chosen = treedef.flatten_up_to(sparsify)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"sparsify pytree does not match the params structure ({treedef}): {e}"
            ) from e
        chosen = [bool(c) for c in chosen]

    axes = []
    for (p, x), c in zip(flat, chosen):
        if not c:
            axes.append(None)
            continue
        name = key_path(p)
        if not is_nm(x):
            raise ValueError(
                f"{name}: N:M was requested for a leaf of dtype {getattr(x, 'dtype', type(x).__name__)} "
                f"and shape {tuple(np.shape(x))}; expected a floating array"
            )
        ax = axis_fn(p, x)
        axes.append(check_nm(np.shape(x), n if n is not None else 1, m, int(ax), name=name))
    return jax.tree_util.tree_unflatten(treedef, axes)


def straight_through(w: jax.Array, mask: jax.Array) -> jax.Array:
    """Straight-through masked weight: forward ``w * mask``, gradient passed unchanged to ``w``.

    .. math:: \\tilde w = w + \\operatorname{sg}(w \\odot \\operatorname{mask} - w),\\qquad
        \\partial L/\\partial w = \\partial L/\\partial \\tilde w

    Args:
      w: dense weight.
      mask: boolean or 0/1 mask of the same shape (treated as a constant).

    Returns:
      An array equal to ``w * mask`` whose VJP/JVP w.r.t. ``w`` is the identity.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nm import nm_mask, straight_through
      >>> w = jnp.array([[1.0], [-3.0], [2.0], [0.5]])
      >>> straight_through(w, nm_mask(w, 2, 4))[:, 0].tolist()
      [0.0, -3.0, 2.0, 0.0]
      >>> jax.grad(lambda w: straight_through(w, nm_mask(w, 2, 4)).sum())(w)[:, 0].tolist()
      [1.0, 1.0, 1.0, 1.0]

    Reference: Bengio et al. 2013 (STE); STEP (Lu et al., ICML 2023).
    """
    masked = jnp.where(mask, w, jnp.zeros((), w.dtype))
    return w + jax.lax.stop_gradient(masked - w)
