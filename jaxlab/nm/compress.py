"""Compressed N:M format for deployment: kept values plus packed within-group indices.

For a weight ``w`` with grouping axis ``a`` of length ``K`` (groups of ``M`` consecutive entries),
:func:`compress` stores

* ``values``: ``w``'s shape with axis ``a`` of length ``E = K N / M``; group ``g``'s kept entries,
  in increasing index order, at positions ``g N .. g N + N - 1``;
* ``indices``: ``uint8``, ``w``'s shape with axis ``a`` of length ``ceil(E / q)``; each kept entry's
  within-group position ``p in [0, M)`` in ``bits`` bits, ``q = 8 // bits`` per byte, entry ``e`` in
  byte ``e // q`` at bit offset ``bits * (e % q)`` (first index in the lowest bits), zero padded.

``bits`` is the smallest power of two ``>= ceil(log2 M)``: M=2 -> 1, M=4 -> 2, M=8, 16 -> 4.
The kept entries are exactly those of :func:`~jaxlab.nm.nm_mask` (same magnitude rank, lower index
first among ties, NaN ranked as ``+inf``), and the round trip is exact:

.. math:: \\operatorname{decompress}(\\operatorname{compress}(w)) = w \\odot \\operatorname{mask}(w)

with pruned entries exactly ``0`` (also where ``w`` is ``±inf`` or NaN: ``jnp.where(mask, w, 0)``).

Reference: Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA 2:4, arXiv 2104.08378):
values + 2-bit metadata; STEP (Lu et al., ICML 2023) for the N:M ratios used.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxlab.nm.masks import check_nm, nm_leaf_axes, nm_mask
from jaxlab.paths import key_path

__all__ = [
    "SUPPORTED_M",
    "NMCompressed",
    "compress",
    "compress_params",
    "decompress",
    "decompress_params",
    "index_bits",
    "pack_indices",
    "unpack_indices",
]

_BITS = {2: 1, 4: 2, 8: 4, 16: 4}

#: Group sizes ``M`` with a packed index format (the keys of :func:`index_bits`' table). Masks work for
#: any ``M``; the N:M optimizers accept only these, so that what they train can be exported.
SUPPORTED_M: tuple[int, ...] = tuple(_BITS)


def index_bits(m: int) -> int:
    """Bits per stored index for group size ``m`` (2 -> 1, 4 -> 2, 8 -> 4, 16 -> 4).

    Raises:
      ValueError: ``m`` is not one of 2, 4, 8, 16 (other group sizes can be masked, not compressed).

    Example:
      >>> from jaxlab.nm import index_bits
      >>> [index_bits(m) for m in (2, 4, 8, 16)]
      [1, 2, 4, 4]
    """
    if m not in _BITS:
        raise ValueError(f"unsupported N:M group size M={m} for packed indices; expected one of {tuple(_BITS)}")
    return _BITS[m]


@flax.struct.dataclass
class NMCompressed:
    """A compressed N:M weight (a pytree: ``values``, ``indices`` are children; the rest is static).

    Attributes:
      values: kept values, ``shape`` with axis ``axis`` of length ``K*N/M``, dtype ``dtype``.
      indices: ``uint8`` packed within-group positions, axis ``axis`` of length ``ceil(K*N/M / q)``.
      n, m: the N:M ratio.
      axis: non-negative grouping axis of the dense weight.
      shape: the dense weight's shape.
      dtype: the dense weight's dtype.
    """

    values: jax.Array
    indices: jax.Array
    n: int = flax.struct.field(pytree_node=False)
    m: int = flax.struct.field(pytree_node=False)
    axis: int = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)
    dtype: jnp.dtype = flax.struct.field(pytree_node=False)

    @property
    def bits(self) -> int:
        """Bits per stored index."""
        return index_bits(self.m)

    @property
    def num_kept(self) -> int:
        """``K * N / M``: kept entries along the grouping axis."""
        return self.shape[self.axis] // self.m * self.n

    @property
    def nbytes(self) -> int:
        """Storage in bytes (values + packed indices)."""
        return int(self.values.size * jnp.dtype(self.values.dtype).itemsize + self.indices.size)


def pack_indices(pos: jax.Array, bits: int, axis: int = -1) -> jax.Array:
    """Pack integer positions ``< 2**bits`` along ``axis`` into ``uint8``, ``8 // bits`` per byte.

    .. math:: P_r = \\sum_{s<q} p_{rq+s} \\ll (\\text{bits}\\cdot s), \\qquad q = 8/\\text{bits}

    The axis is zero-padded to a multiple of ``q``; the result has length ``ceil(E / q)`` there.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nm import pack_indices
      >>> pack_indices(jnp.array([1, 3, 0, 2, 3]), bits=2).tolist()   # 1 + 3<<2 + 0<<4 + 2<<6, then 3
      [141, 3]
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8; got {bits}")
    pos = jnp.moveaxis(jnp.asarray(pos), axis, -1).astype(jnp.uint8)
    q = 8 // bits
    e = pos.shape[-1]
    rows = -(-e // q)
    pos = jnp.pad(pos, [(0, 0)] * (pos.ndim - 1) + [(0, rows * q - e)])
    pos = pos.reshape(*pos.shape[:-1], rows, q)
    shifts = (jnp.arange(q, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    packed = jnp.sum((pos << shifts).astype(jnp.uint32), axis=-1).astype(jnp.uint8)  # disjoint bits
    return jnp.moveaxis(packed, -1, axis)


def _unpack(packed: jax.Array, bits: int, count: int, axis: int) -> jax.Array:
    p = jnp.moveaxis(packed, axis, -1)
    q = 8 // bits
    shifts = (jnp.arange(q, dtype=jnp.uint8) * bits).astype(jnp.uint8)
    planes = (p[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    out = planes.reshape(*p.shape[:-1], p.shape[-1] * q)[..., :count].astype(jnp.int32)
    return jnp.moveaxis(out, -1, axis)


def unpack_indices(c: NMCompressed) -> jax.Array:
    """Within-group positions of ``c``'s kept values as ``int32``, same shape as ``c.values``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.nm import compress, unpack_indices
      >>> c = compress(jnp.array([[0.], [5.], [0.], [7.]]), 2, 4, axis=0)
      >>> unpack_indices(c)[:, 0].tolist()
      [1, 3]
    """
    return _unpack(c.indices, c.bits, c.num_kept, c.axis)


def compress(w: jax.Array, n: int, m: int, axis: int = 0, *, name: str | None = None) -> NMCompressed:
    """Compress ``w`` to N:M along ``axis``: magnitude mask (lower index wins ties), values + packed indices.

    .. math:: V_{gN+j} = w_{gM + p_{g,j}},\\quad p_{g,0} < \\dots < p_{g,N-1}
        = \\{p : \\operatorname{mask}(w)_{g,p}\\}

    Args:
      w: dense weight.
      n, m: the ratio (``m`` in 2, 4, 8, 16).
      axis: grouping axis (Flax Dense kernel: 0, the reduction axis).
      name: leaf path for error messages.

    Returns:
      :class:`NMCompressed` keeping exactly the entries of ``nm_mask(w, n, m, axis)``:
      ``decompress(result) == jnp.where(nm_mask(w, n, m, axis), w, 0)`` exactly (``w * mask`` where
      ``w`` is finite; a NaN or ``inf`` that the mask prunes becomes ``0``, not ``nan``).

    Raises:
      ValueError: unsupported ``m``, ``n > m`` or ``w.shape[axis] % m != 0``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nm import compress
      >>> c = compress(jax.random.normal(jax.random.PRNGKey(0), (8, 4)), 2, 4, axis=0)
      >>> print(c.values.shape, c.indices.shape, c.indices.dtype, c.bits)
      (4, 4) (1, 4) uint8 2
      >>> c.nbytes, 8 * 4 * 4   # compressed vs dense float32 bytes
      (68, 128)
    """
    w = jnp.asarray(w)
    axis = check_nm(w.shape, n, m, axis, name=name)
    bits = index_bits(m)
    mask = nm_mask(w, n, m, axis)
    wt = jnp.moveaxis(w, axis, -1)
    mt = jnp.moveaxis(mask, axis, -1)
    lead, k = wt.shape[:-1], wt.shape[-1]
    wg = wt.reshape(*lead, k // m, m)
    mg = mt.reshape(*lead, k // m, m)
    # kept positions in increasing order: stable sort puts the True (key 0) entries first, in order
    pos = jnp.argsort(jnp.logical_not(mg).astype(jnp.int8), axis=-1, stable=True)[..., :n]
    vals = jnp.take_along_axis(wg, pos, axis=-1).reshape(*lead, k // m * n)
    packed = pack_indices(pos.reshape(*lead, k // m * n), bits, axis=-1)
    return NMCompressed(
        values=jnp.moveaxis(vals, -1, axis),
        indices=jnp.moveaxis(packed, -1, axis),
        n=int(n),
        m=int(m),
        axis=int(axis),
        shape=tuple(int(s) for s in w.shape),
        dtype=jnp.dtype(w.dtype),
    )


def decompress(c: NMCompressed) -> jax.Array:
    """Dense weight from a compressed one: zeros except the kept values at their positions.

    .. math:: w_{gM+p} = \\sum_j [p_{g,j} = p]\\, V_{gN+j}

    Args:
      c: an :class:`NMCompressed`.

    Returns:
      Array of ``c.shape`` and ``c.dtype``.

    Raises:
      TypeError: ``c`` is not an :class:`NMCompressed`.
      ValueError: ``values``/``indices`` do not have the shapes the static fields imply.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nm import compress, decompress, nm_mask
      >>> w = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
      >>> bool(jnp.array_equal(decompress(compress(w, 2, 4, 0)), w * nm_mask(w, 2, 4, 0)))
      True
    """
    if not isinstance(c, NMCompressed):
        raise TypeError(f"decompress expects a jaxlab.nm.NMCompressed, got {type(c).__name__}")
    n, m, axis, shape = c.n, c.m, c.axis, tuple(c.shape)
    e = c.num_kept
    want_v = shape[:axis] + (e,) + shape[axis + 1 :]
    want_i = shape[:axis] + (-(-e // (8 // c.bits)),) + shape[axis + 1 :]
    if tuple(c.values.shape) != want_v or tuple(c.indices.shape) != want_i:
        raise ValueError(
            f"NMCompressed {n}:{m} of shape {shape} (axis {axis}) needs values {want_v} and indices "
            f"{want_i}; got values {tuple(c.values.shape)} and indices {tuple(c.indices.shape)}"
        )
    pos = jnp.moveaxis(unpack_indices(c), axis, -1)
    vals = jnp.moveaxis(c.values, axis, -1).astype(c.dtype)
    lead = vals.shape[:-1]
    g = shape[axis] // m
    pos = pos.reshape(*lead, g, n)
    vals = vals.reshape(*lead, g, n)
    slots = jnp.arange(m, dtype=jnp.int32)
    out = jnp.zeros((*lead, g, m), c.dtype)
    for j in range(n):  # positions within a group are distinct: each slot receives at most one value
        out = jnp.where(pos[..., j, None] == slots, vals[..., j, None], out)
    return jnp.moveaxis(out.reshape(*lead, g * m), -1, axis)


def compress_params(params, n: int = 2, m: int = 4, *, sparsify=None, nm_axis=None):
    """Compress every sparsifiable leaf of a parameter tree; other leaves are returned unchanged.

    Args:
      params: parameter pytree (e.g. a trained Flax ``params`` dict).
      n, m: the ratio.
      sparsify: leaf filter (``None``: floating ``kernel`` leaves whose reduction axis divides by
        ``m``; a callable ``(path, leaf) -> bool``; or a pytree of bools).
      nm_axis: grouping axis (``None``: :func:`~jaxlab.nm.reduction_axis`; int; or callable).

    Returns:
      The tree with :class:`NMCompressed` in place of each sparsified leaf (what
      :class:`jaxlab.nn.NMDense` consumes).

    Raises:
      ValueError: a selected leaf cannot be grouped by ``m`` (names the leaf path and shape).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nm import compress_params, decompress_params, nm_mask
      >>> w = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
      >>> params = {"dense": {"kernel": w, "bias": jnp.zeros(4)}}
      >>> sparse = compress_params(params, 2, 4)
      >>> type(sparse["dense"]["kernel"]).__name__, sparse["dense"]["bias"] is params["dense"]["bias"]
      ('NMCompressed', True)
      >>> dense = decompress_params(sparse)   # == params with each kernel hard-pruned
      >>> bool(jnp.array_equal(dense["dense"]["kernel"], w * nm_mask(w, 2, 4, axis=0)))
      True
    """
    index_bits(m)
    axes = nm_leaf_axes(params, m, sparsify=sparsify, nm_axis=nm_axis, n=n)
    return _map_axes(params, axes, lambda p, x, a: compress(x, n, m, a, name=key_path(p)))


def _map_axes(params, axes, fn):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    ax = treedef.flatten_up_to(axes)
    return jax.tree_util.tree_unflatten(treedef, [x if a is None else fn(p, x, a) for (p, x), a in zip(flat, ax)])


def decompress_params(tree):
    """Inverse of :func:`compress_params`: every :class:`NMCompressed` becomes its dense array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.nm import compress_params, decompress_params
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}}
      >>> dense = decompress_params(compress_params(params, 2, 4))
      >>> print(dense["dense"]["kernel"].shape, int(jnp.count_nonzero(dense["dense"]["kernel"])))  # 2 of 4 kept
      (8, 4) 16
    """
    return jax.tree.map(
        lambda x: decompress(x) if isinstance(x, NMCompressed) else x,
        tree,
        is_leaf=lambda x: isinstance(x, NMCompressed),
    )
