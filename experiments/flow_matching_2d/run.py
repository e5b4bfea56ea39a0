"""Flow matching on the five toy 2D datasets: trained model vs a standard Gaussian, SW2 and energy distance.

Every run goes through ``jaxlab.training.train`` (the same code path as ``jaxlab train config.yaml``), so
this experiment also exercises the runtime: config validation, checkpoints, metrics, reports. The
arguments are the common experiment set (:func:`jaxlab.training.experiment.setup`); ``config.yaml`` stays a
plain ``jaxlab train`` config, so the sweep's own sizes (datasets, seeds, steps) live in ``SWEEP`` below.

    jaxlab reproduce flow_matching_2d [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE] [--overlay FILE]

``--set``/``--overlay`` change the run config (e.g. ``--set optim.learning_rate=3e-4``); ``--steps`` and
``--seeds`` the sweep.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import jax
import numpy as np

import jaxlab
from jaxlab.losses import euler_sample
from jaxlab.training.config import to_dict
from jaxlab.training.experiment import markdown_table, mean_std, setup, std_note

# The sweep: the full table, and --quick (what `make demo` runs). config.yaml's train.steps is `jaxlab train`'s.
SWEEP = {"datasets": ["eight_gaussians", "checkerboard", "two_moons", "spirals", "concentric_rings"],
         "full": {"seeds": 3, "steps": 5000}, "quick": {"seeds": 1, "steps": 2000}}


def evaluate(cfg, params, n: int, seed: int):
    """SW2 / energy distance of model samples and of N(0, I) samples against fresh data."""
    task = jaxlab.training.build_task(cfg)
    sampler = jaxlab.data.toy2d_sampler(cfg.data.name)
    key = jax.random.PRNGKey(10_000 + seed)
    kn, kd, kp, kg = jax.random.split(key, 4)
    steps = cfg.task.options.get("sample_steps", 50)
    gen = euler_sample(task.apply_fn, params, jax.random.normal(kn, (n, 2)), steps=steps)
    ref = sampler(kd, n)
    gauss = jax.random.normal(kg, (n, 2))
    out = {
        "sw2": float(jaxlab.sliced_wasserstein2(gen, ref, kp, 1024)),
        "energy": float(jaxlab.energy_distance(gen, ref)),
        "sw2_gaussian": float(jaxlab.sliced_wasserstein2(gauss, ref, kp, 1024)),
        "energy_gaussian": float(jaxlab.energy_distance(gauss, ref)),
    }
    return out, np.asarray(gen), np.asarray(ref)


def plot_grid(samples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(samples), figsize=(2.6 * len(samples), 5.4), squeeze=False)
    for j, (name, (gen, ref)) in enumerate(samples.items()):
        for i, (pts, title, c) in enumerate(((ref, "data", "C0"), (gen, "flow matching", "C1"))):
            ax = axes[i, j]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.4, color=c)
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}\n{title}" if i == 0 else title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_tag(cfg) -> str:
    """8 hex digits of the resolved run config, ignoring where the run lives."""
    d = {k: v for k, v in to_dict(cfg).items() if k not in ("name", "out_dir")}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:8]


def main(argv=None) -> int:
    # --steps goes to the sweep, not into the run config (steps_key=()); --seeds lands in cfg["seeds"].
    exp = setup(__file__, argv, description=__doc__, steps_key=())
    sweep = SWEEP["quick" if exp.quick else "full"]
    base = {k: v for k, v in exp.cfg.items() if k != "seeds"}  # the resolved `jaxlab train` config
    exp.seeds = seeds = exp.seeds or sweep["seeds"]
    steps = exp.args.steps or sweep["steps"]
    results: dict[str, list[dict]] = {}
    samples = {}
    for name in SWEEP["datasets"]:
        for seed in range(seeds):
            cfg = jaxlab.training.load_config(base=base, sets=[
                f"name={name}_s{seed}", f"out_dir={exp.out / 'runs'}", f"data.name={name}", f"seed={seed}",
                f"train.steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
            ])
            # one run dir per resolved config: rerunning the same command reuses the finished runs, a
            # changed budget or --set trains new ones (a run dir refuses to resume under another config)
            cfg.name = f"{name}_s{seed}_{config_tag(cfg)}"
            state, _ = jaxlab.training.train(cfg)
            params = state.ema_params if state.ema_params is not None else state.params
            m, gen, ref = evaluate(cfg, params, cfg.data.eval_size, seed)
            results.setdefault(name, []).append(m)
            if seed == 0:
                samples[name] = (gen, ref)
            print(f"{name} seed {seed}: sw2 {m['sw2']:.4f} (gaussian {m['sw2_gaussian']:.4f})", flush=True)

    rows = []
    for name, runs in results.items():
        col = {k: [r[k] for r in runs] for k in runs[0]}
        rows.append([name] + [mean_std(col[k], digits=4) for k in ("sw2", "sw2_gaussian", "energy", "energy_gaussian")]
                    + ["yes" if all(r["sw2"] < r["sw2_gaussian"] for r in runs) else "NO"])
    o, d = base["optim"], base["data"]
    report = exp.header("Flow matching on toy 2D data") + [
        f"{steps} {o['name']} steps (batch {d['batch_size']}, {o['schedule']} LR {o['learning_rate']}, warmup "
        f"{o.get('warmup_steps', 0)}, EMA {base['train'].get('ema_decay')}), {base['model']['name']} "
        f"{base['model']['options']}, {seeds} seed(s), {base['task']['options'].get('sample_steps', 50)} Euler steps "
        f"for sampling, metrics on {d['eval_size']} fresh samples (SW2 with 1024 projections; energy distance). "
        f"Wall time {time.perf_counter() - exp.started:.0f} s.",
        "",
        f"Columns: {std_note(seeds)}; \"model beats N(0,I)\" = lower SW2 than noise on every seed.",
        "",
        markdown_table(["dataset", "SW2 model", "SW2 N(0,I)", "energy model", "energy N(0,I)", "model beats N(0,I)"],
                       rows),
        "",
        "![samples](samples.png)",
    ]
    exp.write("\n".join(report), {"steps": steps, "seeds": seeds, "results": results})
    plot_grid(samples, exp.out / "samples.png")
    print(f"written: {exp.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    main()
