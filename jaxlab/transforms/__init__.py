"""Optax transforms: GRASP and the N:M sparsity family (STEP, SR-STE/STE, ASP).

The N:M optimizers share one mask code and one pair of accessors (:func:`sparse_forward_params`
for the forward pass, :func:`prune` for deployment):

- :func:`scale_by_step` / :func:`step_adamw`: STEP (dense AdamW, AutoSwitch, frozen-``v`` mask learning);
- :func:`scale_by_sr_ste` / :func:`sr_ste_adamw`: Adam on ``g + lambda_w (1 - mask(w)) w`` with an
  always-sparse STE forward; STE is ``lambda_w = 0`` (:func:`scale_by_ste_adam`, :func:`ste_adamw`);
- :func:`asp`: one-shot magnitude N:M pruning at ``prune_step`` around any inner optimizer
  (:func:`asp_adamw` is ``asp(optax.adamw(...))``).

Example:
  >>> from jaxlab.transforms import asp, prune, sparse_forward_params
  >>> params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
  >>> tx = asp(optax.adamw(1e-2, weight_decay=0.01), prune_step=3, n=2, m=4)
  >>> state = tx.init(params)
  >>> for _ in range(4):
  ...     grads = jax.grad(lambda p: jnp.sum(sparse_forward_params(p, state)["kernel"] ** 2))(params)
  ...     updates, state = tx.update(grads, state, params)
  ...     params = optax.apply_updates(params, updates)
  >>> int((params["kernel"] != 0).sum())  # 2 of every 4 weights along the reduction axis remain
  16
  >>> bool((prune(params, state)["kernel"] == params["kernel"]).all())
  True
"""

__all__: list[str] = []

from jaxlab.transforms._nm_common import NM_STATIC_ARGS, nm_static_args, prune, sparse_forward_params
from jaxlab.transforms.asp import AspState, asp, asp_adamw
from jaxlab.transforms.grasp import (
    GRASP_MODES,
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
from jaxlab.transforms.grasp_residual import project_cotangent, residual_basis
from jaxlab.transforms.residual_sides import DEFAULT_SIDE_RULES, ResidualSides
from jaxlab.transforms.sr_ste import (
    SrSteState,
    SteState,
    scale_by_sr_ste,
    scale_by_sr_ste_adam,
    scale_by_ste_adam,
    sr_ste_adamw,
    ste_adamw,
)
from jaxlab.transforms.step import (
    StepState,
    scale_by_step,
    step_adamw,
    step_phase,
    step_statistics,
    step_switch_step,
)
from jaxlab.transforms.tree import find_states, map_leaves, named_leaves, path_filter

__all__ += [
    "DEFAULT_SIDE_RULES",
    "GRASP_MODES",
    "GraspState",
    "ResidualSides",
    "SpuriousSubspace",
    "grasp",
    "grasp_around",
    "grasp_init_params",
    "identify_spurious_subspace",
    "lora_svd",
    "project_cotangent",
    "project_finetune",
    "project_lora",
    "project_residual",
    "residual_basis",
    "subspace_leakage",
]


__all__ += ["find_states", "map_leaves", "named_leaves", "path_filter"]

__all__ += [
    "NM_STATIC_ARGS",
    "AspState",
    "SrSteState",
    "SteState",
    "StepState",
    "asp",
    "asp_adamw",
    "nm_static_args",
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
]
