"""Pallas kernels for the hot ops, each beside a pure-jnp ``*_reference`` and an XLA fallback.

``nm_matmul``: compressed N:M weight matmul (deploying STEP-trained models), see
:mod:`jaxlab.kernels.nm_matmul`.
``flash_attention``: JVP-capable fused attention (MeanFlow on a DiT), see :mod:`jaxlab.kernels.attention`.
"""

from jaxlab.kernels.attention import attention_reference, flash_attention
from jaxlab.kernels.nm_matmul import (
    AUTO_MAX_BATCH,
    SUPPORTED_M,
    BlockSizes,
    index_bits,
    nm_matmul,
    nm_matmul_reference,
)

__all__: list[str] = [
    "AUTO_MAX_BATCH",
    "BlockSizes",
    "SUPPORTED_M",
    "attention_reference",
    "flash_attention",
    "index_bits",
    "nm_matmul",
    "nm_matmul_reference",
]
