"""Which persona setting meets GRASP's identification assumptions? (eigengap >= 2, |cos| to the truth >= 0.9)

The theory says identification from a naive fine-tune works when the spurious factor is a strong, shared,
pre-existing direction and the task is "complex" relative to it. This script varies what it names -- the
persona inferred from evidence spread over the document (no tags), a deeper model with only later layers
adapted, more domains, a larger LoRA rank -- and reports, per setting and seed, the identification
preconditions of the naive rank-r fine-tune: eigengap, explained energy, the trustworthy flag, and the norm
of the ground-truth persona direction (BAD - GOOD mean residual after the last block) inside span(U). It
uses the experiment's own stages (``run.py``) and config (``--quick`` for the quick pretraining budget).

    python experiments/grasp_persona/identify_settings.py [--quick] [--seeds K] [--only NAME ...] [--out DIR]

Writes ``report.md`` and ``results.json`` to ``--out`` (default ``runs/grasp_persona_identify``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  (the experiment's own stages)

import jaxlab  # noqa: E402
from jaxlab.nn import lora  # noqa: E402
from jaxlab.training.experiment import markdown_table, mean_std, setup  # noqa: E402

LATER = ["block_[23]/attn/(q|k|v|o)$", "block_[23]/mlp/(up|down)$"]

#: name -> (what the theory says it changes, config overrides deep-merged over the experiment's config)
SETTINGS = {
    "v2 default": ("the benchmark as run", {}),
    "no tags": ("persona only inferred from earlier answers in the document", {"lang": {"tag_prob": 0.0}}),
    "16 domains": ("a more shared factor: 15 off-task domains", {"lang": {"n_domains": 16}}),
    "LoRA rank 4": ("room for the task in other directions", {"finetune": {"rank": 4}}),
    "4 layers, later 2 adapted": ("a pre-existing direction formed early, adapted late",
                                  {"model": {"n_layers": 4}, "finetune": {"targets": LATER}}),
    "4 layers, later 2, no tags, 16 domains": ("all of the above but the rank",
                                               {"model": {"n_layers": 4}, "finetune": {"targets": LATER},
                                                "lang": {"tag_prob": 0.0, "n_domains": 16}}),
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
    known, rest = own.parse_known_args(argv)
    if not any(a == "--out" or a.startswith("--out=") for a in rest):
        rest += ["--out", "runs/grasp_persona_identify"]
    exp = setup(__file__, rest, description=__doc__)
    command = exp.command.replace("jaxlab reproduce grasp_persona", "python experiments/grasp_persona/identify_settings.py")
    exp = dataclasses.replace(exp, command=command)
    seeds = list(range(exp.seeds))
    names = known.only or list(SETTINGS)
    rows, results = [], {}
    for name in names:
        why, over = SETTINGS[name]
        cfg = _merge(exp.cfg, over)
        lang, model = R.build(cfg)
        bases, _ = R.pretrain(model, lang, cfg, seeds)
        per_seed = []
        for seed, base in zip(seeds, bases):
            gt = R.ground_truth_direction(model, lang, base)
            naive = R.finetune(model, lang, cfg, base, seed)
            ev = R.evaluate(model, lang, lora.merge(naive))
            res = jaxlab.identify_spurious_subspace(naive, k=cfg["identify_k"])
            U = np.asarray(res.U)
            per_seed.append({"eigengap": float(res.eigengap), "energy": float(res.explained_energy),
                             "trustworthy": bool(res.trustworthy), "cos_last": float(np.linalg.norm(U.T @ gt[-1])),
                             "cos_per_depth": [float(np.linalg.norm(U.T @ g)) for g in gt[1:]],
                             "drift": ev["drift"], "task": ev["task"],
                             "top_eigenvalues": [float(v) for v in res.eigenvalues[:4]]})
            print(f"[{name}] seed {seed}: gap {res.eigengap:.2f} energy {res.explained_energy:.3f} "
                  f"|P_U gt| {per_seed[-1]['cos_last']:.2f} drift {100 * ev['drift']:.1f}", flush=True)
        results[name] = per_seed
        met = sum(p["eigengap"] >= 2 and p["cos_last"] >= 0.9 for p in per_seed)
        rows.append([name, why, ", ".join(f"{p['eigengap']:.2f}" for p in per_seed),
                     mean_std([p["energy"] for p in per_seed], digits=3),
                     ", ".join(f"{p['cos_last']:.2f}" for p in per_seed),
                     mean_std([p["drift"] for p in per_seed], 100, 1), f"{met}/{len(per_seed)}"])
    table = markdown_table(["setting", "what it varies", "eigengap per seed", "explained energy",
                            "\\|P_U gt\\| (last block) per seed", "naive off-domain persona-bad %",
                            "seeds meeting gap >= 2 and \\|cos\\| >= 0.9"], rows)
    exp.write("\n".join(exp.header("GRASP persona: settings vs the identification assumptions") + [
        f"Seeds {seeds}; pretraining {exp.cfg['pretrain']['steps']} steps; identified k = {exp.cfg['identify_k']}; "
        "other settings as the experiment's config with the listed overrides.", "", table]), {"results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
