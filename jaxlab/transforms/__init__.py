__all__: list[str] = []

from jaxlab.transforms._nm_common import NM_STATIC_ARGS, nm_static_args, prune, sparse_forward_params
from jaxlab.transforms.asp import AspState, asp_adamw
from jaxlab.transforms.grasp import (
    GraspState,
    grasp,
    grasp_around,
    grasp_init_params,
    project_finetune,
    project_lora,
    project_residual,
    subspace_leakage,
)
from jaxlab.transforms.grasp_identify import SpuriousSubspace, identify_spurious_subspace, lora_svd
from jaxlab.transforms.residual_sides import DEFAULT_SIDE_RULES, ResidualSides
from jaxlab.transforms.sr_ste import SrSteState, scale_by_sr_ste_adam, sr_ste_adamw
from jaxlab.transforms.ste import SteState, scale_by_ste_adam, ste_adamw
from jaxlab.transforms.step import (
    StepState,
    scale_by_step,
    step_adamw,
    step_phase,
    step_statistics,
    step_switch_step,
)

__all__ += [
    "DEFAULT_SIDE_RULES",
    "GraspState",
    "ResidualSides",
    "SpuriousSubspace",
    "grasp",
    "grasp_around",
    "grasp_init_params",
    "identify_spurious_subspace",
    "lora_svd",
    "project_finetune",
    "project_lora",
    "project_residual",
    "subspace_leakage",
]


__all__ += [
    "NM_STATIC_ARGS",
    "AspState",
    "SrSteState",
    "SteState",
    "StepState",
    "asp_adamw",
    "nm_static_args",
    "prune",
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
]
