"""jaxlab: GRASP, STEP and variance-reduced MeanFlow as composable pure-functional JAX pieces.

The top level lists, explicitly, the methods (Optax transforms and losses), their evaluation metrics
and the core runtime entry points. Everything else lives in its subpackage, each with its own
``__all__``: :mod:`jaxlab.nm` (N:M masks and formats), :mod:`jaxlab.transforms`, :mod:`jaxlab.losses`,
:mod:`jaxlab.nn` (Flax modules, LoRA, the pretrained decoder family), :mod:`jaxlab.models` (Hugging
Face checkpoints in and out, tokenizers), :mod:`jaxlab.kernels`, :mod:`jaxlab.data`,
:mod:`jaxlab.distributed`, :mod:`jaxlab.training` (runtime, registries, experiment harness).

The runtime (``jaxlab.training`` and the names below taken from it) is imported on first use, so
``import jaxlab.transforms`` or ``import jaxlab.losses`` does not load orbax or matplotlib.
"""

import importlib

from jaxlab import data, distributed, kernels, losses, metrics, models, nm, nn, transforms
from jaxlab.kernels import nm_matmul, nm_matmul_reference
from jaxlab.losses import (
    GMMOracle,
    MeanFlowConfig,
    euler_sample,
    flow_matching_loss,
    gmm_oracle,
    make_meanflow_loss_fn,
    meanflow_init_state,
    meanflow_loss,
    meanflow_sample,
)
from jaxlab.metrics import energy_distance, mmd_rbf, sliced_wasserstein2
from jaxlab.nn import LoRADense, NMDense, grasp_intercept, lora, residual_projection_hook
from jaxlab.transforms import (
    SpuriousSubspace,
    asp,
    asp_adamw,
    grasp,
    grasp_around,
    grasp_init_params,
    identify_spurious_subspace,
    project_cotangent,
    project_finetune,
    project_lora,
    prune,
    scale_by_sr_ste,
    scale_by_sr_ste_adam,
    scale_by_ste_adam,
    scale_by_step,
    sparse_forward_params,
    sr_ste_adamw,
    ste_adamw,
    step_adamw,
    step_phase,
    step_statistics,
    step_switch_step,
    subspace_leakage,
)

__version__ = "0.1.0"

# runtime entry points, resolved from jaxlab.training on first access (PEP 562)
_RUNTIME = (
    "TrainState",
    "build_optimizer",
    "get_method",
    "load_config",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "register_method",
    "register_task",
    "train",
)


def __getattr__(name: str):
    if name == "training" or name in _RUNTIME:
        training = importlib.import_module("jaxlab.training")
        return training if name == "training" else getattr(training, name)
    raise AttributeError(f"module 'jaxlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

__all__ = [
    # subpackages
    "data",
    "distributed",
    "kernels",
    "losses",
    "metrics",
    "models",
    "nm",
    "nn",
    "training",
    "transforms",
    # GRASP
    "SpuriousSubspace",
    "grasp",
    "grasp_around",
    "grasp_init_params",
    "identify_spurious_subspace",
    "lora",
    "LoRADense",
    "grasp_intercept",
    "project_cotangent",
    "residual_projection_hook",
    "project_finetune",
    "project_lora",
    "subspace_leakage",
    # STEP and the N:M baselines
    "asp",
    "asp_adamw",
    "nm_matmul",
    "nm_matmul_reference",
    "NMDense",
    "prune",
    "scale_by_sr_ste",
    "scale_by_sr_ste_adam",
    "scale_by_ste_adam",
    "scale_by_step",
    "sparse_forward_params",
    "sr_ste_adamw",
    "ste_adamw",
    "step_adamw",
    "step_phase",
    "step_statistics",
    "step_switch_step",
    # MeanFlow and flow matching
    "GMMOracle",
    "MeanFlowConfig",
    "euler_sample",
    "flow_matching_loss",
    "gmm_oracle",
    "make_meanflow_loss_fn",
    "meanflow_init_state",
    "meanflow_loss",
    "meanflow_sample",
    # metrics
    "energy_distance",
    "mmd_rbf",
    "sliced_wasserstein2",
    # runtime
    "TrainState",
    "build_optimizer",
    "get_method",
    "load_config",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "register_method",
    "register_task",
    "train",
]
