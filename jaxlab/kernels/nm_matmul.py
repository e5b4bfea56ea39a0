"""Compressed N:M weight matmul: Pallas kernels, a pure-jnp reference and an XLA fallback.

A weight ``W`` of logical shape ``(K, N_out)`` pruned to N:M along its reduction axis 0 is stored in
the :mod:`jaxlab.nm` compressed format (``NMCompressed``): the kept values ``V`` of shape
``(K*N/M, N_out)`` (group ``g`` of ``M`` consecutive rows contributes its ``N`` kept rows in
increasing index order, entry ``e = g*N + j``) and the within-group positions ``I_e`` of every kept
entry, packed ``q = 8 // bits`` per ``uint8`` along axis 0 (entry ``e`` sits in byte ``e // q`` at
bit offset ``bits * (e % q)``, ``bits = 1, 2, 4`` for ``M = 2, 4, 8|16``). The product is

.. math::

    y_{b,c} = \\sum_k x_{b,k} W_{k,c} = \\sum_{e} x_{b,\\, g(e) M + I_{e,c}}\\; V_{e,c},
    \\qquad g(e) = \\lfloor e / N \\rfloor .

**How the kernel decompresses on chip.** A ``(block_k, block_n)`` weight tile holds
``E_t = block_k*N/M`` entries, i.e. ``R = E_t / q`` packed index rows. For every bit plane
``s < q`` the kernel takes the strided value rows ``V_s[r] = V[r*q + s]`` (entry ``e = r*q + s``) and
the plane ``I_s = (P >> bits*s) & (2^bits - 1)``; for every position ``p < M`` it forms
``D_{s,p} = where(I_s == p, V_s, 0)`` -- only compares and selects, no gathers or scatters -- and
accumulates ``X_{s,p} @ D_{s,p}`` with

.. math::

    X_{s,p}[b, r] = x_{b,\\, g(r q + s) M + p},
    \\qquad y = \\sum_{s<q}\\sum_{p<M} X_{s,p} D_{s,p} .

The column-expanded activation ``X`` (``N*K`` columns) is built once per call by an XLA gather with a
static index table; for the memory-bound shapes this kernel is for (batch <= 16) it is small next to
the weight. HBM traffic per tile is the compressed weight (``bk*bn*N/M`` values plus ``bits`` per
value of indices) instead of the dense ``bk*bn`` values, which is where the speedup comes from:
no Pallas backend reaches sparse tensor cores, so the gain is bandwidth only.

Paths:

* ``"pallas"`` -- a ``pl.pallas_call`` with an explicit grid and ``BlockSpec`` s.
  On TPU (and in interpret mode for ``backend="tpu"/"cpu"``) one generic kernel compiled by Mosaic
  (MXU ``dot`` per ``(s, p)`` block), with a tiled GEMM grid ``(batch, n, k)`` or a GEMV grid
  ``(n, k)`` holding the whole (<= 16 row) batch in one block.
  On GPU a separate Mosaic GPU kernel (:mod:`jaxlab.kernels._nm_matmul_gpu`, ``plgpu.CompilerParams``;
  no Triton): grid ``(batch tiles of <= 16 rows, n, k)`` with the K axis run as the TMA pipeline, 3-D
  blocks so every TMA box is <= 256 per dimension (the weight is zero-padded to whole K tiles
  instead of masked), and a GEMV body of FMAs -- per packed row, ``WG_STRIDED`` 1-D register rows of
  values and indices (one vector width for all dtypes), ``where(I_s == p, V_s, 0)`` times an SMEM
  scalar of ``X_{s,p}`` -- accumulated in registers within a K tile and in SMEM across K tiles.
  ``use_dot`` is ignored there (Mosaic GPU lowers no ``dot_general`` outside ``wgmma``). Default GPU
  tiles ``(16, 256, 128)``; ``block_k`` is halved until the tiles fit 200 KiB of SMEM.
* ``"xla"`` -- decompress with compares/selects in XLA and call ``jnp.dot``; what auto picks on CPU
  and for compute-bound shapes (large batch), where dense tensor-core matmul wins.
* :func:`nm_matmul_reference` -- an independent, readable pure-jnp definition used by the tests.

**What is verified.** Numerics: both kernels (TPU body and GPU body) equal the reference and the
exact pruned product in interpret mode on CPU (``tests/test_kernels_nm_matmul.py``: 2:4, 1:4, 1:8,
2:8, 4:16; f32 and bf16; ragged K, N_out and batch tiles). Lowering, from CPU with
``jax.export(jax.jit(f), platforms=[...])``: Mosaic TPU (``tpu_custom_call``) for 2:4, and Mosaic GPU
for CUDA (the whole kernel lowered by Pallas' Mosaic GPU backend -- layouts, TMA pipeline, SMEM --
into a ``mosaic_gpu_v2`` custom call) for 2:4, 1:4, 1:8, 2:8, 4:16 at batch 1 and 40 in bf16 and
3:4 at batch 16 in f32. **Not verified:** PTX generation/``ptxas`` (needs the CUDA plugin), any run
on a GPU or TPU, and any timing -- so ``implementation=None`` still uses XLA on GPU; the on-device
tests (``-m gpu`` / ``-m tpu``) and ``benchmarks/nm_matmul.py`` are the next check on hardware.
Note: JAX 0.10 warns that ``pl.pallas_call`` for Mosaic GPU is deprecated in favour of
``plgpu.kernel``; the kernel still uses ``pallas_call`` (BlockSpec pipeline, shared interpret path).

**AD.** The kernel is for inference. ``jax.jvp``/``jax.grad`` through the ``"pallas"`` path fall back
to the reference: a ``custom_jvp`` computes the primal with the kernel and the (bilinear) tangent
``nm_matmul_reference(dx, c) + nm_matmul_reference(x, dc)`` in XLA, which JAX can also transpose for
reverse mode. The integer indices get no tangent.

Reference: Lu et al., "STEP: Learning N:M Structured Sparsity Masks from Scratch with
Precondition", ICML 2023 (arXiv 2302.01172; the N:M format); Mishra et al., "Accelerating Sparse
Deep Neural Networks", arXiv 2104.08378 (compressed N:M storage: values + 2-bit indices).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxlab.kernels import _nm_matmul_gpu as _gpu
from jaxlab.nm.compress import index_bits

__all__ = [
    "AUTO_MAX_BATCH",
    "BlockSizes",
    "SUPPORTED_M",
    "index_bits",
    "nm_matmul",
    "nm_matmul_reference",
]

#: Group sizes with a defined index packing (bits per index from :func:`jaxlab.nm.index_bits`, the one
#: table: 2 -> 1, 4 -> 2, 8 -> 4, 16 -> 4).
SUPPORTED_M: tuple[int, ...] = (2, 4, 8, 16)  # the keys of that table

#: Largest flattened batch for which ``implementation=None`` picks the kernel on GPU/TPU. Above it
#: the matmul stops being bound by weight bandwidth and XLA's dense matmul is used. Calibrate with
#: ``benchmarks/nm_matmul.py`` on the target device.
AUTO_MAX_BATCH: int = 16
#: Minimum ``K * N_out`` for auto to pick the kernel (small weights are launch-bound; XLA fuses them).
_AUTO_MIN_WEIGHT = 1 << 20
_GEMV_MAX_BATCH = 16
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# --------------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the compressed N:M matmul kernel (static; hashable so they can key a jit cache).

    The kernel's grid is ``(cdiv(B, block_b), cdiv(N_out, block_n), cdiv(K, block_k))`` (GEMM) or
    ``(cdiv(N_out, block_n), cdiv(K, block_k))`` (GEMV, batch <= 16 in one block). A K tile holds
    ``block_k / M`` whole groups; ``block_k`` must be a multiple of ``M * 8 // bits`` so that every
    tile starts on a whole byte of packed indices. Sizes larger than the problem are clipped.

    Attributes:
      block_b: activation rows per tile (GEMM grid only).
      block_k: reduction length per tile, in dense (uncompressed) elements.
      block_n: output columns per tile.

    Example:
      >>> from jaxlab.kernels import BlockSizes
      >>> BlockSizes.get_default("tpu", batch=1)     # GEMV: long K tiles, wide N tiles
      BlockSizes(block_b=16, block_k=2048, block_n=512)
      >>> BlockSizes.get_default("cpu", batch=64)    # GEMM, small tiles for interpret-mode tests
      BlockSizes(block_b=32, block_k=128, block_n=128)
    """

    block_b: int = 128
    block_k: int = 512
    block_n: int = 256

    def __post_init__(self):
        for name in ("block_b", "block_k", "block_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {v!r}")

    @classmethod
    def get_default(cls, backend: str | None = None, *, batch: int = 1) -> BlockSizes:
        """Per-backend defaults for a flattened batch size.

        Args:
          backend: ``"tpu"``, ``"gpu"`` (or ``"cuda"``/``"rocm"``) or ``"cpu"``; ``None`` uses
            ``jax.default_backend()``.
          batch: flattened number of activation rows.

        Returns:
          A :class:`BlockSizes`. GEMV shapes (batch <= 16) use long K tiles and wide N tiles to
          stream the weight in large contiguous DMAs; GEMM shapes use MXU/tensor-core sized tiles.
          CPU (interpret mode) uses small tiles so tests exercise multi-tile grids quickly.
        """
        backend = _canonical_backend(backend)
        gemv = batch <= _GEMV_MAX_BATCH
        if backend == "tpu":
            return cls(16, 2048, 512) if gemv else cls(256, 2048, 512)
        if backend == "gpu":  # the Mosaic GPU FMA kernel takes batch tiles of <= 16 rows
            return cls(16, 256, 128)
        return cls(8, 128, 128) if gemv else cls(32, 128, 128)


def _canonical_backend(backend: str | None) -> str:
    backend = jax.default_backend() if backend is None else backend
    backend = backend.lower()
    if backend in ("cuda", "rocm", "gpu"):
        return "gpu"
    return backend


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_compressed(c: Any, name: str = "c") -> tuple[int, int, int, int]:
    """Validate an ``NMCompressed`` Dense weight; return ``(n, m, K, N_out)``."""
    for attr in ("values", "indices", "n", "m", "axis", "shape"):
        if not hasattr(c, attr):
            raise TypeError(
                f"{name} must be a jaxlab.nm.NMCompressed (from jaxlab.nm.compress), got "
                f"{type(c).__name__} without attribute {attr!r}"
            )
    n, m, shape = int(c.n), int(c.m), tuple(c.shape)
    if m not in SUPPORTED_M:
        raise ValueError(f"{name}: unsupported N:M group size M={m} (n={n}); expected M in {SUPPORTED_M}")
    if not 1 <= n <= m:
        raise ValueError(f"{name}: N={n} must satisfy 1 <= N <= M={m}")
    if len(shape) != 2:
        raise ValueError(
            f"{name}: nm_matmul needs a 2-D (K, N_out) Dense weight, got logical shape {shape}"
        )
    axis = int(c.axis) % 2
    if axis != 0:
        raise ValueError(
            f"{name}: the N:M groups must run along the reduction axis 0 of the (K, N_out) weight, "
            f"got axis={c.axis} for shape {shape}"
        )
    k, n_out = shape
    if k % m:
        raise ValueError(f"{name}: K={k} of shape {shape} is not a multiple of M={m}")
    n_entries = k // m * n
    vshape = tuple(c.values.shape)
    if vshape != (n_entries, n_out):
        raise ValueError(
            f"{name}.values has shape {vshape}; expected (K*N/M, N_out) = ({n_entries}, {n_out}) "
            f"for {n}:{m} and logical shape {shape}"
        )
    q = 8 // index_bits(m)
    ishape = tuple(c.indices.shape)
    if ishape != (-(-n_entries // q), n_out):
        raise ValueError(
            f"{name}.indices has shape {ishape}; expected (ceil(K*N/M / {q}), N_out) = "
            f"({-(-n_entries // q)}, {n_out}) for {index_bits(m)}-bit indices"
        )
    if jnp.dtype(c.indices.dtype) != jnp.uint8:
        raise TypeError(f"{name}.indices must be uint8 (packed), got {c.indices.dtype}")
    if jnp.dtype(c.values.dtype) not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}.values must be float32 or bfloat16, got {c.values.dtype}")
    return n, m, k, n_out


def _check_x(x: Any, k: int, c_shape: tuple[int, ...]) -> None:
    if not hasattr(x, "shape") or x.ndim < 1:
        raise ValueError(f"x must be an array of shape (..., K={k}), got {getattr(x, 'shape', x)!r}")
    if x.shape[-1] != k:
        raise ValueError(
            f"x has shape {tuple(x.shape)} with last dim {x.shape[-1]}; expected (..., K={k}) to "
            f"match the compressed weight of logical shape {c_shape}"
        )
    if jnp.dtype(x.dtype) not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32 or bfloat16, got {x.dtype}")


# --------------------------------------------------------------------------------------------------
# Reference and XLA paths
# --------------------------------------------------------------------------------------------------


def _unpack_entries(indices: jax.Array, m: int, n_entries: int) -> jax.Array:
    """Packed uint8 ``(ceil(E/q), C)`` -> int32 within-group positions ``(E, C)`` in entry order."""
    bits = index_bits(m)
    q = 8 // bits
    shifts = (jnp.arange(q, dtype=jnp.uint8) * bits)[None, :, None]
    planes = (indices[:, None, :] >> shifts) & jnp.uint8((1 << bits) - 1)  # (rows, q, C)
    return planes.reshape(-1, indices.shape[-1])[:n_entries].astype(jnp.int32)


def _decompress_dense(values: jax.Array, indices: jax.Array, n: int, m: int, k: int) -> jax.Array:
    """Dense ``(K, N_out)`` weight from compressed values/indices (one-hot scatter, pure jnp)."""
    n_out = values.shape[-1]
    groups = k // m
    pos = _unpack_entries(indices, m, groups * n).reshape(groups, n, n_out)
    vals = values.reshape(groups, n, n_out)
    onehot = pos[:, :, None, :] == jnp.arange(m, dtype=jnp.int32)[None, None, :, None]  # (G,N,M,C)
    dense = jnp.sum(jnp.where(onehot, vals[:, :, None, :], jnp.zeros((), values.dtype)), axis=1)
    return dense.reshape(k, n_out)


def nm_matmul_reference(x: jax.Array, c: Any) -> jax.Array:
    """Pure-jnp reference ``x @ decompress(c)`` for a compressed N:M Dense weight.

    .. math::

        W_{gM + p,\\,col} = \\sum_{j<N} V_{gN+j,\\,col}\\,[I_{gN+j,\\,col} = p],
        \\qquad y = x W ,

    accumulated in float32 at ``Precision.HIGHEST`` and cast to ``result_type(x, c.values)``.

    Args:
      x: activations ``(..., K)``, float32 or bfloat16.
      c: ``jaxlab.nm.NMCompressed`` with logical shape ``(K, N_out)``, groups along axis 0.

    Returns:
      ``(..., N_out)`` array of dtype ``result_type(x.dtype, c.values.dtype)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.kernels import nm_matmul_reference
      >>> from jaxlab.nm import compress, nm_mask
      >>> w = jnp.arange(64.0).reshape(16, 4) % 7 - 3   # (K, N_out); small integers: exact products
      >>> x = jnp.arange(32.0).reshape(2, 16) % 5 - 2   # (B, K)
      >>> c = compress(w, 2, 4, axis=0)
      >>> y = nm_matmul_reference(x, c)
      >>> print(y.shape, bool(jnp.array_equal(y, x @ (w * nm_mask(w, 2, 4, axis=0)))))
      (2, 4) True

    Reference: Lu et al., STEP (ICML 2023): N:M sparsity along the reduction axis.
    """
    n, m, k, _ = _check_compressed(c)
    _check_x(x, k, tuple(c.shape))
    out_dtype = jnp.result_type(x.dtype, c.values.dtype)
    w = _decompress_dense(c.values, c.indices, n, m, k)
    y = jnp.matmul(
        x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST
    )
    return y.astype(out_dtype)


def _xla_nm_matmul(x2: jax.Array, values, indices, *, n: int, m: int, k: int) -> jax.Array:
    """XLA path: decompress with compares/selects (fused by XLA) and one dense dot."""
    out_dtype = jnp.result_type(x2.dtype, values.dtype)
    w = _decompress_dense(values, indices, n, m, k).astype(out_dtype)
    return jnp.dot(x2.astype(out_dtype), w, preferred_element_type=jnp.float32).astype(out_dtype)


# --------------------------------------------------------------------------------------------------
# Pallas kernel
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static tiling of one call (all Python ints)."""

    n: int
    m: int
    bits: int
    q: int  # indices per byte
    k: int
    n_out: int
    n_entries: int  # E = K*N/M
    bb: int
    bk: int
    bn: int
    rows: int  # R: packed index rows per K tile
    k_tiles: int
    b_pad: int
    gemv: bool
    layout3d: bool  # GPU: x as (B, T*q*M, R), values as (E/q, q, N_out) -- TMA boxes <= 256 per dim
    # (the GPU kernel is in _nm_matmul_gpu; the kernel below is the TPU/generic one)
    ragged: bool  # K % block_k != 0: the last K tile reads past the arrays and is masked


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _make_plan(
    batch: int, n: int, m: int, k: int, n_out: int, bs: BlockSizes, gemv: bool, layout3d: bool = False
) -> _Plan:
    bits = index_bits(m)
    q = 8 // bits
    unit = m * q  # smallest K tile that starts every tile on a whole byte of packed indices
    if bs.block_k % unit:
        raise ValueError(
            f"BlockSizes.block_k={bs.block_k} must be a multiple of M * (8 // bits) = {unit} for "
            f"{n}:{m} ({bits}-bit indices)"
        )
    bk = min(bs.block_k, _round_up(k, unit))
    if k % bk:  # prefer a tile that divides K (no ragged tile, no masking) if one is at least half as long
        divisors = [d for d in range(bk - unit, bk // 2 - 1, -unit) if d > 0 and k % d == 0]
        bk = divisors[0] if divisors else bk
    bn = min(bs.block_n, _round_up(n_out, 128))
    if gemv:
        bb = _round_up(batch, 8)
    else:
        bb = min(bs.block_b, _round_up(batch, 8))
    rows = bk // m * n // q
    return _Plan(
        n=n, m=m, bits=bits, q=q, k=k, n_out=n_out, n_entries=k // m * n, bb=bb, bk=bk, bn=bn,
        rows=rows, k_tiles=-(-k // bk), b_pad=_round_up(batch, bb), gemv=gemv, layout3d=layout3d,
        ragged=bool(k % bk) and not layout3d,  # layout3d pads the weight to whole tiles instead
    )


@functools.lru_cache(maxsize=256)
def _expand_columns(plan: _Plan) -> np.ndarray:
    """Static gather table for the column-expanded activation ``X`` (length ``k_tiles*N*bk``).

    Column ``((t*q + s)*M + p)*R + r`` of ``X`` is ``x[:, g*M + p]`` for the entry
    ``e = t*E_t + r*q + s`` of group ``g = e // N``; entries past ``E`` point at column ``K``
    (an appended zero column).
    """
    t, s, p, r = np.meshgrid(
        np.arange(plan.k_tiles), np.arange(plan.q), np.arange(plan.m), np.arange(plan.rows),
        indexing="ij",
    )
    e = t * (plan.rows * plan.q) + r * plan.q + s
    col = (e // plan.n) * plan.m + p
    col = np.where(e < plan.n_entries, col, plan.k)
    return col.reshape(-1).astype(np.int32)


def _nm_kernel(x_ref, v_ref, p_ref, o_ref, *, plan: _Plan, use_dot: bool, compute_dtype):
    """One (batch, n, k) grid step (TPU / generic): decompress a value/index tile on chip and
    accumulate ``X D`` in the output block."""
    kt = pl.program_id(1 if plan.gemv else 2)  # the K (reduction) grid axis is last

    @pl.when(kt == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    rows, q, m, bits = plan.rows, plan.q, plan.m, plan.bits
    bn = v_ref.shape[-1]
    packed = p_ref[...].astype(jnp.int32)  # (R, bn)
    if plan.ragged:
        row = lax.broadcasted_iota(jnp.int32, (rows, bn), 0)
        first_entry = kt * (rows * q)
    acc = o_ref[...]
    zero = jnp.zeros((), compute_dtype)
    for s in range(q):
        # Entry e = r*q + s of this tile: its value row (strided load) and its index bit plane.
        v_s = v_ref[pl.ds(s, rows, stride=q), :]
        v_s = v_s.astype(compute_dtype)
        i_s = (packed >> (bits * s)) & ((1 << bits) - 1)
        if plan.ragged:  # entries past E (ragged last K tile) read out-of-bounds memory: zero them
            v_s = jnp.where(first_entry + row * q + s < plan.n_entries, v_s, zero)
        for p in range(m):
            d = jnp.where(i_s == p, v_s, zero)  # dense rows {g(e)*M + p} of this tile, (R, bn)
            xs = x_ref[:, pl.ds((s * m + p) * rows, rows)]  # (bb, R)
            if use_dot:
                acc += jnp.dot(xs, d, preferred_element_type=jnp.float32)
            else:  # GEMV body: FMAs + a column reduction (no tensor-core tile shape needed).
                acc += jnp.sum(
                    xs.astype(jnp.float32)[:, :, None] * d.astype(jnp.float32)[None, :, :], axis=1
                )
    o_ref[...] = acc


def _compiler_params(backend: str, gemv: bool):
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        sem = ("parallel", "arbitrary") if gemv else ("parallel", "parallel", "arbitrary")
        return pltpu.CompilerParams(dimension_semantics=sem)
    if backend == "gpu":
        from jax.experimental.pallas import mosaic_gpu as plgpu

        sem = ("parallel", "sequential") if gemv else ("parallel", "parallel", "sequential")
        return plgpu.CompilerParams(dimension_semantics=sem, max_concurrent_steps=2)
    return None


def _pallas_nm_matmul(
    x2: jax.Array, values, indices, *, n: int, m: int, k: int, block_sizes: BlockSizes | None,
    interpret: bool, backend: str, use_dot: bool | None,
) -> jax.Array:
    batch, n_out = x2.shape[0], values.shape[-1]
    gemv = batch <= _GEMV_MAX_BATCH
    bs = block_sizes if block_sizes is not None else BlockSizes.get_default(backend, batch=batch)
    out_dtype = jnp.result_type(x2.dtype, values.dtype)
    if backend == "gpu":  # one FMA kernel, 3-D grid, batch tiles of <= 16 rows (see _nm_matmul_gpu)
        plan = _gpu.make_gpu_plan(
            batch, n, m, k, n_out, bs, jnp.dtype(out_dtype).itemsize,
            shrink=block_sizes is None, make_plan=_make_plan,
        )
        gemv = False
    else:
        plan = _make_plan(batch, n, m, k, n_out, bs, gemv)
    if use_dot is None:
        use_dot = True

    # Column-expanded activations (XLA gather with a static table), padded to whole batch tiles.
    cols = jnp.asarray(_expand_columns(plan))
    x_ext = jnp.concatenate([x2.astype(out_dtype), jnp.zeros((batch, 1), out_dtype)], axis=1)
    x_exp = jnp.take(x_ext, cols, axis=1)
    if plan.b_pad != batch:
        x_exp = jnp.pad(x_exp, ((0, plan.b_pad - batch), (0, 0)))

    n_tiles = -(-n_out // plan.bn)
    qm = plan.q * plan.m
    if plan.layout3d:
        # Whole tiles (zero-padded weight if K is ragged), then free reshapes into the 3-D views.
        e_pad, r_pad = plan.k_tiles * plan.rows * plan.q, plan.k_tiles * plan.rows
        if values.shape[0] != e_pad:
            values = jnp.pad(values, ((0, e_pad - values.shape[0]), (0, 0)))
        if indices.shape[0] != r_pad:
            indices = jnp.pad(indices, ((0, r_pad - indices.shape[0]), (0, 0)))
        x_exp = x_exp.reshape(plan.b_pad, plan.k_tiles * qm, plan.rows)
        values = values.reshape(r_pad, plan.q, n_out)
        y = _gpu.gpu_nm_matmul(x_exp, values, indices, plan=plan, interpret=interpret,
                               name=f"nm_matmul_{n}_{m}")
        return y[:batch].astype(out_dtype)
    x_block, v_block = (plan.bb, plan.n * plan.bk), (plan.rows * plan.q, plan.bn)
    x_map = lambda i, t: (i, t)
    v_map = lambda t, j: (t, j)
    if gemv:
        grid = (n_tiles, plan.k_tiles)
        in_specs = [
            pl.BlockSpec(x_block, lambda j, t: x_map(0, t)),
            pl.BlockSpec(v_block, lambda j, t: v_map(t, j)),
            pl.BlockSpec((plan.rows, plan.bn), lambda j, t: (t, j)),
        ]
        out_spec = pl.BlockSpec((plan.bb, plan.bn), lambda j, t: (0, j))
    else:
        grid = (plan.b_pad // plan.bb, n_tiles, plan.k_tiles)
        in_specs = [
            pl.BlockSpec(x_block, lambda i, j, t: x_map(i, t)),
            pl.BlockSpec(v_block, lambda i, j, t: v_map(t, j)),
            pl.BlockSpec((plan.rows, plan.bn), lambda i, j, t: (t, j)),
        ]
        out_spec = pl.BlockSpec((plan.bb, plan.bn), lambda i, j, t: (i, j))

    kernel = functools.partial(_nm_kernel, plan=plan, use_dot=use_dot, compute_dtype=out_dtype)
    weight_bytes = values.size * values.dtype.itemsize + indices.size
    cost = pl.CostEstimate(
        flops=2 * plan.b_pad * plan.n * k * n_out,
        transcendentals=0,
        bytes_accessed=int(weight_bytes + x_exp.size * x_exp.dtype.itemsize * n_tiles
                           + plan.b_pad * n_out * 4),
    )
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.b_pad, n_out), jnp.float32),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(backend, gemv),
        cost_estimate=cost,
        name=f"nm_matmul_{n}_{m}",
    )(x_exp, values, indices)
    return y[:batch].astype(out_dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _pallas_with_ref_jvp(x2, values, indices, static):
    return _pallas_nm_matmul(x2, values, indices, **dict(static))


@_pallas_with_ref_jvp.defjvp
def _pallas_jvp(static, primals, tangents):
    x2, values, indices = primals
    dx, dv, _ = tangents
    kw = dict(static)
    y = _pallas_nm_matmul(x2, values, indices, **kw)
    # The product is bilinear in (x, values): the tangent is two reference products (XLA, differentiable
    # and transposable), so jvp, grad and jvp-of-grad work; the kernel itself is never differentiated.
    n, m, k = kw["n"], kw["m"], kw["k"]
    dy = _xla_nm_matmul(dx, values, indices, n=n, m=m, k=k) + _xla_nm_matmul(
        x2, dv, indices, n=n, m=m, k=k
    )
    return y, dy.astype(y.dtype)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


#: Backends on which auto may pick the kernel. GPU is left out: the Mosaic GPU kernel lowers for CUDA
#: (checked from CPU) but has never run or been timed on a GPU.
_AUTO_KERNEL_BACKENDS = ("tpu",)


def _auto_implementation(batch: int, n: int, m: int, k: int, n_out: int, backend: str) -> str:
    if backend not in _AUTO_KERNEL_BACKENDS:
        return "xla"
    memory_bound = batch <= AUTO_MAX_BATCH
    compresses = n * 2 <= m  # at least 2x fewer values than dense (2:4, 1:4, 1:8, 2:8, 4:16, ...)
    big_enough = k * n_out >= _AUTO_MIN_WEIGHT
    return "pallas" if (memory_bound and compresses and big_enough) else "xla"


def nm_matmul(
    x: jax.Array,
    c: Any,
    *,
    implementation: str | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    use_dot: bool | None = None,
) -> jax.Array:
    """``x @ decompress(c)`` for a compressed N:M Dense weight, by Pallas kernel or XLA.

    .. math::

        y_{b,c} = \\sum_{g}\\sum_{j<N} x_{b,\\, gM + I_{gN+j,c}}\\; V_{gN+j,c}

    (the N kept weights of every group of M along the reduction axis; see the module docstring for
    how the kernel expands value/index tiles on chip).

    Args:
      x: activations ``(..., K)``, float32 or bfloat16.
      c: ``jaxlab.nm.NMCompressed`` of logical shape ``(K, N_out)`` with groups along axis 0
        (``jaxlab.nm.compress(w, n, m, axis=0)``), any N:M with ``M in (2, 4, 8, 16)``.
      implementation: ``None`` (auto: the kernel for memory-bound shapes -- flattened batch
        <= :data:`AUTO_MAX_BATCH`, ``N/M <= 1/2``, ``K*N_out >= 2**20`` -- on TPU, XLA otherwise,
        always on CPU and, until the Mosaic GPU kernel has been run and timed on a GPU, on GPU),
        ``"xla"`` or ``"pallas"``.
      block_sizes: static :class:`BlockSizes`; default :meth:`BlockSizes.get_default`.
      interpret: run the Pallas kernel in interpret mode (``None``: only on CPU, where it is the only
        way to run it; use for tests).
      use_dot: kernel body: ``True`` multiplies each decompressed tile with ``jnp.dot`` (MXU/tensor
        cores), ``False`` with FMAs and a column reduction (GEMV). ``None``: ``dot``. Ignored on GPU,
        whose Mosaic GPU kernel is FMA-only.

    Returns:
      ``(..., N_out)`` array of dtype ``result_type(x.dtype, c.values.dtype)`` (float32 accumulation).

    Raises:
      ValueError: ``x.shape[-1] != K``, unsupported M, groups not along axis 0, malformed ``c``,
        unknown ``implementation`` or a ``block_k`` that does not align packed index bytes.
      TypeError: ``c`` is not an ``NMCompressed`` or dtypes are not float32/bfloat16.

    AD: the kernel is for inference. Under ``jax.jvp``/``jax.grad`` the ``"pallas"`` path computes the
    primal with the kernel and the derivative with the XLA reference (``custom_jvp``).

    Example:
      A tiny weight (the kernel pays off for memory-bound shapes, e.g. a ``(4096, 4096)`` bf16
      weight and ``x`` of shape ``(1, 4096)`` on GPU/TPU); on CPU auto picks XLA, and
      ``implementation="pallas", interpret=True`` runs the kernel body in the Pallas interpreter:

      >>> import jax.numpy as jnp
      >>> from jaxlab.kernels import nm_matmul, nm_matmul_reference
      >>> from jaxlab.nm import compress
      >>> w = jnp.arange(64.0).reshape(16, 4) % 7 - 3   # (K, N_out); small integers: exact products
      >>> x = jnp.arange(32.0).reshape(2, 16) % 5 - 2   # (B, K)
      >>> c = compress(w, 2, 4, axis=0)
      >>> y = nm_matmul(x, c)
      >>> y.tolist()
      [[-14.0, 5.0, -1.0, 12.0], [6.0, 11.0, 0.0, -3.0]]
      >>> y_kernel = nm_matmul(x, c, implementation="pallas", interpret=True)
      >>> bool(jnp.array_equal(y_kernel, nm_matmul_reference(x, c)))   # same numbers
      True

    Reference: Lu et al., STEP (ICML 2023, arXiv 2302.01172); Mishra et al., arXiv 2104.08378.
    """
    if implementation not in (None, "xla", "pallas"):
        raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    n, m, k, n_out = _check_compressed(c)
    _check_x(x, k, tuple(c.shape))
    lead = x.shape[:-1]
    batch = math.prod(lead)
    x2 = x.reshape(batch, k)
    backend = _canonical_backend(None)
    if implementation is None:
        implementation = _auto_implementation(batch, n, m, k, n_out, backend)
    if implementation == "xla" or batch == 0:
        y = _xla_nm_matmul(x2, c.values, c.indices, n=n, m=m, k=k)
    else:
        if interpret is None:
            interpret = backend not in ("gpu", "tpu")
        static = (
            ("n", n), ("m", m), ("k", k), ("block_sizes", block_sizes), ("interpret", bool(interpret)),
            ("backend", backend), ("use_dot", use_dot),
        )
        y = _pallas_with_ref_jvp(x2, c.values, c.indices, static)
    return y.reshape(*lead, n_out)
