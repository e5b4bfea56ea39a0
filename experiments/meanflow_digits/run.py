"""Small DiT on scikit-learn's 8x8 digits: flow matching vs MeanFlow (lam = 1.0, other fixed, auto) at 1 and 2 NFE.

Score: a Frechet distance in the 64-d penultimate feature space of a small MLP digits classifier trained
in this experiment on the training split (a "digits FD"; NOT Inception FID, numbers are not comparable
with image FIDs). Reference floor: FD between the held-out real images and the training images.

Every model (and the classifier) trains through the shared harness
(:func:`jaxlab.training.experiment.run_training`, the ``jaxlab train`` step): flow matching is the same
MeanFlow loss with every row r = t; the fixed coefficients x seeds are one vmapped run whose per-run input
is the coefficient. Paired seeds: run ``s`` of every model starts from the same init, sees the same
batches and is sampled from the same noise, so the table reports paired differences against lam = 1.

    jaxlab reproduce meanflow_digits [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE]
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.losses import MeanFlowConfig, euler_sample, meanflow_init_state, meanflow_loss, meanflow_sample
from jaxlab.nn import DiT
from jaxlab.training.experiment import markdown_table, mean_std, paired_difference, run_training, setup
from jaxlab.training.methods import get_method, make_schedule


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


def train_classifier(cfg, x, y, x_te, y_te):
    """The FD feature network: Adam on noisy training images (one harness run); ``(features_fn, test acc)``."""
    c = cfg["classifier"]
    clf = DigitsClassifier(c["hidden"], c["features"])
    x, y, x_te, y_te = (jnp.asarray(a) for a in (x, y, x_te, y_te))

    def batch_fn(key):
        idx = jax.random.randint(key, (128,), 0, x.shape[0])
        return x[idx] + 0.05 * jax.random.normal(key, x[idx].shape), y[idx]  # light noise: features stay smooth

    def cross_entropy(params, batch, key):
        return optax.softmax_cross_entropy_with_integer_labels(clf.apply(params, batch[0]), batch[1]).mean(), {}

    res = run_training(cross_entropy, get_method("adam").make(c["lr"]), lambda key: clf.init(key, x[:2]), batch_fn,
                       steps=c["steps"], seeds=[c["seed"]], desc="classifier")
    params = jax.tree.map(lambda a: a[0], res.state.params)
    acc = float(jnp.mean(jnp.argmax(clf.apply(params, x_te), -1) == y_te))
    return jax.jit(lambda a: clf.apply(params, a, return_features=True)), acc


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` (symmetric PSD square roots via eigh)."""
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1h = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1h @ s2 @ s1h), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def train_dit(model, cfg, x_tr, y_tr, loss_cfg: MeanFlowConfig, seeds: list[int], lams: list[float] | None, desc):
    """Train ``model`` per ``(seeds[i], lams[i])`` (``lams=None``: ``loss_cfg``'s own coefficient, e.g. "auto").

    Adam (registry ``adam``) with a cosine decay to 0; batches are uniform draws of the training split with
    their labels; the per-run coefficient reaches the loss through the batch.
    """
    tr = cfg["train"]
    xs, ys = jnp.asarray(x_tr), jnp.asarray(y_tr)
    per_run = lams is not None

    def sample_batch(key, lam):
        idx = jax.random.randint(key, (tr["batch"],), 0, xs.shape[0])
        return {"x": xs[idx], "y": ys[idx], "lam": lam}

    def mf_loss(params, batch, key, loss_state):
        config = dataclasses.replace(loss_cfg, jvp_cond_weight=batch["lam"]) if per_run else loss_cfg
        loss, aux = meanflow_loss(model.apply, params, batch["x"], key, config=config, y=batch["y"],
                                  loss_state=loss_state)
        new_state = aux.pop("loss_state")
        return loss, (aux, new_state)

    return run_training(
        mf_loss, get_method("adam").make(make_schedule(tr["lr"], schedule="cosine", total_steps=tr["steps"])),
        lambda key: model.init(key, xs[:2], jnp.zeros(2), jnp.zeros(2), ys[:2]), sample_batch,
        steps=tr["steps"], seeds=seeds, run_inputs=jnp.asarray(lams if per_run else np.ones(len(seeds)), jnp.float32),
        has_loss_state=True, init_loss_state=meanflow_init_state(loss_cfg), desc=desc,
    )


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


def _model_label(key: str) -> tuple[str, str]:
    """``"MeanFlow lam=1 @ 2 NFE"`` -> ``("MeanFlow λ = 1 (original)", "2")``."""
    name, nfe = key.rsplit(" @ ", 1)
    name = name.replace("lam=", "λ = ") + (" (original)" if name == "MeanFlow lam=1" else "")
    return name, nfe.split()[0]


def report(exp, cfg: dict, fd: dict, paired: dict, acc: float, floor: float, auto_final, n_train, n_test) -> str:
    m_, t_ = cfg["model"], cfg["train"]
    rows = [[*_model_label(k), mean_std(v), paired.get(k, {"text": "—"})["text"]] for k, v in fd.items()]
    lines = exp.header("MeanFlow vs flow matching on 8x8 digits (small DiT)") + [
        f"DiT patch {m_['patch']}, hidden {m_['hidden']}, depth {m_['depth']}, heads {m_['heads']}; {t_['steps']} Adam "
        f"steps (batch {t_['batch']}, lr {t_['lr']} cosine); {exp.seeds} paired seed(s) (same init, batches and "
        f"sampling noise for every model); {n_train} train / {n_test} held-out images. "
        f"Wall time {time.perf_counter() - exp.started:.0f} s.",
        "",
        f"Digits FD = Frechet distance in the {cfg['classifier']['features']}-d feature space of an MLP classifier "
        f"trained here (held-out accuracy {acc:.3f}); {cfg['eval']['n']} class-balanced samples vs the training "
        f"images. Floor (held-out real vs training images): {floor:.2f}. Not Inception FID. Lower is better.",
        "",
        markdown_table(["model", "NFE", "digits FD ↓ (mean ± sample std)",
                        "paired FD − FD(λ = 1), same NFE: mean [95 % t-interval]"], rows),
    ]
    if auto_final:
        lines += ["", f"Final auto coefficient: {mean_std(auto_final)}."]
    return "\n".join(lines + ["", "![samples](samples.png)", ""])


def main(argv=None) -> int:
    exp = setup(__file__, argv, description=__doc__)
    cfg = exp.cfg
    seeds = int(exp.seeds)
    x_tr, y_tr, x_te, y_te = load_digits_split(cfg["train"]["test_fraction"])
    feats, acc = train_classifier(cfg, x_tr, y_tr, x_te, y_te)
    f_train = np.asarray(feats(x_tr))
    fd_floor = frechet_distance(np.asarray(feats(x_te)), f_train)

    model = DiT(num_classes=10, **cfg["model"])
    fixed = [float(c) for c in cfg["fixed_coefficients"]]
    n = cfg["eval"]["n"]
    y_gen = jnp.arange(n) % 10
    base = MeanFlowConfig(num_classes=10, **cfg["loss"])
    apply_y = lambda q, z, r, t: model.apply(q, z, r, t, y_gen)  # noqa: E731
    samplers = {
        "fm": jax.jit(lambda p_, e, nfe: euler_sample(apply_y, p_, e, steps=nfe), static_argnums=2),
        "mf": jax.jit(lambda p_, e, nfe: meanflow_sample(apply_y, p_, e, steps=nfe), static_argnums=2),
    }
    noise = [jax.random.normal(jax.random.PRNGKey(1000 + s), (n, 8, 8, 1)) for s in range(seeds)]
    fd, grids, auto_final = {}, {}, []

    def score(name, params, sampler, nfes):  # params stacked over seeds 0..seeds-1
        for s in range(seeds):
            p_s = jax.tree.map(lambda a, s=s: a[s], params)
            for nfe in nfes:
                gen = np.asarray(samplers[sampler](p_s, noise[s], nfe))
                fd.setdefault(f"{name} @ {nfe} NFE", []).append(frechet_distance(np.asarray(feats(gen)), f_train))
                if s == 0 and (nfe == 1 or nfe >= 10):
                    grids[f"{name}, {nfe} NFE"] = gen

    # Flow matching baseline: the same loss code with every row r = t (no JVP).
    everyone = list(range(seeds))
    fm_cfg = dataclasses.replace(base, flow_matching_fraction=1.0)
    res = train_dit(model, cfg, x_tr, y_tr, fm_cfg, everyone, [1.0] * seeds, "flow matching")
    score("flow matching", res.state.params, "fm", cfg["eval"]["fm_nfe"])
    # MeanFlow at the fixed coefficients x seeds: one vmapped harness run, run i = (seed i // k, lam i % k).
    res = train_dit(model, cfg, x_tr, y_tr, base, [s for s in everyone for _ in fixed], fixed * seeds, "MeanFlow fixed λ")
    for j, c in enumerate(fixed):
        score(f"MeanFlow lam={c:g}", jax.tree.map(lambda a, j=j: a[j::len(fixed)], res.state.params), "mf", (1, 2))
    if cfg.get("auto", True):
        res = train_dit(model, cfg, x_tr, y_tr, dataclasses.replace(base, jvp_cond_weight="auto"), everyone, None,
                        "MeanFlow auto")
        auto_final = res.trace["jvp_cond_weight"][:, -1].tolist()
        score("MeanFlow lam=auto", res.state.params, "mf", (1, 2))

    paired = {}  # every model against MeanFlow lam = 1 at the same NFE, paired over seeds
    for key, vals in fd.items():
        name, nfe = key.rsplit(" @ ", 1)
        if name != "MeanFlow lam=1" and f"MeanFlow lam=1 @ {nfe}" in fd:
            paired[key] = paired_difference(vals, fd[f"MeanFlow lam=1 @ {nfe}"], digits=2)
    exp.write(report(exp, cfg, fd, paired, acc, fd_floor, auto_final, len(x_tr), len(x_te)),
              {"classifier_accuracy": acc, "fd_floor": fd_floor, "fd": fd, "paired_vs_lam1": paired,
               "auto_final_coefficient": auto_final})
    sample_grid({"real (held-out)": x_te[np.argsort(y_te, kind="stable")][:: max(1, len(x_te) // 20)], **grids},
                exp.out / "samples.png")
    print(f"written: {exp.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    main()
