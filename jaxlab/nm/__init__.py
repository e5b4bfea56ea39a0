"""N:M structured sparsity primitives (pure jnp): masks, tie rule, compressed format, STE helper.

Groups of ``M`` consecutive entries run along a leaf's matmul *reduction* axis (Flax ``Dense``
kernel ``(d_in, d_out)`` and ``DenseGeneral`` ``(*in_axes, *out_axes)``: axis 0; ``Conv`` HWIO: the input
channels, axis -2; see :func:`reduction_axis`). Among equal magnitudes the lower index wins; NaN ranks
as ``+inf``. Only group sizes in :data:`SUPPORTED_M` can be compressed.
"""

from jaxlab.nm.compress import (
    SUPPORTED_M,
    NMCompressed,
    compress,
    compress_params,
    decompress,
    decompress_params,
    index_bits,
    pack_indices,
    unpack_indices,
)
from jaxlab.nm.masks import (
    check_nm,
    default_sparsify,
    leaf_name,
    nm_leaf_axes,
    nm_mask,
    reduction_axis,
    straight_through,
)

__all__ = [
    "SUPPORTED_M",
    "NMCompressed",
    "check_nm",
    "compress",
    "compress_params",
    "decompress",
    "decompress_params",
    "default_sparsify",
    "index_bits",
    "leaf_name",
    "nm_leaf_axes",
    "nm_mask",
    "pack_indices",
    "reduction_axis",
    "straight_through",
    "unpack_indices",
]
