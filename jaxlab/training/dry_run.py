"""``jaxlab train CONFIG --overlay tpu_configs/X.yaml --dry-run``: compile one step for a slice, on CPU.

The dry run builds the configured mesh on as many (simulated) devices as the slice has — re-executing
itself in a subprocess with ``--xla_force_host_platform_device_count=N`` when this process has fewer —
then lowers and compiles one train step with abstract (``ShapeDtypeStruct``) inputs, so no params are
ever materialised, and prints:

* the per-device memory estimate from the compiled program (arguments, outputs, temporaries),
* the per-device FLOPs and bytes accessed from XLA's cost analysis,
* the sharding of every parameter and of the optimizer state,
* the collective ops in the compiled HLO (all-reduce, all-gather, reduce-scatter, ...), with counts.

``dry_run_report(cfg)`` returns the same as a dict (used by tests and the scaling study).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections import Counter

import jax
import numpy as np

from jaxlab.distributed.mesh import mesh_from_config
from jaxlab.distributed.sharding import batch_sharding, unbox
from jaxlab.paths import key_path
from jaxlab.training.config import to_dict
from jaxlab.training.registry import build_task, build_task_optimizer
from jaxlab.training.state import TrainState
from jaxlab.training.train_step import make_train_step, state_shardings

__all__ = ["dry_run", "dry_run_report", "mesh_device_count", "collective_traffic"]

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def mesh_device_count(mesh_cfg) -> int:
    """How many devices the configured mesh needs (``-1`` axes count as 1)."""
    if mesh_cfg.ici is not None or mesh_cfg.dcn is not None:
        ici = [max(s, 1) for s in (mesh_cfg.ici or [1, 1, 1])]
        dcn = [max(s, 1) for s in (mesh_cfg.dcn or [1, 1, 1])]
        return math.prod(ici) * math.prod(dcn)
    return math.prod(max(s, 1) for s in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor))


_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_LINE = re.compile(r"=\s*(?P<ty>\(.*?\)|\w+\[[^\]]*\])\S*\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all"
                   r"|collective-permute)(?:-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def _array_bytes(ty: str) -> int:
    total = 0
    for dt, dims in _ARRAY.findall(ty):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES.get(dt, 4)
    return total


def _group_size(rest: str, num_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", rest)
    if m:
        sizes = dict((k.strip("'"), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        axes = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes[a] for a in axes) if axes else 1
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
    if m:
        return len([x for x in m.group(1).split(",") if x])
    return num_devices


def collective_traffic(hlo: str, num_devices: int) -> dict:
    """Per-device bytes sent over the interconnect by each collective kind (ring algorithms).

    all-reduce of S bytes: ``2 (n-1)/n S``; all-gather to S: ``(n-1)/n S``; reduce-scatter to S:
    ``(n-1) S``; all-to-all of S: ``(n-1)/n S``; collective-permute: ``S``; ``n`` = replica-group size.
    """
    out = Counter()
    for line in hlo.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        op, size = m.group("op"), _array_bytes(m.group("ty"))
        n = _group_size(m.group("rest"), num_devices)
        if n <= 1:
            continue
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                  "all-to-all": (n - 1) / n, "collective-permute": 1.0}[op]
        out[op] += factor * size
    return dict(out)


def _spec_str(sh) -> str:
    spec = getattr(sh, "spec", None)
    return "replicated" if spec is None or all(s is None for s in spec) else str(tuple(spec))


def dry_run_report(cfg) -> dict:
    """Lower + compile one train step of ``cfg`` on its mesh; return memory, cost, shardings, collectives."""
    n = mesh_device_count(cfg.mesh)
    if jax.device_count() < n:
        raise RuntimeError(f"dry run needs {n} devices, this process has {jax.device_count()}")
    mesh = mesh_from_config(cfg.mesh, devices=jax.devices()[:n])
    task = build_task(cfg)
    tx, forward_params_fn = build_task_optimizer(cfg, task)
    key = jax.random.PRNGKey(cfg.seed)

    base = task.abstract_base  # pretrained tasks: shapes only, no weights read

    def params_of(k):
        return task.init_params(k) if base is None else task.init_params(k, base)

    def make(k):
        return TrainState.create(
            params=unbox(params_of(k)), tx=tx, rng=k, ema_decay=cfg.train.ema_decay,
            loss_state=task.init_loss_state,
        )

    boxed = jax.eval_shape(params_of, key)
    abstract = jax.eval_shape(make, key)
    shardings = state_shardings(abstract, tx, mesh, boxed_params=boxed)
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), task.batch_fn(0))
    # batch_fn gives this process's share; the global batch is process_count times larger (1 here)
    batch_in = jax.tree.map(
        lambda b: jax.ShapeDtypeStruct(b.shape, b.dtype, sharding=batch_sharding(mesh, len(b.shape))), batch
    )
    step = make_train_step(
        task.loss_fn, tx, forward_params_fn=forward_params_fn, has_loss_state=task.has_loss_state, trainable=task.trainable,
        ema_decay=cfg.train.ema_decay, mesh=mesh, state_sharding=shardings, jit=False,
    )
    jitted = jax.jit(step, in_shardings=(shardings, jax.tree.map(lambda b: b.sharding, batch_in)),
                     out_shardings=(shardings, None))
    lowered = jitted.lower(state_in, batch_in)
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else (cost or {})
    hlo = compiled.as_text()
    collectives = Counter()
    for op in _COLLECTIVES:
        collectives[op] = len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
    param_rows = [
        (key_path(p), tuple(a.shape), _spec_str(s))
        for (p, a), s in zip(
            jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(shardings.params)
        )
    ]
    opt_specs = Counter(_spec_str(s) for s in jax.tree.leaves(shardings.opt_state))
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract.params))

    def mem_field(name):
        return int(getattr(mem, name, 0) or 0) if mem is not None else 0

    return {
        "devices": n,
        "mesh": dict(mesh.shape),
        "task": cfg.task.name,
        "params": n_params,
        "global_batch": [list(b.shape) for b in jax.tree.leaves(batch_in)],
        "memory_per_device_bytes": {
            "arguments": mem_field("argument_size_in_bytes"),
            "outputs": mem_field("output_size_in_bytes"),
            "temporaries": mem_field("temp_size_in_bytes"),
            "generated_code": mem_field("generated_code_size_in_bytes"),
        },
        "flops_per_device": float(cost.get("flops", 0.0)),
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
        "collectives": dict(collectives),
        "comm_bytes_per_device": collective_traffic(hlo, n),
        "param_shardings": param_rows,
        "opt_state_shardings": dict(opt_specs),
    }


def _print_report(rep: dict) -> None:
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    m = rep["memory_per_device_bytes"]
    print(f"dry run: task {rep['task']!r} on {rep['devices']} devices, mesh {rep['mesh']}, "
          f"{rep['params']:,} params, global batch {rep['global_batch']}")
    print(f"  memory per device: arguments {mib(m['arguments'])}, outputs {mib(m['outputs'])}, "
          f"temporaries {mib(m['temporaries'])}, total {mib(m['arguments'] + m['outputs'] + m['temporaries'])}")
    print(f"  cost per device:   {rep['flops_per_device']:.3e} FLOPs, {rep['bytes_accessed_per_device']:.3e} bytes accessed")
    print("  collectives:       " + (", ".join(f"{k} x{v}" for k, v in rep["collectives"].items() if v) or "none"))
    comm = rep["comm_bytes_per_device"]
    print("  interconnect bytes per device: " + (", ".join(f"{k} {mib(v)}" for k, v in comm.items()) or "none")
          + f" (total {mib(sum(comm.values()))})")
    print("  param shardings:")
    for path, shape, spec in rep["param_shardings"]:
        print(f"    {path:48s} {str(shape):18s} {spec}")
    print("  optimizer-state leaves by sharding: " + ", ".join(f"{k}: {v}" for k, v in rep["opt_state_shardings"].items()))


def dry_run(cfg, args=None, *, as_json: bool = False) -> int:
    """CLI entry: run :func:`dry_run_report` here, or in a subprocess with enough simulated devices."""
    n = mesh_device_count(cfg.mesh)
    if jax.device_count() >= n:
        rep = dry_run_report(cfg)
        if as_json:
            print(json.dumps(rep))
        else:
            _print_report(rep)
        return 0
    if os.environ.get("_JAXLAB_DRY_RUN_CHILD"):
        raise RuntimeError(f"dry run child has {jax.device_count()} devices, needs {n}")
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["_JAXLAB_DRY_RUN_CHILD"] = "1"
    code = (
        "import json, sys; from jaxlab.training.config import from_dict, RunConfig;"
        "from jaxlab.training.dry_run import dry_run;"
        "cfg = from_dict(RunConfig, json.loads(sys.argv[1]));"
        f"sys.exit(dry_run(cfg, as_json={as_json!r}))"
    )
    print(f"(dry run: re-executing on {n} simulated CPU devices)", file=sys.stderr)
    return subprocess.call([sys.executable, "-c", code, json.dumps(to_dict(cfg))], env=env)
