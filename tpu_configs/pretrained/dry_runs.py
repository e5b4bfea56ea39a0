"""Pod-scale dry runs of the pretrained-checkpoint workflows: Llama-3.1-8B and Qwen2.5-7B shapes (no
weights: ``tpu_configs/shapes/*/config.json``), LoRA + GRASP fine-tune and STEP full fine-tune (2:4), on
64 (v5p-128) and 256 (v6e-256) simulated devices. Each run compiles one train step with
``jaxlab train ... --dry-run`` (abstract params, nothing read) and records XLA:CPU's per-device memory
(arguments = params + optimizer state + batch, temporaries = activations and gradients at the stated
batch and sequence length), FLOPs and interconnect bytes; the table compares the total with the chips'
HBM. CPU-compiled numbers are estimates of the TPU program, not TPU measurements.

    python tpu_configs/pretrained/dry_runs.py     # writes tpu_configs/pretrained/dry_runs.{json,md}

The layers are scanned (``nn.scan``): XLA's cost analysis counts the body of the layer loop once, so the
FLOP and interconnect columns are one layer's share plus the rest of the step, not the whole step (an
unrolled compile of the first row gives 1.2e14 FLOPs and 104 GiB of collectives per device; its
memory analysis, 83 GiB of temporaries, reflects XLA:CPU's schedule gathering every layer at once, not
the scanned program the runs use).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HBM_GIB = {"v5p-128": 95.0, "v6e-256": 32.0}
MODELS = ("llama3.1-8b", "qwen2.5-7b")
WORKFLOWS = {
    "LoRA r=16 + GRASP": ("configs/hf/grasp_sft.yaml",
                          ["task.options.grasp_subspace=random:4", "task.options.lora_rank=16"]),
    "STEP 2:4 full FT": ("configs/hf/step_sparsify.yaml", ["optim.options={n: 2, m: 4, t_min: 1000, t_max: 3000}"]),
}


def one(model: str, slice_: str, workflow: str) -> dict:
    cfg, sets = WORKFLOWS[workflow]
    cmd = [sys.executable, "-c", "from jaxlab.training.dry_run import dry_run; from jaxlab.training import "
           "load_config; import sys, json; sys.exit(dry_run(load_config(sys.argv[1], overlays=json.loads("
           "sys.argv[2]), sets=json.loads(sys.argv[3])), as_json=True))",
           cfg, json.dumps([f"tpu_configs/pretrained/{model}.yaml", f"tpu_configs/pretrained/{slice_}.yaml"]),
           json.dumps(sets)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    if out.returncode:
        raise RuntimeError(f"{model} {slice_} {workflow}: {out.stderr[-2000:]}")
    rep = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    rep["compile_wall_s"] = time.perf_counter() - t0
    return rep


def main():
    if "--table-only" in sys.argv:
        return table(json.loads((HERE / "dry_runs.json").read_text()))
    rows = []
    for model in MODELS:
        for slice_ in HBM_GIB:
            for wf in WORKFLOWS:
                rep = one(model, slice_, wf)
                rep.update(model=model, slice=slice_, workflow=wf)
                rows.append(rep)
                print(f"{model} {slice_} {wf}: {rep['compile_wall_s']:.0f} s", flush=True)
    (HERE / "dry_runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    table(rows)


def table(rows):
    gib = 1024**3
    lines = [
        "| model | slice (devices) | mesh (data, fsdp, tensor) | workflow | params | args GiB | temps GiB | "
        "total GiB / HBM | TFLOP/dev, loop body once | ICI GiB/dev, loop body once | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["memory_per_device_bytes"]
        tot = (m["arguments"] + m["temporaries"]) / gib
        mesh = r["mesh"]
        comm = sum(v for k, v in r["comm_bytes_per_device"].items() if k != "total") / gib \
            if isinstance(r["comm_bytes_per_device"], dict) else r["comm_bytes_per_device"] / gib
        lines.append(
            f"| {r['model']} | {r['slice']} ({r['devices']}) | ({mesh['data']}, {mesh['fsdp']}, {mesh['tensor']}) | "
            f"{r['workflow']} | {r['params'] / 1e9:.2f} B | {m['arguments'] / gib:.2f} | {m['temporaries'] / gib:.2f} | "
            f"{tot:.1f} / {HBM_GIB[r['slice']]:.0f} | {r['flops_per_device'] / 1e12:.1f} | {comm:.2f} | "
            f"{r['compile_wall_s']:.0f} |"
        )
    (HERE / "dry_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
