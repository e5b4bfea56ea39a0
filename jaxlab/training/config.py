"""Run configuration: YAML + overlays + ``--set`` overrides, validated into typed dataclasses.

A run is described by :class:`RunConfig`. Loading goes

    base YAML  ->  each ``--overlay FILE`` deep-merged in order  ->  each ``--set a.b=c``  ->  validation

Validation is strict: an unknown key or a value of the wrong type raises :class:`ConfigError` naming
the dotted key path, the offending value and what is allowed. Task-specific options live under
``task.options`` and are validated against the options dataclass the task registered
(:func:`jaxlab.training.register_task`); model options likewise under ``model.options``.

Example::

    cfg = read_config("experiments/flow_matching_2d/config.yaml",
                      overlays=["tpu_configs/v5e-8.yaml"], sets=["train.steps=500", "data.name=two_moons"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TaskConfig",
    "TrainConfig",
    "MeshConfig",
    "RunConfig",
    "from_dict",
    "to_dict",
    "read_config",
    "apply_set",
    "load_yaml",
    "deep_merge",
    "dump_config",
    "check_ranges",
]


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is unknown, missing or of the wrong type (message names the key path)."""


@dataclasses.dataclass
class DataConfig:
    """What to train on. ``name`` picks a dataset known to the task (e.g. a toy2d name)."""

    name: str = "eight_gaussians"
    batch_size: int = 256
    eval_size: int = 2048


@dataclasses.dataclass
class ModelConfig:
    """Which network; ``options`` are validated by the model registered under ``name``."""

    name: str = "velocity_mlp"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OptimConfig:
    """Optimiser: a registered method (:mod:`jaxlab.training.methods`), its schedule and clipping.

    ``name`` is a method of the registry (``adam``, ``adamw``, ``sgd``, ``step``, ``ste``, ``sr_ste``,
    ``asp``, ``grasp``, ``grasp_around``, or one you registered); ``b1``/``b2``/``eps``/``weight_decay``
    reach the methods that take them; ``options`` holds the method's own hyper-parameters (e.g.
    ``{n: 2, m: 4, switch_eps: 1e-8}`` for ``step``). Schedule: see :func:`jaxlab.training.make_schedule`.
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    final_fraction: float = 0.0
    grad_clip: float | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TaskConfig:
    """The training objective; ``options`` are validated by the task registered under ``name``."""

    name: str = "flow_matching"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TrainConfig:
    """Loop settings.

    ``steps >= 1``; ``log_every >= 1``; ``eval_every``/``ckpt_every`` ``>= 0`` (0: only at the end);
    ``keep >= 1`` checkpoints. ``check_finite`` stops on a non-finite loss, gradient leaf or global gradient
    norm; ``divergence_factor`` (``null`` to disable) also stops when the loss exceeds that multiple of the
    median of the last ``divergence_window`` losses (checked once 20 losses are seen, and only while that
    median is positive).
    """

    steps: int = 2000
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 500
    keep: int = 3
    async_checkpoint: bool = True
    ema_decay: float | None = None
    check_finite: bool = True
    divergence_factor: float | None = 100.0
    divergence_window: int = 200
    progress: bool = True


@dataclasses.dataclass
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)``; ``-1`` on one axis takes the remaining devices.

    ``ici``/``dcn`` (optional) give per-slice and across-slice shapes for multi-slice TPU runs, in the
    same axis order; when given they override ``data/fsdp/tensor``.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    ici: list[int] | None = None
    dcn: list[int] | None = None
    distributed: bool = False


@dataclasses.dataclass
class RunConfig:
    """A whole run: everything ``jaxlab train`` needs, and what it writes back as ``config.yaml``."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------- validation


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))


def _convert(tp, value, path: str):
    """Check ``value`` against type ``tp`` and convert (int -> float, list -> tuple, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: got {value!r}; allowed: {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: got {value!r}; expected {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an int, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads "1e-3" as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a float, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {k: _convert(vt, v, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")


def from_dict(cls, data: dict | None, path: str = ""):
    """Build dataclass ``cls`` from a (nested) mapping, strictly.

    Raises:
      ConfigError: an unknown key (listing the allowed ones), a missing required key, or a type mismatch,
        each naming the dotted key path.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!r}; allowed keys at {path or '<root>'}: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key_path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key_path}: required key is missing")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks of options dataclasses
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or '<root>'}: {e}") from e


def to_dict(obj) -> Any:
    """Dataclass (nested) -> plain dict/list/scalars, suitable for YAML."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, over: dict) -> dict:
    """Recursively merge mapping ``over`` into a copy of ``base`` (``over`` wins; mappings merge)."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: ``1e-3`` and ``5E-9`` are numbers, as in 1.2 and in
    Python; PyYAML implements YAML 1.1, which needs a dot (``1.0e-3``) and reads ``1e-3`` as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML as every jaxlab config is read: the safe loader, and ``1e-3`` is a float (not a string).

    Example:
      >>> from jaxlab.training.config import load_yaml
      >>> load_yaml("lr: 1e-3\\neps: 1.0e-8\\nsteps: 1_000\\nname: e5")
      {'lr': 0.001, 'eps': 1e-08, 'steps': 1000, 'name': 'e5'}
    """
    return yaml.load(text, Loader=_Loader)


def apply_set(tree: dict, assignment: str) -> dict:
    """Apply one ``a.b.c=value`` override (value parsed as YAML: ``3``, ``1e-3``, ``true``, ``[1, 2]``)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=100")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    value = load_yaml(raw) if raw.strip() else ""
    override: dict = {}
    cur = override
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return deep_merge(tree, override)


def _read_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = load_yaml(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at top level, got {type(data).__name__}")
    return data


def read_config(path=None, *, overlays=(), sets=(), base: dict | None = None) -> RunConfig:
    """Read a :class:`RunConfig` from YAML ``path`` + ``overlays`` (in order) + ``sets`` (in order).

    Checks the structure and types of every key. The registered parts (``optim.name``/``options``,
    ``task``/``model`` options) are checked by :func:`jaxlab.training.load_config`, which calls this
    and then :func:`jaxlab.training.validate_config`.
    """
    tree = dict(base or {})
    if path is not None:
        tree = deep_merge(tree, _read_yaml(path))
    for ov in overlays:
        tree = deep_merge(tree, _read_yaml(ov))
    for s in sets:
        tree = apply_set(tree, s)
    cfg = from_dict(RunConfig, tree)
    check_ranges(cfg)
    return cfg


# (key path, predicate, what is allowed) for every plain-data field with a range
_RANGES = (
    ("data.batch_size", lambda v: v >= 1, ">= 1"),
    ("data.eval_size", lambda v: v >= 1, ">= 1"),
    ("optim.learning_rate", lambda v: v > 0, "> 0 (the peak of the schedule)"),
    ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: v >= 0, ">= 0"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("optim.final_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("optim.grad_clip", lambda v: v is None or v > 0, "> 0 or null"),
    ("train.steps", lambda v: v >= 1, ">= 1"),
    ("train.log_every", lambda v: v >= 1, ">= 1"),
    ("train.eval_every", lambda v: v >= 0, ">= 0 (0: evaluate at the end only)"),
    ("train.ckpt_every", lambda v: v >= 0, ">= 0 (0: checkpoint at the end only)"),
    ("train.keep", lambda v: v >= 1, ">= 1 (the newest checkpoint is always kept)"),
    ("train.ema_decay", lambda v: v is None or 0 <= v < 1, "in [0, 1) or null"),
    ("train.divergence_factor", lambda v: v is None or v > 1, "> 1 or null (off)"),
    ("train.divergence_window", lambda v: v >= 1, ">= 1"),
    ("mesh.data", lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
    ("mesh.fsdp", lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
    ("mesh.tensor", lambda v: v == -1 or v >= 1, ">= 1, or -1 for the remaining devices"),
)


def check_ranges(cfg: RunConfig) -> None:
    """Check the numeric range of every plain-data field that has one (see ``_RANGES``).

    Raises:
      ConfigError: ``KEY: got VALUE; expected RANGE``, for the first field out of range.
    """
    for key, ok, allowed in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not ok(value):
            raise ConfigError(f"{key}: got {value!r}; expected {allowed}")
    axes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if axes.count(-1) > 1:
        raise ConfigError(f"mesh: at most one of data/fsdp/tensor may be -1, got {axes}")


def dump_config(cfg: RunConfig, path) -> None:
    """Write the fully resolved config as YAML."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
