"""Optimizer update time of the N:M transforms relative to ``optax.adamw`` on the transformer's params.

For each optimizer the jitted ``tx.update(grads, state, params)`` followed by ``optax.apply_updates``
is timed on the parameters of :class:`jaxlab.nn.Transformer` (N:M on every block projection).
Every optimizer is built through the method registry (``get_method(name).make(lr, common=...)``,
as ``jaxlab train`` and the experiments build them). Timed: ``adamw`` (``optax.adamw``, the
baseline), ``step`` (``step_adamw``) in phase 1 and in phase 2 (the state's phase forced to 1),
``ste``, ``sr_ste`` and ``asp`` (before and after pruning); rows are labelled by the factory. Three
phase-1 ablations split its cost: without the SR-STE term (``sr_ste_lambda=0``: its phase-1 work is
the unpacking of an all-zero mask), with ``Z_t`` measured on one step in 10 (``z_every=10``) and
never (``z_every=10**6``).
``--train-step`` times whole train steps instead (``causal_lm_loss`` on a ``--batch`` x ``--seq`` token
batch, its gradient through the forward params, the update): ``adamw`` vs STEP in phase 1 (reference
``Z_t`` and ``z_stride=16``) and phase 2, so the update's overhead can be read as a share of a step.
Methods are interleaved within each repetition so that load on a shared machine hits all of them
alike; the reported time is the median over repetitions of the mean over ``--inner`` back-to-back
updates; ratios divide by adamw's median from the same run.

    python benchmarks/optimizer_step.py [--quick] [--d-model 512 --layers 4]

Writes ``benchmarks/optimizer_step.json`` (``optimizer_step_quick.json`` with ``--quick``) next to
this file and prints a table. Targets (issue 4): phase 2 <= 1.15x, phase 1 <= 1.10x adamw.

Result on a quiet 2-core CPU box (2026-12-03, ``--reps 21``; d_model 512, 4 layers, 12.9 M params, 2:4):
phase 2 0.97x (meets the target), phase 1 1.47x (misses it), STE 1.00x, SR-STE 1.30x, ASP 0.95x / 0.98x;
repeated runs move each ratio by about +-0.1. Of phase 1's extra 0.47x the Z_t reduction is 0.40x (a
second pass over ``g`` and ``v`` that XLA:CPU does not fuse with the moment updates: no multi-output
reduce fusion on CPU); ``z_stride=16`` brings phase 1 to 1.15x, ``z_every=10`` to 1.09x (their effect on
the switch step: experiments/step_digits/README.md). With ``--train-step`` (batch 8 x 128): phase 1
1.021x, ``z_stride=16`` 1.010x, phase 2 1.012x of AdamW's train step. Not measured on GPU/TPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.training.methods import get_method
from jaxlab.transforms import StepState


def _force(state, cls, **fields):
    """Replace fields of the (unique) ``cls`` sub-state inside an optax chain state."""
    return jax.tree.map(lambda s: s._replace(**fields) if isinstance(s, cls) else s, state,
                        is_leaf=lambda s: isinstance(s, cls))


def build(args):
    cfg = TransformerConfig(vocab=256, d_model=args.d_model, n_layers=args.layers, n_heads=max(1, args.d_model // 64),
                            d_ff=4 * args.d_model, max_len=max(128, getattr(args, "seq", 128)))
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype) * 1e-2, params)
    # N:M on the block projections (a regex, applied by the registry through jaxlab.transforms.path_filter);
    # the embeddings and the unembedding stay dense. n/m/sparsify reach only the N:M methods.
    common = dict(weight_decay=0.0, n=2, m=4, sparsify=r"block_\d+/(attn|mlp)/\w+/kernel$")
    never = dict(switch_eps=0.0, t_min=10**6, t_max=10**6)  # STEP's phase is forced below
    rows = [  # (label: the factory behind the registry name, registry name, hyper-parameters, forced phase)
        ("adamw", "adamw", {}, None),
        ("step_adamw phase 1", "step", never, 0),
        ("step_adamw phase 1, no SR-STE term", "step", {**never, "sr_ste_lambda": 0.0}, 0),
        ("step_adamw phase 1, z_every=10", "step", {**never, "z_every": 10}, 0),
        ("step_adamw phase 1, z_stride=4", "step", {**never, "z_stride": 4}, 0),
        ("step_adamw phase 1, z_stride=16", "step", {**never, "z_stride": 16}, 0),
        ("step_adamw phase 1, Z never (ablation)", "step", {**never, "z_every": 10**6}, 0),
        ("step_adamw phase 2", "step", never, 1),
        ("ste_adamw", "ste", {}, None),
        ("sr_ste_adamw", "sr_ste", {}, None),
        ("asp_adamw (dense part)", "asp", {"prune_step": 10**6}, None),
        ("asp_adamw (pruned)", "asp", {"prune_step": 1}, None),
    ]
    opts = {label: (get_method(name).make(1e-3, common=common, **hyper), phase)
            for label, name, hyper, phase in rows}
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return model, params, grads, opts, n_params


def make_loop(tx, inner):
    @jax.jit
    def loop(params, state, grads):
        def body(_, carry):
            p, s = carry
            u, s = tx.update(grads, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, inner, body, (params, state))

    return loop


def make_train_loop(model, tx, forward_params_fn, tokens, inner):
    """``inner`` whole train steps (loss, gradient through the forward params, update) in one jitted loop."""

    def loss(p, state):
        fp = p if forward_params_fn is None else forward_params_fn(p, state)
        return causal_lm_loss(model.apply({"params": fp}, tokens), tokens)

    @jax.jit
    def loop(params, state, _):
        def body(_, carry):
            p, s = carry
            g = jax.grad(loss)(p, s)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, inner, body, (params, state))

    return loop


TRAIN_ROWS = ("adamw", "step_adamw phase 1", "step_adamw phase 1, z_stride=16", "step_adamw phase 2")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, few repetitions")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--train-step", action="store_true", help="time whole train steps (forward + backward + update)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.inner, args.reps = 128, 2, 5, 5
    model, params, grads, opts, n_params = build(args)
    if args.train_step:
        opts = {k: opts[k] for k in TRAIN_ROWS}
        tokens = jax.random.randint(jax.random.PRNGKey(2), (args.batch, args.seq), 0, 256)
        fwd = get_method("step").forward_params_fn
    loops, states = {}, {}
    for name, (tx, phase) in opts.items():
        state = tx.init(params)
        if phase is not None:
            state = _force(state, StepState, phase=jnp.asarray(phase, jnp.int32))
        if name == "asp_adamw (pruned)":  # one update prunes (prune_step=1); time the masked regime after it
            _, state = jax.jit(tx.update)(grads, state, params)
        if args.train_step:
            loops[name] = make_train_loop(model, tx, None if name == "adamw" else fwd, tokens, args.inner)
        else:
            loops[name] = make_loop(tx, args.inner)
        states[name] = state
        jax.block_until_ready(loops[name](params, state, grads))  # compile + warm up
    times = {name: [] for name in opts}
    for _ in range(args.reps):
        for name in opts:
            t0 = time.perf_counter()
            jax.block_until_ready(loops[name](params, states[name], grads))
            times[name].append((time.perf_counter() - t0) / args.inner)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med["adamw"]
    rows = [{"optimizer": k, "median_ms": 1e3 * v, "ratio_vs_adamw": v / base} for k, v in med.items()]
    result = {
        "benchmark": "optimizer_step",
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "model": {"d_model": args.d_model, "layers": args.layers, "params": int(n_params)},
        "inner": args.inner,
        "reps": args.reps,
        "ratio": "2:4",
        "timed": f"train step (batch {args.batch} x {args.seq})" if args.train_step else "update + apply_updates",
        "rows": rows,
        "targets": {"step_adamw phase 1": 1.10, "step_adamw phase 2": 1.15},
    }
    here = pathlib.Path(__file__).resolve().parent
    stem = "optimizer_train_step" if args.train_step else "optimizer_step"
    out = pathlib.Path(args.out) if args.out else here / (f"{stem}_quick.json" if args.quick else f"{stem}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{result['timed']}, transformer d_model={args.d_model} layers={args.layers} "
          f"({n_params:,} params), {result['device']}")
    print(f"{'optimizer':<40}{'median ms':>12}{'x adamw':>10}")
    for r in rows:
        print(f"{r['optimizer']:<40}{r['median_ms']:>12.3f}{r['ratio_vs_adamw']:>10.3f}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
