"""``NMDense``: a Linen Dense layer whose kernel is stored compressed N:M, for inference."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlab.kernels.nm_matmul import BlockSizes, index_bits, nm_matmul
from jaxlab.nm.compress import compress
from jaxlab.paths import slash_path

__all__ = ["NMDense"]


def _compress(w: jax.Array, n: int, m: int):
    return compress(w, n, m, axis=0)


class NMDense(nn.Module):
    """Dense layer ``y = x W + b`` with ``W`` (``(K, features)``) held in compressed N:M form.

    .. math::

        y_{b,c} = \\sum_g \\sum_{j<N} x_{b,\\, gM + I_{gN+j,c}}\\, V_{gN+j,c} + b_c

    The ``"kernel"`` parameter is a ``jaxlab.nm.NMCompressed`` (kept values ``V``, packed
    within-group indices ``I``; groups of ``M`` along the reduction axis 0), so a model that uses
    ``NMDense`` where it used ``nn.Dense`` (same module names) takes the tree produced by
    ``jaxlab.nm.compress_params(trained_params, ...)`` directly, and computes exactly what the
    ``nn.Dense`` model computes with the pruned kernel ``w * mask``. The product goes through
    :func:`jaxlab.kernels.nm_matmul` (Pallas kernel for memory-bound shapes on GPU/TPU, XLA
    otherwise). Initialising from scratch draws a dense ``kernel_init`` weight and compresses it
    (magnitude N:M); that is for tests and shape inference -- the layer is meant for inference
    with trained weights (gradients flow through the XLA reference, see ``nm_matmul``).

    Attributes:
      features: output width ``N_out``.
      n, m: the N:M ratio (``m`` in 2, 4, 8, 16).
      use_bias: add a bias.
      dtype: computation/output dtype (``x`` is cast to it); ``None`` keeps the promoted input dtype.
        The compressed values are used in their stored dtype (compress in bf16 to stream bf16).
      param_dtype: dtype of freshly initialised values and bias.
      kernel_init, bias_init: initialisers (``kernel_init`` sees the dense ``(K, features)`` shape).
      implementation: ``None`` (auto), ``"xla"`` or ``"pallas"``, passed to ``nm_matmul``.
      block_sizes: optional static :class:`~jaxlab.kernels.BlockSizes`.

    Example:
      >>> import functools, flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxlab.nm import compress_params, decompress_params
      >>> from jaxlab.nn import NMDense
      >>> class Model(nn.Module):
      ...     dense: object = nn.Dense
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return self.dense(4, name="out")(x)
      >>> x = jax.random.normal(jax.random.PRNGKey(1), (2, 8))
      >>> dense_params = Model().init(jax.random.PRNGKey(0), x)["params"]    # ... then train
      >>> sparse = compress_params(dense_params, n=2, m=4)
      >>> y = Model(dense=functools.partial(NMDense, n=2, m=4)).apply({"params": sparse}, x)
      >>> y_pruned = Model().apply({"params": decompress_params(sparse)}, x)   # nn.Dense, kernel w * mask
      >>> print(y.shape, bool(jnp.allclose(y, y_pruned, atol=1e-5)))
      (2, 4) True

    Reference: Lu et al., "STEP" (ICML 2023, arXiv 2302.01172), deployment of N:M-sparse weights.
    """

    features: int
    n: int = 2
    m: int = 4
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    implementation: str | None = None
    block_sizes: BlockSizes | None = None

    def _where(self) -> str:
        return slash_path(self.path) or type(self).__name__

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``x`` of shape ``(..., K)``; returns ``(..., features)``."""
        k = x.shape[-1]
        where = self._where()
        index_bits(self.m)  # unsupported M -> ValueError before any parameter is created
        if not 1 <= self.n <= self.m:
            raise ValueError(f"{where}: N={self.n} must satisfy 1 <= N <= M={self.m}")
        if k % self.m:
            raise ValueError(
                f"{where}: input of shape {tuple(x.shape)} has K={k}, not a multiple of M={self.m}; "
                f"an {self.n}:{self.m} kernel needs (..., K) with K % {self.m} == 0"
            )

        def init_kernel(key):
            w = self.kernel_init(key, (k, self.features), self.param_dtype)
            return _compress(w, self.n, self.m)

        if self.has_variable("params", "kernel"):
            # Read directly: Flax's own shape check would re-run the init (a dense draw + compress)
            # under eval_shape on every apply; the check below is exact and names the layer.
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", init_kernel)
        got = (getattr(kernel, "n", None), getattr(kernel, "m", None), tuple(getattr(kernel, "shape", ())))
        if got != (self.n, self.m, (k, self.features)):
            raise ValueError(
                f"{where}/kernel: compressed weight is {got[0]}:{got[1]} with logical shape {got[2]}; "
                f"expected {self.n}:{self.m} with shape {(k, self.features)} for input {tuple(x.shape)}"
            )
        if self.dtype is not None:
            x = x.astype(self.dtype)
        y = nm_matmul(x, kernel, implementation=self.implementation, block_sizes=self.block_sizes)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(y.dtype)
        return y.astype(self.dtype) if self.dtype is not None else y
