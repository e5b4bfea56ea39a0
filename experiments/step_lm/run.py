"""STEP vs ASP / STE / SR-STE vs dense on a byte-level LM over the CPython standard library's sources.

A small decoder-only transformer (:class:`jaxlab.nn.Transformer`) is trained with Adam(W) on the
byte corpus of :func:`jaxlab.data.load_stdlib_corpus` under the same token budget for every method
and N:M ratio (2:4, 1:4, 1:8); seeds are trained together with ``vmap``. The paper's claim tested:
under Adam, SR-STE/ASP fall behind dense and further with sparsity, STEP closes most of the gap.

    jaxlab reproduce step_lm [--quick] [--seeds K] [--out DIR]
    python experiments/step_lm/run.py --quick

Writes ``DIR/results.json``, ``DIR/report.md`` (validation bits/byte mean +- std, STEP's switch
step, deployed hard-pruned loss) and ``DIR/z_trace.png``, ``DIR/bpb_vs_sparsity.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from jaxlab.data.text import eval_windows, load_stdlib_corpus, random_windows
from jaxlab.nm import nm_leaf_axes, nm_mask
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.transforms import (
    asp_adamw,
    prune,
    sparse_forward_params,
    sr_ste_adamw,
    ste_adamw,
    step_adamw,
    step_statistics,
)
from jaxlab.transforms._tree import map_leaves, path_filter

HERE = Path(__file__).resolve().parent
METHODS = ("dense", "asp", "ste", "sr_ste", "step")
LN2 = math.log(2.0)


def load_config(quick: bool) -> dict:
    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    quick_over = cfg.pop("quick", {})
    if quick:
        for section, vals in quick_over.items():
            cfg[section].update(vals) if isinstance(vals, dict) else cfg.__setitem__(section, vals)
    return cfg


def sparsify_filter(cfg):
    return path_filter(cfg["sparsify_regex"])


def make_tx(method: str, n: int, m: int, cfg: dict):
    o, steps = cfg["optim"], cfg["train"]["steps"]
    lr = optax.warmup_cosine_decay_schedule(0.0, o["lr"], o["warmup"], steps, o["lr"] * o["final_lr_frac"])
    adam = dict(b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"])
    sp = dict(n=n, m=m, sparsify=sparsify_filter(cfg))
    if method == "dense":
        return optax.adamw(lr, **adam)
    if method == "asp":
        return asp_adamw(lr, prune_step=max(1, int(cfg["asp"]["prune_frac"] * steps)), **adam, **sp)
    if method == "ste":
        return ste_adamw(lr, **adam, **sp)
    if method == "sr_ste":
        return sr_ste_adamw(lr, sr_ste_lambda=cfg["sr_ste_lambda"], **adam, **sp)
    if method == "step":
        s = cfg["step"]
        return step_adamw(
            lr, switch_eps=s["switch_eps"], t_min=int(s["t_min_frac"] * steps), t_max=int(s["t_max_frac"] * steps),
            window=s.get("window"), sr_ste_lambda=cfg["sr_ste_lambda"], **adam, **sp,
        )
    raise ValueError(f"unknown method {method!r}")


def oneshot_prune(params, n, m, cfg):
    """Magnitude N:M pruning of the same leaves (for the dense model's 'prune without training' row)."""
    axes = nm_leaf_axes(params, m, sparsify=sparsify_filter(cfg), n=n)
    return map_leaves(lambda p, a, w: w if a is None else w * nm_mask(w, n, m, a), axes, params)


def run_setting(method, n, m, cfg, data, seeds, model, pbar=None):
    """Train ``seeds`` models (vmapped) for one method/ratio; return per-seed metrics and traces."""
    tr = cfg["train"]
    steps, chunk = tr["steps"], tr["chunk"]
    tx = make_tx(method, n, m, cfg)
    forward = (lambda p, s: p) if method == "dense" else sparse_forward_params
    train_data = jnp.asarray(data["train"])
    dummy = jnp.zeros((1, tr["seq_len"]), jnp.int32)

    def init(key):
        params = nn.meta.unbox(model.init(key, dummy)["params"])
        return params, tx.init(params)

    def loss_at(params, batch):
        return causal_lm_loss(model.apply({"params": params}, batch), batch)

    def one_step(carry, key):
        params, opt = carry
        batch = random_windows(train_data, key, tr["batch"], tr["seq_len"])
        loss, g = jax.value_and_grad(lambda p: loss_at(forward(p, opt), batch))(params)
        u, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, u)
        if method == "step":
            st = step_statistics(opt)
            z, phase = st["z"], st["phase"]
        else:
            z, phase = jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)
        return (params, opt), (loss, z, phase)

    @jax.jit
    def run_chunk(carry, keys):  # keys: (seeds, chunk, 2)
        return jax.vmap(lambda c, k: jax.lax.scan(one_step, c, k))(carry, keys)

    val = jnp.asarray(data["val_windows"])

    @jax.jit
    def evaluate(params, opt):
        def one(p, s):
            deployed = p if method == "dense" else prune(p, s)
            oneshot = {
                f"{a}:{b}": loss_at(oneshot_prune(p, a, b, cfg), val) / LN2 for a, b in cfg["ratios"]
            } if method == "dense" else {}
            return loss_at(forward(p, s), val) / LN2, loss_at(deployed, val) / LN2, oneshot
        return jax.vmap(one)(params, opt)

    seed_keys = jnp.stack([jax.random.PRNGKey(s) for s in range(seeds)])
    carry = jax.jit(jax.vmap(init))(seed_keys)
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 1), steps))(seed_keys)
    losses, zs, phases = [], [], []
    t0 = time.perf_counter()
    for c0 in range(0, steps, chunk):
        carry, (loss, z, phase) = run_chunk(carry, step_keys[:, c0 : c0 + chunk])
        losses.append(np.asarray(loss))
        zs.append(np.asarray(z))
        phases.append(np.asarray(phase))
        if pbar is not None:
            pbar.update(min(chunk, steps - c0))
            pbar.set_postfix_str(f"{method} {n}:{m} loss {float(np.mean(loss[:, -1])):.3f}", refresh=False)
    train_s = time.perf_counter() - t0
    fwd_bpb, deployed_bpb, oneshot = evaluate(*carry)
    losses, zs, phases = (np.concatenate(x, axis=1) for x in (losses, zs, phases))
    switch = [int(np.argmax(p > 0)) + 1 if p.any() else -1 for p in phases]  # 1-based step T0
    return {
        "method": method, "n": n, "m": m, "seeds": seeds,
        "val_bpb": np.asarray(fwd_bpb).tolist(), "deployed_bpb": np.asarray(deployed_bpb).tolist(),
        "oneshot_bpb_by_ratio": {k: np.asarray(v).tolist() for k, v in oneshot.items()} or None,
        "final_train_bpb": (losses[:, -50:].mean(1) / LN2).tolist(),
        "switch_step": switch if method == "step" else None,
        "z_trace": zs[0].tolist() if method == "step" else None,
        "train_seconds": train_s,
    }


def _ms(xs) -> str:
    xs = np.asarray(xs, np.float64)
    return f"{xs.mean():.4f} ± {xs.std(ddof=1) if xs.size > 1 else 0.0:.4f}"


def write_report(out: Path, results: list[dict], cfg: dict, corpus_summary: dict, argv_str: str) -> str:
    from jaxlab.training.report import markdown_table

    dense = next((r for r in results if r["method"] == "dense"), None)
    if dense is None:
        raise ValueError("the report needs the dense run (include 'dense' in --methods)")
    rows = [["dense", "—", _ms(dense["val_bpb"]), "(dense)", "—", "—"]]
    for r in results:
        if r["method"] == "dense":
            continue
        gap = np.mean(r["val_bpb"]) - np.mean(dense["val_bpb"])
        sw = "—" if r["switch_step"] is None else ", ".join(str(s) for s in r["switch_step"])
        rows.append([r["method"], f"{r['n']}:{r['m']}", _ms(r["val_bpb"]), _ms(r["deployed_bpb"]), f"{gap:+.4f}", sw])
    oneshot = [[f"{n}:{m}", _ms(dense["oneshot_bpb_by_ratio"][f"{n}:{m}"])] for n, m in cfg["ratios"]]
    tr = cfg["train"]
    lines = [
        "# step_lm: N:M sparse training of a byte-level LM (CPython stdlib sources)",
        "",
        f"Command: `{argv_str}`",
        "",
        f"Model: {cfg['model']}; batch {tr['batch']} x {tr['seq_len']} bytes, {tr['steps']} steps "
        f"({tr['batch'] * tr['seq_len'] * tr['steps']:,} training bytes per run), AdamW {cfg['optim']}; "
        f"N:M on `{cfg['sparsify_regex']}` (reduction axis 0).",
        f"Corpus: {corpus_summary}.",
        "",
        "Validation bits/byte (mean ± std over seeds; the forward each method trains with) and the",
        "deployed hard-pruned model's bits/byte (`jaxlab.prune`); gap = mean val bpb − dense.",
        "",
        markdown_table(["method", "N:M", "val bpb", "deployed (pruned) bpb", "gap vs dense", "STEP switch step"], rows),
        "",
    ]
    if oneshot:
        lines += ["Dense model pruned one-shot by magnitude, no fine-tuning (reference):", "",
                  markdown_table(["N:M", "bpb"], oneshot), ""]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    return text


def plot(out: Path, results: list[dict], cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    window = cfg["step"].get("window") or int(round(1.0 / (1.0 - cfg["optim"]["b2"])))
    for i, r in enumerate(x for x in results if x["method"] == "step"):
        t0 = r["switch_step"][0]
        z = np.asarray(r["z_trace"])[:t0]  # Z_t is only measured in phase 1 (t <= T0)
        t = np.arange(1, len(z) + 1)
        zbar = np.array([z[max(0, k - window + 1) : k + 1].mean() for k in range(len(z))])
        ax.semilogy(t, z, color=f"C{i}", lw=0.8, alpha=0.6, label=f"Z_t, {r['n']}:{r['m']} (seed 0)")
        ax.semilogy(t, zbar, color=f"C{i}", lw=2, label=f"Zbar_t (window {window})")
        ax.axvline(t0, color=f"C{i}", ls="--", lw=1)
        break  # phase 1 is dense AdamW: the trace is the same for every ratio (same seed and data)
    ax.axhline(cfg["step"]["switch_eps"], color="k", ls=":", lw=1, label="switch_eps")
    ax.set_xlabel("step t")
    ax.set_ylabel("mean |v_t - v_{t-1}| over N:M leaves")
    ax.set_title("STEP AutoSwitch statistic (dashed: switch step)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "z_trace.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ratios = [f"{n}:{m}" for n, m in cfg["ratios"]]
    x = np.arange(len(ratios))
    dense = next(r for r in results if r["method"] == "dense")
    ax.axhline(np.mean(dense["val_bpb"]), color="k", ls="--", label="dense")
    for j, meth in enumerate(m for m in METHODS if m != "dense"):
        rs = [next(r for r in results if r["method"] == meth and f"{r['n']}:{r['m']}" == k) for k in ratios]
        mean = [np.mean(r["val_bpb"]) for r in rs]
        std = [np.std(r["val_bpb"], ddof=1) if len(r["val_bpb"]) > 1 else 0 for r in rs]
        ax.errorbar(x + 0.06 * (j - 1.5), mean, yerr=std, marker="o", capsize=3, label=meth)
    ax.set_xticks(x, ratios)
    ax.set_xlabel("N:M")
    ax.set_ylabel("validation bits/byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bpb_vs_sparsity.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU-minutes variant")
    p.add_argument("--out", default="runs/step_lm")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default from config)")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    cfg = load_config(args.quick)
    seeds = args.seeds or cfg["seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg["data"]
    corpus = load_stdlib_corpus(max_train_bytes=d["train_bytes"], max_val_bytes=d["val_bytes"])
    data = {"train": corpus.train, "val_windows": eval_windows(corpus.val, cfg["train"]["seq_len"], d["val_windows"], spread=True)}
    model = Transformer(TransformerConfig(**cfg["model"], max_len=cfg["train"]["seq_len"]))
    methods = [x for x in args.methods.split(",") if x]
    settings = [("dense", 2, 4)] if "dense" in methods else []
    settings += [(meth, n, m) for n, m in cfg["ratios"] for meth in methods if meth != "dense"]
    results = []
    with tqdm(total=len(settings) * cfg["train"]["steps"], desc="step_lm", unit="step") as pbar:
        for meth, n, m in settings:
            results.append(run_setting(meth, n, m, cfg, data, seeds, model, pbar))
    argv_str = "jaxlab reproduce step_lm" + (" --quick" if args.quick else "") + (f" --seeds {args.seeds}" if args.seeds else "")
    payload = {"config": cfg, "corpus": corpus.summary(), "results": results, "command": argv_str}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    text = write_report(out, results, cfg, corpus.summary(), argv_str)
    if all(meth in methods for meth in METHODS):
        plot(out, results, cfg)
    print(text)
    return payload


if __name__ == "__main__":
    main()
