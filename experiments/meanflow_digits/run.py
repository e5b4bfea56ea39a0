"""Small DiT on scikit-learn's 8x8 digits: flow matching vs MeanFlow (lam = 1.0, other fixed, auto) at 1 and 2 NFE.

Score: a Frechet distance in the 64-d penultimate feature space of a small MLP digits classifier trained
in this experiment on the training split (a "digits FD"; NOT Inception FID, numbers are not comparable
with image FIDs). Reference floor: FD between the held-out real images and the training images.

    jaxlab reproduce meanflow_digits [--quick] [--seeds K] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm import tqdm

from jaxlab.losses import MeanFlowConfig, euler_sample, meanflow_init_state, meanflow_loss, meanflow_sample
from jaxlab.nn import DiT

HERE = Path(__file__).resolve().parent


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """Apply ``--set a.b=value`` overrides (values parsed as YAML); unknown keys are an error."""
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        node, parts = cfg, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--set {key}: no section {part!r} in config.yaml")
            node = node[part]
        if parts[-1] not in node:
            raise SystemExit(f"--set {key}: unknown key; known: {sorted(node)}")
        node[parts[-1]] = yaml.safe_load(raw)
    return cfg


def load_config(quick: bool) -> dict:
    cfg = yaml.safe_load((HERE / "config.yaml").read_text())
    q = cfg.pop("quick", {})
    return _merge(cfg, q) if quick else cfg


def load_digits_split(test_fraction: float, seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` with images ``(N, 8, 8, 1)`` in ``[-1, 1]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


class DigitsClassifier(nn.Module):
    """MLP 64 -> hidden -> features -> 10; ``features`` are the penultimate ReLU activations."""

    hidden: int = 128
    features: int = 64

    @nn.compact
    def __call__(self, x, return_features: bool = False):
        h = jnp.reshape(x, (x.shape[0], -1))
        h = nn.relu(nn.Dense(self.hidden)(h))
        f = nn.relu(nn.Dense(self.features)(h))
        return f if return_features else nn.Dense(10)(f)


def train_classifier(cfg, x, y, x_te, y_te, key):
    c = cfg["classifier"]
    clf = DigitsClassifier(c["hidden"], c["features"])
    x, y, x_te, y_te = (jnp.asarray(a) for a in (x, y, x_te, y_te))
    params = clf.init(key, x[:2])
    tx = optax.adam(c["lr"])

    @jax.jit
    def step(p, o, k):
        idx = jax.random.randint(k, (128,), 0, x.shape[0])
        xb = x[idx] + 0.05 * jax.random.normal(k, x[idx].shape)  # light noise: features stay smooth
        loss = lambda q: optax.softmax_cross_entropy_with_integer_labels(clf.apply(q, xb), y[idx]).mean()
        g = jax.grad(loss)(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    o = tx.init(params)
    for i in range(c["steps"]):
        params, o = step(params, o, jax.random.fold_in(key, i))
    acc = float(jnp.mean(jnp.argmax(clf.apply(params, x_te), -1) == y_te))
    feats = jax.jit(lambda a: clf.apply(params, a, return_features=True))
    return feats, acc


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` (symmetric PSD square roots via eigh)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1h @ s2 @ s1h), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def make_trainer(model, cfg, x_tr, y_tr, mf_kwargs: dict, fixed_lam: bool):
    """Jitted ``train(key, lam) -> (params, lam_trace)`` over ``steps`` steps; vmappable over ``lam``."""
    tr = cfg["train"]
    steps, batch = tr["steps"], tr["batch"]
    tx = optax.adam(optax.cosine_decay_schedule(tr["lr"], steps))
    xs, ys = jnp.asarray(x_tr), jnp.asarray(y_tr)

    def train(key, lam):
        mf = MeanFlowConfig(jvp_cond_weight=lam if fixed_lam else "auto", num_classes=10, **mf_kwargs)
        k_init, k_run = jax.random.split(key)
        params = model.init(k_init, xs[:2], jnp.zeros(2), jnp.zeros(2), ys[:2])

        def body(c, k):
            p, o, st = c
            kb, kl = jax.random.split(k)
            idx = jax.random.randint(kb, (batch,), 0, xs.shape[0])
            (loss, aux), g = jax.value_and_grad(
                lambda q: meanflow_loss(model.apply, q, xs[idx], kl, config=mf, y=ys[idx], loss_state=st),
                has_aux=True)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o, aux["loss_state"]), aux["jvp_cond_weight"]

        (params, _, _), trace = jax.lax.scan(body, (params, tx.init(params), meanflow_init_state(mf)),
                                             jax.random.split(k_run, steps))
        return params, trace

    return jax.jit(jax.vmap(train))


def sample_grid(images: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(images), 1, figsize=(10, 1.3 * len(images)), squeeze=False)
    for ax, (name, imgs) in zip(axes[:, 0], images.items()):
        row = np.concatenate([np.pad(im[..., 0], 1, constant_values=-1) for im in imgs[:20]], axis=1)
        ax.imshow(np.clip(row, -1, 1), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_axis_off()
        ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller DiT, fewer steps (a few CPU minutes)")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", default="runs/meanflow_digits")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config.yaml entry, e.g. --set model.time_scale=1000.0")
    args = p.parse_args(argv)
    cfg = apply_sets(load_config(args.quick), args.set)
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.steps:
        cfg["train"]["steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    x_tr, y_tr, x_te, y_te = load_digits_split(cfg["train"]["test_fraction"])
    feats, acc = train_classifier(cfg, x_tr, y_tr, x_te, y_te, jax.random.PRNGKey(123))
    f_train = np.asarray(feats(x_tr))
    fd_floor = frechet_distance(np.asarray(feats(x_te)), f_train)

    model = DiT(num_classes=10, **cfg["model"])
    seeds = int(cfg["seeds"])
    fixed = [float(c) for c in cfg["fixed_coefficients"]]
    n = cfg["eval"]["n"]
    y_gen = jnp.arange(n) % 10
    mf_kwargs = dict(cfg["loss"])
    fm_kwargs = dict(mf_kwargs, flow_matching_fraction=1.0)

    rows: dict[str, dict[str, list]] = {}
    grids, auto_final = {}, []
    bar = tqdm(total=seeds * 3, desc="meanflow_digits", unit="group")

    def score(name, params, sample_fn, nfes, key):
        for nfe in nfes:
            gen = np.asarray(sample_fn(params, jax.random.normal(key, (n, 8, 8, 1)), nfe))
            rows.setdefault(f"{name} @ {nfe} NFE", {}).setdefault("fd", []).append(
                frechet_distance(np.asarray(feats(gen)), f_train))
            if seed_now[0] == 0 and (nfe == 1 or nfe >= 10):
                grids[f"{name}, {nfe} NFE"] = gen

    mf_sample = jax.jit(lambda p_, e, nfe: meanflow_sample(lambda q, z, r, t: model.apply(q, z, r, t, y_gen), p_, e,
                                                           steps=nfe), static_argnums=2)
    fm_sample = jax.jit(lambda p_, e, nfe: euler_sample(lambda q, z, r, t: model.apply(q, z, r, t, y_gen), p_, e,
                                                        steps=nfe), static_argnums=2)
    seed_now = [0]
    for s in range(seeds):
        seed_now[0] = s
        key = jax.random.PRNGKey(s)
        ekey = jax.random.PRNGKey(1000 + s)
        # Flow matching baseline: the same loss code with every row r = t (no JVP).
        pf, _ = make_trainer(model, cfg, x_tr, y_tr, fm_kwargs, True)(key[None], jnp.ones(1))
        bar.update(1)
        score("flow matching", jax.tree.map(lambda a: a[0], pf), fm_sample, cfg["eval"]["fm_nfe"], ekey)
        # MeanFlow at the fixed coefficients: one vmapped run.
        pm, _ = make_trainer(model, cfg, x_tr, y_tr, mf_kwargs, True)(
            jnp.repeat(key[None], len(fixed), 0), jnp.asarray(fixed, jnp.float32))
        bar.update(1)
        for j, c in enumerate(fixed):
            score(f"MeanFlow lam={c:g}", jax.tree.map(lambda a, j=j: a[j], pm), mf_sample, (1, 2), ekey)
        if cfg.get("auto", True):
            pa, tr = make_trainer(model, cfg, x_tr, y_tr, mf_kwargs, False)(key[None], jnp.zeros(1))
            bar.update(1)
            auto_final.append(float(tr[0, -1]))
            score("MeanFlow lam=auto", jax.tree.map(lambda a: a[0], pa), mf_sample, (1, 2), ekey)
    bar.close()
    elapsed = time.time() - t0

    def ms(v):
        v = np.asarray(v)
        return f"{v.mean():.2f} ± {v.std():.2f}" if v.size > 1 else f"{v.mean():.2f}"

    cmd = "jaxlab reproduce meanflow_digits" + (" --quick" if args.quick else "") + (
        f" --seeds {args.seeds}" if args.seeds else "") + (f" --steps {args.steps}" if args.steps else "") + "".join(f" --set {x}" for x in args.set)
    m_, t_ = cfg["model"], cfg["train"]
    lines = [
        "# MeanFlow vs flow matching on 8x8 digits (small DiT)",
        "",
        f"`{cmd}` — DiT patch {m_['patch']}, hidden {m_['hidden']}, depth {m_['depth']}, heads {m_['heads']}; "
        f"{t_['steps']} Adam steps (batch {t_['batch']}, lr {t_['lr']} cosine); {seeds} seed(s); "
        f"{len(x_tr)} train / {len(x_te)} held-out images. Wall time {elapsed:.0f} s.",
        "",
        f"Digits FD = Frechet distance in the {cfg['classifier']['features']}-d feature space of an MLP classifier "
        f"trained here (held-out accuracy {acc:.3f}); {n} class-balanced samples vs the training images. "
        f"Floor (held-out real vs training images): {fd_floor:.2f}. Not Inception FID.",
        "",
        "| model | digits FD (lower is better) |",
        "|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {ms(r['fd'])} |")
    if auto_final:
        lines += ["", f"Final auto coefficient: {ms(auto_final)}."]
    lines += ["", "![samples](samples.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(
        {"config": cfg, "command": cmd, "elapsed_s": elapsed, "classifier_accuracy": acc, "fd_floor": fd_floor,
         "fd": {k: v["fd"] for k, v in rows.items()}, "auto_final_coefficient": auto_final}, indent=1))
    sample_grid({"real (held-out)": x_te[np.argsort(y_te, kind="stable")][:: max(1, len(x_te) // 20)], **grids},
                out / "samples.png")
    print("\n".join(lines))
    print(f"written: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
