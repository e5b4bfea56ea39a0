"""Mosaic GPU variant of the compressed N:M matmul kernel (private; used by :mod:`.nm_matmul`).

One ``pl.pallas_call`` with ``plgpu.CompilerParams``: grid ``(batch tiles, N tiles, K tiles)``,
the first two parallel (CUDA grid), the K axis sequential (Pallas' Mosaic GPU TMA pipeline,
``max_concurrent_steps`` buffers per input). Blocks in SMEM:

* ``x``: the column-expanded activation tile ``(bb, q*M, R)`` (``R`` = packed index rows per K tile),
* ``values``: ``(R, q, bn)`` -- value row ``r*q + s`` of the tile is ``v[r, s, :]``,
* ``indices``: packed ``uint8`` ``(R, bn)``,

every TMA box <= 256 per dimension. The body is a GEMV made of FMAs (Mosaic GPU lowers no
``dot_general`` outside ``wgmma``): a ``fori_loop`` over the ``R`` packed rows loads one packed row and
the ``q`` value rows it describes as 1-D ``(bn,)`` register arrays (``WG_STRIDED`` layout, the same
vector width for ``uint8``, ``bf16`` and ``f32`` so element-wise ops line up), unpacks bit plane ``s``
with shifts/ands, forms ``D_{s,p} = where(I_s == p, V_s, 0)`` and accumulates
``acc_b += X_{s,p}[b, r] * D_{s,p}`` with the activation entry read as an SMEM scalar (a splat).
The ``bb`` accumulators (``bn`` float32 each) live in registers inside a K tile and in an SMEM
scratch across K tiles (the pipeline rotates output buffers between steps, so the output block
itself is written once, at the last K step).

Batch tiles are at most 16 rows: the body is unrolled over the batch, and above ~16 rows the
matmul is compute-bound, where ``implementation=None`` uses XLA anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

#: Largest batch tile of the GPU kernel (the FMA body is unrolled over the batch rows).
GPU_MAX_BLOCK_B = 16


#: Shared-memory budget of one CTA (H100 allows 227 KiB; the rest is left for barriers/scratch).
SMEM_BUDGET_BYTES = 200 * 1024


def smem_bytes(plan, itemsize: int, slots: int = 2) -> int:
    """Shared memory of one CTA: ``slots`` pipeline buffers of every block plus the accumulator."""
    slots = min(slots, plan.k_tiles)
    x = plan.bb * plan.q * plan.m * plan.rows * itemsize
    v = plan.rows * plan.q * plan.bn * itemsize
    p = plan.rows * plan.bn
    o = plan.bb * plan.bn * 4
    return slots * (x + v + p + o) + o


def make_gpu_plan(batch, n, m, k, n_out, bs, itemsize: int, *, shrink: bool, make_plan):
    """Static tiling for the GPU kernel; checks TMA and SMEM limits with clear errors.

    With ``shrink`` (default block sizes) ``block_k`` is halved until the tiles fit
    :data:`SMEM_BUDGET_BYTES` (dense N:M such as 3:4 need shorter K tiles).
    """
    import dataclasses

    if bs.block_n % 128:
        raise ValueError(f"BlockSizes.block_n={bs.block_n} must be a multiple of 128 on GPU")
    bs = dataclasses.replace(bs, block_b=min(bs.block_b, GPU_MAX_BLOCK_B))
    q = 8 // {2: 1, 4: 2, 8: 4, 16: 4}[m]
    unit = m * q  # K tiles start on whole bytes of packed indices
    while True:
        plan = make_plan(batch, n, m, k, n_out, bs, False, layout3d=True)
        half = bs.block_k // 2 // unit * unit
        if (
            not shrink
            or smem_bytes(plan, itemsize) <= SMEM_BUDGET_BYTES
            or half < unit
            or (half * n // m // q * itemsize) % 16  # would break the TMA rule below
        ):
            break
        bs = dataclasses.replace(bs, block_k=half)
    if (plan.rows * itemsize) % 16:
        raise ValueError(
            f"GPU kernel: block_k={plan.bk} gives R={plan.rows} packed index rows per K tile for "
            f"{n}:{m}; the activation block's minor dimension R * {itemsize} bytes must be a "
            f"multiple of 16 (TMA); use a larger block_k"
        )
    used = smem_bytes(plan, itemsize)
    if used > SMEM_BUDGET_BYTES:
        raise ValueError(
            f"GPU kernel: tiles (block_b={plan.bb}, block_k={plan.bk}, block_n={plan.bn}) need "
            f"{used} bytes of shared memory (budget {SMEM_BUDGET_BYTES}); use smaller block sizes"
        )
    return plan


def _strided_layout(bn: int):
    """``WG_STRIDED`` layout for a ``(bn,)`` row: widest vector (<= 8) that tiles 128 threads."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    vec = 8
    while bn % (vec * 128):
        vec //= 2
    return plgpu.Layout.WG_STRIDED((bn,), vec_size=vec)


def _gpu_kernel(x_ref, v_ref, p_ref, o_ref, acc_ref, *, plan, interpret: bool):
    kt = pl.program_id(2)
    bb, bn = o_ref.shape
    rows, q, m, bits = plan.rows, plan.q, plan.m, plan.bits
    mask = (1 << bits) - 1

    if interpret:
        load = lambda ref, idx: ref[idx]  # noqa: E731
        cast = lambda a: a  # noqa: E731
    else:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        layout = _strided_layout(bn)
        load = lambda ref, idx: plgpu.load(ref, idx, layout=layout)  # noqa: E731
        cast = lambda a: plgpu.layout_cast(a, layout)  # noqa: E731

    @pl.when(kt == 0)
    def _init():
        for b in range(bb):
            acc_ref[b, :] = cast(jnp.zeros((bn,), jnp.float32))

    def row_step(r, accs):
        accs = list(accs)
        packed = load(p_ref, (r, slice(None))).astype(jnp.int32)  # (bn,) q packed entries
        for s in range(q):
            v_s = load(v_ref, (r, s, slice(None))).astype(jnp.float32)  # entry r*q + s
            i_s = packed if s == 0 else packed >> (bits * s)
            i_s = i_s & mask if s < q - 1 else i_s  # the top plane needs no mask
            for p in range(m):
                d = jnp.where(i_s == p, v_s, 0.0)  # dense row g(e)*M + p of this tile
                for b in range(bb):
                    xv = x_ref[b, s * m + p, r].astype(jnp.float32)  # SMEM scalar (splat)
                    accs[b] = accs[b] + xv * d
        return tuple(accs)

    init = tuple(load(acc_ref, (b, slice(None))) for b in range(bb))
    accs = lax.fori_loop(0, rows, row_step, init)
    for b in range(bb):
        acc_ref[b, :] = accs[b]

    @pl.when(kt == plan.k_tiles - 1)
    def _finish():
        for b in range(bb):
            o_ref[b, :] = load(acc_ref, (b, slice(None)))


def gpu_nm_matmul(x_exp, values, indices, *, plan, interpret: bool, name: str):
    """Run the Mosaic GPU kernel on prepared operands (all padded to whole tiles by the caller).

    Args:
      x_exp: column-expanded activations ``(b_pad, k_tiles*q*M, R)`` in the compute dtype.
      values: ``(k_tiles*R, q, N_out)`` kept values.
      indices: ``(k_tiles*R, N_out)`` packed ``uint8`` indices.
      plan: the static ``_Plan`` of :mod:`.nm_matmul` (``layout3d=True``, ``bb <= 16``,
        ``bn % 128 == 0``).
      interpret: run with the Pallas interpreter (CPU tests) instead of compiling with Mosaic GPU.
      name: kernel name.

    Returns:
      float32 ``(b_pad, N_out)``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    assert plan.layout3d and plan.bb <= GPU_MAX_BLOCK_B and plan.bn % 128 == 0, plan
    n_out = values.shape[-1]
    qm = plan.q * plan.m
    grid = (plan.b_pad // plan.bb, -(-n_out // plan.bn), plan.k_tiles)
    in_specs = [
        pl.BlockSpec((plan.bb, qm, plan.rows), lambda i, j, t: (i, t, 0)),
        pl.BlockSpec((plan.rows, plan.q, plan.bn), lambda i, j, t: (t, 0, j)),
        pl.BlockSpec((plan.rows, plan.bn), lambda i, j, t: (t, j)),
    ]
    out_spec = pl.BlockSpec((plan.bb, plan.bn), lambda i, j, t: (i, j))
    params = None
    if not interpret:
        params = plgpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "sequential"), max_concurrent_steps=2
        )
    weight_bytes = values.size * values.dtype.itemsize + indices.size
    cost = pl.CostEstimate(
        flops=2 * plan.b_pad * plan.n * plan.k * n_out,
        transcendentals=0,
        bytes_accessed=int(weight_bytes * grid[0] + x_exp.size * x_exp.dtype.itemsize * grid[1]
                           + plan.b_pad * n_out * 4),
    )
    kernel = functools.partial(_gpu_kernel, plan=plan, interpret=interpret)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((plan.b_pad, n_out), jnp.float32),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        scratch_shapes=[plgpu.SMEM((plan.bb, plan.bn), jnp.float32)],
        interpret=interpret,
        compiler_params=params,
        cost_estimate=cost,
        name=name,
    )(x_exp, values, indices)
