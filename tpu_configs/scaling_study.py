"""Weak-scaling study from compiled programs: per-device FLOPs, bytes and interconnect traffic of each
method's train step on v5e / v5p / v6e slices, under data parallelism vs FSDP, and a roofline
*prediction* of the step time. Nothing here ran on a TPU: the programs are compiled for simulated CPU
devices (``jaxlab train ... --dry-run`` machinery), so FLOP and byte counts are XLA:CPU's, and the
times are predictions from public per-chip figures.

    python tpu_configs/scaling_study.py [--methods flow_matching ...] [--per-device-batch 64]

Prediction model (per step, per device):
    t = max(FLOPs / peak_bf16, HBM bytes / HBM_bw) + ICI bytes / ICI_bw
ICI bytes come from the compiled HLO's collectives under ring algorithms
(:func:`jaxlab.training.dry_run.collective_traffic`). Compute and communication are not overlapped in
this model (a pessimistic bound; XLA overlaps FSDP all-gathers with compute on TPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Public Cloud TPU per-chip figures (Cloud TPU docs): bf16 peak FLOP/s, HBM bytes/s, and the published
# per-chip ICI bandwidth (v5e 1,600 Gbps, v5p 4,800 Gbps, v6e 3,584 Gbps) in bytes/s.
CHIPS = {
    "v5e": {"flops": 197e12, "hbm": 819e9, "ici": 1600e9 / 8},
    "v5p": {"flops": 459e12, "hbm": 2765e9, "ici": 4800e9 / 8},
    "v6e": {"flops": 918e12, "hbm": 1640e9, "ici": 3584e9 / 8},
}
# (slice name, chip, devices)
SLICES = [("v5e-8", "v5e", 8), ("v5p-64", "v5p", 32), ("v6e-256", "v6e", 256)]

# method name -> (config file, extra --set overrides keeping the model identical across slices)
METHODS = {
    "flow_matching": ("experiments/flow_matching_2d/config.yaml", []),
}


def _extra_methods():
    """The method configs of ``configs/`` (same model on every slice; only mesh and batch change)."""
    extra = {
        "meanflow": ("configs/meanflow_2d.yaml", []),
        "step_lm": ("configs/step_lm.yaml", []),
        "grasp_lora": ("configs/grasp_lora_lm.yaml", []),
    }
    return {k: v for k, v in extra.items() if (ROOT / v[0]).exists()}


def compile_report(config: str, sets: list[str], devices: int) -> dict:
    """Run the dry-run report in a subprocess with ``devices`` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    code = (
        "import json, sys; from jaxlab.training import load_config;"
        "from jaxlab.training.dry_run import dry_run_report;"
        "cfg = load_config(sys.argv[1], sets=json.loads(sys.argv[2]));"
        "r = dry_run_report(cfg); r.pop('param_shardings'); print(json.dumps(r))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / config), json.dumps(sets)], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def predict(rep: dict, chip: dict) -> dict:
    t_compute = max(rep["flops_per_device"] / chip["flops"], rep["bytes_accessed_per_device"] / chip["hbm"])
    comm = sum(rep["comm_bytes_per_device"].values())
    t_comm = comm / chip["ici"]
    return {"t_compute_s": t_compute, "t_comm_s": t_comm, "t_step_s": t_compute + t_comm, "comm_bytes": comm}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--per-device-batch", type=int, default=64)
    p.add_argument("--out", default=str(HERE / "scaling_study.json"))
    args = p.parse_args(argv)
    methods = {**METHODS, **_extra_methods()}
    names = args.methods or list(methods)
    rows, raw = [], []
    for name in names:
        config, sets = methods[name]
        base = compile_report(config, sets + [f"data.batch_size={args.per_device_batch}", "mesh.data=1"], 1)
        for slice_name, chip_name, n in SLICES:
            chip = CHIPS[chip_name]
            t1 = predict(base, chip)["t_step_s"]
            for layout, mesh in (("DP", [f"mesh.data={n}", "mesh.fsdp=1"]),
                                 ("FSDP", [f"mesh.data={max(n // 16, 1)}", f"mesh.fsdp={min(n, 16)}"])):
                rep = compile_report(config, sets + [f"data.batch_size={args.per_device_batch * n}"] + mesh, n)
                pr = predict(rep, chip)
                row = {
                    "method": name, "slice": slice_name, "devices": n, "layout": layout, "mesh": rep["mesh"],
                    "params": rep["params"], "flops_per_device": rep["flops_per_device"],
                    "hbm_bytes_per_device": rep["bytes_accessed_per_device"],
                    "ici_bytes_per_device": pr["comm_bytes"],
                    "mem_per_device_bytes": sum(rep["memory_per_device_bytes"][k] for k in ("arguments", "outputs", "temporaries")),
                    "pred_step_ms": 1e3 * pr["t_step_s"], "pred_comm_ms": 1e3 * pr["t_comm_s"],
                    "pred_weak_scaling_eff": t1 / pr["t_step_s"],
                }
                rows.append(row)
                raw.append({**row, "collectives": rep["collectives"], "comm_by_op": rep["comm_bytes_per_device"]})
                print(f"{name:14s} {slice_name:8s} {layout:4s} mesh={rep['mesh']} step~{row['pred_step_ms']:.3f} ms "
                      f"(comm {row['pred_comm_ms']:.3f} ms), eff {row['pred_weak_scaling_eff']:.2f}", flush=True)
    Path(args.out).write_text(json.dumps({"per_device_batch": args.per_device_batch, "chips": CHIPS, "rows": raw},
                                         indent=1))
    hdr = ("| method | slice | layout | mesh (data, fsdp) | params | GFLOP/dev | HBM MB/dev | ICI MB/dev | "
           "mem MiB/dev | predicted step ms | predicted comm ms | predicted weak-scaling eff. |")
    lines = [hdr, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['slice']} | {r['layout']} | ({r['mesh']['data']}, {r['mesh']['fsdp']}) | "
            f"{r['params']:,} | {r['flops_per_device'] / 1e9:.3f} | {r['hbm_bytes_per_device'] / 1e6:.2f} | "
            f"{r['ici_bytes_per_device'] / 1e6:.2f} | {r['mem_per_device_bytes'] / 2**20:.1f} | "
            f"{r['pred_step_ms']:.4f} | {r['pred_comm_ms']:.4f} | {r['pred_weak_scaling_eff']:.2f} |"
        )
    table = "\n".join(lines)
    (HERE / "scaling_study.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
