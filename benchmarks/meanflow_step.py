"""Benchmark: MeanFlow train-step time divided by the flow-matching train-step time on the same DiT.

One run, one device, one model (``jaxlab.nn.DiT``), one batch. Every variant is the full train step of
``jaxlab train`` (:func:`jaxlab.training.make_train_step`: ``value_and_grad`` + the registry's ``adam`` +
grad-norm/finiteness metrics, the same overhead for every variant):

* ``flow_matching`` -- ``jaxlab.flow_matching_loss`` (no JVP; the baseline of every ratio),
* ``meanflow lam=1.0`` -- original MeanFlow: one ``jax.jvp`` on the r != t rows, no vhat forward,
* ``meanflow lam=0.5`` -- fixed coefficient: one ``jax.jvp`` + the boundary ``u(z, t, t)`` forward,
* ``meanflow auto`` -- two tangents on one linearisation (vmapped ``jax.jvp``) + the boundary forward,

(MeanFlow through :func:`jaxlab.make_meanflow_loss_fn`, its loss state carried by the train state) each at
``flow_matching_fraction`` 0.75 (the MeanFlow default: JVP on a quarter of the batch) and 0.0
(JVP on every row, the worst case). Targets (issue 3): <= 1.6x for fixed coefficients, <= 2.0x for auto,
at the default fraction.

Fused attention rows (``attention=pallas``): original MeanFlow (lam=1.0) at both fractions on the same DiT
with ``DiT(attention="pallas")`` (:func:`jaxlab.kernels.flash_attention`: Pallas flash forward + fused
primal-and-tangent kernel under ``jax.jvp``, jnp-recomputed backward), same params, timed in the same
round-robin; ``ratio_vs_jnp_attention`` divides by the ``attention=jnp`` row of the same config. They run
on GPU/TPU; on CPU only with ``--pallas-interpret`` (interpret-mode timings are meaningless there: use it
to check the rows work). The model output with the kernel is checked against the jnp model first.

Timing: ``--inner`` steps per timed call inside one jitted ``lax.fori_loop`` (Python dispatch amortised);
all variants are compiled and warmed up first, then timed round-robin ``--reps`` times (so load from
other processes hits every variant alike). Ratios use the minimum per variant (the least-disturbed
run); the ratio of medians is reported too.

Usage::

    python benchmarks/meanflow_step.py            # DiT-S-like size on the default device
    python benchmarks/meanflow_step.py --quick    # small DiT on CPU (a minute)
    python benchmarks/meanflow_step.py --quick --pallas-interpret   # + the fused-attention rows (CPU check)

Writes ``benchmarks/meanflow_step.json`` (``meanflow_step_quick.json`` with ``--quick``) next to this
file and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

from jaxlab.losses import MeanFlowConfig, flow_matching_loss, make_meanflow_loss_fn, meanflow_init_state
from jaxlab.nn import DiT
from jaxlab.training import TrainState, make_train_step
from jaxlab.training.methods import get_method


def compile_variant(model, params, x, cfg: MeanFlowConfig | None, inner):
    """Jit ``inner`` train steps in one ``fori_loop``; returns a zero-argument timed callable (compiled, warmed up).

    ``cfg=None`` is the flow-matching baseline; otherwise the MeanFlow loss with ``cfg``.
    """
    tx = get_method("adam").make(1e-4)
    if cfg is None:
        step = make_train_step(functools.partial(flow_matching_loss, model.apply), tx, jit=False)
    else:
        step = make_train_step(make_meanflow_loss_fn(model.apply, cfg), tx, has_loss_state=True, jit=False)
    state = TrainState.create(params=params, tx=tx, rng=0, loss_state=None if cfg is None else meanflow_init_state(cfg))
    run = jax.jit(lambda st: jax.lax.fori_loop(0, inner, lambda i, s: step(s, x)[0], st))
    jax.block_until_ready(run(state))  # compile + warm up

    def timed():
        t0 = time.perf_counter()
        jax.block_until_ready(run(state))
        return (time.perf_counter() - t0) / inner

    return timed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small DiT, CPU-sized")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--image", type=int, default=None, help="image side (square, 4 channels unless --quick)")
    p.add_argument("--inner", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--pallas-interpret", action="store_true",
                   help="also run the attention=pallas rows on CPU (interpret mode; timings meaningless)")
    args = p.parse_args(argv)
    if args.quick:
        size = dict(patch=2, hidden=64, depth=3, heads=4, time_dim=32)
        batch, side, ch, inner, reps = args.batch or 64, args.image or 8, 1, args.inner or 10, args.reps or 7
    else:  # DiT-S/2-like on 32x32x4 latents
        size = dict(patch=2, hidden=384, depth=12, heads=6, time_dim=256)
        batch, side, ch, inner, reps = args.batch or 64, args.image or 32, 4, args.inner or 10, args.reps or 5
    model = DiT(time_scale=1.0, **size)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, side, side, ch))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:2], jnp.zeros(2), jnp.zeros(2))

    variants = [("flow_matching", None, None)]
    for frac in (0.75, 0.0):
        for lam in (1.0, 0.5, "auto"):
            variants.append((f"meanflow lam={lam} fraction={frac}",
                             MeanFlowConfig(jvp_cond_weight=lam, flow_matching_fraction=frac), (lam, frac)))
    fns = [compile_variant(model, params, x, cfg, inner) for _, cfg, _ in variants]
    # Fused-attention rows: the same MeanFlow steps with DiT(attention="pallas"), divided by the jnp rows.
    pallas_rows = {}  # variant index -> index of its attention=jnp baseline
    pallas_note = None
    if jax.default_backend() != "cpu" or args.pallas_interpret:
        model_p = DiT(time_scale=1.0, attention="pallas", **size)
        try:
            z, r, t = x[:4], jnp.full((4,), 0.2), jnp.full((4,), 0.9)
            err = float(jnp.max(jnp.abs(jax.jit(model_p.apply)(params, z, r, t) - jax.jit(model.apply)(params, z, r, t))))
            if not err <= 1e-2:
                raise RuntimeError(f"attention=pallas output differs from attention=jnp by {err}")
            for frac in (0.75, 0.0):
                cfg = MeanFlowConfig(jvp_cond_weight=1.0, flow_matching_fraction=frac)
                base = next(i for i, v in enumerate(variants) if v[2] == (1.0, frac))
                fns.append(compile_variant(model_p, params, x, cfg, inner))
                pallas_rows[len(variants)] = base
                variants.append((f"meanflow lam=1.0 fraction={frac} attention=pallas", cfg, None))
            pallas_note = "interpret mode: timings meaningless" if jax.default_backend() == "cpu" else None
        except Exception as e:  # keep the rest of the benchmark; record why the kernel rows are missing
            fns, variants = fns[: len(fns) - len(pallas_rows)], variants[: len(variants) - len(pallas_rows)]
            pallas_rows, pallas_note = {}, f"attention=pallas rows failed: {type(e).__name__}: {e}"[:500]
    else:
        pallas_note = "attention=pallas rows skipped on CPU (pass --pallas-interpret to run them in interpret mode)"
    # Round-robin over variants so that load from other processes hits all of them alike.
    times = [[] for _ in variants]
    for _ in range(reps):
        for i, f in enumerate(fns):
            times[i].append(f())
    base_min, base_med = min(times[0]), statistics.median(times[0])
    rows = []
    for (name, _, meta), ts in zip(variants, times):
        target = None
        if meta is not None and meta[1] == 0.75:
            target = 2.0 if meta[0] == "auto" else 1.6
        ratio = min(ts) / base_min
        rows.append({"variant": name, "ms_per_step_min": 1e3 * min(ts), "ms_per_step_median": 1e3 * statistics.median(ts),
                     "ratio_vs_flow_matching": ratio, "ratio_of_medians": statistics.median(ts) / base_med,
                     "target": target, "meets_target": None if target is None else ratio <= target})
        if len(rows) - 1 in pallas_rows:
            rows[-1]["ratio_vs_jnp_attention"] = min(ts) / min(times[pallas_rows[len(rows) - 1]])
    result = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "quick": args.quick,
        "model": {"DiT": size, "batch": batch, "image": [side, side, ch]},
        "inner": inner,
        "reps": reps,
        "command": "python benchmarks/meanflow_step.py" + (" --quick" if args.quick else "")
        + (" --pallas-interpret" if args.pallas_interpret else ""),
        "rows": rows,
        "pallas_attention_note": pallas_note,
    }
    here = pathlib.Path(__file__).resolve().parent
    out = pathlib.Path(args.out) if args.out else here / ("meanflow_step_quick.json" if args.quick else "meanflow_step.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"device: {result['device']}  DiT {size}  batch {batch}  image {side}x{side}x{ch}")
    print(f"{'variant':40s} {'ms/step min':>12s} {'median':>8s} {'x FM (min)':>11s} {'x FM (med)':>11s} {'target':>10s}")
    for r in rows:
        tgt = "" if r["target"] is None else f"<={r['target']:.1f}" + (" ok" if r["meets_target"] else " MISS")
        print(f"{r['variant']:40s} {r['ms_per_step_min']:12.2f} {r['ms_per_step_median']:8.2f} "
              f"{r['ratio_vs_flow_matching']:11.2f} {r['ratio_of_medians']:11.2f} {tgt:>10s}")
    for r in rows:
        if "ratio_vs_jnp_attention" in r:
            print(f"{r['variant']}: {r['ratio_vs_jnp_attention']:.2f}x the attention=jnp step (min)")
    if pallas_note:
        print(pallas_note)
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    main()
