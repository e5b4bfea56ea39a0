"""Device meshes: ``(data, fsdp, tensor)`` on one host, a slice, or several slices.

We build on ``jax.make_mesh`` / ``mesh_utils.create_hybrid_device_mesh`` and
``jax.distributed.initialize``; jaxlab adds no distribution layer of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

__all__ = ["MESH_AXES", "make_mesh", "mesh_from_config", "maybe_initialize_distributed"]

MESH_AXES = ("data", "fsdp", "tensor")


def _resolve(shape: Sequence[int], n: int, what: str) -> tuple[int, ...]:
    shape = list(shape)
    if sum(1 for s in shape if s == -1) > 1:
        raise ValueError(f"{what}: at most one axis may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what}: axis sizes must be positive or -1, got {shape}")
    if -1 in shape:
        if n % known:
            raise ValueError(f"{what}: {n} devices are not divisible by the fixed axes {shape}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(
            f"{what}: mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, but {n} are available"
        )
    return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ``Mesh`` with axes ``("data", "fsdp", "tensor")`` over ``devices`` (default: all).

    ``-1`` on one axis (at most one) takes the remaining devices; ``data`` defaults to ``-1``, so
    ``make_mesh()`` is pure data parallelism and ``make_mesh(data=1, fsdp=-1)`` is pure FSDP.

    Example:
      >>> import jax
      >>> from jaxlab.distributed import make_mesh
      >>> dict(make_mesh(data=1, devices=jax.devices()[:1]).shape)
      {'data': 1, 'fsdp': 1, 'tensor': 1}
      >>> make_mesh(data=1, fsdp=-1).shape["fsdp"] == jax.device_count()   # pure FSDP over every device
      True
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = (data, fsdp, tensor)
    if -1 not in sizes and 0 < math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]  # an explicit smaller mesh uses the first devices
    shape = _resolve(sizes, len(devices), "make_mesh")
    if devices == jax.devices():
        # Auto axes: XLA's sharding propagation places intermediates (jax.make_mesh defaults to Explicit).
        return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
    """Mesh from a :class:`~jaxlab.training.MeshConfig` (``ici``/``dcn`` for multi-slice TPU)."""
    devices = jax.devices() if devices is None else list(devices)
    if mesh_cfg.ici is not None or mesh_cfg.dcn is not None:
        ici = list(mesh_cfg.ici or [1, 1, 1])
        dcn = list(mesh_cfg.dcn or [1, 1, 1])
        if len(ici) != 3 or len(dcn) != 3:
            raise ValueError(f"mesh.ici / mesh.dcn: expected 3 sizes for {MESH_AXES}, got ici={ici} dcn={dcn}")
        num_slices = math.prod(dcn)
        per_slice = len(devices) // max(num_slices, 1)
        ici = _resolve(ici, per_slice, "mesh.ici")
        if num_slices > 1 and hasattr(devices[0], "slice_index"):
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
        else:  # simulated (CPU) multi-slice: slices are contiguous device blocks
            arr = np.asarray(devices).reshape(tuple(d * i for d, i in zip(dcn, ici)))
        return Mesh(arr, MESH_AXES)
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices=devices)


def maybe_initialize_distributed(enabled: bool) -> None:
    """Call ``jax.distributed.initialize()`` once on multi-host runs (TPU pods auto-detect peers)."""
    if enabled and not getattr(maybe_initialize_distributed, "_done", False):
        # On Cloud TPU the coordinator, process count and id are auto-detected; elsewhere set
        # JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
        jax.distributed.initialize()
        maybe_initialize_distributed._done = True
