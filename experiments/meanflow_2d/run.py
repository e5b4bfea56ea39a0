"""MeanFlow's JVP-tangent coefficient on toy 2D data: sample quality, exact target MSE and gradient MSE.

Sweeps ``jvp_cond_weight`` (lam: 1.0 = original MeanFlow, 0.0 = improved-MeanFlow tangent, "auto" = the
pooled online estimate) on five toy datasets x paired seeds. Training goes through the shared harness
(:func:`jaxlab.training.experiment.run_training`, the ``jaxlab train`` step): all fixed coefficients and
seeds of one dataset are one vmapped run whose per-run input is the coefficient, and run ``s`` of every
coefficient starts from the same init and sees the same batches, so coefficients are compared on paired
seeds. Metrics at 1 and 2 NFE: sliced Wasserstein-2 and energy distance against fresh data; paired
differences against lam = 1 with 95 % t-intervals. On the Gaussian-mixture dataset the exact oracle gives
the target MSE ``M(lam)`` and its minimiser for the trained network, and a Monte-Carlo gradient MSE
against the ideal-target gradient.

    jaxlab reproduce meanflow_2d [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE]
    (e.g. --set "datasets=[spirals, two_moons]" --set loss.adaptive_p=0.0)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxlab
from jaxlab.losses import (
    MeanFlowConfig,
    gmm_oracle,
    meanflow_init_state,
    meanflow_loss,
    meanflow_sample,
    meanflow_target,
)
from jaxlab.nn import VelocityMLP
from jaxlab.training.experiment import markdown_table, mean_std, paired_difference, run_training, setup
from jaxlab.training.methods import get_method, make_schedule


def train_runs(model, sampler, cfg: dict, seeds: list[int], lams: list[float] | None, desc: str):
    """One harness run per ``(seeds[i], lams[i])``; ``lams=None`` trains the "auto" coefficient instead.

    The coefficient travels as the run input through the batch into the loss; Adam with a cosine decay
    to 0 over ``train.steps`` (registry ``adam`` + ``make_schedule``).
    """
    tr = cfg["train"]
    tx = get_method("adam").make(make_schedule(tr["lr"], schedule="cosine", total_steps=tr["steps"]))
    base = MeanFlowConfig(jvp_cond_weight="auto" if lams is None else 1.0, **cfg["loss"])

    def loss_fn(params, batch, key, loss_state):
        mf = base if lams is None else dataclasses.replace(base, jvp_cond_weight=batch["lam"])
        loss, aux = meanflow_loss(model.apply, params, batch["x"], key, config=mf, loss_state=loss_state)
        new_state = aux.pop("loss_state")
        return loss, (aux, new_state)

    return run_training(
        loss_fn, tx,
        lambda key: model.init(key, jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2)),
        lambda key, lam: {"x": sampler(key, tr["batch"]), "lam": lam},
        steps=tr["steps"], seeds=seeds, run_inputs=jnp.asarray(lams or [0.0] * len(seeds), jnp.float32),
        has_loss_state=True, init_loss_state=meanflow_init_state(base), desc=desc,
    )


def make_evaluator(model, sampler, cfg: dict):
    ev = cfg["eval"]

    def evaluate(params, key):
        kn, kd, kp = jax.random.split(key, 3)
        noise = jax.random.normal(kn, (ev["n"], 2))
        ref = sampler(kd, ev["n"])
        out, samples = {}, {}
        for nfe in (1, 2):
            gen = meanflow_sample(model.apply, params, noise, steps=nfe)
            out[f"sw2_{nfe}"] = jaxlab.sliced_wasserstein2(gen, ref, kp, ev["projections"])
            out[f"energy_{nfe}"] = jaxlab.energy_distance(gen, ref)
            samples[nfe] = gen
        return out, samples[1]

    return jax.jit(jax.vmap(evaluate))


def oracle_study(model, params, mixture, cfg: dict, lams: np.ndarray, key):
    """Exact M(lam), lam*, the auto estimator's limit, and Monte-Carlo gradient MSE vs the ideal-target gradient."""
    oc, lo = cfg["oracle"], cfg["loss"]
    oracle = gmm_oracle(mixture)
    kw = dict(mu=lo["time_mu"], sigma=lo["time_sigma"])
    terms = oracle.expected_terms(model.apply, params, key, oc["points"], vhat="boundary", **kw)
    M = np.asarray(oracle.target_mse_from_terms(terms, jnp.asarray(lams)))
    lam_star = float(oracle.optimal_from_terms(terms))
    limit = float(oracle.estimator_limit_from_terms(terms))

    def grad_sq_err(lam, k):
        x, e, z, r, t = oracle.sample_points(k, oc["grad_batch"], **kw)
        vhat = model.apply(params, z, t, t)
        T_star = jax.lax.stop_gradient(oracle.ideal_target(model.apply, params, z, r, t))
        _, T, _ = meanflow_target(model.apply, params, z, r, t, e - x, vhat, lam)
        g = lambda tgt: jax.grad(lambda p: jnp.mean(jnp.sum((model.apply(p, z, r, t) - tgt) ** 2, -1)))(params)
        diff = jax.tree.map(lambda a, b: a - b, g(T), g(T_star))
        return sum(jnp.sum(d**2) for d in jax.tree.leaves(diff))

    keys = jax.random.split(jax.random.fold_in(key, 1), oc["grad_batches"])
    per_lam = jax.jit(jax.vmap(lambda lam: jnp.mean(jax.lax.map(lambda k: grad_sq_err(lam, k), keys))))
    G = np.asarray(per_lam(jnp.asarray(lams, jnp.float32)))
    return {"lams": lams.tolist(), "target_mse": M.tolist(), "grad_mse": G.tolist(), "lam_star": lam_star,
            "auto_limit": limit, "terms": {k: float(v) for k, v in terms.items()}}


def _label(c) -> str:
    return "auto" if c == "auto" else f"{float(c):g}"


def _sd(v) -> float:
    v = np.asarray(v, np.float64)
    return float(v.std(ddof=1)) if v.size > 1 else 0.0


def plots(out: Path, results: dict, coefs: list, traces: dict, samples: dict, oracle: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fixed = [c for c in coefs if c != "auto"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        for nfe, col in ((1, "C0"), (2, "C1")):
            m = np.array([np.mean(results[name][_label(c)][f"sw2_{nfe}"]) for c in fixed])
            s = np.array([_sd(results[name][_label(c)][f"sw2_{nfe}"]) for c in fixed])
            ax.errorbar(fixed, m, yerr=s, marker="o", ms=3, color=col, label=f"{nfe} NFE")
            if "auto" in results[name]:
                ax.axhline(np.mean(results[name]["auto"][f"sw2_{nfe}"]), color=col, ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("jvp_cond_weight (dashed: auto; bars: sample std)")
    axes[0, 0].set_ylabel("SW2 to data")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_coefficient.png", dpi=110)
    plt.close(fig)

    show = [c for c in (0.0, 0.5, 1.0, "auto") if c in coefs]
    fig, axes = plt.subplots(len(names), len(show) + 1, figsize=(2.2 * (len(show) + 1), 2.2 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        ref, gens = samples[name]
        for j, (pts, title) in enumerate([(ref, "data")] + [(gens[_label(c)], f"lam={_label(c)}") for c in show]):
            ax = axes[i, j]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4, color="C0" if j == 0 else "C3")
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {title}" if j == 0 else f"1-NFE {title}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "samples_1step.png", dpi=110)
    plt.close(fig)

    if traces:
        fig, ax = plt.subplots(figsize=(5, 3))
        for name, tr in traces.items():
            ax.plot(np.asarray(tr).mean(0), label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel('"auto" jvp_cond_weight')
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "auto_coefficient.png", dpi=110)
        plt.close(fig)

    if oracle is not None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        lams = np.asarray(oracle["lams"])
        axes[0].plot(lams, oracle["target_mse"], marker="o", ms=3)
        axes[0].axvline(oracle["lam_star"], color="k", ls="--", lw=1, label=f"exact lam* = {oracle['lam_star']:.3f}")
        axes[0].axvline(oracle["auto_limit"], color="C2", ls=":", lw=1, label=f"auto limit = {oracle['auto_limit']:.3f}")
        axes[0].set_title("exact target MSE E||T_lam - T*||^2", fontsize=9)
        axes[0].legend(fontsize=7)
        axes[1].plot(lams, oracle["grad_mse"], marker="o", ms=3, color="C1")
        axes[1].set_title("gradient MSE vs ideal-target gradient (MC)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("jvp_cond_weight")
        fig.tight_layout()
        fig.savefig(out / "oracle.png", dpi=110)
        plt.close(fig)


def report(exp, cfg: dict, results: dict, coefs: list, oracle: dict | None) -> tuple[str, dict]:
    """The report's markdown and the per-dataset summary (best coefficient against lam = 1)."""
    m_, t_, ev = cfg["model"], cfg["train"], cfg["eval"]
    labels = [_label(c) for c in coefs]
    lines = exp.header("MeanFlow jvp_cond_weight sweep on toy 2D data") + [
        f"VelocityMLP {m_['depth']}x{m_['hidden']} (time_scale {m_['time_scale']}), {t_['steps']} Adam steps "
        f"(batch {t_['batch']}, lr {t_['lr']} cosine), loss {cfg['loss']}, {exp.seeds} paired seed(s) (same init "
        f"and batches for every lam); metrics on {ev['n']} samples vs fresh data (SW2 with {ev['projections']} "
        f"projections; energy distance). Wall time {time.perf_counter() - exp.started:.0f} s.",
        "",
        "lam = jvp_cond_weight: 1.0 = original MeanFlow (v_c in the JVP tangent), 0.0 = improved-MeanFlow "
        "tangent (u(z,t,t)), auto = pooled online estimate. Lower is better; **bold** = best mean.",
        "",
    ]

    def pivot(metric: str, cell) -> str:
        rows = []
        for name, res in results.items():
            means = {lab: float(np.mean(res[lab][metric])) for lab in labels}
            best = min(means, key=means.get)
            rows.append([name] + [f"**{cell(name, lab)}**" if lab == best else cell(name, lab) for lab in labels])
        return markdown_table(["dataset"] + [f"λ={lab}" for lab in labels], rows)

    for metric, title in (("sw2_1", "SW2 at 1 NFE"), ("sw2_2", "SW2 at 2 NFE"),
                          ("energy_1", "Energy distance at 1 NFE"), ("energy_2", "Energy distance at 2 NFE")):
        lines += [f"## {title} (mean ± sample std, ddof=1, over {exp.seeds} seed(s))", "",
                  pivot(metric, lambda name, lab, k=metric: mean_std(results[name][lab][k], digits=3)), ""]
    if "1" in labels:
        for nfe in (1, 2):
            lines += [f"## Paired difference SW2(λ) − SW2(λ=1) at {nfe} NFE: mean [95 % t-interval] over "
                      f"{exp.seeds} paired seed(s) (negative = better than original MeanFlow)", "",
                      markdown_table(["dataset"] + [f"λ={lab}" for lab in labels if lab != "1"], [
                          [name] + [paired_difference(res[lab][f"sw2_{nfe}"], res["1"][f"sw2_{nfe}"])["text"]
                                    for lab in labels if lab != "1"] for name, res in results.items()]), ""]

    summary, rows = {}, []
    for name, res in results.items():
        if "1" not in res:
            break
        for nfe in (1, 2):
            sw, en = (np.array([np.mean(res[lab][f"{m}_{nfe}"]) for lab in labels]) for m in ("sw2", "energy"))
            best, best_e = labels[int(np.argmin(sw))], labels[int(np.argmin(en))]
            base, base_e = sw[labels.index("1")], en[labels.index("1")]
            imp, imp_e = 100.0 * (1.0 - sw.min() / base), 100.0 * (1.0 - en.min() / base_e)
            diff = paired_difference(res[best][f"sw2_{nfe}"], res["1"][f"sw2_{nfe}"])
            auto = mean_std(res["auto"]["final_coefficient"]) if "auto" in res else "—"
            summary[f"{name}/{nfe}"] = {"best": best, "improvement_pct": imp, "paired_difference": diff,
                                        "energy_best": best_e, "energy_improvement_pct": imp_e}
            rows.append([name, nfe, best, f"{sw.min():.4f}", f"{base:.4f}", f"{imp:.1f}%", diff["text"], best_e,
                         f"{imp_e:.1f}%", auto])
    if rows:
        lines += ["## Best coefficient vs the original MeanFlow corner (λ = 1), by mean SW2", "",
                  markdown_table(["dataset", "NFE", "best λ", "SW2 best", "SW2 λ=1", "best vs λ=1",
                                  "paired SW2 best − λ=1 (95 % CI)", "energy best λ", "energy best vs λ=1",
                                  "auto final λ (mean ± std)"], rows), ""]
    if oracle is not None:
        t = oracle["terms"]
        lines += [f"## Exact oracle on {cfg['oracle']['dataset']} (network: the λ = 1 run, seed 0)", "",
                  f"Exact minimiser of the target MSE (boundary vhat): λ* = {oracle['lam_star']:.3f}; where the "
                  f"auto estimator converges for this network: {oracle['auto_limit']:.3f}. Terms: "
                  + ", ".join(f"{k} = {v:.4g}" for k, v in t.items()) + ".", "",
                  markdown_table(["λ", "exact target MSE E‖T_λ − T*‖²", "gradient MSE vs ideal-target gradient (MC)"],
                                 [[f"{lam:g}", f"{mse:.4f}", f"{g:.4g}"] for lam, mse, g in
                                  zip(oracle["lams"], oracle["target_mse"], oracle["grad_mse"])
                                  if lam in [float(c) for c in coefs if c != "auto"] or lam == 0.1]), ""]
    lines += ["![metric vs coefficient](metric_vs_coefficient.png)", "", "![1-step samples](samples_1step.png)", ""]
    if "auto" in coefs:
        lines += ["![auto coefficient](auto_coefficient.png)", ""]
    if oracle is not None:
        lines += ["![oracle](oracle.png)", ""]
    return "\n".join(lines), summary


def main(argv=None) -> int:
    exp = setup(__file__, argv, description=__doc__)
    cfg = exp.cfg
    seeds = int(exp.seeds)
    fixed = [float(c) for c in cfg["coefficients"]]
    coefs = fixed + (["auto"] if cfg.get("auto", True) else [])
    model = VelocityMLP(**cfg["model"])
    eval_keys = jax.random.split(jax.random.PRNGKey(10_000), seeds)  # per seed, the same for every lam

    results, traces, samples, lam1 = {}, {}, {}, {}
    for name in cfg["datasets"]:
        sampler = jaxlab.data.toy2d_sampler(name)
        ev = make_evaluator(model, sampler, cfg)
        results[name], gens = {}, {}
        # Fixed coefficients x seeds: one vmapped harness run, run i = (seed i // len(fixed), lam i % len(fixed)).
        res = train_runs(model, sampler, cfg, [s for s in range(seeds) for _ in fixed], fixed * seeds,
                         f"{name} fixed λ")
        metrics, gen1 = ev(res.state.params, jnp.repeat(eval_keys, len(fixed), axis=0))
        for j, c in enumerate(fixed):
            idx = np.arange(seeds) * len(fixed) + j
            results[name][_label(c)] = {k: np.asarray(v)[idx].tolist() for k, v in metrics.items()}
            gens[_label(c)] = np.asarray(gen1[idx[0]])
        j1 = fixed.index(1.0) if 1.0 in fixed else 0  # seed 0 of the lam = 1.0 run
        lam1[name] = jax.tree.map(lambda a, j1=j1: a[j1], res.state.params)
        if "auto" in coefs:
            res = train_runs(model, sampler, cfg, list(range(seeds)), None, f"{name} auto")
            ma, ga = ev(res.state.params, eval_keys)
            results[name]["auto"] = {k: np.asarray(v).tolist() for k, v in ma.items()}
            results[name]["auto"]["final_coefficient"] = res.trace["jvp_cond_weight"][:, -1].tolist()
            gens["auto"] = np.asarray(ga[0])
            traces[name] = res.trace["jvp_cond_weight"]
        samples[name] = (np.asarray(sampler(jax.random.PRNGKey(10_001), cfg["eval"]["n"])), gens)

    oracle = None
    oname = cfg["oracle"]["dataset"]
    if oname in cfg["datasets"] and 1.0 in fixed:
        mixture = jaxlab.data.toy2d_sampler(oname)
        if isinstance(mixture, jaxlab.data.GaussianMixture):
            grid = np.round(np.linspace(0.0, 1.0, 21), 3)
            grid = np.unique(np.concatenate([grid, np.asarray(fixed)]))
            oracle = oracle_study(model, lam1[oname], mixture, cfg, grid, jax.random.PRNGKey(77))

    text, summary = report(exp, cfg, results, coefs, oracle)
    exp.write(text, {"results": results, "summary": summary, "oracle": oracle})
    plots(exp.out, results, coefs, traces, samples, oracle)
    print(f"written: {exp.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    main()
