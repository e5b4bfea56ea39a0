"""Why are MeanFlow's one-step samples on the 2D toys worse than flow matching's? A mechanism check.

Not part of ``jaxlab reproduce`` (a single-seed diagnostic behind the README's one-step section). On one
dataset it trains, all with :class:`jaxlab.nn.VelocityMLP` (random Fourier features of ``z``):

* ``teacher``: flow matching (4x256, batch 512, 8000 steps), sampled with 50 Euler steps;
* ``distilled``: a student (4 x ``--hidden``) regressed directly onto the teacher's one-step map
  ``u(z, 0, 1) = z - Phi(z)`` (``Phi``: 100 Euler steps of the teacher) on 65 536 fixed noise draws. If
  it matches the teacher, the one-step map is representable by the network at this budget;
* MeanFlow students (4 x ``--hidden``, plain MSE, lam = 1, two U(0, 1) times sorted, half the rows
  ``r = t``) whose target ``T = sg(v - (t - r) du/dt)`` (:func:`jaxlab.losses.meanflow_target`) is built
  from three choices of ``v``:
  ``v_c`` (the conditional velocity ``e - x``: standard MeanFlow), ``teacher`` (the teacher's marginal
  velocity ``v(z_t, t)``: the same fixed point without the conditional noise) and ``self`` (the student's
  own ``u(z, t, t)`` on ``r < t`` rows, ``v_c`` on ``r = t`` rows).

Scores: MMD^2 (RBF bandwidth 0.1, unbiased U-statistic, x 1e3) and SW2 (512 projections) of 4096 samples
against 4096 data points. Rows are appended to ``<out>/mechanism.jsonl``; ``--plot`` writes the samples.

    python experiments/meanflow_2d/mechanism_one_step.py --dataset spirals --steps 4000 16000
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
from jaxlab.losses import euler_sample, flow_matching_loss, meanflow_sample, meanflow_target
from jaxlab.nn import VelocityMLP

MMD_BANDWIDTH = 0.1


def model(hidden: int) -> VelocityMLP:
    return VelocityMLP(hidden=hidden, depth=4, time_dim=64, time_scale=1.0, fourier_features=64, fourier_scale=0.5)


def init(m: VelocityMLP):
    return m.init(jax.random.PRNGKey(0), jnp.zeros((2, 2)), jnp.zeros(2), jnp.zeros(2))


def train(loss, params, steps: int, chunk: int = 500):
    """Adam 1e-3 with cosine decay; ``loss(params, key)``; step ``i`` uses ``fold_in(PRNGKey(1), i)``."""
    tx = optax.adam(optax.cosine_decay_schedule(1e-3, steps))

    def step(carry, i):
        p, o = carry
        val, g = jax.value_and_grad(loss)(p, jax.random.fold_in(jax.random.PRNGKey(1), i))
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), val

    run = jax.jit(lambda c, s: jax.lax.scan(step, c, s + jnp.arange(chunk)))
    carry = (params, tx.init(params))
    for s in range(0, steps, chunk):
        carry, _ = run(carry, s)
    return jax.block_until_ready(carry[0])  # so that the caller's wall time includes the computation


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="spirals")
    ap.add_argument("--steps", type=int, nargs="+", default=[4000, 16000], help="MeanFlow student budgets")
    ap.add_argument("--hidden", type=int, default=128, help="student width")
    ap.add_argument("--variants", nargs="+", default=["v_c", "teacher", "self"])
    ap.add_argument("--out", default="runs/meanflow_2d_mechanism")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    S = jaxlab.data.toy2d_sampler(args.dataset)
    ref = S(jax.random.PRNGKey(6), 4096)
    z_eval = jax.random.normal(jax.random.PRNGKey(5), (4096, 2))
    rows, samples = [], {}

    def record(name: str, g, wall: float, **kw):
        r = {"dataset": args.dataset, "run": name, **kw,
             "mmd_x1e3": 1e3 * float(jaxlab.mmd_rbf(g, ref, MMD_BANDWIDTH, unbiased=True)),
             "sw2": float(jaxlab.sliced_wasserstein2(g, ref, jax.random.PRNGKey(7), 512)), "wall_s": round(wall, 1)}
        rows.append(r)
        samples[len(rows) - 1] = np.asarray(g)  # one panel per row (a name recurs across --steps)
        with (out / "mechanism.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)

    floor = S(jax.random.PRNGKey(99), 4096)
    record("data vs data", floor, 0.0)

    teacher = model(256)
    t0 = time.perf_counter()
    pt = train(lambda p, k: flow_matching_loss(teacher.apply, p, S(jax.random.split(k)[0], 512),
                                               jax.random.split(k)[1])[0], init(teacher), 8000)
    record("teacher FM, 50 Euler", euler_sample(teacher.apply, pt, z_eval, steps=50), time.perf_counter() - t0)

    student = model(args.hidden)
    zp = jax.random.normal(jax.random.PRNGKey(42), (65536, 2))
    tp = jax.jit(lambda z: z - euler_sample(teacher.apply, pt, z, steps=100))(zp)

    def distill_loss(p, k):
        i = jax.random.randint(k, (512,), 0, zp.shape[0])
        u = student.apply(p, zp[i], jnp.zeros(512), jnp.ones(512))
        return jnp.mean(jnp.sum((u - tp[i]) ** 2, -1))

    t0 = time.perf_counter()
    pd = train(distill_loss, init(student), 4000)
    record("distilled one-step map, 1 NFE", meanflow_sample(student.apply, pd, z_eval, steps=1),
           time.perf_counter() - t0, steps=4000)

    def mf_loss(which: str, p, k, B: int = 256):
        kb, ke, kt = jax.random.split(k, 3)
        x, e = S(kb, B), jax.random.normal(ke, (B, 2))
        ab = jax.random.uniform(kt, (2, B))
        fm_rows = jnp.arange(B) < B // 2
        t, r = ab.max(0), jnp.where(fm_rows, ab.max(0), ab.min(0))
        z = (1 - t)[:, None] * x + t[:, None] * e
        if which == "teacher":
            v = jax.lax.stop_gradient(teacher.apply(pt, z, t, t))
        elif which == "self":
            v = jnp.where(fm_rows[:, None], e - x, jax.lax.stop_gradient(student.apply(p, z, t, t)))
        else:
            v = e - x
        _, T, _ = meanflow_target(student.apply, p, z, r, t, v, None, 1.0)
        u = student.apply(p, z, r, t)
        return jnp.mean(jnp.sum((u - jax.lax.stop_gradient(T)) ** 2, -1))

    for steps in args.steps:
        for which in args.variants:
            t0 = time.perf_counter()
            p = train(lambda p, k, w=which: mf_loss(w, p, k), init(student), steps)
            record(f"MeanFlow v={which}, 1 NFE", meanflow_sample(student.apply, p, z_eval, steps=1),
                   time.perf_counter() - t0, steps=steps)

    print("\n| run | steps | MMD² ×10³ (RBF 0.1, unbiased) | SW2 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r.get('steps', '—')} | {r['mmd_x1e3']:.3f} | {r['sw2']:.4f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ncol = 5
        nrow = -(-len(rows) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.3 * ncol, 2.5 * nrow), squeeze=False)
        for ax in axes.flat[len(rows):]:
            ax.axis("off")
        for i, (ax, r) in enumerate(zip(axes.flat, rows)):
            name, pts = r["run"], samples[i]
            ax.scatter(pts[:, 0], pts[:, 1], s=0.3, alpha=0.4, color="C0" if name == "data vs data" else "C3")
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            steps = f", {r['steps']} st" if "steps" in r else ""
            ax.set_title(f"{name}{steps}\nMMD² {r['mmd_x1e3']:.2f}e-3 (unbiased)", fontsize=6)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"written: {args.plot}")
    return 0


if __name__ == "__main__":
    main()
