"""Fast check of the N:M optimizers: an MLP on scikit-learn's digits (8x8 images, 10 classes).

Same grid as ``step_lm`` (dense / ASP / STE / SR-STE / STEP at 2:4, 1:4, 1:8, seeds vmapped, same
number of Adam steps for all), but a classifier that trains in seconds. Reports test accuracy and
cross-entropy (mean +- std over seeds), STEP's switch step, and the deployed hard-pruned model.

    jaxlab reproduce step_digits [--quick] [--seeds K] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from jaxlab.nm import nm_leaf_axes, nm_mask
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


class MLP(nn.Module):
    """``x -> [Dense(h) -> relu] * depth -> Dense(10)``; hidden kernels ``(d_in, d_out)`` are N:M targets."""

    hidden: int = 256
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = jax.nn.relu(nn.Dense(self.hidden, name=f"hidden_{i}")(x))
        return nn.Dense(10, name="head")(x)


def load_config(quick: bool) -> dict:
    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    for section, vals in cfg.pop("quick", {}).items() if quick else ():
        cfg[section].update(vals)
    return cfg


def load_digits_split(test_fraction: float, split_seed: int):
    """Standardised digits features with a fixed stratified split (``sklearn.model_selection``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    return (xtr - mu) / sd, ytr.astype(np.int32), (xte - mu) / sd, yte.astype(np.int32)


def make_tx(method, n, m, cfg):
    o, steps = cfg["optim"], cfg["train"]["steps"]
    lr = optax.cosine_decay_schedule(o["lr"], steps, o["final_lr_frac"])
    adam = dict(b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"])
    sp = dict(n=n, m=m, sparsify=path_filter(cfg["sparsify_regex"]))
    if method == "dense":
        return optax.adamw(lr, **adam)
    if method == "asp":
        return asp_adamw(lr, prune_step=max(1, int(cfg["asp"]["prune_frac"] * steps)), **adam, **sp)
    if method == "ste":
        return ste_adamw(lr, **adam, **sp)
    if method == "sr_ste":
        return sr_ste_adamw(lr, sr_ste_lambda=cfg["sr_ste_lambda"], **adam, **sp)
    s = cfg["step"]
    return step_adamw(
        lr, switch_eps=s["switch_eps"], t_min=int(s["t_min_frac"] * steps), t_max=int(s["t_max_frac"] * steps),
        window=s.get("window"), sr_ste_lambda=cfg["sr_ste_lambda"], **adam, **sp,
    )


def run_setting(method, n, m, cfg, data, seeds, pbar=None):
    tr = cfg["train"]
    model = MLP(**cfg["model"])
    tx = make_tx(method, n, m, cfg)
    forward = (lambda p, s: p) if method == "dense" else sparse_forward_params
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in data)

    def ce(params, x, y):
        logits = model.apply({"params": params}, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), jnp.mean(logits.argmax(-1) == y)

    def init(key):
        params = model.init(key, xtr[:1])["params"]
        return params, tx.init(params)

    def one_step(carry, key):
        params, opt = carry
        idx = jax.random.randint(key, (tr["batch"],), 0, xtr.shape[0])
        loss, g = jax.value_and_grad(lambda p: ce(forward(p, opt), xtr[idx], ytr[idx])[0])(params)
        u, opt = tx.update(g, opt, params)
        z = step_statistics(opt)["z"] if method == "step" else jnp.zeros([], jnp.float32)
        ph = step_statistics(opt)["phase"] if method == "step" else jnp.zeros([], jnp.int32)
        return (optax.apply_updates(params, u), opt), (loss, z, ph)

    @jax.jit
    def train(keys):
        carry = jax.vmap(init)(keys[:, 0])
        return jax.vmap(lambda c, k: jax.lax.scan(one_step, c, k))(carry, keys[:, 1:])

    @jax.jit
    def evaluate(params, opt):
        def one(p, s):
            deployed = p if method == "dense" else prune(p, s)
            oneshot = {}
            if method == "dense":
                for a, b in cfg["ratios"]:
                    axes = nm_leaf_axes(p, b, sparsify=path_filter(cfg["sparsify_regex"]), n=a)
                    q = map_leaves(lambda _, ax, w, a=a, b=b: w if ax is None else w * nm_mask(w, a, b, ax), axes, p)
                    oneshot[f"{a}:{b}"] = ce(q, xte, yte)[1]
            return ce(forward(p, s), xte, yte), ce(deployed, xte, yte), oneshot
        return jax.vmap(one)(params, opt)

    keys = jnp.stack([jax.random.split(jax.random.PRNGKey(100 + s), tr["steps"] + 1) for s in range(seeds)])
    t0 = time.perf_counter()
    (params, opt), (loss, z, ph) = train(keys)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    (te_loss, te_acc), (dep_loss, dep_acc), oneshot = evaluate(params, opt)
    if pbar is not None:
        pbar.update(1)
        pbar.set_postfix_str(f"{method} {n}:{m} acc {float(np.mean(te_acc)):.3f}", refresh=False)
    ph = np.asarray(ph)
    return {
        "method": method, "n": n, "m": m, "seeds": seeds,
        "test_acc": np.asarray(te_acc).tolist(), "test_loss": np.asarray(te_loss).tolist(),
        "deployed_acc": np.asarray(dep_acc).tolist(), "deployed_loss": np.asarray(dep_loss).tolist(),
        "oneshot_acc_by_ratio": {k: np.asarray(v).tolist() for k, v in oneshot.items()} or None,
        "switch_step": [int(np.argmax(p > 0)) + 1 if p.any() else -1 for p in ph] if method == "step" else None,
        "z_trace": np.asarray(z)[0].tolist() if method == "step" else None,
        "seconds": seconds,
    }


def _ms(xs, scale=1.0, digits=2) -> str:
    xs = np.asarray(xs, np.float64) * scale
    sd = xs.std(ddof=1) if xs.size > 1 else 0.0
    return f"{xs.mean():.{digits}f} ± {sd:.{digits}f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/step_digits")
    p.add_argument("--seeds", type=int, default=None)
    args = p.parse_args(argv)
    cfg = load_config(args.quick)
    seeds = args.seeds or cfg["seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(cfg["data"]["test_fraction"], cfg["data"]["split_seed"])
    settings = [("dense", 2, 4)] + [(meth, n, m) for n, m in cfg["ratios"] for meth in METHODS[1:]]
    results = []
    with tqdm(total=len(settings), desc="step_digits", unit="setting") as pbar:
        for meth, n, m in settings:
            results.append(run_setting(meth, n, m, cfg, data, seeds, pbar))
    command = "jaxlab reproduce step_digits" + (" --quick" if args.quick else "") + (f" --seeds {args.seeds}" if args.seeds else "")
    from jaxlab.training.report import markdown_table

    dense = results[0]
    rows = [["dense", "—", _ms(dense["test_acc"], 100), _ms(dense["test_loss"], 1, 3), "(dense)", "—"]]
    for r in results[1:]:
        sw = "—" if r["switch_step"] is None else ", ".join(map(str, r["switch_step"]))
        rows.append([r["method"], f"{r['n']}:{r['m']}", _ms(r["test_acc"], 100), _ms(r["test_loss"], 1, 3),
                     _ms(r["deployed_acc"], 100), sw])
    oneshot = [[f"{n}:{m}", _ms(dense["oneshot_acc_by_ratio"][f"{n}:{m}"], 100)] for n, m in cfg["ratios"]]
    tr = cfg["train"]
    text = "\n".join([
        "# step_digits: N:M sparse training of an MLP on scikit-learn digits",
        "",
        f"Command: `{command}`",
        "",
        f"MLP {cfg['model']}, {tr['steps']} Adam steps of batch {tr['batch']}, {seeds} seeds; N:M on "
        f"`{cfg['sparsify_regex']}`; test split {cfg['data']['test_fraction']} (seed {cfg['data']['split_seed']}).",
        "",
        markdown_table(["method", "N:M", "test acc %", "test CE", "deployed (pruned) acc %", "STEP switch step"], rows),
        "",
        "Dense model pruned one-shot by magnitude, no fine-tuning:",
        "",
        markdown_table(["N:M", "test acc %"], oneshot),
        "",
    ])
    (out / "report.md").write_text(text)
    payload = {"config": cfg, "results": results, "command": command}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    _plot(out, results, cfg)
    print(text)
    return payload


def _plot(out: Path, results, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    window = cfg["step"].get("window") or int(round(1.0 / (1.0 - cfg["optim"]["b2"])))
    for i, r in enumerate(x for x in results if x["method"] == "step"):
        t0 = r["switch_step"][0]
        z = np.asarray(r["z_trace"])[:t0]  # measured in phase 1 only; identical across ratios
        t = np.arange(1, len(z) + 1)
        zbar = np.array([z[max(0, k - window + 1) : k + 1].mean() for k in range(len(z))])
        ax.semilogy(t, z, color=f"C{i}", lw=0.8, alpha=0.6, label="Z_t")
        ax.semilogy(t, zbar, color=f"C{i}", lw=2, label=f"Zbar_t (window {window})")
        ax.axvline(t0, color=f"C{i}", ls="--", lw=1)
        break
    ax.axhline(cfg["step"]["switch_eps"], color="k", ls=":", lw=1, label="switch_eps")
    ax.set_xlabel("step t")
    ax.set_ylabel("Z_t")
    ax.set_title("STEP Z_t (seed 0; dashed: switch)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ratios = [f"{n}:{m}" for n, m in cfg["ratios"]]
    x = np.arange(len(ratios))
    ax.axhline(100 * np.mean(results[0]["test_acc"]), color="k", ls="--", label="dense")
    for j, meth in enumerate(METHODS[1:]):
        rs = [next(r for r in results if r["method"] == meth and f"{r['n']}:{r['m']}" == k) for k in ratios]
        ax.errorbar(x + 0.06 * (j - 1.5), [100 * np.mean(r["test_acc"]) for r in rs],
                    yerr=[100 * np.std(r["test_acc"], ddof=1) if len(r["test_acc"]) > 1 else 0 for r in rs],
                    marker="o", capsize=3, label=meth)
    ax.set_xticks(x, ratios)
    ax.set_ylabel("test accuracy %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "digits.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
