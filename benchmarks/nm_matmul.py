"""Benchmark: compressed N:M matmul kernel vs XLA dense ``x @ w`` and ``x @ (w * mask)``.

For LLM-like weights (``K x N_out`` = 4096x4096, 4096x14336) and batch sizes 1..4096 this times, in
one run and on one device:

* ``dense``   -- XLA ``x @ w`` with the dense weight (the baseline of every ratio),
* ``masked``  -- XLA ``x @ (w * mask)`` (dense weight + mask streamed, how a pruned model runs today),
* ``xla_nm``  -- ``nm_matmul(..., implementation="xla")`` (decompress in XLA, dense dot),
* ``kernel``  -- ``nm_matmul(..., implementation="pallas")`` (the Pallas kernel),
* ``auto``    -- ``nm_matmul(x, c)`` (what users get by default),

and reports speedups over ``dense`` plus the fraction of the HBM roofline each reaches
(``bytes that must move / time / peak bandwidth``). The bandwidth ceiling of a ratio is
``dense weight bytes / compressed weight bytes`` (2:4 bf16 -> 1.78x, 1:4 -> 3.56x, 1:8 -> 6.4x).
``jax.experimental.sparse`` has no N:M matmul in this JAX version; the row is skipped.

Timing: each op runs ``--inner`` times inside one jitted ``lax.fori_loop`` whose carry feeds one
output element back into the activation (an in-place update, so XLA cannot hoist the matmul out of
the loop); the wall time of the whole call over ``--inner`` is the per-op device time, with Python
dispatch amortised. The median over ``--reps`` calls is reported.

Usage::

    python benchmarks/nm_matmul.py              # full sweep on the default device (GPU/TPU)
    python benchmarks/nm_matmul.py --quick      # tiny CPU smoke run (kernel in interpret mode)

Writes ``benchmarks/nm_matmul.json`` (``nm_matmul_quick.json`` with ``--quick``) next to this file
and prints a table. On CPU the kernel runs in Pallas interpret mode: its times say nothing about
speed, the run only proves the pipeline works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlab import nm
from jaxlab.kernels import index_bits, nm_matmul

# Peak HBM bandwidth (bytes/s) by device kind substring (spec/kernels.md reference figures).
_PEAK_BW = {
    "H100": 3.35e12,
    "H200": 4.8e12,
    "v5 lite": 819e9,
    "v5e": 819e9,
    "v5p": 2.77e12,
    "v6": 1.64e12,
}


def _peak_bw(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for key, bw in _PEAK_BW.items():
        if key.lower() in kind.lower():
            return bw
    return None


def _timed(fn, args, inner: int, reps: int) -> float:
    """Median seconds per op of ``fn(x, *rest)`` run ``inner`` times inside one jitted loop."""

    def looped(x, *rest):
        def body(_, carry):
            xc, acc = carry
            y = fn(xc, *rest)
            first = y.reshape(-1)[0]
            # Feed one output element back (tiny, bounded): the next matmul depends on this one.
            xc = lax.dynamic_update_slice(
                xc, jnp.tanh(first).astype(xc.dtype).reshape((1,) * xc.ndim), (0,) * xc.ndim
            )
            return xc, acc + first.astype(jnp.float32)

        return lax.fori_loop(0, inner, body, (x, jnp.zeros((), jnp.float32)))[1]

    f = jax.jit(looped)
    jax.block_until_ready(f(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Compressed:
    """Same children/static fields as ``jaxlab.nm.NMCompressed`` (used only if jaxlab.nm lacks compress)."""

    values: jax.Array
    indices: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))
    m: int = dataclasses.field(metadata=dict(static=True))
    axis: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple = dataclasses.field(metadata=dict(static=True))
    dtype: object = dataclasses.field(metadata=dict(static=True))


def _compress(w: jax.Array, n: int, m: int):
    """``(compressed weight, 0/1 mask)``: ``jaxlab.nm.compress`` when present, else the same format here."""
    if hasattr(nm, "compress") and hasattr(nm, "decompress"):
        c = nm.compress(w, n, m, axis=0)
        return c, (nm.decompress(c) != 0).astype(w.dtype)
    k, cols = w.shape
    groups = w.reshape(k // m, m, cols)
    keep = jnp.sort(jnp.argsort(-jnp.abs(groups), axis=1, stable=True)[:, :n], axis=1)
    vals = jnp.take_along_axis(groups, keep, axis=1).reshape(-1, cols)
    bits = index_bits(m)
    q = 8 // bits
    ent = keep.reshape(-1, cols).astype(jnp.uint8)
    rows = -(-ent.shape[0] // q)
    ent = jnp.pad(ent, ((0, rows * q - ent.shape[0]), (0, 0))).reshape(rows, q, cols)
    packed = jnp.zeros((rows, cols), jnp.uint8)
    for s in range(q):
        packed = packed | (ent[:, s] << (bits * s)).astype(jnp.uint8)
    mask = jnp.zeros(groups.shape, w.dtype)
    mask = jnp.put_along_axis(mask, keep, 1, axis=1, inplace=False).reshape(k, cols)
    return _Compressed(vals, packed, n, m, 0, (k, cols), w.dtype), mask


def _weight_bytes(c) -> int:
    return int(c.values.size * c.values.dtype.itemsize + c.indices.size * c.indices.dtype.itemsize)


def run(args) -> dict:
    device = jax.devices()[0]
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype)
    peak = _peak_bw(device)
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes:
        k, n_out = shape
        w = jnp.asarray(rng.standard_normal((k, n_out)) / np.sqrt(k), dtype)
        dense_w_bytes = k * n_out * dtype.itemsize
        for ratio in args.ratios:
            n, m = ratio
            c, mask = _compress(w, n, m)
            wb = _weight_bytes(c)
            for batch in args.batches:
                x = jnp.asarray(rng.standard_normal((batch, k)), dtype)
                io = (batch * k + batch * n_out) * dtype.itemsize
                ops = {
                    "dense": (lambda a, ww: a @ ww, (x, w), dense_w_bytes + io),
                    "masked": (lambda a, ww, mm: a @ (ww * mm), (x, w, mask), 2 * dense_w_bytes + io),
                    "xla_nm": (lambda a, cc: nm_matmul(a, cc, implementation="xla"), (x, c), wb + io),
                    "kernel": (lambda a, cc: nm_matmul(a, cc, implementation="pallas"), (x, c), wb + io),
                    "auto": (lambda a, cc: nm_matmul(a, cc), (x, c), wb + io),
                }
                row = {"K": k, "N_out": n_out, "ratio": f"{n}:{m}", "batch": batch}
                # Correctness before speed: the kernel must equal x @ (w * mask) (f32 accumulation).
                want = jnp.dot(x, w * mask, preferred_element_type=jnp.float32)
                got = nm_matmul(x, c, implementation="pallas").astype(jnp.float32)
                row["kernel_rel_err"] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                for name, (fn, fargs, nbytes) in ops.items():
                    t = _timed(fn, fargs, args.inner, args.reps)
                    row[f"{name}_us"] = t * 1e6
                    row[f"{name}_hbm_frac"] = (nbytes / t / peak) if peak else None
                for name in ("masked", "xla_nm", "kernel", "auto"):
                    row[f"{name}_speedup"] = row["dense_us"] / row[f"{name}_us"]
                row["bw_ceiling"] = (dense_w_bytes + io) / (wb + io)
                rows.append(row)
                print(_fmt_row(row), flush=True)
    try:
        from jax.experimental.sparse import nm as _sparse_nm  # noqa: F401

        sparse_note = "jax.experimental.sparse.nm present but not benchmarked"
    except ImportError:
        sparse_note = f"jax.experimental.sparse has no N:M matmul in jax {jax.__version__}; skipped"
    return {
        "benchmark": "nm_matmul",
        "device": str(getattr(device, "device_kind", backend)),
        "backend": backend,
        "kernel_mode": "interpret (timings meaningless)" if backend == "cpu" else "compiled",
        "jax": jax.__version__,
        "dtype": str(dtype),
        "peak_hbm_bytes_per_s": peak,
        "inner": args.inner,
        "reps": args.reps,
        "quick": args.quick,
        "note": sparse_note,
        "rows": rows,
    }


_COLS = ("K", "N_out", "ratio", "batch", "kernel_rel_err", "dense_us", "masked_speedup", "xla_nm_speedup", "kernel_speedup",
         "auto_speedup", "bw_ceiling", "kernel_hbm_frac", "dense_hbm_frac")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _fmt_row(row) -> str:
    return " | ".join(_fmt(row[c]) for c in _COLS)


def table(result: dict) -> str:
    head = " | ".join(_COLS)
    lines = [f"device: {result['device']} ({result['kernel_mode']}), dtype {result['dtype']}", head,
             " | ".join("---" for _ in _COLS)]
    lines += [_fmt_row(r) for r in result["rows"]]
    return "\n".join(lines)


def _parse_pairs(s: str, sep: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(sep)) for item in s.split(",") if item]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny CPU smoke run (interpret-mode kernel)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--shapes", default="4096x4096,4096x14336", help="KxN_out list")
    p.add_argument("--ratios", default="2:4,1:4,1:8")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256,512,1024,2048,4096")
    p.add_argument("--inner", type=int, default=20, help="ops per timed jitted loop")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default: next to this script)")
    args = p.parse_args(argv)
    if args.quick:  # tiny defaults; explicitly given --ratios/--batches still apply
        args.shapes = "256x256"
        args.ratios = "2:4,1:4" if args.ratios == p.get_default("ratios") else args.ratios
        args.batches = "1,32" if args.batches == p.get_default("batches") else args.batches
        args.inner, args.reps = 2, 2
    args.shapes = _parse_pairs(args.shapes, "x")
    args.ratios = _parse_pairs(args.ratios, ":")
    args.batches = [int(b) for b in args.batches.split(",")]
    print(" | ".join(_COLS))
    result = run(args)
    here = pathlib.Path(__file__).resolve().parent
    out = pathlib.Path(args.out) if args.out else here / ("nm_matmul_quick.json" if args.quick else "nm_matmul.json")
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
