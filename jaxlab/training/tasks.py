"""Task and model registries: what ``jaxlab train`` can run.

A :class:`Task` bundles everything the generic loop needs: parameter init, the loss, a step-indexed
batch function (so resuming needs no data-loader state), evaluation and report hooks, and optionally
its own optimizer (STEP) or forward-params map (STE). Methods register theirs with
:func:`register_task`; the options under ``task.options`` in a config are validated against the
dataclass given at registration, so a typo fails with the key path before any compute.

Example (what the flow-matching task below does)::

    @dataclasses.dataclass
    class MyOptions:
        sample_steps: int = 50

    def build(cfg, options, model):
        return Task(init_params=..., loss_fn=..., batch_fn=...)

    register_task("my_task", build, MyOptions)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.training.config import ConfigError, OptimConfig, RunConfig, from_dict

__all__ = [
    "Task",
    "register_task",
    "register_model",
    "build_task",
    "build_model",
    "build_optimizer",
    "validate_options",
    "TASKS",
    "MODELS",
    "FlowMatchingOptions",
    "VelocityMLPOptions",
]


@dataclasses.dataclass
class Task:
    """What the generic loop needs to train one objective.

    Attributes:
      init_params: ``key -> params`` (may return flax ``Partitioned`` boxes: their logical names drive sharding).
      loss_fn: ``(params, batch, key) -> (loss, metrics)`` (or with loss state, see ``make_train_step``).
      batch_fn: ``step -> batch`` (numpy / jax arrays, this process's share of the global batch).
      eval_fn: ``(params, key) -> {name: float}`` or ``None``.
      report_fn: ``(params, run_dir) -> list of markdown lines`` (writes plots into ``run_dir/plots``) or ``None``.
      make_tx: ``(optim_cfg, total_steps) -> optax transform`` overriding the default optimizer, or ``None``.
      forward_params_fn, has_loss_state, init_loss_state, trainable: passed to :func:`make_train_step`.
      apply_fn: the model's apply function (for users and reports).
    """

    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable
    batch_fn: Callable[[int], Any]
    eval_fn: Callable | None = None
    report_fn: Callable | None = None
    make_tx: Callable | None = None
    forward_params_fn: Callable | None = None
    has_loss_state: bool = False
    init_loss_state: Any = None
    apply_fn: Callable | None = None
    trainable: Any = None


TASKS: dict[str, tuple[Callable, type | None]] = {}
MODELS: dict[str, tuple[Callable, type | None]] = {}


def register_task(name: str, builder: Callable, options_cls: type | None = None) -> None:
    """Register ``builder(cfg, options, model) -> Task`` under ``name`` (``options_cls`` validates ``task.options``)."""
    TASKS[name] = (builder, options_cls)


def register_model(name: str, builder: Callable, options_cls: type | None = None) -> None:
    """Register ``builder(options, cfg) -> flax Module`` under ``name``."""
    MODELS[name] = (builder, options_cls)


def _options(registry, kind, name, raw):
    if name not in registry:
        raise ConfigError(f"{kind}.name: unknown {kind} {name!r}; registered: {sorted(registry)}")
    _, cls = registry[name]
    if cls is None:
        if raw:
            raise ConfigError(f"{kind}.options: {kind} {name!r} takes no options, got {sorted(raw)}")
        return None
    return from_dict(cls, raw, f"{kind}.options")


def validate_options(cfg: RunConfig) -> None:
    """Validate ``task.options`` and ``model.options`` against their registered dataclasses."""
    _ensure_builtin()
    _options(TASKS, "task", cfg.task.name, cfg.task.options)
    _options(MODELS, "model", cfg.model.name, cfg.model.options)


def build_model(cfg: RunConfig) -> nn.Module:
    _ensure_builtin()
    opts = _options(MODELS, "model", cfg.model.name, cfg.model.options)
    return MODELS[cfg.model.name][0](opts, cfg)


def build_task(cfg: RunConfig) -> Task:
    _ensure_builtin()
    opts = _options(TASKS, "task", cfg.task.name, cfg.task.options)
    return TASKS[cfg.task.name][0](cfg, opts, build_model(cfg))


def build_optimizer(optim: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam/AdamW/SGD with optional warmup + cosine decay and global-norm clipping."""
    if optim.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, max(optim.warmup_steps, 0), max(total_steps, optim.warmup_steps + 1)
        )
    elif optim.warmup_steps > 0:
        lr = optax.linear_schedule(0.0, optim.learning_rate, optim.warmup_steps)
    else:
        lr = optim.learning_rate
    if optim.name == "adam":
        tx = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "adamw":
        tx = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    else:
        tx = optax.sgd(lr, momentum=optim.b1)
    if optim.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
    return tx


# --------------------------------------------------------------------------- built-ins


@dataclasses.dataclass
class VelocityMLPOptions:
    """Options of :class:`jaxlab.nn.VelocityMLP` (see its docstring)."""

    hidden: int = 256
    depth: int = 4
    time_dim: int = 64
    time_scale: float = 1000.0

    def __post_init__(self):
        if self.hidden <= 0 or self.depth <= 0:
            raise ValueError(f"hidden and depth must be positive, got hidden={self.hidden}, depth={self.depth}")
        if self.time_dim % 2:
            raise ValueError(f"time_dim must be even, got {self.time_dim}")


def _build_velocity_mlp(opts: VelocityMLPOptions, cfg):
    from jaxlab.nn import VelocityMLP

    return VelocityMLP(hidden=opts.hidden, depth=opts.depth, time_dim=opts.time_dim, time_scale=opts.time_scale)


@dataclasses.dataclass
class FlowMatchingOptions:
    """Flow matching on a toy 2D dataset: Euler steps used to sample, projections for SW2."""

    sample_steps: int = 50
    sw_projections: int = 1024

    def __post_init__(self):
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.sw_projections < 1:
            raise ValueError(f"sw_projections must be >= 1, got {self.sw_projections}")


def _toy2d_batch_fn(name: str, batch_size: int, seed: int):
    from jaxlab.data import toy2d_sampler

    sampler = jax.jit(toy2d_sampler(name), static_argnums=1)
    nproc, pid = jax.process_count(), jax.process_index()
    if batch_size % nproc:
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by the {nproc} processes")
    local = batch_size // nproc
    data_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xDA7A)

    def batch_fn(step: int):
        key = jax.random.fold_in(jax.random.fold_in(data_key, step), pid)
        return np.asarray(sampler(key, local))

    return batch_fn, sampler


def _build_flow_matching(cfg: RunConfig, opts: FlowMatchingOptions, model: nn.Module) -> Task:
    from jaxlab.losses import euler_sample, flow_matching_loss
    from jaxlab.metrics import energy_distance, sliced_wasserstein2

    batch_fn, sampler = _toy2d_batch_fn(cfg.data.name, cfg.data.batch_size, cfg.seed)
    apply_fn = lambda params, z, r, t: model.apply({"params": params}, z, r, t)

    def init_params(key):
        return model.init(key, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.ones((1,)))["params"]

    def loss_fn(params, batch, key):
        return flow_matching_loss(apply_fn, params, batch, key)

    n_eval = cfg.data.eval_size

    @jax.jit
    def _eval(params, key):
        kn, kd, kp = jax.random.split(key, 3)
        gen = euler_sample(apply_fn, params, jax.random.normal(kn, (n_eval, 2)), steps=opts.sample_steps)
        ref = sampler(kd, n_eval)
        return {
            "sw2": sliced_wasserstein2(gen, ref, kp, opts.sw_projections),
            "energy": energy_distance(gen, ref),
        }

    def eval_fn(params, key):
        return {k: float(v) for k, v in _eval(params, key).items()}

    def report_fn(params, run_dir: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = jax.random.PRNGKey(cfg.seed + 1)
        gen = np.asarray(euler_sample(apply_fn, params, jax.random.normal(key, (n_eval, 2)), steps=opts.sample_steps))
        ref = np.asarray(sampler(jax.random.fold_in(key, 1), n_eval))
        fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
        axes[0].scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.5)
        axes[0].set_title(f"data: {cfg.data.name}")
        axes[1].scatter(gen[:, 0], gen[:, 1], s=2, alpha=0.5, color="C1")
        axes[1].set_title(f"flow matching, {opts.sample_steps} Euler steps")
        for ax in axes:
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_aspect("equal")
        fig.tight_layout()
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        fig.savefig(run_dir / "plots" / "samples.png", dpi=110)
        plt.close(fig)
        return ["![samples](plots/samples.png)"]

    return Task(
        init_params=init_params,
        loss_fn=loss_fn,
        batch_fn=batch_fn,
        eval_fn=eval_fn,
        report_fn=report_fn,
        apply_fn=apply_fn,
    )


_BUILTIN_DONE = False


def _ensure_builtin() -> None:
    """Register the built-in tasks/models (and import method packages that register theirs)."""
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    register_model("velocity_mlp", _build_velocity_mlp, VelocityMLPOptions)
    register_task("flow_matching", _build_flow_matching, FlowMatchingOptions)
    from jaxlab.training.method_tasks import register_method_tasks

    register_method_tasks()
