"""Meshes, sharding rules and multi-host initialisation."""

from jaxlab.distributed.mesh import MESH_AXES, make_mesh, maybe_initialize_distributed, mesh_from_config
from jaxlab.distributed.sharding import (
    BATCH_AXES,
    DEFAULT_RULES,
    batch_sharding,
    logical_param_specs,
    opt_state_shardings,
    param_shardings,
    replicated,
    unbox,
)

__all__ = [
    "BATCH_AXES",
    "DEFAULT_RULES",
    "MESH_AXES",
    "batch_sharding",
    "logical_param_specs",
    "make_mesh",
    "maybe_initialize_distributed",
    "mesh_from_config",
    "opt_state_shardings",
    "param_shardings",
    "replicated",
    "unbox",
]
