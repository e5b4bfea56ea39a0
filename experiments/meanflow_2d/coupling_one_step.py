"""One-step MeanFlow on toy 2D data with minibatch-OT data-noise pairs: the pilot behind meanflow_2d's v3 default.

Not part of ``jaxlab reproduce`` (single seed). On each dataset it trains, with the meanflow_2d v2 network
(``VelocityMLP`` 4x128, 64 Fourier features of scale 0.5) and optimiser (Adam 1e-3, cosine, batch 256):

* ``fm:<coupling>``: flow matching, sampled with 50 Euler steps (and 1, to show how straight the flow is);
* ``mf:<coupling>:p=<p>``: MeanFlow (``jaxlab.meanflow_loss``, lam = 1, 50 % r = t rows, logit-normal
  (-0.4, 1) times, adaptive weight power ``p``, c = 1e-3), sampled with 1 and 2 steps;

where ``coupling`` is ``independent`` (the loss draws its own noise) or ``exact`` / ``sinkhorn`` (the batch noise
re-paired to the data by ``jaxlab.losses.ot_couple``). Scores: MMD² (RBF 0.1, unbiased, x 1e3) and SW2 (512
projections) of 4096 samples against 4096 data points.

``--noise`` also measures the mechanism: for each trained flow-matching network, the regression target's
scatter ``E ||v_c - v_theta(z_t, t)||^2`` on fresh batches of the same pairing at t in {0.05, ..., 0.95}
(the conditional variance of ``v_c`` around the marginal velocity, plus the network's error).

    python experiments/meanflow_2d/coupling_one_step.py --datasets spirals --runs fm:independent mf:exact:p=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from mechanism_one_step import init, model, train  # this folder is sys.path[0] when run as a script

import jaxlab
from jaxlab.losses import (
    MeanFlowConfig,
    euler_sample,
    flow_matching_loss,
    meanflow_loss,
    meanflow_sample,
    ot_couple,
)

DEFAULT_RUNS = ["fm:independent", "fm:exact", "mf:independent:p=1", "mf:independent:p=0", "mf:exact:p=1",
                "mf:exact:p=0.5", "mf:exact:p=0", "mf:sinkhorn:p=0"]
NOISE_TIMES = np.round(np.linspace(0.05, 0.95, 10), 2)


def pairs(sampler, key, batch: int, coupling: str):
    kx, ke, ks = jax.random.split(key, 3)
    x, e = sampler(kx, batch), jax.random.normal(ke, (batch, 2))
    return x, (e if coupling == "independent" else ot_couple(x, e, method=coupling, key=ks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["spirals"])
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--noise", action="store_true", help="measure the FM runs' target scatter per t")
    ap.add_argument("--out", default="runs/meanflow_2d_coupling")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net = model(128)  # the v2/v3 network: 4x128, 64 Fourier features of scale 0.5
    p0 = init(net)
    base = MeanFlowConfig(jvp_cond_weight=1.0, flow_matching_fraction=0.5, time_mu=-0.4, time_sigma=1.0,
                          adaptive_p=1.0, adaptive_c=1e-3, reduction="sum")
    z_eval = jax.random.normal(jax.random.PRNGKey(5), (4096, 2))
    for name in args.datasets:
        S = jaxlab.data.toy2d_sampler(name)
        ref = S(jax.random.PRNGKey(6), 4096)
        score = lambda g, ref=ref: {
            "mmd_x1e3": 1e3 * float(jaxlab.mmd_rbf(g, ref, 0.1, unbiased=True)),
            "sw2": float(jaxlab.sliced_wasserstein2(g, ref, jax.random.PRNGKey(7), 512))}
        for spec in args.runs:
            kind, coupling, *opt = spec.split(":")
            t0 = time.perf_counter()
            row = {"dataset": name, "run": spec, "steps": args.steps}
            if kind == "fm":
                def loss(p, k, c=coupling, S=S):
                    kb, kl = jax.random.split(k)
                    x, e = pairs(S, kb, 256, c)
                    return flow_matching_loss(net.apply, p, x, kl, noise=e)[0]

                p = train(loss, p0, args.steps)
                row.update(fm50=score(euler_sample(net.apply, p, z_eval, steps=50)),
                           fm1=score(euler_sample(net.apply, p, z_eval, steps=1)))
                if args.noise:
                    def scatter(t, k, p=p, c=coupling, S=S):
                        x, e = pairs(S, k, 1024, c)
                        tt = jnp.full((1024,), t)
                        z = (1 - t) * x + t * e
                        return jnp.mean(jnp.sum((e - x - net.apply(p, z, tt, tt)) ** 2, -1))

                    keys = jax.random.split(jax.random.PRNGKey(11), 8)
                    row["target_scatter"] = {f"{t:g}": float(np.mean([scatter(float(t), k) for k in keys]))
                                             for t in NOISE_TIMES}
            else:
                cfg = dataclasses.replace(base, adaptive_p=float(opt[0].split("=")[1]) if opt else 1.0)

                def loss(p, k, c=coupling, cfg=cfg, S=S):
                    kb, kl = jax.random.split(k)
                    x, e = pairs(S, kb, 256, c)
                    return meanflow_loss(net.apply, p, x, kl, config=cfg, noise=e)[0]

                p = train(loss, p0, args.steps)
                row.update(mf1=score(meanflow_sample(net.apply, p, z_eval, steps=1)),
                           mf2=score(meanflow_sample(net.apply, p, z_eval, steps=2)))
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    main()
