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
defaults, so they override by pattern.

Reference: Gilligan-Lee et al., "Unsupervised Identification and Removal of Spurious Correlations During
Fine-Tuning", arXiv 2605.27676 (GRASP), sec. 1 of ``specs/grasp.md``.
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
