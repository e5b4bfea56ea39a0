"""Training runtime: TrainState, the jitted/sharded step, the loop, checkpoints, metrics, config, tasks."""

from jaxlab.training.checkpoint import Checkpointer
from jaxlab.training.config import (
    ConfigError,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    load_config,
)
from jaxlab.training.loop import fit, global_batch, init_state, train
from jaxlab.training.metrics import MetricsWriter, read_metrics
from jaxlab.training.report import write_report
from jaxlab.training.state import TrainState
from jaxlab.training.step import NonFiniteError, make_train_step, state_shardings
from jaxlab.training.tasks import Task, build_optimizer, build_task, register_model, register_task

__all__ = [
    "Checkpointer",
    "ConfigError",
    "DataConfig",
    "MeshConfig",
    "MetricsWriter",
    "ModelConfig",
    "NonFiniteError",
    "OptimConfig",
    "RunConfig",
    "Task",
    "TaskConfig",
    "TrainConfig",
    "TrainState",
    "build_optimizer",
    "build_task",
    "fit",
    "global_batch",
    "init_state",
    "load_config",
    "make_train_step",
    "read_metrics",
    "register_model",
    "register_task",
    "state_shardings",
    "train",
    "write_report",
]
