"""The train step: one jitted function from CPU to pod.

``make_train_step`` builds ``step(state, batch) -> (state, metrics)``:

    key              = fold_in(state.rng, state.step)
    loss, grads      = value_and_grad(params -> loss_fn(forward_params_fn(params, opt_state), batch, key))
    updates, opt_st  = tx.update(grads, opt_state, params)
    params           = params + updates
    ema              = d * ema + (1 - d) * params          (optional)

With a ``mesh`` the same function is jitted with ``in_shardings``/``out_shardings``: the batch is split
over the data-parallel axes, params and optimizer state are placed by the sharding rules (FSDP shards
them over ``fsdp``); XLA inserts the collectives. Nothing in the step is device-count specific, so the
result equals the single-device step up to float reassociation.

Non-finite values: ``metrics["nonfinite"]`` is ``-1`` when the loss and every gradient leaf are finite,
``0`` when the loss is not, and ``1 + i`` when gradient leaf ``i`` (in ``tree_flatten_with_path``
order) is the first non-finite one. :func:`raise_if_nonfinite` turns it into an error naming the leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlab.distributed.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    opt_state_shardings,
    param_shardings,
    replicated,
)
from jaxlab.paths import key_path
from jaxlab.training.state import TrainState

__all__ = [
    "make_train_step",
    "make_pmap_train_step",
    "make_shard_map_train_step",
    "state_shardings",
    "DivergenceError",
    "NonFiniteError",
    "raise_if_nonfinite",
    "nonfinite_message",
    "leaf_paths",
]


class DivergenceError(FloatingPointError):
    """Training diverged: the message names the 1-based step, what went wrong and the last good checkpoint."""


class NonFiniteError(DivergenceError):
    """A loss or gradient became NaN/Inf; the message names the step and the first bad leaf."""


def leaf_paths(tree) -> list[str]:
    """``keystr`` of every leaf, in flatten order."""
    return [key_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _first_nonfinite(loss, grads) -> jax.Array:
    leaves = jax.tree.leaves(grads)
    flags = [jnp.all(jnp.isfinite(loss))] + [jnp.all(jnp.isfinite(g)) for g in leaves]
    flags = jnp.stack(flags)
    return jnp.where(jnp.all(flags), -1, jnp.argmin(flags)).astype(jnp.int32)


def raise_if_nonfinite(code: int, step: int, paths: list[str], note: str = "") -> None:
    """Raise :class:`NonFiniteError` for a ``metrics["nonfinite"]`` code (no-op for ``-1``).

    ``step`` is the 1-based number of the step that produced it (as in metrics and checkpoints).
    """
    code = int(code)
    if code < 0:
        return
    raise NonFiniteError(nonfinite_message(code, step, paths, note))


def nonfinite_message(code: int, step: int, paths: list[str], note: str = "") -> str:
    """The text for a ``metrics["nonfinite"]`` code ``>= 0``: the step and the first non-finite value."""
    what = "the loss" if int(code) == 0 else f"the gradient of params{paths[int(code) - 1]}"
    return f"non-finite value (NaN/Inf) at step {step}: {what} is the first non-finite value{note}"


def state_shardings(state_abstract: TrainState, tx, mesh: Mesh, boxed_params=None, rules=None):
    """Shardings for a whole :class:`TrainState` on ``mesh``.

    Params (and EMA params) follow the logical rules (``boxed_params`` carries the names) or the
    generic FSDP fallback; optimizer-state leaves that mirror params follow their param; the rest is
    replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    p_sh = param_shardings(boxed_params if boxed_params is not None else state_abstract.params, mesh, rules)
    rep = replicated(mesh)
    return TrainState(
        step=rep,
        params=p_sh,
        opt_state=opt_state_shardings(tx, state_abstract.opt_state, p_sh, mesh, params=state_abstract.params),
        rng=rep,
        ema_params=p_sh if state_abstract.ema_params is not None else None,
        loss_state=jax.tree.map(lambda _: rep, state_abstract.loss_state),
    )


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    *,
    forward_params_fn: Callable[[Any, Any], Any] | None = None,
    has_loss_state: bool = False,
    trainable: Any = None,
    ema_decay: float | None = None,
    mesh: Mesh | None = None,
    state_sharding: TrainState | None = None,
    batch_ndim: int | Any = None,
    donate: bool = False,
    jit: bool = True,
):
    """Build the train step.

    Args:
      loss_fn: ``loss_fn(params, batch, key) -> (loss, metrics)``; with ``has_loss_state``,
        ``loss_fn(params, batch, key, loss_state) -> (loss, (metrics, new_loss_state))``.
      tx: any optax transformation (``update`` is called with ``params``, so STEP/GRASP/weight decay work).
      forward_params_fn: ``(params, opt_state) -> params`` applied inside the differentiated function,
        e.g. :func:`jaxlab.sparse_forward_params` (straight-through N:M forward).
      has_loss_state: see ``loss_fn``.
      trainable: optional pytree of bools like the params (e.g. :func:`jaxlab.lora.trainable_mask`): leaves
        marked ``False`` are held under ``stop_gradient``, so their gradients are exact zeros that XLA
        neither computes nor all-reduces across devices (LoRA fine-tuning of a frozen base). The
        optimizer must leave them alone too (e.g. :func:`jaxlab.lora.freeze_base`).
      ema_decay: if set, ``state.ema_params`` tracks ``d * ema + (1 - d) * params``.
      mesh: run sharded on this mesh (batch over ``data`` x ``fsdp``); ``None``: plain ``jit``.
      state_sharding: the :class:`TrainState` of shardings (from :func:`state_shardings`); needed with ``mesh``.
      batch_ndim: pytree (or int) of batch leaf ranks, for the batch sharding; default 2 for every leaf.
      donate: donate the input state buffers (saves memory on accelerators).
      jit: return the un-jitted function when False (for ``pmap``/``shard_map`` wrappers).
    Returns:
      ``step(state, batch) -> (state, metrics)`` with metrics ``loss``, ``grad_norm``, ``nonfinite``
      and whatever ``loss_fn`` reported.
    """

    step = _step_fn(loss_fn, tx, forward_params_fn=forward_params_fn, has_loss_state=has_loss_state,
                    trainable=trainable, ema_decay=ema_decay)

    if not jit:
        return step
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    if state_sharding is None:
        raise ValueError("make_train_step: mesh given without state_sharding (use jaxlab.training.state_shardings)")

    def batch_sh(nd):
        return batch_sharding(mesh, nd)

    if batch_ndim is None:
        in_batch = None  # resolved lazily per batch structure below
    else:
        in_batch = jax.tree.map(batch_sh, batch_ndim)

    rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
    cache: dict = {}

    def sharded(state, batch):
        bsh = in_batch if in_batch is not None else jax.tree.map(lambda x: batch_sh(jnp.ndim(x)), batch)
        struct = jax.tree.structure(batch)
        if struct not in cache:
            cache[struct] = jax.jit(
                step,
                in_shardings=(state_sharding, bsh),
                out_shardings=(state_sharding, rep),
                donate_argnums=donate_argnums,
            )
        return cache[struct](state, batch)

    return sharded


def _freeze(params, trainable):
    """``stop_gradient`` on the leaves ``trainable`` marks ``False`` (identity without a mask)."""
    if trainable is None:
        return params
    ps, ts = jax.tree.structure(params), jax.tree.structure(trainable)
    if ps != ts:
        raise ValueError(f"make_train_step: trainable mask structure {ts} does not match the params {ps}; "
                         "build it from the params, e.g. jaxlab.lora.trainable_mask(params)")
    return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def _pmean_floats(tree, axis_name):
    """``pmean`` the floating leaves; integer leaves (counters) are equal on every device and keep their dtype."""
    return jax.tree.map(
        lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(jnp.result_type(x), jnp.inexact) else x, tree
    )


def _step_fn(loss_fn, tx, *, forward_params_fn=None, has_loss_state=False, trainable=None, ema_decay=None,
             axis_name=None):
    """The one train-step body: loss and grads, optional cross-device mean, ``tx.update``, EMA, metrics.

    With ``axis_name`` the gradients, loss, metrics and floating loss-state leaves are ``pmean``-ed over
    that axis before the update (the per-device body of the pmap / shard_map flavours).
    """

    def step(state: TrainState, batch):
        key = state.step_key()

        def objective(params):
            params = _freeze(params, trainable)
            fparams = params if forward_params_fn is None else forward_params_fn(params, state.opt_state)
            if has_loss_state:
                loss, (metrics, new_ls) = loss_fn(fparams, batch, key, state.loss_state)
            else:
                loss, metrics = loss_fn(fparams, batch, key)
                new_ls = state.loss_state
            return loss, (metrics, new_ls)

        (loss, (metrics, new_ls)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
            new_ls = _pmean_floats(new_ls, axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay is not None and ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, loss_state=new_ls
        )
        out = dict(metrics)
        out["loss"] = loss
        out["grad_norm"] = optax.tree.norm(grads)
        out["nonfinite"] = _first_nonfinite(loss, grads)
        return new_state, out

    return step


def make_pmap_train_step(loss_fn, tx, *, axis_name: str = "batch", devices=None, **kwargs):
    """``jax.pmap`` flavour of the step: replicated state, batch split on a leading device axis.

    Gradients are ``pmean``-ed over ``axis_name`` before ``tx.update``, so with equal shard sizes
    the update equals the single-device step on the whole batch. Give the state a leading device axis
    (e.g. ``jax.tree.map(lambda x: jnp.stack([x] * n), state)``) and reshape batches to
    ``(n_devices, per_device, ...)``.
    (Per-example losses averaged within a shard; a loss whose statistics pool across the batch must
    itself ``psum`` over ``axis_name`` to match the single-device step exactly.)
    """
    return jax.pmap(_step_fn(loss_fn, tx, axis_name=axis_name, **kwargs), axis_name=axis_name, devices=devices)


def make_shard_map_train_step(loss_fn, tx, mesh: Mesh, *, axis_name: str = "data", **kwargs):
    """``jax.shard_map`` flavour: state replicated (``P()``), batch split over ``axis_name``, grads ``pmean``-ed."""
    local = _step_fn(loss_fn, tx, axis_name=axis_name, **kwargs)
    return jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis_name)), out_specs=(P(), P()), check_vma=False)
    )
