"""STEP vs ASP / STE / SR-STE vs dense on a byte-level LM over the CPython standard library's sources.

A small decoder-only transformer (:class:`jaxlab.nn.Transformer`) is trained with Adam(W) on the
byte corpus of :func:`jaxlab.data.load_stdlib_corpus` under the same token budget for every method
and N:M ratio (2:4, 1:4, 1:8). Training, paired seeds (same init and batches for every method) and
statistics come from :mod:`jaxlab.training.experiment`, the optimizers from the method registry
("dense" is the registry's ``adamw``). The paper's claim tested: under Adam, SR-STE/ASP fall behind
dense and further with sparsity, STEP closes most of the gap.

    jaxlab reproduce step_lm [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE]
    jaxlab reproduce step_lm --set 'methods=[dense, sr_ste, step]'      # a subset of the rows

Writes ``DIR/results.json``, ``DIR/report.md`` (validation bits/byte mean ± sample std, paired
differences with 95 % intervals, STEP's switch step, deployed hard-pruned loss) and
``DIR/z_trace.png``, ``DIR/bpb_vs_sparsity.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.data.text import eval_windows, load_stdlib_corpus, random_windows
from jaxlab.nm import nm_leaf_axes, nm_mask
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.training.experiment import mean_std, paired_difference, run_training, setup, std_note
from jaxlab.training.methods import get_method, make_schedule
from jaxlab.training.nm_premise import nm_premise_probe, plot_premise, premise_summary, premise_table
from jaxlab.training.report import markdown_table
from jaxlab.transforms import map_leaves, path_filter, prune, step_statistics

LN2 = math.log(2.0)


def make_optimizer(label: str, n: int, m: int, cfg: dict):
    """``(method, tx)`` for one table row; "dense" is ``adamw``, the rest are registry names."""
    o, steps = cfg["optim"], cfg["train"]["steps"]
    schedule = make_schedule(o["lr"], schedule="cosine", warmup_steps=o["warmup"], total_steps=steps,
                             final_fraction=o["final_lr_frac"])
    extra: dict = {}
    if label in ("sr_ste", "step"):
        extra["sr_ste_lambda"] = cfg["sr_ste_lambda"]
    if label == "asp":
        extra["prune_step"] = max(1, int(cfg["asp"]["prune_frac"] * steps))
    if label == "step":  # t_min/t_max as fractions of the budget; every other key goes to step_adamw as is
        s = dict(cfg["step"])
        extra.update(t_min=int(s.pop("t_min_frac") * steps), t_max=int(s.pop("t_max_frac") * steps), **s)
    method = get_method("adamw" if label == "dense" else label)
    shared = dict(b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"],
                  n=n, m=m, sparsify=cfg["sparsify_regex"])  # a regex: the registry applies path_filter
    return method, method.make(schedule, common=shared, **extra)


def oneshot_prune(params, n, m, cfg):
    """Magnitude N:M pruning of the same leaves (for the dense model's 'prune without training' row)."""
    axes = nm_leaf_axes(params, m, sparsify=path_filter(cfg["sparsify_regex"]), n=n)
    return map_leaves(lambda path, ax, w: w * nm_mask(w, n, m, ax) if ax is not None else w, axes, params)


def run_setting(label, n, m, cfg, data, seeds, model) -> dict:
    """Train ``seeds`` paired models (vmapped) for one method/ratio; per-seed metrics and STEP's traces."""
    tr = cfg["train"]
    method, tx = make_optimizer(label, n, m, cfg)
    train_data, val = jnp.asarray(data["train"]), jnp.asarray(data["val_windows"])

    def nats(params, tokens):
        return causal_lm_loss(model.apply({"params": params}, tokens), tokens)

    def bits(params, tokens):
        return nats(params, tokens) / LN2

    premise = cfg.get("premise") or {}
    probe = None
    if label in (premise.get("methods") or []):  # STEP's premise: flip rate and v vs a dense shadow
        probe = nm_premise_probe(lambda p, batch, key: (nats(p, batch), {}), n=n, m=m, b2=cfg["optim"]["b2"],
                                 sparsify=cfg["sparsify_regex"], local_batches=premise.get("local_batches", 0),
                                 batch_fn=lambda key: random_windows(train_data, key, tr["batch"], tr["seq_len"]),
                                 forward_params_fn=method.forward_params_fn,
                                 shadow=premise.get("shadow", True))
    res = run_training(
        lambda p, batch, key: (nats(p, batch), {}),
        tx,
        lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, tr["seq_len"]), jnp.int32))["params"]),
        lambda key: random_windows(train_data, key, tr["batch"], tr["seq_len"]),
        steps=tr["steps"], seeds=seeds, chunk=tr["chunk"], desc=f"step_lm {label} {n}:{m}",
        forward_params_fn=method.forward_params_fn,
        record_fn=(lambda st: step_statistics(st.opt_state)) if label == "step" else None,
        probe=probe,
    )

    def one(p, s):
        if method.sparse:
            return bits(method.forward_params_fn(p, s), val), bits(prune(p, s), val), {}
        ref = bits(p, val)
        return ref, ref, {f"{a}:{b}": bits(oneshot_prune(p, a, b, cfg), val) for a, b in cfg["ratios"]}

    fwd, deployed, oneshot = jax.device_get(jax.jit(jax.vmap(one))(res.state.params, res.state.opt_state))
    trace = res.trace
    out = {
        "method": label, "n": n, "m": m, "seeds": int(np.size(fwd)),
        "val_bpb": fwd.tolist(), "deployed_bpb": deployed.tolist(),
        "oneshot_bpb_by_ratio": {k: v.tolist() for k, v in oneshot.items()} or None,
        "final_train_bpb": (trace["loss"][:, -50:].mean(1) / LN2).tolist(),
        "switch_step": None, "z_trace": None, "zbar_trace": None,
        "premise": premise_summary(trace, premise.get("every", 100)) if probe is not None else None,
        "train_seconds": res["seconds"],
    }
    if label == "step":  # T0 from the state's own record; Z_t / Zbar_t of seed 0
        out.update(switch_step=trace["switch_step"][:, -1].tolist(), z_trace=trace["z"][0].tolist(),
                   zbar_trace=trace["zbar"][0].tolist())
    return out


def write_report(exp, results: list[dict], cfg: dict, corpus_summary: dict) -> str:
    dense = next((r for r in results if r["method"] == "dense"), None)
    if dense is None:
        raise ValueError("the report needs the dense run: keep 'dense' in the config's methods")
    k, tr = exp.seeds, cfg["train"]
    ref = np.mean(dense["val_bpb"])
    rows = [["dense", "—", mean_std(dense["val_bpb"], digits=4), "(dense)", "—", "—"]]
    for r in results:
        if r is not dense:
            switch = "—" if r["switch_step"] is None else ", ".join(map(str, r["switch_step"]))
            rows.append([r["method"], f"{r['n']}:{r['m']}", mean_std(r["val_bpb"], digits=4),
                         mean_std(r["deployed_bpb"], digits=4), f"{np.mean(r['val_bpb']) - ref:+.4f}", switch])
    cell = {(r["method"], f"{r['n']}:{r['m']}"): r["val_bpb"] for r in results if r is not dense}
    ratios = [f"{n}:{m}" for n, m in cfg["ratios"]]
    contrasts = [(a, "dense") for a in cfg["methods"] if a != "dense"]
    if {"step", "sr_ste"} <= set(cfg["methods"]):
        contrasts.insert(0, ("step", "sr_ste"))
    closes = {"step", "sr_ste"} <= set(cfg["methods"])
    diff_rows = []
    for ratio in ratios:
        row = [ratio]
        for a, b in contrasts:
            other = dense["val_bpb"] if b == "dense" else cell[b, ratio]
            row.append(paired_difference(cell[a, ratio], other, digits=4)["text"])
        if closes:  # the claim's own quantity: the share of SR-STE's gap to dense that STEP closes, per seed
            sr, st, de = (np.asarray(x, np.float64) for x in (cell["sr_ste", ratio], cell["step", ratio], dense["val_bpb"]))
            row.append(paired_difference(100 * (sr - st) / (sr - de), np.zeros_like(sr), digits=1)["text"])
        diff_rows.append(row)
    lines = exp.header("step_lm: N:M sparse training of a byte-level LM (CPython stdlib sources)") + [
        f"Model: {cfg['model']}; batch {tr['batch']} x {tr['seq_len']} bytes, {tr['steps']} steps "
        f"({tr['batch'] * tr['seq_len'] * tr['steps']:,} training bytes per run), AdamW {cfg['optim']}; "
        f"N:M on `{cfg['sparsify_regex']}` (reduction axis 0); {k} paired seeds (same init and batches "
        "for every method).",
        f"Corpus: {corpus_summary}.",
        "",
        f"Validation bits/byte ({std_note(k)}; the forward each method trains with) and the deployed",
        "hard-pruned model's bits/byte (`jaxlab.prune`); gap = mean val bpb − mean dense val bpb.",
        "",
        markdown_table(["method", "N:M", "val bpb (mean ± std)", "deployed bpb (mean ± std)",
                        "gap vs dense", "STEP switch step (per seed)"], rows),
        "",
        f"Paired differences of validation bits/byte over {k} seeds (negative: the first method is better): "
        "mean [95 % t-interval].",
        "",
        markdown_table(["N:M"] + [f"{a} − {b} (paired 95 % CI)" for a, b in contrasts]
                       + (["% of SR-STE's gap to dense closed by STEP (per seed, 95 % CI)"] if closes else []),
                       diff_rows),
        "",
        f"Dense model pruned one-shot by magnitude, no fine-tuning (reference; {std_note(k)}):",
        "",
        markdown_table(["N:M", "bpb (mean ± std)"],
                       [[q, mean_std(dense["oneshot_bpb_by_ratio"][q], digits=4)] for q in ratios]),
    ]
    probed = {f"{r['method']} {r['n']}:{r['m']}": r["premise"] for r in results if r.get("premise")}
    if probed:
        every = (cfg.get("premise") or {}).get("every", 100)
        lines += ["", f"STEP's premise (`jaxlab.training.nm_premise`; {every}-step window means, then {std_note(k)}): "
                  "the N:M magnitude mask's flips per weight per step, and the optimizer's bias-corrected second "
                  "moment vs a shadow dense Adam second moment on the same trajectory (relative Frobenius "
                  "error, mean over the N:M leaves; mean |log ratio| per element). STEP's v is live (= the "
                  "shadow) before its switch and frozen after. With `premise.local_batches` = K, also the error of v "
                  "against the local reference r (the mean squared gradient the optimizer would receive at the "
                  "current weights, over K fresh batches) on the kept weights, after every chunk; the dense row "
                  "(its own v against its own r) is the floor that sampling noise and an EMA's lag set.", "",
                  markdown_table(*premise_table(probed))]
    return "\n".join(lines)


def plot(out: Path, results: list[dict], cfg: dict) -> None:
    """``z_trace.png`` (STEP's Z_t, Zbar_t and switch, seed 0) and ``bpb_vs_sparsity.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, ax, name, xlabel, ylabel):
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

    step = next((r for r in results if r["method"] == "step"), None)
    if step is not None:  # phase 1 is dense AdamW: the trace is the same for every ratio (same seed and data)
        t0 = step["switch_step"][0]  # Z_t is only measured in phase 1 (t <= T0)
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for key, style in (("z_trace", dict(lw=0.8, alpha=0.6, label="Z_t (seed 0)")),
                           ("zbar_trace", dict(lw=2, label="Zbar_t (ring-buffer mean)"))):
            ax.semilogy(np.arange(1, t0 + 1), step[key][:t0], color="C0", **style)
        ax.axvline(t0, color="C0", ls="--", lw=1)
        ax.axhline(cfg["step"].get("switch_eps") or cfg["optim"]["eps"], color="k", ls=":", lw=1, label="switch_eps")
        ax.set_title("STEP AutoSwitch statistic (dashed: switch step)")
        save(fig, ax, "z_trace.png", "step t", "mean |v_t - v_{t-1}| over N:M leaves")

    probed = [r for r in results if r.get("premise")]
    if probed:
        plot_premise(out / "premise.png", {f"{r['method']} {r['n']}:{r['m']}": r["premise"] for r in probed},
                     {f"{r['method']} {r['n']}:{r['m']}": r["switch_step"] for r in probed},
                     title="STEP's premise: mask flips and the second moment (mean over seeds, "
                           "band: min..max; dotted: STEP's switch)")

    ratios = [f"{n}:{m}" for n, m in cfg["ratios"]]
    cells = {(r["method"], f"{r['n']}:{r['m']}"): np.asarray(r["val_bpb"]) for r in results}
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axhline(cells["dense", "2:4"].mean(), color="k", ls="--", label="dense")
    for j, meth in enumerate(x for x in cfg["methods"] if x != "dense"):
        got = [cells[meth, q] for q in ratios]
        sd = [v.std(ddof=1) if v.size > 1 else 0.0 for v in got]
        ax.errorbar(np.arange(len(ratios)) + 0.06 * (j - 1.5), [v.mean() for v in got], yerr=sd,
                    marker="o", capsize=3, label=meth)
    ax.set_xticks(np.arange(len(ratios)), ratios)
    save(fig, ax, "bpb_vs_sparsity.png", "N:M", "validation bits/byte (bars: sample std)")


def main(argv=None) -> dict:
    exp = setup(__file__, argv, description=__doc__)
    cfg, d = exp.cfg, exp.cfg["data"]
    corpus = load_stdlib_corpus(max_train_bytes=d["train_bytes"], max_val_bytes=d["val_bytes"])
    data = {"train": corpus.train,
            "val_windows": eval_windows(corpus.val, cfg["train"]["seq_len"], d["val_windows"], spread=True)}
    model = Transformer(TransformerConfig(**cfg["model"], max_len=cfg["train"]["seq_len"]))
    methods = cfg["methods"]
    settings = [("dense", 2, 4)] if "dense" in methods else []
    settings += [(meth, n, m) for n, m in cfg["ratios"] for meth in methods if meth != "dense"]
    results = [run_setting(meth, n, m, cfg, data, exp.seeds, model) for meth, n, m in settings]
    payload = exp.write(write_report(exp, results, cfg, corpus.summary()),
                        {"corpus": corpus.summary(), "results": results})
    plot(exp.out, results, cfg)
    return payload


if __name__ == "__main__":
    main()
