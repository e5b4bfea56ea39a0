"""N:M structured sparsity primitives (pure jnp): masks, tie rule, compressed format, STE helper.

Groups of ``M`` consecutive entries run along a leaf's matmul *reduction* axis (Flax ``Dense``
kernel ``(d_in, d_out)``: axis 0; conv HWIO: axis -2). Among equal magnitudes the lower index wins.
"""

from jaxlab.nm.compress import (
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
