"""Benchmark: optimizer-update time of ``chain(adamw, grasp)`` (and ``grasp_around``) over plain ``adamw``.

Two parameter sets of the bundled transformer (``jaxlab.nn.transformer``):

* ``lora``  -- LoRA factors (rank r) on every ``attn/{q,k,v,o}`` and ``mlp/{up,down}`` with the base
  frozen by ``jaxlab.lora.freeze_base`` (the base leaves are part of the tree, as in training; the
  optimizer, GRASP included, sits inside ``freeze_base``, so only the LoRA factors reach it);
* ``dense`` -- full fine-tuning of all params (every residual-side kernel projected).

Every optimizer comes from the method registry (``jaxlab.training.methods``: ``adamw``, ``grasp``,
``grasp_around``, AdamW lr 1e-3, weight decay 0.01); for ``lora`` each sits behind ``freeze_base``.

Each variant times ``tx.update`` + ``apply_updates`` only (no forward/backward), ``--inner`` updates inside
one jitted ``lax.fori_loop`` (params and state carried, so nothing is hoisted), median over ``--reps``
calls, the variants interleaved within each repetition. The ratio is against ``adamw`` measured in the
same run on the same device. Targets (issue 5):
<= 1.10x (LoRA), <= 1.25x (dense).

GRASP's residual mode lives in the model's backward pass, not in the optimizer, so it is timed as a whole
LoRA **train step** (loss, gradient through the model, ``freeze_base`` AdamW update) on a ``--batch`` x
``--seq`` token batch: plain AdamW vs the residual mode (:func:`jaxlab.nn.residual_projection_hook` at
every residual write), update mode (``grasp_around``) and both, interleaved in the same run; ratio against
the plain train step.

Usage::

    python benchmarks/grasp_step.py            # d_model 512, 8 layers, k = 4
    python benchmarks/grasp_step.py --quick    # d_model 128, 2 layers (CPU seconds)

Writes ``benchmarks/grasp_step.json`` (``grasp_step_quick.json`` with ``--quick``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxlab.nn import lora, residual_projection_hook
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.training.methods import get_method

# Table label -> registry method (``grasp`` = chain(adamw, grasp), ``grasp_around`` = grasp_around(adamw)).
VARIANTS = (("adamw", "adamw"), ("chain(adamw, grasp)", "grasp"), ("grasp_around(adamw)", "grasp_around"))


def _runner(tx, params, inner: int):
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    @jax.jit
    def run(params, state):
        def body(_, c):
            p, s = c
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        return lax.fori_loop(0, inner, body, (params, state))

    state = tx.init(params)
    jax.block_until_ready(run(params, state))  # compile + warm up
    return lambda: jax.block_until_ready(run(params, state))


def _step_runner(model, tx, params, tokens, hook, inner: int):
    """``inner`` full LoRA train steps (forward, backward, update) in one jitted loop."""
    def loss(p):
        return causal_lm_loss(model.apply({"params": lora.merge(p)}, tokens, resid_hook=hook), tokens)

    @jax.jit
    def run(params, state):
        def body(_, c):
            p, s = c
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, u), s

        return lax.fori_loop(0, inner, body, (params, state))

    state = tx.init(params)
    jax.block_until_ready(run(params, state))
    return lambda: jax.block_until_ready(run(params, state))


def _time_interleaved(runners: dict, inner: int, reps: int) -> dict:
    """Median seconds per update of each runner; the runners alternate within every repetition so slow
    phases of a shared machine hit all of them alike."""
    times = {k: [] for k in runners}
    for _ in range(reps):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r()
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="dimension of the projected subspace")
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="train-step rows: token batch")
    ap.add_argument("--seq", type=int, default=None, help="train-step rows: sequence length")
    args = ap.parse_args(argv)
    d = args.d_model or (128 if args.quick else 512)
    layers = args.layers or (2 if args.quick else 8)
    inner = args.inner or (20 if args.quick else 50)
    cfg = TransformerConfig(vocab=256, d_model=d, n_layers=layers, n_heads=4, d_ff=4 * d, max_len=64)
    model = Transformer(cfg)
    base = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((d, args.k)))[0]
    lp = lora.inject(base, [r"attn/(q|k|v|o)$", r"mlp/(up|down)$"], args.rank, key=jax.random.PRNGKey(1))
    rows = []
    for name, params, wrap in (("lora", lp, lambda t: lora.freeze_base(t, lp)), ("dense", base, lambda t: t)):
        hyper = {"adamw": {}, "grasp": {"subspace": U}, "grasp_around": {"subspace": U}}
        txs = {label: wrap(get_method(method).make(1e-3, weight_decay=0.01, **hyper[method]))
               for label, method in VARIANTS}
        t_all = _time_interleaved({k: _runner(tx, params, inner) for k, tx in txs.items()}, inner, args.reps)
        base_t = t_all.pop("adamw")
        for variant, t in t_all.items():
            rows.append({"params": name, "variant": variant, "adamw_us": 1e6 * base_t, "grasp_us": 1e6 * t,
                         "ratio": t / base_t, "n_params": int(sum(x.size for x in jax.tree.leaves(params)))})
    # whole train steps: the residual mode is a backward rule inside the model
    batch, seq = args.batch or (8 if args.quick else 16), args.seq or (32 if args.quick else 64)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (batch, seq), 0, cfg.vocab)
    step_inner = max(1, inner // 10)
    plain = lora.freeze_base(get_method("adamw").make(1e-3, weight_decay=0.01), lp)
    around = lora.freeze_base(get_method("grasp_around").make(1e-3, weight_decay=0.01, subspace=U), lp)
    hook = residual_projection_hook(U)
    steps = {"adamw": (plain, None), "GRASP residual": (plain, hook), "GRASP update (grasp_around)": (around, None),
             "GRASP both": (around, hook)}
    t_all = _time_interleaved({k: _step_runner(model, tx, lp, tokens, h, step_inner) for k, (tx, h) in steps.items()},
                              step_inner, args.reps)
    base_t = t_all.pop("adamw")
    for variant, t in t_all.items():
        rows.append({"params": "lora train step", "variant": variant, "adamw_us": 1e6 * base_t, "grasp_us": 1e6 * t,
                     "ratio": t / base_t, "n_params": int(sum(x.size for x in jax.tree.leaves(lp))),
                     "batch": batch, "seq": seq})
    dev = jax.devices()[0]
    out = {"device": f"{dev.platform} {dev.device_kind}", "d_model": d, "layers": layers, "rank": args.rank,
           "k": args.k, "inner": inner, "step_inner": step_inner, "reps": args.reps, "rows": rows}
    path = pathlib.Path(__file__).with_name("grasp_step_quick.json" if args.quick else "grasp_step.json")
    path.write_text(json.dumps(out, indent=2))
    print(f"device {out['device']}, d_model {d}, {layers} layers, LoRA rank {args.rank}, k {args.k}")
    print(f"{'params':16s} {'variant':28s} {'#params':>10s} {'adamw us':>10s} {'grasp us':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['params']:16s} {r['variant']:28s} {r['n_params']:10d} {r['adamw_us']:10.1f} "
              f"{r['grasp_us']:10.1f} {r['ratio']:7.3f}")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
