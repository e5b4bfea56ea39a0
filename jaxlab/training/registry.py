"""Task and model registries: what ``jaxlab train`` can run.

A :class:`Task` bundles everything the generic loop needs: parameter init, the loss, a step-indexed
batch function (so resuming needs no data-loader state), evaluation and report hooks. The optimizer
comes from the method registry (:mod:`jaxlab.training.methods`, ``optim.name``); a task may wrap it
(``wrap_tx``, e.g. LoRA's frozen base). Tasks register with :func:`register_task`; the options under
``task.options`` in a config are validated against the dataclass given at registration, so a typo
fails with the key path before any compute. The built-in tasks live in
:mod:`jaxlab.training.tasks_toy2d` and :mod:`jaxlab.training.tasks_lm`, imported by
``jaxlab.training``.

Example (what ``tasks_toy2d`` does for flow matching)::

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
from typing import Any

import flax.linen as nn
import jax

from jaxlab.training.config import ConfigError, RunConfig, from_dict, read_config
from jaxlab.training.methods import METHODS, build_optimizer

__all__ = [
    "MODELS",
    "TASKS",
    "TASK_DATASETS",
    "Task",
    "build_model",
    "build_task",
    "build_task_optimizer",
    "load_config",
    "register_model",
    "register_task",
    "validate_config",
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
      wrap_tx: ``tx -> tx`` applied to the optimizer built from ``optim`` (e.g. LoRA's ``freeze_base``), or ``None``.
      forward_params_fn: ``(params, opt_state) -> params`` for :func:`make_train_step`; ``None`` takes the
        method's own (:func:`jaxlab.sparse_forward_params` for N:M methods).
      has_loss_state, init_loss_state, trainable: passed to :func:`make_train_step`.
      apply_fn: the model's apply function (for users and reports).
      load_base: ``mesh_or_None -> params``: concrete pretrained parameters (e.g. :func:`jaxlab.models.load_hf`,
        placed with their shardings under a mesh). When set, ``init_params`` is called as
        ``init_params(key, base)`` inside the jitted init with ``base`` as an *argument* (never a constant
        baked into the program).
      abstract_base: the ``jax.ShapeDtypeStruct`` tree of ``load_base``'s result (dry runs: no weights read).
      export_fn: ``(state, run_dir) -> list of markdown lines``, called once on the leader when the run
        reaches its last step (e.g. write a Hugging Face directory of the trained model).
      optim_hyper: extra method hyper-parameters only code can give (e.g. an N:M ``sparsify`` leaf filter),
        passed to the ``optim`` method where its factory takes them.
    """

    init_params: Callable[[jax.Array], Any]
    loss_fn: Callable
    batch_fn: Callable[[int], Any]
    eval_fn: Callable | None = None
    report_fn: Callable | None = None
    wrap_tx: Callable | None = None
    forward_params_fn: Callable | None = None
    has_loss_state: bool = False
    init_loss_state: Any = None
    apply_fn: Callable | None = None
    trainable: Any = None
    load_base: Callable | None = None
    abstract_base: Any = None
    export_fn: Callable | None = None
    optim_hyper: Any = None


TASKS: dict[str, tuple[Callable, type | None]] = {}
MODELS: dict[str, tuple[Callable, type | None]] = {}
# task name -> the data.name values it accepts (a task that reads no data.name is absent)
TASK_DATASETS: dict[str, tuple[str, ...]] = {}


def register_task(name: str, builder: Callable, options_cls: type | None = None, *,
                  datasets: tuple[str, ...] | None = None) -> None:
    """Register ``builder(cfg, options, model) -> Task`` under ``name`` (``options_cls`` validates ``task.options``;
    ``datasets``, if given, are the ``data.name`` values the task accepts, checked before any compute)."""
    TASKS[name] = (builder, options_cls)
    if datasets is None:
        TASK_DATASETS.pop(name, None)
    else:
        TASK_DATASETS[name] = tuple(datasets)


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


def validate_config(cfg: RunConfig) -> None:
    """Check the registered parts of ``cfg``: ``optim.name`` and ``optim.options`` against the method
    registry, ``task.options`` and ``model.options`` against their registered dataclasses.

    Raises:
      ConfigError: naming the key path and what is allowed.
    """
    if cfg.optim.name not in METHODS:
        raise ConfigError(f"optim.name: unknown method {cfg.optim.name!r}; registered: {sorted(METHODS)}")
    # options reach the methods that take them (one config serves --set optim.name=...); a name that
    # no registered method takes is a typo
    known = {h for m in METHODS.values() for h in m.hyperparameters}
    unknown = sorted(set(cfg.optim.options) - known)
    if unknown:
        raise ConfigError(f"unknown key optim.options.{unknown[0]!r}: no registered method takes it; "
                          f"method {cfg.optim.name!r} accepts {list(METHODS[cfg.optim.name].hyperparameters)}")
    _options(TASKS, "task", cfg.task.name, cfg.task.options)
    _options(MODELS, "model", cfg.model.name, cfg.model.options)
    allowed = TASK_DATASETS.get(cfg.task.name)
    if allowed is not None and cfg.data.name not in allowed:
        raise ConfigError(f"data.name: unknown dataset {cfg.data.name!r} for task {cfg.task.name!r}; "
                          f"available: {list(allowed)}")


def load_config(path=None, *, overlays=(), sets=(), base: dict | None = None) -> RunConfig:
    """Load and fully validate a run config: :func:`~jaxlab.training.config.read_config`, then
    :func:`validate_config`, so a typo anywhere fails with its key path before any compute.

    Example::

        cfg = load_config("experiments/flow_matching_2d/config.yaml",
                          overlays=["tpu_configs/v5e-8.yaml"], sets=["train.steps=500"])
    """
    cfg = read_config(path, overlays=overlays, sets=sets, base=base)
    validate_config(cfg)
    return cfg


def build_model(cfg: RunConfig) -> nn.Module:
    """The flax module registered under ``model.name``, built from ``model.options``."""
    opts = _options(MODELS, "model", cfg.model.name, cfg.model.options)
    return MODELS[cfg.model.name][0](opts, cfg)


def build_task(cfg: RunConfig) -> Task:
    """The task registered under ``task.name``, built from ``task.options`` and its model."""
    opts = _options(TASKS, "task", cfg.task.name, cfg.task.options)
    return TASKS[cfg.task.name][0](cfg, opts, build_model(cfg))


def build_task_optimizer(cfg: RunConfig, task: Task):
    """``(tx, forward_params_fn)`` for ``task``: the ``optim`` method (wrapped by ``task.wrap_tx``) and the
    forward map the train step needs (the task's own, else the method's: N:M methods train through
    :func:`jaxlab.sparse_forward_params`)."""
    tx = build_optimizer(cfg.optim, cfg.train.steps, extra=task.optim_hyper)
    if task.wrap_tx is not None:
        tx = task.wrap_tx(tx)
    forward = task.forward_params_fn or METHODS[cfg.optim.name].forward_params_fn
    return tx, forward
