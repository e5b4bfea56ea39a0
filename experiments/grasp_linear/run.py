"""GRASP on the linear residual toy: identification threshold, drift vs task for every method, rerouting.

    jaxlab reproduce grasp_linear [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE]

The toy (``jaxlab.data.persona.linear_persona_toy``): ``h = x W_in``, ``y = h W_out`` with a planted
persona direction ``u`` that alone drives the persona output ``y_p``; curated data carry a task change
orthogonal to ``u`` plus an always-on offset ``s u``. LoRA (rank 4) on ``W_in`` (a writer).

1. Identification: |cos(U, u)| and eigengap of a naive LoRA vs the spurious strength ``s / sigma_max``.
2. Methods at ``s = 2 sigma_max``: naive LoRA, GRASP (beta sweep), post-hoc projection, CAFT-style
   training-time ablation, preventative steering (c sweep), inference-time ablation, KL-to-base
   (lambda sweep). Metrics: persona drift on off-task inputs (fraction of the offset transferred),
   task MSE on held-out task inputs (non-persona outputs), persona content kept (slope of ``y_p`` on the
   base ``y_p`` off-task; 1 = pretrained content preserved). Paired differences GRASP - naive.
3. Rerouting (known limitation): with a trainable readout (LoRA on ``W_out`` too) GRASP cannot stop drift.

Seed ``s`` is one planted toy (``linear_persona_toy(PRNGKey(s))``), one full-batch training set drawn
from the harness's ``data_key(s)`` and one LoRA init from ``seed_key(s)``, shared by every method, so
method differences at a seed are paired. Training: :func:`jaxlab.training.experiment.run_training`
(full batch: the batch does not depend on the step); optimizers from the method registry (``adamw``;
GRASP = ``grasp_around``, "after Adam only" = ``grasp``), each behind ``jaxlab.lora.freeze_base``.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jaxlab
from jaxlab.data.persona import linear_persona_toy
from jaxlab.nn import lora
from jaxlab.training.experiment import data_key, mean_std, paired_difference, run_training, setup
from jaxlab.training.methods import get_method
from jaxlab.training.report import markdown_table

SIDES = {r"^w_in$": "writer", r"^w_out$": "reader"}
# The registry method behind each training mode (all others: plain AdamW; the mode changes the loss).
GRASP_METHOD = {"grasp": "grasp_around", "grasp_post": "grasp"}
# Headline metrics for the paired differences: (key, label, scale); task MSE sits near 1e-4, so in units of 1e-3.
HEADLINE = (("drift", "persona drift", 1.0), ("task_mse", "task MSE x 1e3", 1e3))


def forward(p, x, hook=None):
    h = x @ p["w_in"]["kernel"]
    if hook is not None:
        h = hook(h)
    return h @ p["w_out"]["kernel"]


def base_params(toy) -> dict:
    return {"w_in": {"kernel": toy.w_in}, "w_out": {"kernel": toy.w_out}}


def make_toy(cfg, seed: int, rel: float):
    tsv = cfg["task_singular_values"]
    return linear_persona_toy(jax.random.PRNGKey(seed), spurious=rel * tsv[0], task_singular_values=tsv)


def seed_keys(seed: int) -> dict:
    """The data keys of seed ``seed``: training task / off-task inputs, evaluation, U's orientation."""
    return dict(zip(("task", "off", "eval", "orient"), jax.random.split(data_key(seed), 4)))


def optimizer(cfg, mode: str, U, beta: float):
    name = GRASP_METHOD.get(mode, "adamw")
    hyper = {"subspace": U, "sides": SIDES, "beta": beta} if name != "adamw" else {}
    return get_method(name).make(cfg["lr"], weight_decay=cfg["weight_decay"], **hyper)


def train(toy, cfg, seed, mode="naive", *, targets=(r"^w_in$",), hookvec=None, lam=0.0, U=None, beta=1.0):
    """Full-batch LoRA fine-tune of ``toy`` at paired seed ``seed``.

    mode: naive | grasp | grasp_post | caft | steer | kl.
    ``grasp``: ``grasp_around(adamw)`` (project the gradient and the update); ``grasp_post``:
    ``chain(adamw, grasp)`` (the update only). ``caft`` ablates ``hookvec`` from the residual in training,
    ``steer`` adds it; ``kl`` adds ``lam`` times the squared distance to the base outputs off-task.
    """
    keys, base = seed_keys(seed), base_params(toy)
    x = toy.inputs(keys["task"], cfg["n_train"], "task")
    x_off = toy.inputs(keys["off"], cfg["n_train"], "off")
    batch = (x, toy.targets(x), x_off, forward(base, x_off))
    hv = None if hookvec is None else jnp.asarray(hookvec, jnp.float32).reshape(toy.w_in.shape[1], -1)
    hook = {"caft": lambda h: h - (h @ hv) @ hv.T, "steer": lambda h: h + hv[:, 0]}.get(mode)

    def loss_fn(p, b, key):
        xb, yb, xo, yo = b
        m = lora.merge(p)
        fit = jnp.mean(jnp.sum((forward(m, xb, hook) - yb) ** 2, -1))
        if mode != "kl":
            return fit, {"fit": fit}
        return fit + lam * jnp.mean(jnp.sum((forward(m, xo) - yo) ** 2, -1)), {"fit": fit}

    def init_fn(key):
        p0 = lora.inject(base, list(targets), cfg["rank"], key=key)
        return p0 if mode not in GRASP_METHOD else jaxlab.grasp_init_params(p0, U, SIDES)

    tx = lora.freeze_base(optimizer(cfg, mode, U, beta), jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    res = run_training(loss_fn, tx, init_fn, lambda key: batch, steps=cfg["steps"], seeds=[seed],
                       progress=False)
    return jax.tree.map(lambda a: a[0], res.state.params)


def evaluate(toy, params, key, n=2048, hook=None) -> dict:
    """Drift (fraction of the spurious offset carried to off-task inputs), task MSE, persona content kept."""
    m = lora.merge(params)
    kt, ko = jax.random.split(key)
    x_off, x_task = toy.inputs(ko, n, "off"), toy.inputs(kt, n, "task")
    yb = np.asarray(forward(base_params(toy), x_off))[:, toy.persona_out]
    yf = np.asarray(forward(m, x_off, hook))[:, toy.persona_out]
    offset = toy.spurious * float(toy.w_out[:, toy.persona_out] @ toy.u)
    drift = float(np.mean(yf - yb)) / offset
    slope = float(np.cov(yf, yb)[0, 1] / np.var(yb, ddof=1))
    pred = np.asarray(forward(m, x_task, hook))[:, 1:]
    tgt = np.asarray(toy.task_targets(x_task))[:, 1:]
    # The task is the input-dependent map: compare centred outputs (constant offsets are drift, not task).
    err = (pred - pred.mean(0)) - (tgt - tgt.mean(0))
    return {"drift": drift, "task_mse": float(np.mean(np.sum(err**2, -1))), "content": slope}


def identification_sweep(cfg, seeds, pbar) -> list[dict]:
    rows = []
    for rel in cfg["identify_strengths"]:
        for seed in seeds:
            toy = make_toy(cfg, seed, rel)
            res = jaxlab.identify_spurious_subspace(train(toy, cfg, seed), sides=SIDES, k=1)
            cos = abs(float(np.asarray(res.U)[:, 0] @ np.asarray(toy.u)))
            rows.append({"rel_strength": rel, "seed": seed, "cos": cos, "eigengap": res.eigengap,
                         "trustworthy": res.trustworthy})
            pbar.update(1)
    return rows


def methods_run(cfg, seed, pbar, reroute=False) -> dict:
    toy = make_toy(cfg, seed, cfg["spurious_rel"])
    targets = (r"^w_in$", r"^w_out$") if reroute else (r"^w_in$",)
    keys = seed_keys(seed)
    out: dict = {}

    def run(name, **kw):
        p = train(toy, cfg, seed, targets=targets, **kw)
        out[name] = evaluate(toy, p, keys["eval"])
        pbar.update(1)
        return p

    naive = run("naive")
    res = jaxlab.identify_spurious_subspace(naive, sides=SIDES, k=1)
    U = np.asarray(res.U)
    # Orient U along the naive model's mean residual shift (steering needs a sign).
    x_off = toy.inputs(keys["orient"], 1024, "off")
    shift = np.asarray(jnp.mean(x_off @ (lora.merge(naive)["w_in"]["kernel"] - toy.w_in), 0))
    mag = float(shift @ U[:, 0])
    U, mag = U * np.sign(mag), abs(mag)
    out["_ident"] = {"cos": abs(float(U[:, 0] @ np.asarray(toy.u))), "eigengap": res.eigengap,
                     "explained_energy": res.explained_energy}
    if reroute:
        run("GRASP", mode="grasp", U=U)
        return out
    for beta in cfg["grasp_betas"]:
        run("GRASP" if beta == 1.0 else f"GRASP beta={beta}", mode="grasp", U=U, beta=beta)
    run("GRASP after Adam only", mode="grasp_post", U=U)
    out["post-hoc projection"] = evaluate(toy, jaxlab.project_lora(naive, U, SIDES), keys["eval"])
    Uj = jnp.asarray(U)
    out["inference ablation"] = evaluate(toy, naive, keys["eval"], hook=lambda h: h - (h @ Uj) @ Uj.T)
    run("CAFT (train-time ablation)", mode="caft", hookvec=U)
    for c in cfg["steer_c"]:
        run(f"steering c={c}", mode="steer", hookvec=c * mag * U[:, 0])
    for lam in cfg["kl_lambdas"]:
        run(f"KL-to-base lambda={lam}", mode="kl", lam=lam)
    return out


def paired_vs_naive(runs: list[dict]) -> dict:
    """GRASP - naive on the headline metrics, paired over seeds (95 % t-intervals)."""
    return {key: paired_difference([r["GRASP"][key] for r in runs], [r["naive"][key] for r in runs], scale)
            for key, _, scale in HEADLINE}


def plot(ident, methods, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rels = sorted({r["rel_strength"] for r in ident})
    by_rel = {s: [r for r in ident if r["rel_strength"] == s] for s in rels}
    left.plot(rels, [np.mean([r["cos"] for r in by_rel[s]]) for s in rels], "o-")
    left.axvline(1.0, color="gray", ls="--", lw=1)
    left.set(xlabel="spurious strength / largest task singular value", ylabel="|cos(U, u)|",
             title="identification threshold")
    gap_ax = left.twinx()
    gap_ax.plot(rels, [np.mean([r["eigengap"] for r in by_rel[s]]) for s in rels], "s:", color="C1")
    gap_ax.set_yscale("log")
    gap_ax.set_ylabel("eigengap", color="C1")
    for i, name in enumerate(n for n in methods[0] if not n.startswith("_")):
        mean = {k: np.mean([m[name][k] for m in methods]) for k in ("drift", "task_mse")}
        right.scatter(mean["task_mse"], mean["drift"], color=f"C{i % 10}", marker="o*sD^v<>ph"[i % 10], s=40,
                      label=name)
    right.set_xscale("symlog", linthresh=1e-3)
    right.set(xlabel="task MSE (held-out, non-persona outputs)", ylabel="persona drift (fraction of offset)",
              title="drift vs task (mean over seeds)")
    right.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(out / "grasp_linear.png", dpi=110)
    plt.close(fig)


def report(exp, cfg, ident, methods, reroute) -> tuple[str, dict]:
    n = len(methods)
    rels = sorted({r["rel_strength"] for r in ident})
    t1 = markdown_table(
        ["s / sigma_max", r"\|cos(U, u)\|", "eigengap", "trustworthy (gap >= 2)"],
        [[r, mean_std([x["cos"] for x in ident if x["rel_strength"] == r], digits=3),
          mean_std([x["eigengap"] for x in ident if x["rel_strength"] == r], digits=3),
          f"{sum(x['trustworthy'] for x in ident if x['rel_strength'] == r)}/{n}"] for r in rels],
    )
    names = [k for k in methods[0] if not k.startswith("_")]
    t2 = markdown_table(
        ["method", "persona drift (off-task)", "task MSE", "persona content kept"],
        [[k] + [mean_std([m[k][q] for m in methods], digits=3) for q in ("drift", "task_mse", "content")]
         for k in names],
    )
    paired = {"methods": paired_vs_naive(methods), "reroute": paired_vs_naive(reroute)}
    t_pair = markdown_table(
        ["setting"] + [f"GRASP − naive: {label} (95 % CI)" for _, label, _ in HEADLINE],
        [[what] + [paired[part][key]["text"] for key, _, _ in HEADLINE]
         for part, what in (("methods", "readout frozen (section 2)"),
                            ("reroute", "readout trainable (section 3)"))],
    )
    t3 = markdown_table(
        ["method (readout trainable)", "persona drift (off-task)", "task MSE"],
        [[k] + [mean_std([m[k][q] for m in reroute], digits=3) for q in ("drift", "task_mse")]
         for k in ("naive", "GRASP")],
    )
    return "\n".join(exp.header("GRASP on the linear residual toy") + [
        f"{n} paired seed(s), {cfg['steps']} full-batch AdamW steps (lr {cfg['lr']}, weight decay "
        f"{cfg['weight_decay']}), LoRA rank {cfg['rank']} on W_in, task singular values "
        f"{cfg['task_singular_values']}. Wall time {time.perf_counter() - exp.started:.0f} s.",
        "",
        "## 1. Identification vs spurious strength",
        "",
        t1,
        "",
        f"## 2. Methods at s = {cfg['spurious_rel']} x sigma_max (identification |cos| = "
        f"{mean_std([m['_ident']['cos'] for m in methods], digits=3)})",
        "",
        "Drift: mean shift of the persona output on off-task inputs / the planted offset (naive ~ 1). "
        "Task MSE: held-out task inputs, non-persona outputs, vs the task-only target. Content kept: slope of "
        "the persona output on the base model's persona output off-task (1 = pretrained content preserved).",
        "",
        t2,
        "",
        f"Paired differences over {n} seed(s), mean [95 % t-interval] (no interval with one seed):",
        "",
        t_pair,
        "",
        "## 3. Known limitation: a trainable readout offers another route",
        "",
        t3,
        "",
        "![plots](grasp_linear.png)",
    ]), paired


def main(argv=None) -> int:
    exp = setup(__file__, argv, description=__doc__, steps_key="steps")
    cfg = exp.cfg
    seeds = list(range(exp.seeds))
    n_methods = 1 + len(cfg["grasp_betas"]) + 2 + len(cfg["steer_c"]) + len(cfg["kl_lambdas"])
    with tqdm(total=len(seeds) * (len(cfg["identify_strengths"]) + n_methods + 2), desc="grasp_linear",
              dynamic_ncols=True) as pbar:
        ident = identification_sweep(cfg, seeds, pbar)
        methods = [methods_run(cfg, s, pbar) for s in seeds]
        reroute = [methods_run(cfg, s, pbar, reroute=True) for s in seeds]
    text, paired = report(exp, cfg, ident, methods, reroute)
    plot(ident, methods, exp.out)
    exp.write(text, {"seeds": len(seeds), "identification": ident, "methods": methods, "reroute": reroute,
                     "paired_grasp_minus_naive": paired})
    print(f"written: {exp.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
