"""Does measuring STEP's AutoSwitch statistic on a sample change the switch? (the phase-1 cost knobs)

Not part of ``jaxlab reproduce``. ``Z_t`` (the mean of ``|v_t - v_{t-1}|`` over the N:M leaves) is an extra
reduction over the gradients and ``v`` on every phase-1 step, most of phase 1's cost over AdamW on CPU
(``benchmarks/optimizer_step.py``). Two knobs sample it:

* ``z_every=k``: ``Z_t`` on one step in ``k`` (``Zbar`` = the mean of the samples in the same window);
* ``z_stride=k``: ``Z_t`` on every step, over every ``k``-th row of each N:M leaf, the start row rotating
  with the step (``jaxlab.transforms.step.z_rows``).

Both leave phase 1 itself untouched (``Z`` only decides *when* to switch), so a run whose switch step
equals the reference's is the reference run, bit for bit. For each ratio this trains STEP on step_digits'
task (its ``config.yaml``: MLP 2x256, 1500 steps, b2 = 0.99, ``switch_eps`` 5e-9; ``--set`` as in
``jaxlab reproduce``) with the reference statistic and with each sampled variant, the same paired seeds,
and reports the switch step per seed, its change, and the deployed accuracy's paired difference.

    python experiments/step_digits/z_sampling.py [--seeds 5] [--out runs/step_digits_z_sampling]
    python experiments/step_digits/z_sampling.py --set step.switch_eps=1e-8   # (any --set of run.py)
"""

from __future__ import annotations

import copy
import json

import numpy as np
from run import build_model, load_digits_split, run_setting  # this folder is sys.path[0] when run as a script

from jaxlab.training.experiment import markdown_table, paired_difference, setup

# each variant sets both knobs, so a --set of either in the config does not change the comparison
VARIANTS = {"reference": {"z_every": 1, "z_stride": 1}, "z_every=10": {"z_every": 10, "z_stride": 1},
            "z_stride=16": {"z_every": 1, "z_stride": 16}, "z_stride=4": {"z_every": 1, "z_stride": 4}}


def main(argv=None) -> dict:
    exp = setup(__file__.replace("z_sampling.py", "run.py"), argv, description=__doc__)
    cfg = exp.cfg
    cfg["premise"] = None
    data = load_digits_split(cfg["data"]["test_fraction"], cfg["data"]["split_seed"])
    model = build_model(cfg["model"])
    out = []
    for n, m in cfg["ratios"]:
        for name, knobs in VARIANTS.items():
            c = copy.deepcopy(cfg)
            c["step"].update(knobs)
            r = run_setting("step", n, m, c, model, data, exp.seeds)
            out.append({"variant": name, "n": n, "m": m, "switch_step": r["switch_step"],
                        "deployed_acc": r["deployed_acc"], "zbar_trace": r["zbar_trace"], "seconds": r["seconds"]})
    rows = []
    for n, m in cfg["ratios"]:
        ref = next(r for r in out if (r["variant"], r["n"], r["m"]) == ("reference", n, m))
        for r in out:
            if (r["n"], r["m"]) != (n, m):
                continue
            d_sw = np.asarray(r["switch_step"]) - np.asarray(ref["switch_step"])
            same = int(np.sum(d_sw == 0))
            # Zbar of seed 0 against the reference's, over the phase-1 steps both share (from the first
            # full window on): the statistic's sampling error itself
            stop = min(r["switch_step"][0], ref["switch_step"][0]) - 1
            window = int(cfg["step"].get("window") or round(1 / (1 - cfg["optim"]["b2"])))
            a, b = (np.asarray(x["zbar_trace"][window:stop], np.float64) for x in (r, ref))
            err = f"{100 * np.max(np.abs(a / b - 1)):.1f}" if a.size else "—"
            if r is ref:
                acc = f"{100 * np.mean(r['deployed_acc']):.2f}"
            else:
                acc = paired_difference(r["deployed_acc"], ref["deployed_acc"], scale=100.0, digits=2)["text"]
            rows.append([f"{n}:{m}", r["variant"], ", ".join(map(str, r["switch_step"])),
                         "—" if r is ref else ", ".join(f"{x:+d}" for x in d_sw),
                         "—" if r is ref else f"{same}/{len(d_sw)}", "—" if r is ref else err, acc])
    table = markdown_table(["ratio", "Z_t measured", "switch step per seed", "Δ switch vs reference",
                            "same switch", "max |Zbar / Zbar_ref - 1| % (seed 0)", "deployed acc % (reference: mean; others: paired Δ [95 % t-interval])"],
                           rows)
    text = (f"# STEP switch step with a sampled AutoSwitch statistic (step_digits, {exp.seeds} paired seeds)\n\n"
            f"{table}\n")
    print(text)
    (exp.out / "z_sampling.md").write_text(text)
    (exp.out / "z_sampling.json").write_text(json.dumps(out, indent=1))
    return {"results": out}


if __name__ == "__main__":
    main()
