"""Pytree helpers shared by the transforms and their users: leaf filters, per-leaf maps, state lookup.

Path strings come from :mod:`jaxlab.paths` (the one place that spells a path).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxlab.paths import slash_path

__all__ = ["find_states", "map_leaves", "named_leaves", "path_filter"]


def named_leaves(tree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``[(slash_path, leaf), ...]`` in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(slash_path(p), x) for p, x in flat]


def path_filter(include: str | Sequence[str], exclude: str | Sequence[str] = ()) -> Callable[[Any, Any], bool]:
    """Leaf filter ``(path, leaf) -> bool`` from regexes searched in the slash path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.transforms import path_filter
      >>> only_mlp = path_filter(r"mlp/(up|down)/kernel$", exclude=r"block_1/")
      >>> tree = {"block_0": {"mlp": {"up": {"kernel": 0, "bias": 0}}}, "block_1": {"mlp": {"up": {"kernel": 0}}}}
      >>> [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if only_mlp(p, x)]
      ["['block_0']['mlp']['up']['kernel']"]
    """
    inc = [include] if isinstance(include, str) else list(include)
    exc = [exclude] if isinstance(exclude, str) else list(exclude)
    inc_re = [re.compile(p) for p in inc]
    exc_re = [re.compile(p) for p in exc]

    def pred(path, leaf) -> bool:
        s = slash_path(path)
        return any(r.search(s) for r in inc_re) and not any(r.search(s) for r in exc_re)

    return pred


def map_leaves(fn: Callable, spec_tree, tree, *rest):
    """Map ``fn(path, spec, leaf, *rest_leaves)`` over ``tree``'s leaves with a per-leaf ``spec``.

    ``spec_tree`` has ``tree``'s structure but its leaves may be ``None`` (which JAX would otherwise
    treat as an empty subtree), e.g. the per-leaf N:M axis from :func:`jaxlab.nm.nm_leaf_axes`.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = treedef.flatten_up_to(spec_tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    out = [fn(p, s, x, *(o[i] for o in others)) for i, ((p, x), s) in enumerate(zip(flat, specs))]
    return jax.tree_util.tree_unflatten(treedef, out)


def find_states(opt_state, types: type | tuple[type, ...]) -> list:
    """All sub-states of ``opt_state`` (through ``chain``, ``inject_hyperparams``, ``MultiSteps``...)
    that are instances of ``types``, in flattening order."""
    hits = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, types))
    return [h for h in hits if isinstance(h, types)]
