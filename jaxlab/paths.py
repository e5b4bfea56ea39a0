"""Pytree paths as strings: the one place that turns a ``tree_flatten_with_path`` path into text.

Two spellings are used across jaxlab:

* :func:`slash_path` — ``"block_0/attn/q/kernel"``, for regex leaf filters, module names and reports;
* :func:`key_path` — ``"['block_0']['attn']['q']['kernel']"`` (``jax.tree_util.keystr``), for error
  messages that point at a leaf the way Python indexing would.

Both go through :func:`path_keys`, which also accepts plain tuples of names (Flax ``flatten_dict``
keys, ``Module.path``) and drops the trailing ``.value`` of an ``nnx.split`` state, so Linen params, NNX
states and raw dicts name their leaves alike.
"""

from __future__ import annotations

import jax

__all__ = ["key_path", "leaf_name", "path_keys", "slash_path"]


def path_keys(path) -> tuple[str, ...]:
    """The keys of a pytree path (from ``tree_flatten_with_path``, or a tuple of names) as strings.

    Dict keys, sequence indices and attribute names alike; a trailing ``.value`` attribute (the
    ``nnx.Variable`` wrapper of an ``nnx.split`` state) is dropped, so ``state['l1']['kernel'].value``
    and ``params['l1']['kernel']`` have the same keys ``("l1", "kernel")``.

    Example:
      >>> import jax
      >>> from jaxlab.paths import path_keys
      >>> [path_keys(p) for p, _ in jax.tree_util.tree_flatten_with_path({"l1": {"kernel": 0}, "h": [1]})[0]]
      [('h', '0'), ('l1', 'kernel')]
    """
    keys = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                keys.append(str(getattr(k, attr)))
                break
        else:
            keys.append(str(k))
    if len(keys) > 1 and keys[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        keys.pop()
    return tuple(keys)


def slash_path(path) -> str:
    """``"a/b/c"`` (NNX ``.value`` dropped).

    Example:
      >>> import jax
      >>> from jaxlab.paths import slash_path
      >>> [slash_path(p) for p, _ in jax.tree_util.tree_flatten_with_path({"attn": {"q": {"kernel": 0}}})[0]]
      ['attn/q/kernel']
      >>> slash_path(("block_0", "mlp", "up"))
      'block_0/mlp/up'
    """
    return "/".join(path_keys(path))


def key_path(path) -> str:
    """``jax.tree_util.keystr`` of a path: ``"['a']['b']"`` (for error messages).

    Example:
      >>> import jax
      >>> from jaxlab.paths import key_path
      >>> [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 0}})[0]]
      ["['a']['b']"]
    """
    return jax.tree_util.keystr(tuple(path))


def leaf_name(path) -> str:
    """The last key of a pytree path as a string (``"kernel"`` for ``params['dense']['kernel']``).

    Example:
      >>> import jax
      >>> from jaxlab.paths import leaf_name
      >>> [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({"dense": {"kernel": 0, "bias": 1}})[0]]
      ['bias', 'kernel']
    """
    keys = path_keys(path)
    return keys[-1] if keys else ""
