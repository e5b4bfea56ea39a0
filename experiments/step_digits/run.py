"""Fast check of the N:M optimizers: an MLP or a small conv net on scikit-learn's digits (8x8, 10 classes).

Same grid as ``step_lm`` (dense / ASP / STE / SR-STE / STEP at 2:4, 1:4, 1:8, the same number of Adam
steps for all, paired seeds vmapped) on a classifier that trains in seconds. Training, seeds and
statistics come from :mod:`jaxlab.training.experiment`, the optimizers from the method registry
("dense" is the registry's ``adamw``). Reports test accuracy and cross-entropy (mean ± sample std),
paired differences (STEP − SR-STE, each sparse method − dense, 95 % t-intervals), STEP's switch
step, the deployed hard-pruned model and the dense model pruned one-shot.

    jaxlab reproduce step_digits [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE]
    jaxlab reproduce step_digits --overlay experiments/step_digits/conv_v2.yaml   # the conv net, b2 = 0.999
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.nm import nm_leaf_axes, nm_mask
from jaxlab.training.experiment import (
    markdown_table,
    mean_std,
    paired_difference,
    run_training,
    setup,
    std_note,
)
from jaxlab.training.methods import get_method, make_schedule
from jaxlab.training.nm_premise import nm_premise_probe, plot_premise, premise_summary, premise_table
from jaxlab.transforms import map_leaves, path_filter, prune, step_statistics


class MLP(nn.Module):
    """``x -> [Dense(h) -> relu] * depth -> Dense(10)``; hidden kernels ``(d_in, d_out)`` are N:M targets."""

    hidden: int = 256
    depth: int = 2

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = jax.nn.relu(nn.Dense(self.hidden, name=f"hidden_{i}")(x))
        return nn.Dense(10, name="head")(x)


class Conv3x3(nn.Module):
    """A 3x3 'SAME' convolution with a Flax ``Conv`` kernel ``(3, 3, c_in, c_out)``, computed as one matmul.

    The nine shifted copies of the zero-padded input are stacked along the channels (``[dy, dx, c]``
    order, the kernel's own) and multiplied by the kernel reshaped to ``(9 c_in, c_out)``: the same
    function as ``nn.Conv(c_out, (3, 3))``, but XLA:CPU runs these tiny 8x8 convolutions and their
    gradients (and their ``vmap`` over seeds) about 4x faster as matmuls than as convolutions (measured).
    """

    features: int

    @nn.compact
    def __call__(self, x):
        c_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        h, w = x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate([xp[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=-1)
        return patches @ kernel.reshape(9 * c_in, self.features) + bias


class ConvNet(nn.Module):
    """``8x8x1 -> [Conv3x3(c) -> relu] per channel count -> avg-pool 2 -> Dense(hidden) -> relu -> Dense(10)``.

    Conv kernels are HWIO ``(3, 3, c_in, c_out)``: N:M groups run along ``c_in`` (axis 2, the input
    channels; :func:`jaxlab.nm.reduction_axis` reads the ``conv`` in the module name), so the first conv
    (``c_in = 1``) stays dense; the hidden ``Dense`` kernel groups along its input features.
    """

    channels: tuple = (8, 16)
    hidden: int = 64

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        for i, c in enumerate(self.channels):
            x = jax.nn.relu(Conv3x3(c, name=f"conv_{i}")(x))
        x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        x = jax.nn.relu(nn.Dense(self.hidden, name="hidden")(x))
        return nn.Dense(10, name="head")(x)


def build_model(spec: dict) -> nn.Module:
    """``spec["kind"]`` picks ``spec["mlp"]`` (:class:`MLP` fields) or ``spec["conv"]`` (:class:`ConvNet` fields)."""
    kind = spec.get("kind", "mlp")
    if kind == "mlp":
        return MLP(**spec.get("mlp", {}))
    if kind == "conv":
        conv = dict(spec.get("conv", {}))
        return ConvNet(channels=tuple(conv.pop("channels", (8, 16))), **conv)
    raise ValueError(f"step_digits: model.kind must be 'mlp' or 'conv', got {kind!r}")


def load_digits_split(test_fraction: float, split_seed: int):
    """Standardised digits features with a fixed stratified split (``sklearn.model_selection``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-3
    return (xtr - mu) / sd, ytr.astype(np.int32), (xte - mu) / sd, yte.astype(np.int32)


def one_shot(params, n: int, m: int, pattern: str):
    """Magnitude N:M mask on the leaves whose slash path matches ``pattern`` (a dense model, no fine-tuning)."""
    axes = nm_leaf_axes(params, m, sparsify=path_filter(pattern), n=n)
    return map_leaves(lambda _, ax, w: w if ax is None else w * nm_mask(w, n, m, ax), axes, params)


def optimizer(label: str, n: int, m: int, cfg: dict):
    """The registry method behind a table row and its optimizer (``dense`` = ``adamw``)."""
    o, steps, st = cfg["optim"], cfg["train"]["steps"], cfg["step"]
    lr = make_schedule(o["lr"], schedule="cosine", total_steps=steps, final_fraction=o["final_lr_frac"])
    hyper = {
        "asp": {"prune_step": max(1, int(cfg["asp"]["prune_frac"] * steps))},
        "sr_ste": {"sr_ste_lambda": cfg["sr_ste_lambda"]},
        # t_min/t_max as fractions of the budget; every other step key goes to step_adamw as is
        "step": {**{k: v for k, v in st.items() if not k.endswith("_frac")}, "t_min": int(st["t_min_frac"] * steps),
                 "t_max": int(st["t_max_frac"] * steps), "sr_ste_lambda": cfg["sr_ste_lambda"]},
    }.get(label, {})
    common = {k: o[k] for k in ("b1", "b2", "eps", "weight_decay")}
    common.update(n=n, m=m, sparsify=cfg["sparsify_regex"])  # the registry turns the regex into path_filter
    method = get_method("adamw" if label == "dense" else label)
    return method, method.make(lr, common=common, **hyper)


def run_setting(label, n, m, cfg, model, data, seeds) -> dict:
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in data)
    method, tx = optimizer(label, n, m, cfg)

    def scores(params, x, y):
        logits = model.apply({"params": params}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(ce), jnp.mean(logits.argmax(-1) == y)

    def loss_fn(params, batch, key):
        loss, acc = scores(params, *batch)
        return loss, {"acc": acc}

    def batch_fn(key):
        idx = jax.random.randint(key, (cfg["train"]["batch"],), 0, xtr.shape[0])
        return xtr[idx], ytr[idx]

    premise = cfg.get("premise") or {}
    probe = None
    if label in (premise.get("methods") or []):  # STEP's premise: flip rate and v vs a dense shadow
        probe = nm_premise_probe(loss_fn, n=n, m=m, b2=cfg["optim"]["b2"], sparsify=cfg["sparsify_regex"],
                                 local_batches=premise.get("local_batches", 0), batch_fn=batch_fn,
                                 forward_params_fn=method.forward_params_fn,
                                 shadow=premise.get("shadow", True))
    res = run_training(
        loss_fn, tx, lambda key: model.init(key, xtr[:1])["params"], batch_fn,
        steps=cfg["train"]["steps"], seeds=seeds, forward_params_fn=method.forward_params_fn,
        record_fn=(lambda st: step_statistics(st.opt_state)) if label == "step" else None,
        probe=probe, desc=f"{label} {n}:{m}",
    )

    @jax.jit
    @jax.vmap
    def evaluate(p, s):
        if not method.sparse:
            rx = cfg["sparsify_regex"]
            shot = {f"{a}:{b}": scores(one_shot(p, a, b, rx), xte, yte)[1] for a, b in cfg["ratios"]}
            return scores(p, xte, yte), scores(p, xte, yte), shot
        return scores(method.forward_params_fn(p, s), xte, yte), scores(prune(p, s), xte, yte), {}

    scored = jax.device_get(evaluate(res.state.params, res.state.opt_state))
    (te_loss, te_acc), (dep_loss, dep_acc), shot = scored
    tr = res.trace
    return {
        "method": label, "n": n, "m": m, "seeds": len(te_acc),
        "test_acc": te_acc.tolist(), "test_loss": te_loss.tolist(),
        "deployed_acc": dep_acc.tolist(), "deployed_loss": dep_loss.tolist(),
        "oneshot_acc_by_ratio": {k: v.tolist() for k, v in shot.items()} or None,
        "switch_step": tr["switch_step"][:, -1].tolist() if label == "step" else None,
        "z_trace": tr["z"][0].tolist() if label == "step" else None,
        "zbar_trace": tr["zbar"][0].tolist() if label == "step" else None,
        "premise": premise_summary(tr, premise.get("every", 100)) if probe is not None else None,
        "seconds": res["seconds"],
    }


def report(exp, results: list[dict], cfg: dict) -> str:
    k, tr = exp.seeds, cfg["train"]
    by = {(r["method"], r["n"], r["m"]): r for r in results}
    dense = next(r for r in results if r["method"] == "dense")
    sparse = [x for x in cfg["methods"] if x != "dense"]
    rows = [["dense", "—", mean_std(dense["test_acc"], 100), mean_std(dense["test_loss"], 1, 3), "(dense)",
             "—"]]
    for r in results:
        if r is not dense:
            sw = "—" if r["switch_step"] is None else ", ".join(map(str, r["switch_step"]))
            rows.append([r["method"], f"{r['n']}:{r['m']}", mean_std(r["test_acc"], 100),
                         mean_std(r["test_loss"], 1, 3), mean_std(r["deployed_acc"], 100), sw])
    pairs = [(x, "dense") for x in sparse]
    if {"step", "sr_ste"} <= set(sparse):
        pairs.insert(0, ("step", "sr_ste"))

    def acc(meth, n, m):
        return (dense if meth == "dense" else by[meth, n, m])["test_acc"]

    paired = [[f"{n}:{m}"] + [paired_difference(acc(a, n, m), acc(b, n, m), 100, 2)["text"] for a, b in pairs]
              for n, m in cfg["ratios"]]
    shot = [[f"{n}:{m}", mean_std(dense["oneshot_acc_by_ratio"][f"{n}:{m}"], 100)] for n, m in cfg["ratios"]]
    probed = {f"{r['method']} {r['n']}:{r['m']}": r["premise"] for r in results if r.get("premise")}
    premise_lines = [] if not probed else [
        "", f"STEP's premise (`jaxlab.training.nm_premise`; window means, then {std_note(k)}): mask flips per "
        "weight per step, and the optimizer's bias-corrected v vs a shadow dense Adam v on the same trajectory; "
        "with `premise.local_batches` = K, v vs the local reference r (the mean squared gradient the optimizer "
        "would receive at the current weights over K fresh batches, kept weights; the dense row is the floor).",
        "", markdown_table(*premise_table(probed))]
    kind = cfg["model"].get("kind", "mlp")
    return "\n".join(exp.header(f"step_digits: N:M sparse training of a{'n MLP' if kind == 'mlp' else ' conv net'} "
                                 "on scikit-learn digits") + [
        f"Model {kind} {cfg['model'].get(kind, {})}, b2 = {cfg['optim']['b2']}, {tr['steps']} Adam steps of batch {tr['batch']}, {k} paired seeds (same init "
        f"and batches for every method); N:M on `{cfg['sparsify_regex']}`; test split "
        f"{cfg['data']['test_fraction']} (seed {cfg['data']['split_seed']}).",
        "",
        f"Test accuracy and cross-entropy, {std_note(k)}; deployed = `jaxlab.prune` of the trained params:",
        "",
        markdown_table(["method", "N:M", "test acc % (mean ± std)", "test CE (mean ± std)",
                        "deployed acc % (mean ± std)", "STEP switch step (per seed)"], rows),
        "",
        f"Paired differences of test accuracy in percentage points over {k} seeds: mean [95 % t-interval]:",
        "",
        markdown_table(["N:M"] + [f"{a} − {b} (paired 95 % CI)" for a, b in pairs], paired),
        "",
        f"Dense model pruned one-shot by magnitude, no fine-tuning ({std_note(k)}):",
        "",
        markdown_table(["N:M", "test acc % (mean ± std)"], shot),
    ] + premise_lines)


def plot(out: Path, results: list[dict], cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    r = next((x for x in results if x["method"] == "step"), None)
    if r is not None:  # phase 1 is dense AdamW: the Z_t trace of seed 0 is the same at every ratio
        t0 = r["switch_step"][0]
        t = np.arange(1, t0 + 1)
        ax.semilogy(t, r["z_trace"][:t0], color="C0", lw=0.8, alpha=0.6, label="Z_t")
        ax.semilogy(t, r["zbar_trace"][:t0], color="C0", lw=2, label="Zbar_t")
        ax.axvline(t0, color="C0", ls="--", lw=1)
    ax.axhline(cfg["step"].get("switch_eps") or cfg["optim"]["eps"], color="k", ls=":", lw=1, label="switch_eps")
    ax.set_xlabel("step t")
    ax.set_ylabel("Z_t")
    ax.set_title("STEP Z_t (seed 0; dashed: switch)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ratios = [f"{n}:{m}" for n, m in cfg["ratios"]]
    pos = np.arange(len(ratios))
    ax.axhline(100 * np.mean(results[0]["test_acc"]), color="k", ls="--", label="dense")
    for j, meth in enumerate(cfg["methods"][1:]):
        acc = [100 * np.asarray(r["test_acc"]) for k in ratios for r in results
               if r["method"] == meth and f"{r['n']}:{r['m']}" == k]
        ax.errorbar(pos + 0.06 * (j - 1.5), [a.mean() for a in acc],
                    yerr=[a.std(ddof=1) if a.size > 1 else 0 for a in acc], marker="o", capsize=3, label=meth)
    ax.set_xticks(pos, ratios)
    ax.set_ylabel("test accuracy % (bars: sample std)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "digits.png", dpi=120)
    plt.close(fig)
    probed = [r for r in results if r.get("premise")]
    if probed:
        label = lambda r: f"{r['method']} {r['n']}:{r['m']}"
        plot_premise(out / "premise.png", {label(r): r["premise"] for r in probed},
                     {label(r): r["switch_step"] for r in probed},
                     title="STEP's premise on digits (mean over seeds, band: min..max; dotted: STEP's switch)")


def main(argv=None) -> dict:
    exp = setup(__file__, argv, description=__doc__)
    cfg = exp.cfg
    if cfg["methods"][0] != "dense":
        raise ValueError(f"step_digits: methods must start with 'dense' (the reference); got {cfg['methods']}")
    data = load_digits_split(cfg["data"]["test_fraction"], cfg["data"]["split_seed"])
    model = build_model(cfg["model"])
    settings = [("dense", 2, 4)] + [(x, n, m) for n, m in cfg["ratios"] for x in cfg["methods"][1:]]
    results = [run_setting(x, n, m, cfg, model, data, exp.seeds) for x, n, m in settings]
    payload = exp.write(report(exp, results, cfg), {"results": results})
    plot(exp.out, results, cfg)
    return payload


if __name__ == "__main__":
    main()
