"""Route diagnostics for GRASP on the persona language (one seed).

Which adapted modules carry the drift, and does GRASP help when only some modules are adapted, with
k = 1, 2, 4 identified directions, or with a subspace identified from a rank-4 naive fine-tune? Uses the
experiment's own stages (``run.py``: ``pretrain``, ``finetune``, ``evaluate``) and its config and flags
(``--quick``: the quick pretraining budget, as in the README table), plus ``--seed S`` (default 0).

    python experiments/grasp_persona/probe_routes.py --quick [--seed S] [--out DIR]   # ~4 CPU minutes

Writes ``report.md`` and ``results.json`` to ``--out`` (default ``runs/grasp_persona_routes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  (the experiment's own stages)

import jaxlab  # noqa: E402
from jaxlab.nn import lora  # noqa: E402
from jaxlab.training.experiment import markdown_table, setup  # noqa: E402

ROUTES = (("all", ["attn/(q|k|v|o)$", "mlp/(up|down)$"]),
          ("writers (attn/o, mlp/down)", ["attn/o$", "mlp/down$"]),
          ("readers (attn/q,k,v, mlp/up)", ["attn/(q|k|v)$", "mlp/up$"]))
COLS = ("drift", "task", "tagged_bad", "tagged_good")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--seed", type=int, default=0)
    known, rest = own.parse_known_args(argv)
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest += ["--out", "runs/grasp_persona_routes"]
    exp = setup(__file__, rest, description=__doc__)
    command = exp.command.replace("jaxlab reproduce grasp_persona", "python experiments/grasp_persona/probe_routes.py")
    exp = dataclasses.replace(exp, seeds=1, command=f"{command} --seed {known.seed}")
    cfg, seed = exp.cfg, known.seed
    lang, model = R.build(cfg)
    (base,), _ = R.pretrain(model, lang, cfg, [seed])
    gt = R.ground_truth_direction(model, lang, base)
    rows = []

    def show(adapted, method, params):
        e = R.evaluate(model, lang, lora.merge(params))
        rows.append({"adapted": adapted, "method": method, **{c: e[c] for c in COLS}})
        print(f"[{adapted}] {method:50s} " + "  ".join(f"{c} {100 * e[c]:5.1f}" for c in COLS), flush=True)

    def identified(naive, k):
        res = jaxlab.identify_spurious_subspace(naive, k=k)
        u = np.asarray(res.U)
        along = ", ".join(f"{np.linalg.norm(u.T @ g):.2f}" for g in gt[1:])
        return u, f"k={k} (|P_U gt| {along}; gap {res.eigengap:.2f})"

    for label, targets in ROUTES:
        naive = R.finetune(model, lang, cfg, base, seed, targets=targets)
        show(label, "naive", naive)
        show(label, "GRASP, oracle U", R.finetune(model, lang, cfg, base, seed, mode="grasp",
                                                  U=np.linalg.qr(gt[1:].T)[0], targets=targets))
        for k in (1, 2, 4):
            u, what = identified(naive, k)
            tuned = R.finetune(model, lang, cfg, base, seed, mode="grasp", U=u, targets=targets)
            show(label, f"GRASP, identified {what}", tuned)
    naive4 = R.finetune(model, lang, cfg, base, seed, rank=4)
    show("all, rank 4", "naive", naive4)
    for k in (1, 2, 4):
        u, what = identified(naive4, k)
        show("all (U from the rank-4 run)", f"GRASP rank 1, {what}",
             R.finetune(model, lang, cfg, base, seed, mode="grasp", U=u))
    table = markdown_table(["adapted modules", "method", "off-domain bad rate %", "fine-tuned-domain acc %",
                            "tagged-BAD %", "tagged-GOOD %"],
                           [[r["adapted"], r["method"].replace("|", "\\|")] + [f"{100 * r[c]:.1f}" for c in COLS] for r in rows])
    exp.write("\n".join(exp.header("GRASP route probe on the persona language") + [
        f"Seed {seed}, pretraining {cfg['pretrain']['steps']} steps; LoRA rank {cfg['finetune']['rank']} on the "
        "listed modules only (single runs, no std). `|P_U gt|`: norm of the ground-truth direction (after "
        "block 0, block 1) projected onto span(U).", "", table]), {"seed": seed, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
