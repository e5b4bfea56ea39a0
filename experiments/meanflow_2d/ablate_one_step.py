"""Small single-seed ablations of the one-step (1-NFE) MeanFlow regime on toy 2D data.

Not part of ``jaxlab reproduce``: a scratch harness for the issue "1-NFE samples of spirals / rings are
blobs". Each run trains ``jaxlab.nn.VelocityMLP`` with ``jaxlab.meanflow_loss`` (jvp_cond_weight = 1, i.e.
original MeanFlow) in a plain jitted ``lax.scan`` loop (Adam + cosine decay, optional warmup), keeps an EMA of
the parameters, and scores 1- and 2-NFE samples of the raw *and* the EMA parameters with the meanflow_2d
metric settings (2048 samples vs 2048 fresh data points, SW2 with 512 projections), plus SW2 on 8192 points
and a local metric, MMD² with an RBF kernel of bandwidth 0.1 on 4096 points (V-statistic ``_mmd`` and
unbiased U-statistic ``_mmdu``; SW2 cannot tell a spiral from a disc of the same spread). The flow-matching
reference (variant ``fm``) is the same model / steps / optimiser trained on r = t rows only with plain MSE,
sampled with 50 Euler steps. ``floor`` in the table is SW2 between two independent data draws of the same
size (the metric's noise floor).

    python experiments/meanflow_2d/ablate_one_step.py --datasets spirals concentric_rings \
        --variants fm base p0 p0_ff25 --steps 4000

Results are appended to ``<out>/results.jsonl`` (one line per dataset x variant x budget; a finished line is
reused, so rerunning a command only trains what is missing) and the table is printed at the end.
Variants are the ``VARIANTS`` dict below; ``--set k=v`` overrides a field of every variant (e.g.
``--set hidden=512``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlab
from jaxlab.losses import MeanFlowConfig, euler_sample, meanflow_loss, meanflow_sample
from jaxlab.nn import VelocityMLP

# Defaults = the v1 config of meanflow_2d (v1.yaml: MLP 4x256, time_scale 1, p = 1, c = 1e-3, 50 % r = t, logit-normal
# (-0.4, 1), Adam 1e-3 cosine, batch 256); each variant overrides some of them.
DEFAULTS = dict(
    hidden=256, depth=4, time_dim=64, time_scale=1.0,
    adaptive_p=1.0, adaptive_c=1e-3, flow_matching_fraction=0.5,
    sampler="logit", time_mu=-0.4, time_sigma=1.0,
    lr=1e-3, warmup=0, batch=256, ema=0.999, fm=False, fourier=0, fourier_scale=1.0, lam=1.0,
)
VARIANTS = {
    "fm": dict(fm=True, adaptive_p=0.0, sampler="uniform"),  # flow-matching reference, 50 Euler steps
    "fm_logit": dict(fm=True, adaptive_p=0.0),
    "base": {},  # the config.yaml defaults (p = 1)
    "p0": dict(adaptive_p=0.0),
    "p05": dict(adaptive_p=0.5),
    "p0_ff25": dict(adaptive_p=0.0, flow_matching_fraction=0.25),
    "p0_ff75": dict(adaptive_p=0.0, flow_matching_fraction=0.75),
    "p0_unif": dict(adaptive_p=0.0, sampler="uniform"),
    "p0_unif_ff25": dict(adaptive_p=0.0, sampler="uniform", flow_matching_fraction=0.25),
    "p0_unif_ff75": dict(adaptive_p=0.0, sampler="uniform", flow_matching_fraction=0.75),
    "p05_unif_ff25": dict(adaptive_p=0.5, sampler="uniform", flow_matching_fraction=0.25),
    "p0_ts10": dict(adaptive_p=0.0, time_scale=10.0),
    "p0_unif_ts10": dict(adaptive_p=0.0, sampler="uniform", time_scale=10.0),
    "p0_unif_wide": dict(adaptive_p=0.0, sampler="uniform", hidden=512, depth=4),
    "p0_unif_deep": dict(adaptive_p=0.0, sampler="uniform", hidden=256, depth=6),
}


# RBF bandwidth of the local metric: about twice the datasets' noise scale (0.05-0.08), so a disc and a
# spiral of the same spread differ (SW2's 1-D projections of the two nearly coincide).
MMD_BANDWIDTH = 0.1


def time_pairs(key, batch: int, v: dict):
    """(r, t, n_eq): two draws sorted (t = max, r = min), r = t on the first n_eq rows."""
    n_eq = int(round(v["flow_matching_fraction"] * batch))
    if v["flow_matching_fraction"] >= 1.0:  # flow matching: ONE draw per row (t = max of two is Beta(2, 1))
        t = (jax.random.uniform(key, (batch,)) if v["sampler"] == "uniform"
             else jax.nn.sigmoid(v["time_mu"] + v["time_sigma"] * jax.random.normal(key, (batch,))))
        return t, t, batch
    if v["sampler"] == "uniform":
        ab = jax.random.uniform(key, (2, batch))
    elif v["sampler"] == "logit":
        ab = jax.nn.sigmoid(v["time_mu"] + v["time_sigma"] * jax.random.normal(key, (2, batch)))
    else:
        raise ValueError(f"unknown sampler {v['sampler']!r}")
    t, r = ab.max(0), ab.min(0)
    r = jnp.where(jnp.arange(batch) < n_eq, t, r)
    return r, t, n_eq


def train(name: str, v: dict, steps: int, seed: int = 0, chunk: int = 250):
    sampler = jaxlab.data.toy2d_sampler(name)
    model = VelocityMLP(hidden=v["hidden"], depth=v["depth"], time_dim=v["time_dim"], time_scale=v["time_scale"],
                        fourier_features=v["fourier"], fourier_scale=v["fourier_scale"])
    key = jax.random.PRNGKey(seed)
    k_init, k_run = jax.random.split(key)
    params = model.init(k_init, jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2))
    sched = (optax.warmup_cosine_decay_schedule(0.0, v["lr"], v["warmup"], steps) if v["warmup"]
             else optax.cosine_decay_schedule(v["lr"], steps))
    tx = optax.adam(sched)
    fm = bool(v["fm"])
    cfg = MeanFlowConfig(jvp_cond_weight=v["lam"], adaptive_p=v["adaptive_p"], adaptive_c=v["adaptive_c"],
                         flow_matching_fraction=1.0 if fm else v["flow_matching_fraction"], reduction="sum")
    vv = dict(v, flow_matching_fraction=1.0) if fm else v

    def loss_fn(p, x, k):
        kt, kl = jax.random.split(k)
        r, t, n_eq = time_pairs(kt, x.shape[0], vv)
        loss, aux = meanflow_loss(model.apply, p, x, kl, config=cfg, t=t, r=r, prefix=n_eq)
        return loss, aux

    def step(carry, i):
        p, opt, ema = carry
        kb, kl = jax.random.split(jax.random.fold_in(k_run, i))
        x = sampler(kb, v["batch"])
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, kl)
        upd, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, upd)
        ema = jax.tree.map(lambda e, q: v["ema"] * e + (1 - v["ema"]) * q, ema, p)
        return (p, opt, ema), loss

    @jax.jit
    def run_chunk(carry, start):
        return jax.lax.scan(step, carry, start + jnp.arange(chunk))

    carry = (params, tx.init(params), params)
    losses = []
    for s in range(0, steps, chunk):
        carry, l = run_chunk(carry, s)
        losses.append(np.asarray(l))
    p, _, ema = carry
    return model, p, ema, float(np.mean(np.concatenate(losses)[-chunk:]))


def evaluate(name: str, model, params, fm: bool, n: int = 2048, projections: int = 512):
    """SW2 at 1 and 2 NFE (MeanFlow) or at 50 Euler steps (flow matching); same keys for every run."""
    sampler = jaxlab.data.toy2d_sampler(name)
    kn, kd, kp = jax.random.split(jax.random.PRNGKey(10_000), 3)
    noise = jax.random.normal(kn, (n, 2))
    ref = sampler(kd, n)
    out, gens = {}, {}
    if fm:
        gens["fm50"] = euler_sample(model.apply, params, noise, steps=50)
    else:
        for nfe in (1, 2):
            gens[f"nfe{nfe}"] = meanflow_sample(model.apply, params, noise, steps=nfe)
    for k, g in gens.items():
        out[k] = float(jaxlab.sliced_wasserstein2(g, ref, kp, projections))
    # a lower-noise second estimate: 8192 samples vs 8192 fresh data points (other keys)
    kn8, kd8, kp8 = jax.random.split(jax.random.PRNGKey(20_000), 3)
    noise8, ref8 = jax.random.normal(kn8, (4 * n, 2)), sampler(kd8, 4 * n)
    for k in list(gens):
        g8 = (euler_sample(model.apply, params, noise8, steps=50) if k == "fm50"
              else meanflow_sample(model.apply, params, noise8, steps=int(k[3:])))
        out[k + "_8k"] = float(jaxlab.sliced_wasserstein2(g8, ref8, kp8, projections))
        out[k + "_mmd"] = float(jaxlab.mmd_rbf(g8[:4096], ref8[:4096], bandwidth=MMD_BANDWIDTH))
        out[k + "_mmdu"] = float(jaxlab.mmd_rbf(g8[:4096], ref8[:4096], bandwidth=MMD_BANDWIDTH, unbiased=True))
    return out, {k: np.asarray(g) for k, g in gens.items()}


def data_floor(name: str, n: int = 2048, projections: int = 512) -> dict:
    """SW2 between two independent data draws (2048 and 8192 points): the metric's noise floor."""
    sampler = jaxlab.data.toy2d_sampler(name)
    kn, kd, kp = jax.random.split(jax.random.PRNGKey(10_000), 3)
    kn8, kd8, kp8 = jax.random.split(jax.random.PRNGKey(20_000), 3)
    return {"n2048": float(jaxlab.sliced_wasserstein2(sampler(jax.random.PRNGKey(123), n), sampler(kd, n), kp, projections)),
            "n8192": float(jaxlab.sliced_wasserstein2(sampler(jax.random.PRNGKey(124), 4 * n), sampler(kd8, 4 * n), kp8,
                                                      projections)),
            "mmd": float(jaxlab.mmd_rbf(sampler(jax.random.PRNGKey(124), 2 * n), sampler(kd8, 4 * n)[:2 * n],
                                        bandwidth=MMD_BANDWIDTH))}


def plot(out: Path, rows: list[dict], samples: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["dataset"] for r in rows}, key=[r["dataset"] for r in rows].index)
    cols = ["data", "fm (50 Euler)", "best MeanFlow 1-NFE (EMA)", "base MeanFlow 1-NFE"]
    cols = [c for c in cols if any((n, c) in samples for n in names)]
    fig, axes = plt.subplots(len(names), len(cols), figsize=(2.6 * len(cols), 2.6 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            pts, title = samples.get((name, col), (None, col))
            if pts is not None:
                ax.scatter(pts[:, 0], pts[:, 1], s=0.5, alpha=0.4, color="C0" if j == 0 else "C3")
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {title}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["spirals", "concentric_rings"])
    ap.add_argument("--variants", nargs="+", default=["fm", "base", "p0"])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="k=v override applied to every variant")
    ap.add_argument("--tag", default="", help="suffix of the variant label for --set runs")
    ap.add_argument("--out", default="runs/meanflow_2d_ablate")
    ap.add_argument("--plot", default=None, help="write a samples PNG (data / fm / best / base) to this path")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["dataset"], r["variant"], r["steps"], r["seed"])] = r
    sets = {}
    for kv in args.set:
        k, val = kv.split("=", 1)
        sets[k] = type(DEFAULTS[k])(json.loads(val)) if not isinstance(DEFAULTS[k], bool) else val == "true"

    samples, rows = {}, []
    for name in args.datasets:
        floor = data_floor(name)
        for vname in args.variants:
            label = vname + args.tag
            v = {**DEFAULTS, **VARIANTS[vname], **sets}
            k = (name, label, args.steps, args.seed)
            npz = out / f"samples_{name}_{label}_{args.steps}_s{args.seed}.npz"
            if k in done and npz.exists():
                rows.append(done[k])
                z = np.load(npz)
                samples[(name, label)] = tuple({kk[4:]: z[kk] for kk in z.files if kk.startswith(pre)}
                                               for pre in ("raw_", "ema_"))
                continue
            t0 = time.perf_counter()
            model, p, ema, last_loss = train(name, v, args.steps, args.seed)
            wall = time.perf_counter() - t0
            m_raw, g_raw = evaluate(name, model, p, v["fm"])
            m_ema, g_ema = evaluate(name, model, ema, v["fm"])
            rec = {"dataset": name, "variant": label, "steps": args.steps, "seed": args.seed, "config": v,
                   "raw": m_raw, "ema": m_ema, "floor": floor, "loss_last": last_loss, "wall_s": round(wall, 1)}
            if True:  # always log (a rerun that only regenerates samples appends; the last line wins)
                with log.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[k] = rec
            rows.append(rec)
            print(json.dumps({kk: rec[kk] for kk in ("dataset", "variant", "steps", "raw", "ema", "floor", "wall_s")}),
                  flush=True)
            samples[(name, label)] = (g_raw, g_ema)
            np.savez(npz, **{f"raw_{kk}": g for kk, g in g_raw.items()}, **{f"ema_{kk}": g for kk, g in g_ema.items()})

    # table: 1-NFE SW2 (raw / EMA) vs the fm reference of the same steps (the better of its raw / EMA params)
    print("\n| dataset | variant | steps | 1-NFE raw | 1-NFE EMA | 2-NFE EMA | FM-50 | best 1-NFE / FM "
          "| 1-NFE EMA (8k) | FM-50 (8k) | floor (2k / 8k) | MMD² ×10³ 1-NFE raw / EMA | FM-50 MMD² ×10³ (raw) "
          "| floor MMD² ×10³ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmr = (done.get((r["dataset"], "fm" + args.tag, r["steps"], r["seed"]))  # the reference of the same --set
               or done.get((r["dataset"], "fm", r["steps"], r["seed"])))
        fl = f"{r['floor']['n2048']:.3f} / {r['floor']['n8192']:.3f}"
        fmv = min(fmr["raw"]["fm50"], fmr["ema"]["fm50"]) if fmr else float("nan")
        fm8 = min(fmr["raw"]["fm50_8k"], fmr["ema"]["fm50_8k"]) if fmr else float("nan")
        if "fm50" in r["raw"]:
            print(f"| {r['dataset']} | {r['variant']} | {r['steps']} | — | — | — | {fmv:.4f} (raw {r['raw']['fm50']:.4f}, "
                  f"EMA {r['ema']['fm50']:.4f}) | — | — | {fm8:.4f} | {fl} |")
            continue
        best = min(r["raw"]["nfe1"], r["ema"]["nfe1"])
        mmd = lambda d, k: f"{1e3 * d[k]:.2f}" if k in d else "—"
        print(f"| {r['dataset']} | {r['variant']} | {r['steps']} | {r['raw']['nfe1']:.4f} | {r['ema']['nfe1']:.4f} | "
              f"{r['ema']['nfe2']:.4f} | {fmv:.4f} | {best / fmv:.2f}x | {r['ema']['nfe1_8k']:.4f} | {fm8:.4f} | {fl} | "
              f"{mmd(r['raw'], 'nfe1_mmd')} / {mmd(r['ema'], 'nfe1_mmd')} | {mmd(fmr['raw'] if fmr else {}, 'fm50_mmd')} | "
              f"{mmd(r['floor'], 'mmd')} |")

    if args.plot:
        ref = {}
        for name in args.datasets:
            ref[name] = np.asarray(jaxlab.data.toy2d_sampler(name)(jax.random.split(jax.random.PRNGKey(10_000), 3)[1], 2048))
        pick = {}
        for name in args.datasets:
            mf = [r for r in rows if r["dataset"] == name and "nfe1" in r["ema"]]
            best = min(mf, key=lambda r: r["ema"]["nfe1"]) if mf else None
            pick[(name, "data")] = (ref[name], "data")
            for r in rows:
                if r["dataset"] != name or (name, r["variant"]) not in samples:
                    continue
                g_raw, g_ema = samples[(name, r["variant"])]
                if "fm50" in g_ema:
                    pick[(name, "fm (50 Euler)")] = (g_ema["fm50"], f"FM 50 Euler, SW2 {r['ema']['fm50']:.3f}")
                if best is not None and r is best:
                    pick[(name, "best MeanFlow 1-NFE (EMA)")] = (
                        g_ema["nfe1"], f"{r['variant']} 1-NFE EMA, SW2 {r['ema']['nfe1']:.3f}")
                if r["variant"] == "base":
                    pick[(name, "base MeanFlow 1-NFE")] = (g_raw["nfe1"], f"base 1-NFE, SW2 {r['raw']['nfe1']:.3f}")
        plot(out, rows, pick, Path(args.plot))
        print(f"written: {args.plot}")
    return 0


if __name__ == "__main__":
    main()
