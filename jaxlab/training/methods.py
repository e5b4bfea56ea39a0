"""The method registry: one table from a method name to the optimizer factory that builds it.

Every place that turns a method name into an optimizer goes through here: ``jaxlab train``
(``optim.name`` / ``optim.options`` in a config), the experiments' ``run.py``, the benchmarks and
the contract tests. A method is an optax factory ``factory(learning_rate, **hyper)``; registering it
is one line, after which it runs in every one of those places:

    register_method("my_adam", my_adam_factory)                 # dense
    register_method("my_nm", my_nm_factory, sparse=True)        # N:M: straight-through forward, prune to deploy

``sparse=True`` means the method keeps N:M masks in its state: the train step must run the forward
through :func:`jaxlab.sparse_forward_params` and the deployed model is :func:`jaxlab.prune` of the
params (both read the masks from the optimizer state).

Hyper-parameters are keyword arguments of the factory. :meth:`Method.make` checks their names
against the factory's signature (a typo names the method and what it accepts);
:meth:`Method.make` with ``common=`` passes the shared ones (``b1``, ``b2``, ``eps``, ``weight_decay``,
``n``, ``m``, ``sparsify``...) only to factories that take them, so one experiment config drives dense
and N:M methods alike.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxlab.training.methods import get_method, make_schedule
  >>> lr = make_schedule(1e-3, schedule="cosine", total_steps=100)
  >>> tx = get_method("sr_ste").make(lr, common={"b2": 0.99, "n": 2, "m": 4}, sr_ste_lambda=2e-4)
  >>> state = tx.init({"dense": {"kernel": jnp.ones((8, 4))}})
  >>> get_method("sr_ste").sparse, get_method("adamw").sparse
  (True, False)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optax

from jaxlab import transforms as T

__all__ = [
    "METHODS",
    "Method",
    "build_optimizer",
    "get_method",
    "grasp_adamw",
    "grasp_around_adamw",
    "make_optimizer",
    "make_schedule",
    "register_method",
    "sgd",
]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered optimizer.

    Attributes:
      name: the registry key (``optim.name`` in configs).
      factory: ``factory(learning_rate, **hyper) -> optax.GradientTransformation``.
      sparse: N:M method (masks in its state): train through :func:`jaxlab.sparse_forward_params`,
        deploy with :func:`jaxlab.prune`.
      description: one line for ``jaxlab list``.
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    sparse: bool = False
    description: str = ""

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The keyword arguments ``factory`` accepts besides the learning rate."""
        params = list(inspect.signature(self.factory).parameters.values())
        return tuple(p.name for p in params[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    @property
    def forward_params_fn(self) -> Callable | None:
        """:func:`jaxlab.sparse_forward_params` for N:M methods, else ``None`` (for ``make_train_step``)."""
        return T.sparse_forward_params if self.sparse else None

    def make(self, learning_rate, *, common: Mapping[str, Any] | None = None, **hyper) -> optax.GradientTransformation:
        """Build the optimizer: ``factory(learning_rate, **common_it_accepts, **hyper)``.

        Args:
          learning_rate: a float or an optax schedule (see :func:`make_schedule`).
          common: shared hyper-parameters, passed only where the factory takes them (``n``/``m`` reach
            N:M methods and not AdamW); ``hyper`` overrides them.
          **hyper: method-specific hyper-parameters; every name must be one the factory accepts.
        Raises:
          TypeError: a name in ``hyper`` the factory does not accept (the message lists the accepted ones).
        """
        names = self.hyperparameters
        unknown = sorted(set(hyper) - set(names))
        if unknown:
            raise TypeError(f"method {self.name!r} got unknown hyper-parameter(s) {unknown}; it accepts {list(names)}")
        kwargs = {k: v for k, v in (common or {}).items() if k in names}
        kwargs.update(hyper)
        if isinstance(kwargs.get("sparsify"), str | list | tuple):  # regexes from a config
            kwargs["sparsify"] = T.path_filter(kwargs["sparsify"])
        return self.factory(learning_rate, **kwargs)


METHODS: dict[str, Method] = {}


def register_method(
    name: str, factory: Callable[..., optax.GradientTransformation], *, sparse: bool = False, description: str = ""
) -> Method:
    """Register ``factory`` under ``name`` (replacing an earlier registration of that name); returns the entry."""
    if not callable(factory):
        raise TypeError(f"register_method({name!r}): factory must be callable, got {factory!r}")
    doc = description or (inspect.getdoc(factory) or "").split("\n", 1)[0]
    METHODS[name] = Method(name, factory, sparse, doc)
    return METHODS[name]


def get_method(name: str) -> Method:
    """The registered method ``name``; a ``KeyError`` listing the registered names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None


def make_optimizer(name: str, learning_rate, *, grad_clip: float | None = None, common=None, **hyper):
    """``get_method(name).make(...)``, optionally behind ``optax.clip_by_global_norm(grad_clip)``."""
    tx = get_method(name).make(learning_rate, common=common, **hyper)
    if grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return tx


def make_schedule(
    learning_rate: float,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_fraction: float = 0.0,
):
    """The one learning-rate schedule builder.

    * ``"constant"``: ``learning_rate`` (after a linear warmup from 0 when ``warmup_steps > 0``);
    * ``"cosine"``: linear warmup from 0 over ``warmup_steps`` (if any), then cosine decay to
      ``final_fraction * learning_rate`` at ``total_steps``:
      ``lr_t = lr * (f + (1 - f) * (1 + cos(pi * t / T)) / 2)``.

    Returns a float (constant, no warmup) or an optax schedule.
    """
    if warmup_steps < 0:
        raise ValueError(f"make_schedule: warmup_steps must be >= 0, got {warmup_steps}")
    if schedule == "constant":
        return optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    if schedule != "cosine":
        raise ValueError(f"make_schedule: unknown schedule {schedule!r}; allowed: 'constant', 'cosine'")
    if total_steps is None or total_steps < 1:
        raise ValueError(f"make_schedule: the cosine schedule needs total_steps >= 1, got {total_steps}")
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, total_steps, final_fraction)
    return optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=final_fraction * learning_rate
    )


def build_optimizer(optim, total_steps: int, *, extra=None) -> optax.GradientTransformation:
    """The optimizer an ``optim`` config section describes (:class:`jaxlab.training.OptimConfig`).

    ``make_optimizer(optim.name, make_schedule(...), grad_clip=optim.grad_clip,
    common={b1, b2, eps, weight_decay, **optim.options, **extra})``: like the Adam fields, ``optim.options``
    reach the method only where its factory takes them, so one config switches between methods with
    ``--set optim.name=...`` (:func:`jaxlab.training.validate_config` rejects names no method takes).
    ``extra`` holds what a task adds in code (``Task.optim_hyper``, e.g. an N:M ``sparsify`` filter).
    """
    lr = make_schedule(
        optim.learning_rate, schedule=optim.schedule, warmup_steps=optim.warmup_steps,
        total_steps=total_steps, final_fraction=optim.final_fraction,
    )
    common = dict(b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, **optim.options)
    common.update(extra or {})
    return make_optimizer(optim.name, lr, grad_clip=optim.grad_clip, common=common)


# --------------------------------------------------------------------------------------------- built-ins


def sgd(learning_rate, *, b1: float = 0.0, nesterov: bool = False) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum ``b1`` (``optax.sgd``; ``b1`` so configs share Adam's field name)."""
    # b1 may be traced (optax.inject_hyperparams injects it), so no Python truth test on it
    momentum = None if isinstance(b1, int | float) and b1 == 0 else b1
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def grasp_adamw(
    learning_rate, *, subspace, beta: float = 1.0, sides=None, only=None, mode: str = "update",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW followed by :func:`jaxlab.grasp` (project each update off ``span(U)`` on its residual axis).

    ``mode="residual"``/``"both"``: the model must also carry the residual projection
    (:func:`jaxlab.nn.residual_projection_hook`); ``"residual"`` leaves the updates to AdamW alone.
    """
    return optax.chain(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
        T.grasp(subspace, sides, beta=beta, only=only, mode=mode),
    )


def grasp_around_adamw(
    learning_rate, *, subspace, beta: float = 1.0, sides=None, only=None, mode: str = "update",
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """:func:`jaxlab.grasp_around` AdamW: project the gradient before Adam and the update after (``mode`` as
    in :func:`grasp_adamw`)."""
    inner = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return T.grasp_around(inner, subspace, sides, beta=beta, only=only, mode=mode)


register_method("adam", optax.adam, description="Adam (optax.adam)")
register_method("adamw", optax.adamw, description="AdamW (optax.adamw)")
register_method("sgd", sgd)
register_method("step", T.step_adamw, sparse=True)
register_method("ste", T.ste_adamw, sparse=True)
register_method("sr_ste", T.sr_ste_adamw, sparse=True)
register_method("asp", T.asp_adamw, sparse=True)
register_method("grasp", grasp_adamw)
register_method("grasp_around", grasp_around_adamw)
