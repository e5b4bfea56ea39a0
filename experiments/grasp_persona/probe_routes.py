"""Route diagnostics for GRASP on the persona language (one seed, the ``--quick`` pretraining budget).

Which adapted modules carry the drift, and does GRASP help when only some modules are adapted, with
k = 1, 2, 4 identified directions, or with a subspace identified from a rank-4 naive fine-tune?

    python experiments/grasp_persona/probe_routes.py [--seed S]     # ~4 CPU minutes, one line per run
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402  (the experiment's own stages)

import jaxlab  # noqa: E402
from jaxlab.data.persona import PersonaLanguage  # noqa: E402
from jaxlab.nn import lora  # noqa: E402
from jaxlab.nn.transformer import Transformer, TransformerConfig  # noqa: E402

ALL = ["attn/(q|k|v|o)$", "mlp/(up|down)$"]
WRITERS = ["attn/o$", "mlp/down$"]
READERS = ["attn/(q|k|v)$", "mlp/up$"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    seed = ap.parse_args(argv).seed
    cfg = R.load_config()
    for k, v in cfg["quick"].items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    lang = PersonaLanguage(**cfg["lang"])
    model = Transformer(TransformerConfig(vocab=lang.vocab, max_len=lang.seq_len, **cfg["model"]))
    t0 = time.time()
    base, _ = R.pretrain(model, lang, cfg, seed)
    gt = R.ground_truth_direction(model, lang, base)
    u_oracle = np.linalg.qr(gt[1:].T)[0]

    def show(name, params):
        e = R.evaluate(model, lang, lora.merge(params))
        print(f"{name:62s} drift {100 * e['drift']:5.1f}  task {100 * e['task']:5.1f}  "
              f"tagged-BAD {100 * e['tagged_bad']:5.1f}  tagged-GOOD {100 * e['tagged_good']:5.1f}", flush=True)

    def variant(targets, rank=None):
        c = copy.deepcopy(cfg)
        c["finetune"]["targets"] = targets
        if rank is not None:
            c["finetune"]["rank"] = rank
        return c

    def identified(naive, k):
        res = jaxlab.identify_spurious_subspace(naive, k=k)
        u = np.asarray(res.U)
        along = ", ".join(f"{np.linalg.norm(u.T @ g):.2f}" for g in gt[1:])
        return u, f"k={k} (|P_U gt| {along}; gap {res.eigengap:.2f})"

    for label, targets in (("all", ALL), ("writers only", WRITERS), ("readers only", READERS)):
        c = variant(targets)
        naive = R.finetune(model, lang, c, base, seed)
        show(f"[{label}] naive", naive)
        show(f"[{label}] GRASP, oracle U", R.finetune(model, lang, c, base, seed, mode="grasp", U=u_oracle))
        for k in (1, 2, 4):
            u, what = identified(naive, k)
            show(f"[{label}] GRASP, identified {what}", R.finetune(model, lang, c, base, seed, mode="grasp", U=u))
    naive4 = R.finetune(model, lang, variant(ALL, rank=4), base, seed)
    show("[all, rank 4] naive", naive4)
    for k in (1, 2, 4):
        u, what = identified(naive4, k)
        show(f"[rank-4 identification -> rank-1 GRASP] {what}",
             R.finetune(model, lang, cfg, base, seed, mode="grasp", U=u))
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
