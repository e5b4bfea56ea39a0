"""Training runtime: TrainState, the jitted/sharded train step, the loop, checkpoints, metrics, config,
the task/model registry, the method (optimizer) registry and the experiment harness.

Module map (dependencies point down): ``config`` (plain data) <- ``methods`` (method registry) <-
``registry`` (tasks, models, validated ``load_config``) <- ``tasks_toy2d``, ``tasks_lm`` (built-in
tasks, imported here so they register) ; ``state`` <- ``train_step`` <- ``loop`` ; ``experiment``
(the harness every ``experiments/*/run.py`` uses) <- ``nm_premise`` (the N:M premise probe it can carry).
"""

from jaxlab.training import tasks_hf, tasks_lm, tasks_toy2d  # noqa: F401  (built-in tasks register on import)
from jaxlab.training.checkpoint import Checkpointer, CheckpointError
from jaxlab.training.config import (
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    read_config,
)
from jaxlab.training.loop import fit, global_batch, init_state, train
from jaxlab.training.methods import (
    METHODS,
    Method,
    build_optimizer,
    get_method,
    make_optimizer,
    make_schedule,
    register_method,
)
from jaxlab.training.metrics import MetricsWriter, read_metrics
from jaxlab.training.nm_premise import Probe, nm_premise_probe, premise_summary
from jaxlab.training.registry import (
    MODELS,
    TASKS,
    Task,
    build_model,
    build_task,
    build_task_optimizer,
    load_config,
    register_model,
    register_task,
    validate_config,
)
from jaxlab.training.report import write_report
from jaxlab.training.run_dir import RunDirLocked
from jaxlab.training.state import TrainState
from jaxlab.training.train_step import (
    DivergenceError,
    NonFiniteError,
    make_pmap_train_step,
    make_shard_map_train_step,
    make_train_step,
    state_shardings,
)

__all__ = [
    "METHODS",
    "MODELS",
    "TASKS",
    "CheckpointError",
    "Checkpointer",
    "ConfigError",
    "DataConfig",
    "DivergenceError",
    "MeshConfig",
    "Method",
    "MetricsWriter",
    "ModelConfig",
    "NonFiniteError",
    "OptimConfig",
    "Probe",
    "RunConfig",
    "RunDirLocked",
    "Task",
    "TaskConfig",
    "TrainConfig",
    "TrainState",
    "build_model",
    "build_optimizer",
    "build_task",
    "build_task_optimizer",
    "fit",
    "get_method",
    "global_batch",
    "init_state",
    "load_config",
    "make_optimizer",
    "make_pmap_train_step",
    "make_schedule",
    "make_shard_map_train_step",
    "make_train_step",
    "nm_premise_probe",
    "premise_summary",
    "read_config",
    "read_metrics",
    "register_method",
    "register_model",
    "register_task",
    "state_shardings",
    "train",
    "validate_config",
    "write_report",
]
