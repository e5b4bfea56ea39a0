__all__: list[str] = []

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
