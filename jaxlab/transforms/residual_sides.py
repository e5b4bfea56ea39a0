"""Residual-stream sides: which parameter reads the residual stream and which writes it.

Every adapted matrix of a transformer touches the residual stream (width ``d_model``) on exactly one
side. In Flax layout a Dense kernel is ``(d_in, d_out)``, so

* a **reader** (attention q/k/v, MLP up/gate, unembedding) has ``d_in = d_model``: the residual axis
  is the *input* axis ``-2`` of ``kernel`` and of the LoRA factor ``lora_a (d_in, r)``;
* a **writer** (attention out, MLP down, embedding) has ``d_out = d_model``: the residual axis is the
  *output* axis ``-1`` of ``kernel``, ``bias``, ``embedding`` and of ``lora_b (r, d_out)``.

(PyTorch stores ``nn.Linear.weight`` as ``(d_out, d_in)``: every left/right product flips. Convert
PyTorch weights to Flax layout before declaring sides.)

:class:`ResidualSides` is an ordered rule set ``(regex, side)`` matched with ``re.search`` against the
*module path* of a leaf (its tree path without the leaf name, keys joined by ``/``, e.g.
``"params/block_0/attn/q"``); the first matching rule wins, and a side of ``None`` excludes a module.
The defaults fit :mod:`jaxlab.nn.transformer`; user rules given as a mapping are put *before* the
defaults, so they override by pattern. A user rule that matches no module of a tree (a typo) would be
ignored silently; :meth:`ResidualSides.check` raises instead, and the GRASP functions call it with
``strict=True`` (opt-in: one rule set often describes a whole model while a call sees part of it).

Reference: Gilligan-Lee et al., "Unsupervised Identification and Removal of Spurious Correlations During
Fine-Tuning", arXiv 2605.27676 (GRASP).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from jaxlab.paths import key_path, slash_path

__all__ = [
    "DEFAULT_SIDE_RULES",
    "LeafSide",
    "ResidualSides",
    "as_residual_sides",
    "module_paths",
]

READER = "reader"
WRITER = "writer"
_VALID_SIDES = (READER, WRITER, None)

#: Defaults for the bundled transformer (``jaxlab.nn.transformer``) and common spellings elsewhere.
DEFAULT_SIDE_RULES: tuple[tuple[str, str | None], ...] = (
    (r"(^|/)attn/(q|k|v|qkv|query|key|value)$", READER),
    (r"(^|/)attn/(o|out)$", WRITER),
    (r"(^|/)mlp/(up|gate|fc1|wi)$", READER),
    (r"(^|/)mlp/(down|fc2|wo)$", WRITER),
    (r"(^|/)unembed$", READER),
    (r"(^|/)embed$", WRITER),
)

#: Leaf name -> residual axis, per side. Leaves not listed (e.g. a reader's ``lora_b`` or ``bias``,
#: LayerNorm scales) do not touch the residual stream and are left alone.
_LEAF_AXIS = {
    READER: {"kernel": -2, "lora_a": -2},
    WRITER: {"kernel": -1, "lora_b": -1, "bias": -1, "embedding": -1},
}
#: Number of axes of one (unstacked) leaf of each kind; extra leading axes are a layer stack.
BASE_NDIM = {"kernel": 2, "lora_a": 2, "lora_b": 2, "bias": 1, "embedding": 2}
LORA_LEAVES = ("lora_a", "lora_b")

_DEFAULT_LAYER_PATTERN = r"(?:^|/)(?:blocks?|layers?|h)_(\d+)(?:/|$)"
_MAX_LISTED_MODULES = 40  # longer module listings in error messages collapse layer indices to <i>


def module_paths(tree) -> list[str]:
    """The sorted module paths of a tree: each leaf's slash path without the leaf name.

    Flax metadata boxes (``nn.Partitioned``) are looked through (their ``.value`` is dropped from paths).

    Example:
      >>> import numpy as np
      >>> from jaxlab.transforms.residual_sides import module_paths
      >>> module_paths({"block_0": {"attn": {"q": {"kernel": np.zeros(2), "bias": np.zeros(2)}}}, "w": 1.0})
      ['', 'block_0/attn/q']
    """
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted({"/".join(slash_path(p).split("/")[:-1]) for p, _ in leaves})


def _listing(paths: list[str]) -> str:
    """``paths`` for an error message; a long list has its layer indices collapsed (``block_<i>/attn/q``)."""
    if len(paths) > _MAX_LISTED_MODULES:
        paths = sorted({re.sub(r"(?:(?<=_)|(?<=^)|(?<=/))\d+(?=/|$)", "<i>", p) for p in paths})
    more = len(paths) - _MAX_LISTED_MODULES
    shown = paths[:_MAX_LISTED_MODULES]
    return str(shown) + (f" ... and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class LeafSide:
    """How one leaf touches the residual stream.

    Attributes:
      side: ``"reader"`` or ``"writer"``.
      axis: the residual axis of the leaf (negative: ``-2`` input axis, ``-1`` output axis).
      layer: the block index parsed from the path, or ``None`` (embedding, unembedding, stacked leaf).
      stacked: the leaf carries a leading layer axis (scanned layers).
      name: the leaf name (``kernel``, ``lora_a``, ...).
      path: ``jax.tree_util.keystr`` of the leaf (for error messages).
    """

    side: str
    axis: int
    layer: int | None
    stacked: bool
    name: str
    path: str


@dataclasses.dataclass(frozen=True)
class ResidualSides:
    """Ordered ``(regex, side)`` rules mapping module paths to ``"reader"`` / ``"writer"`` / ``None``.

    Args:
      rules: sequence of ``(pattern, side)``; ``re.search(pattern, module_path)``; first match wins.
      layer_pattern: regex whose group 1 is the block index in a module path (``block_3`` -> 3).

    Example:
      >>> from jaxlab.transforms.residual_sides import ResidualSides
      >>> sides = ResidualSides.default().override({r"my_proj$": "writer"})
      >>> sides.side_of("params/block_0/attn/q"), sides.side_of("params/block_0/my_proj")
      ('reader', 'writer')
      >>> sides.layer_of("params/block_3/attn/o")
      3
    """

    rules: tuple[tuple[str, str | None], ...] = DEFAULT_SIDE_RULES
    layer_pattern: str = _DEFAULT_LAYER_PATTERN

    def __post_init__(self):
        rules = tuple((str(p), s) for p, s in self.rules)
        for p, s in rules:
            if s not in _VALID_SIDES:
                raise ValueError(f"ResidualSides: rule {p!r} has side {s!r}; expected 'reader', 'writer' or None")
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"ResidualSides: rule pattern {p!r} is not a valid regex: {e}") from e
        object.__setattr__(self, "rules", rules)

    @classmethod
    def default(cls) -> ResidualSides:
        """The rules for the bundled transformer (``attn/{q,k,v}``, ``mlp/up``, ``unembed`` read;
        ``attn/o``, ``mlp/down``, ``embed`` write)."""
        return cls()

    def override(self, rules: Mapping[str, str | None] | Iterable[tuple[str, str | None]]) -> ResidualSides:
        """A new rule set with ``rules`` tried before the current ones."""
        items = tuple(rules.items()) if isinstance(rules, Mapping) else tuple(rules)
        return dataclasses.replace(self, rules=items + self.rules)

    def side_of(self, module_path: str) -> str | None:
        """The side of a module path, or ``None`` when no rule matches (or the match says ``None``)."""
        for pattern, side in self.rules:
            if re.search(pattern, module_path):
                return side
        return None

    def layer_of(self, module_path: str) -> int | None:
        m = re.search(self.layer_pattern, module_path, flags=re.IGNORECASE)
        return int(m.group(1)) if m else None

    def leaf_side(self, path, leaf) -> LeafSide | None:
        """Classify one leaf (``path`` from ``tree_flatten_with_path``); ``None`` if it is not projected.

        Raises:
          ValueError: a leaf of a declared module has fewer axes than its kind needs.

        Example:
          >>> import jax, numpy as np
          >>> from jaxlab.transforms.residual_sides import ResidualSides
          >>> tree = {"block_1": {"mlp": {"down": {"kernel": np.zeros((16, 8))}}}}
          >>> ((path, leaf),) = jax.tree_util.tree_flatten_with_path(tree)[0]
          >>> ls = ResidualSides().leaf_side(path, leaf)
          >>> ls.side, ls.axis, ls.layer, ls.stacked
          ('writer', -1, 1, False)
        """
        parts = slash_path(path).split("/")
        name, module = parts[-1], "/".join(parts[:-1])
        side = self.side_of(module)
        if side is None:
            return None
        axis = _LEAF_AXIS[side].get(name)
        if axis is None:
            return None
        ndim = len(getattr(leaf, "shape", ()))
        base = BASE_NDIM[name]
        if ndim < base:
            raise ValueError(
                f"GRASP sides: leaf {key_path(path)} of {side} module {module!r} has shape "
                f"{tuple(getattr(leaf, 'shape', ()))}; expected at least {base} axes for a {name!r} leaf "
                f"(Flax layout: kernel (d_in, d_out), lora_a (d_in, r), lora_b (r, d_out))"
            )
        return LeafSide(
            side=side,
            axis=axis,
            layer=self.layer_of(module),
            stacked=ndim > base,
            name=name,
            path=key_path(path),
        )

    def resolve(self, tree) -> Any:
        """A pytree like ``tree`` whose leaves are :class:`LeafSide` or ``None``."""
        return jax.tree_util.tree_map_with_path(self.leaf_side, tree)

    def user_rules(self) -> tuple[tuple[str, str | None], ...]:
        """The rules the user gave: every rule that is not one of :data:`DEFAULT_SIDE_RULES`.

        Example:
          >>> from jaxlab.transforms.residual_sides import ResidualSides
          >>> ResidualSides.default().override({r"my_proj$": "writer"}).user_rules()
          (('my_proj$', 'writer'),)
        """
        return tuple(r for r in self.rules if r not in DEFAULT_SIDE_RULES)

    def unmatched(self, tree) -> tuple[tuple[str, str | None], ...]:
        """The user rules (:meth:`user_rules`) whose pattern ``re.search``-es no module path of ``tree``.

        Example:
          >>> import numpy as np
          >>> from jaxlab.transforms.residual_sides import ResidualSides
          >>> tree = {"block_0": {"my_proj": {"kernel": np.zeros((4, 8))}}}
          >>> ResidualSides.default().override({r"my_proj$": "writer", r"my_porj$": "reader"}).unmatched(tree)
          (('my_porj$', 'reader'),)
        """
        paths = module_paths(tree)
        return tuple((p, s) for p, s in self.user_rules() if not any(re.search(p, m) for m in paths))

    def check(self, tree, *, who: str = "ResidualSides") -> None:
        """Raise if a user-given rule matches no module path of ``tree`` (usually a typo in the pattern).

        Only the rules the user gave are checked (:meth:`user_rules`): the defaults cover several model
        families, so some of them never match a given model. A rule shadowed by an earlier one still
        counts as matching.

        Args:
          tree: the param (or update) tree the rules are meant for.
          who: the caller, named in the message.

        Raises:
          ValueError: naming each unmatched rule and listing the module paths the tree has.

        Example:
          >>> import numpy as np
          >>> from jaxlab.transforms.residual_sides import as_residual_sides
          >>> tree = {"block_0": {"my_proj": {"kernel": np.zeros((4, 8))}}}
          >>> as_residual_sides({r"my_proj$": "writer"}).check(tree)        # matches: no error
          >>> as_residual_sides({r"my_porj$": "writer"}).check(tree)
          Traceback (most recent call last):
            ...
          ValueError: ResidualSides: side rule 'my_porj$' -> 'writer' matches no module path of the tree; module paths: ['block_0/my_proj'] (fix the pattern, or pass strict=False to allow rules for modules this tree does not have)
        """
        bad = self.unmatched(tree)
        if bad:
            rules = ", ".join(f"{p!r} -> {s!r}" for p, s in bad)
            raise ValueError(
                f"{who}: side rule{'s' if len(bad) > 1 else ''} {rules} "
                f"match{'' if len(bad) > 1 else 'es'} no module path of the tree; module paths: "
                f"{_listing(module_paths(tree))} (fix the pattern, or pass strict=False to allow rules for "
                f"modules this tree does not have)"
            )


def as_residual_sides(sides) -> ResidualSides:
    """Normalise a ``sides`` argument.

    ``None`` -> the defaults; a :class:`ResidualSides` -> itself; a mapping or a sequence of
    ``(pattern, side)`` pairs -> the defaults overridden by those patterns.

    Example:
      >>> from jaxlab.transforms.residual_sides import as_residual_sides
      >>> rules = as_residual_sides({r"attn/q$": None})   # exclude q, keep the other defaults
      >>> rules.side_of("block_0/attn/q"), rules.side_of("block_0/attn/k")
      (None, 'reader')
    """
    if sides is None:
        return ResidualSides.default()
    if isinstance(sides, ResidualSides):
        return sides
    if isinstance(sides, Mapping) or isinstance(sides, (list, tuple)):
        return ResidualSides.default().override(sides)
    raise TypeError(
        f"sides: expected None, a ResidualSides, a mapping pattern -> 'reader'/'writer'/None or a list of "
        f"(pattern, side) pairs; got {type(sides).__name__}"
    )
