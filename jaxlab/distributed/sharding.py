"""Sharding rules: logical axis names -> mesh axes, with a divisibility-aware fallback.

Params created with ``flax.linen.with_logical_partitioning`` carry logical axis names
(``"embed"``, ``"mlp"``, ``"heads"``, ``"vocab"``...). :data:`DEFAULT_RULES` maps them onto the
``(data, fsdp, tensor)`` mesh: FSDP shards the ``embed`` dimension of every kernel over ``fsdp``,
tensor parallelism shards ``mlp``/``heads``/``vocab`` over ``tensor``. A dimension whose length is not
divisible by its mesh axes is replicated instead (e.g. the 2-wide input of a 2D toy MLP on 8 devices).

Leaves without logical names (plain pytrees from any library) get the generic FSDP rule: the largest
dimension divisible by the ``fsdp`` axis size is sharded, if the leaf has at least ``min_size`` elements.

Optimizer states are sharded like the params they mirror (``optax.tree_map_params``); everything else
in them (counts, ring buffers, phases) is replicated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DEFAULT_RULES",
    "BATCH_AXES",
    "logical_param_specs",
    "param_shardings",
    "opt_state_shardings",
    "batch_sharding",
    "replicated",
    "unbox",
]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)
BATCH_AXES = ("data", "fsdp")


def unbox(tree):
    """Strip flax ``Partitioned`` boxes, returning plain arrays."""
    return nn.meta.unbox(tree)


def _is_box(x):
    return isinstance(x, nn.meta.AxisMetadata)


def logical_param_specs(boxed_params):
    """Logical ``PartitionSpec`` per leaf (``None`` for leaves without names).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxlab.distributed import logical_param_specs
      >>> layer = nn.Dense(4, kernel_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed", "mlp")))
      >>> params = layer.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))["params"]
      >>> specs = logical_param_specs(params)
      >>> tuple(specs["kernel"]), specs["bias"]
      (('embed', 'mlp'), None)
    """
    return jax.tree.map(lambda x: P(*x.names) if isinstance(x, nn.Partitioned) else None, boxed_params, is_leaf=_is_box)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _spec_for_leaf(shape, logical, mesh: Mesh, rules, min_size: int) -> P:
    rule_map = dict(rules)
    if logical is not None:
        out = []
        used = set()
        for dim, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
            axes = rule_map.get(name) if name is not None else None
            if axes is not None:
                axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
                axes_t = tuple(a for a in axes_t if a in mesh.shape and a not in used)
                if axes_t and dim % _axis_size(mesh, axes_t) == 0 and _axis_size(mesh, axes_t) > 1:
                    used.update(axes_t)
                    out.append(axes_t[0] if len(axes_t) == 1 else axes_t)
                    continue
            out.append(None)
        return P(*out)
    # generic FSDP fallback
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp <= 1 or math.prod(shape) < min_size or not shape:
        return P()
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if shape[i] % fsdp == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def param_shardings(params, mesh: Mesh, rules: Sequence = DEFAULT_RULES, *, min_size: int = 1024):
    """``NamedSharding`` per param leaf; ``params`` may be boxed (logical names) or plain/abstract.

    Example:
      On a one-device mesh every mesh axis has size 1, so nothing is split; on a ``(1, 4, 2)`` mesh
      the ``("embed", "mlp")`` kernel below would get ``PartitionSpec('fsdp', 'tensor')``. The plain
      leaf has no logical names and fewer than ``min_size`` elements, so it is replicated anyway.

      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from jaxlab.distributed import make_mesh, param_shardings
      >>> mesh = make_mesh(data=1, devices=jax.devices()[:1])
      >>> params = {"kernel": nn.Partitioned(jnp.zeros((8, 4)), names=("embed", "mlp")),
      ...           "plain": jax.ShapeDtypeStruct((8, 4), jnp.float32)}
      >>> sh = param_shardings(params, mesh)
      >>> tuple(sh["kernel"].spec), tuple(sh["plain"].spec), sh["kernel"].mesh.shape["fsdp"]
      ((None, None), (), 1)
    """
    def one(x):
        logical = x.names if isinstance(x, nn.Partitioned) else None
        value = x.value if isinstance(x, nn.meta.AxisMetadata) else x
        return NamedSharding(mesh, _spec_for_leaf(tuple(value.shape), logical, mesh, rules, min_size))

    return jax.tree.map(one, params, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, param_sh, mesh: Mesh, params=None):
    """Shard optimizer-state leaves that mirror params like those params; replicate the rest.

    A state leaf mirrors a param when its key path *ends with* the param's key path and the shapes
    agree (``opt_state[0].mu['dense']['kernel']`` mirrors ``params['dense']['kernel']``). This works for
    any transform, including ones whose ``init`` inspects the param tree (masks, LoRA freezing, GRASP,
    STEP), which ``optax.tree_map_params``' placeholder trick cannot handle. ``tx`` is accepted for API
    stability; ``params`` (abstract) gives the shapes, defaulting to the shardings' own tree structure.
    """
    del tx
    rep = replicated(mesh)
    sh_flat = jax.tree_util.tree_flatten_with_path(param_sh, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
    shapes = None
    if params is not None:
        shapes = [tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(params)]
    index: dict[tuple, list] = {}
    for i, (path, sh) in enumerate(sh_flat):
        key = tuple(jax.tree_util.keystr((k,)) for k in path)
        index.setdefault(key, []).append((sh, None if shapes is None else shapes[i]))
    lengths = sorted({len(k) for k in index}, reverse=True)

    def pick(path, leaf):
        keys = tuple(jax.tree_util.keystr((k,)) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for n in lengths:
            if n > len(keys):
                continue
            for sh, pshape in index.get(keys[-n:], ()):
                if pshape is None or pshape == shape:
                    if len(sh.spec) <= len(shape) and all(
                        ax is None or shape[i] % _axis_size(mesh, ax) == 0 for i, ax in enumerate(sh.spec)
                    ):
                        return sh
        return rep

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Shard a batch's leading axis over every data-parallel mesh axis (``data`` x ``fsdp``).

    Example:
      >>> import jax
      >>> from jaxlab.distributed import batch_sharding, make_mesh
      >>> tuple(batch_sharding(make_mesh(data=1, devices=jax.devices()[:1]), ndim=3).spec)
      (('data', 'fsdp'), None, None)
    """
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))
