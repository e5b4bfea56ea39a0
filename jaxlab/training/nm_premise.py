"""STEP's premise, measured: do mask flips corrupt Adam's second moment under N:M training?

The claim STEP rests on: with a straight-through N:M forward (STE / SR-STE) the masks flip, the
gradients the optimizer sees change with them, and Adam's second moment ``v`` no longer estimates the
variance a dense model's gradients would have; STEP trains dense first, then freezes ``v``. This probe
follows one training run and, at every step ``t``, records

* the **mask flip rate**: the fraction of the sparsifiable weights whose N:M magnitude-mask bit
  differs from the previous step's,

  .. math:: f_t = \\frac{1}{|S|}\\sum_{i\\in S} [\\,\\operatorname{mask}(w_t)_i \\ne \\operatorname{mask}(w_{t-1})_i\\,];

* a **shadow dense second moment**: the EMA a dense Adam would keep on the *same trajectory*, fed with
  the gradient of the loss at the dense weights (no mask) on the same batch and key,

  .. math:: s_t = \\beta_2 s_{t-1} + (1-\\beta_2)\\,\\big(\\nabla_w L(w_{t-1})\\big)^2 ;

* the loss of the dense weights with no mask on that batch (``dense_loss``): how far the network the
  shadow describes is from the one being trained (for sparse-trained weights it is never evaluated);

* per sparsifiable leaf, the **relative error** of the bias-corrected second moment the optimizer holds
  against the bias-corrected shadow,

  .. math:: e_t = \\frac{\\lVert \\hat v_t - \\hat s_t\\rVert_F}{\\lVert \\hat s_t\\rVert_F},\\qquad
      \\hat s_t = \\frac{s_t}{1-\\beta_2^t},\\quad
      \\hat v_t = \\begin{cases} v_t / (1-\\beta_2^t) & \\text{live } v\\\\
                                 v_{T_0}/(1-\\beta_2^{T_0}) & \\text{STEP's frozen } v \\end{cases}

  the same error over the weights the current mask keeps (``v_rel_err_kept``: a pruned weight's
  straight-through gradient is taken at ``w~ = 0`` and differs from the dense one by construction; the
  kept weights are where a corrupted ``v`` would mislead the trained model), and the mean absolute
  log-ratio ``mean |log(v_hat + tiny) - log(s_hat + tiny)|`` (a scale-free view that large entries do
  not dominate; ``tiny = 1e-30``) with its signed mean (``v_log_bias``: which of the two is larger).

The shadow describes the *dense* weights, a network that sparse training never evaluates (its loss
grows with sparsity), so a large error against it does not by itself say that ``v`` is wrong for the
network being trained. With ``local_batches = K > 0`` the probe also measures, after every compiled chunk
of steps, a **local reference** free of that confound and of flips: the second moment of the gradient
the optimizer itself receives (through ``forward_params_fn``: the straight-through N:M forward for the
sparse methods) at the current weights, over ``K`` fresh batches,

  .. math:: r_t = \\frac1K\\sum_{k=1}^K \\big(\\nabla_w L(\\mathrm{fwd}(w_t), B_k)\\big)^2 ,

and ``v_hat``'s error against it over the kept weights (where SR-STE's decay term is zero):
``local_rel_err_kept`` (Frobenius relative error), ``local_log_err_kept`` and ``local_log_bias_kept``
(mean absolute / signed ``log v_hat - log r``). ``r_t`` is what an ideal second moment would be *now*;
its sampling noise (``K`` batches) and an EMA's lag set a floor that every method shares, so dense
AdamW's own error against its ``r_t`` is the baseline a corrupted ``v`` has to exceed.

Both moments are bias-corrected with their own horizon whatever ``bias_correct_frozen_v`` says, so the
error measures *staleness or corruption* of the estimate, not the step-size scaling that flag selects.
For dense AdamW and STEP's phase 1 the optimizer's ``v`` *is* the shadow (error 0 up to float rounding:
a check of the probe). It costs one extra forward and backward pass per step.

Use it through :func:`jaxlab.training.experiment.run_training`'s ``probe=`` argument::

    probe = nm_premise_probe(loss_fn, n=2, m=4, b2=0.999, sparsify=r"block_\\d+/(attn|mlp)/\\w+/kernel$")
    res = run_training(loss_fn, tx, init_fn, batch_fn, steps=..., seeds=..., probe=probe, ...)
    res.trace["flip_rate"], res.trace["v_rel_err"]        # [runs, steps], [runs, steps, n_leaves]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.nm.masks import nm_leaf_axes, nm_mask
from jaxlab.training.state import TrainState
from jaxlab.transforms.sr_ste import SrSteState
from jaxlab.transforms.step import StepState
from jaxlab.transforms.tree import find_states, named_leaves, path_filter

__all__ = [
    "PremiseState",
    "Probe",
    "nm_premise_probe",
    "optimizer_second_moment",
    "plot_premise",
    "premise_table",
    "premise_summary",
    "sparse_leaf_names",
]

_TINY = 1e-30


class Probe(NamedTuple):
    """A per-step measurement carried beside training by :func:`jaxlab.training.experiment.run_training`.

    ``init(state) -> probe_state`` after ``TrainState.create``; ``update(probe_state, state_before,
    state_after, batch) -> (probe_state, {name: array})`` after every step (traced inside the scan);
    optionally ``at_chunk_end(probe_state, state) -> (probe_state, {name: array})`` once after every
    compiled chunk of steps (a measurement too costly for every step; outside the scan, so not paid by
    steps that skip it even when runs are vmapped).
    """

    init: Callable[[TrainState], Any]
    update: Callable[..., tuple[Any, dict]]
    at_chunk_end: Callable[..., tuple[Any, dict]] | None = None


class PremiseState(NamedTuple):
    """State of :func:`nm_premise_probe`: the shadow dense ``s_t`` and the last masks (sparse leaves only)."""

    shadow_nu: list
    masks: list
    count: jax.Array


def optimizer_second_moment(opt_state) -> tuple[Any, jax.Array, jax.Array]:
    """``(nu, count, horizon)`` of the Adam-family state inside ``opt_state``.

    ``horizon`` is the ``t`` whose ``1 - b2^t`` bias-corrects ``nu``: ``count`` for a live moment, STEP's
    switch step ``T_0`` once its ``v`` is frozen (phase 2). Looks through ``chain``/ASP's inner state for
    :class:`~jaxlab.transforms.step.StepState`, :class:`~jaxlab.transforms.sr_ste.SrSteState` or
    ``optax.ScaleByAdamState``.

    Raises:
      ValueError: no such state, or more than one.
    """
    states = find_states(opt_state, (StepState, SrSteState, optax.ScaleByAdamState))
    if len(states) != 1:
        raise ValueError(f"optimizer_second_moment: expected one Adam-family state (StepState, SrSteState or "
                         f"ScaleByAdamState) in opt_state, found {len(states)}")
    s = states[0]
    horizon = s.count
    if isinstance(s, StepState):
        horizon = jnp.where(s.phase == 1, jnp.maximum(s.switch_step, 1), s.count)
    return s.nu, s.count, horizon


def sparse_leaf_names(params, m: int, *, sparsify=None, nm_axis=None) -> list[str]:
    """Slash paths of the N:M leaves (the order of :func:`nm_premise_probe`'s per-leaf columns)."""
    flat_axes = jax.tree_util.tree_structure(params).flatten_up_to(_axes(params, m, sparsify, nm_axis))
    return [name for (name, _), a in zip(named_leaves(params), flat_axes) if a is not None]


def _rel(a, b):
    return jnp.linalg.norm((a - b).ravel()) / jnp.maximum(jnp.linalg.norm(b.ravel()), _TINY)


def _axes(params, m, sparsify, nm_axis):
    if isinstance(sparsify, str):
        sparsify = path_filter(sparsify)
    return nm_leaf_axes(params, m, sparsify=sparsify, nm_axis=nm_axis)


def nm_premise_probe(loss_fn: Callable, *, n: int, m: int, b2: float, sparsify=None, nm_axis=None,
                     local_batches: int = 0, batch_fn: Callable | None = None,
                     forward_params_fn: Callable | None = None, shadow: bool = True) -> Probe:
    """Probe of the mask flip rate and of ``v``'s distance from a shadow dense second moment.

    Args:
      loss_fn: ``(params, batch, key) -> (loss, aux)``, the training loss (evaluated here at the
        *dense* weights).
      n, m: the N:M ratio whose magnitude masks are compared step to step.
      b2: the optimizer's second-moment decay (the shadow uses the same).
      sparsify, nm_axis: which leaves are N:M and along which axis, as given to the optimizer
        (:func:`jaxlab.nm.nm_leaf_axes`; ``sparsify`` may also be a path regex).
      local_batches: ``K`` for the local reference ``r_t`` after every chunk (0: off).
      batch_fn: ``key -> batch`` drawing the local reference's batches (needed when ``local_batches > 0``).
      forward_params_fn: ``(params, opt_state) -> params`` as given to the train step (``None``: the
        identity, i.e. a dense forward).
      shadow: keep the shadow dense ``s_t`` (one extra forward and backward pass per step). ``False``
        records only the flip rate per step (and the local reference when ``local_batches > 0``).

    Returns:
      :class:`Probe` whose metrics are ``flip_rate`` and ``dense_loss`` (scalars; the loss of the dense
      weights with no mask, whose gradient feeds the shadow), ``v_rel_err``, ``v_rel_err_kept`` (the
      same error over the weights the current mask keeps), ``v_log_err`` and ``v_log_bias`` (the mean
      signed log-ratio: negative when ``v`` is smaller than the shadow) (``[n_sparse_leaves]``, in
      :func:`sparse_leaf_names` order); with ``local_batches``, at each chunk end
      ``local_rel_err_kept``, ``local_log_err_kept``, ``local_log_bias_kept`` (``[n_sparse_leaves]``).

    Raises:
      ValueError: no leaf is selected (at ``init``), no single Adam-family state in the optimizer, or
        ``local_batches`` without ``batch_fn``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxlab.training.experiment import run_training
      >>> from jaxlab.training.nm_premise import nm_premise_probe
      >>> loss = lambda p, b, k: (jnp.mean((b @ p["w"]) ** 2), {})
      >>> init = lambda k: {"w": jax.random.normal(k, (8, 2))}
      >>> batch = lambda k: jax.random.normal(k, (4, 8))
      >>> res = run_training(loss, optax.adam(1e-2, b2=0.9), init, batch, steps=5, seeds=1, progress=False,
      ...                    probe=nm_premise_probe(loss, n=2, m=4, b2=0.9, sparsify=r"w"))
      >>> float(res.trace["v_rel_err"].max()) < 1e-5   # dense Adam: v is the shadow
      True
    """
    b2 = float(b2)
    local_batches = int(local_batches)
    if local_batches < 0:
        raise ValueError(f"nm_premise_probe: local_batches must be >= 0, got {local_batches}")
    if local_batches and batch_fn is None:
        raise ValueError("nm_premise_probe: local_batches > 0 needs batch_fn (key -> batch) for the fresh batches")
    forward = forward_params_fn or (lambda p, s: p)

    def sparse(params, *trees) -> list:
        """``[(axis, leaf of each tree...)]`` of the N:M leaves; the axes are static, resolved from params once."""
        treedef = jax.tree_util.tree_structure(params)
        flat_axes = treedef.flatten_up_to(_axes(params, m, sparsify, nm_axis))
        flats = [treedef.flatten_up_to(t) for t in (params, *trees)]
        return [(a, *xs) for a, *xs in zip(flat_axes, *flats) if a is not None]

    def masks_of(params) -> list:
        return [nm_mask(w, n, m, a) for a, w in sparse(params)]

    def init(state: TrainState) -> PremiseState:
        pairs = sparse(state.params)
        if not pairs:
            raise ValueError(f"nm_premise_probe: `sparsify` selects no leaf for {n}:{m} (nothing to measure)")
        return PremiseState(shadow_nu=[jnp.zeros(w.shape, jnp.float32) for _, w in pairs] if shadow else [],
                            masks=masks_of(state.params), count=jnp.zeros([], jnp.int32))

    def flip_rate(masks, previous):
        flips = sum(jnp.sum(a != b, dtype=jnp.float32) for a, b in zip(masks, previous))
        return flips / float(sum(x.size for x in masks))

    def update(ps: PremiseState, before: TrainState, after: TrainState, batch):
        if not shadow:
            masks = masks_of(after.params)
            return ps._replace(masks=masks, count=ps.count + 1), {"flip_rate": flip_rate(masks, ps.masks)}
        key = jax.random.fold_in(before.rng, before.step)
        dense_loss, g = jax.value_and_grad(lambda p: loss_fn(p, batch, key)[0])(before.params)
        t = ps.count + 1
        nu, _, horizon = optimizer_second_moment(after.opt_state)
        leaves = sparse(before.params, g, nu)  # [(axis, w, g, v)]
        shadow_nu = [b2 * s + (1 - b2) * jnp.square(gi.astype(jnp.float32)) for s, (_, _, gi, _) in zip(ps.shadow_nu, leaves)]
        c_s = 1 - b2 ** t.astype(jnp.float32)
        c_v = 1 - b2 ** horizon.astype(jnp.float32)
        masks = masks_of(after.params)
        rel, kept, logs, bias = [], [], [], []
        for s, (_, _, _, v), mk in zip(shadow_nu, leaves, masks):
            s_hat, v_hat = s / c_s, v.astype(jnp.float32) / c_v
            rel.append(_rel(v_hat, s_hat))
            kept.append(_rel(jnp.where(mk, v_hat, 0.0), jnp.where(mk, s_hat, 0.0)))
            log_ratio = jnp.log(v_hat + _TINY) - jnp.log(s_hat + _TINY)
            logs.append(jnp.mean(jnp.abs(log_ratio)))
            bias.append(jnp.mean(log_ratio))
        metrics = {"flip_rate": flip_rate(masks, ps.masks), "dense_loss": dense_loss.astype(jnp.float32),
                   "v_rel_err": jnp.stack(rel),
                   "v_rel_err_kept": jnp.stack(kept), "v_log_err": jnp.stack(logs), "v_log_bias": jnp.stack(bias)}
        return PremiseState(shadow_nu=shadow_nu, masks=masks, count=t), metrics

    def local_second_moment(state: TrainState):
        """``r_t``: mean over ``K`` fresh batches of the squared gradient the optimizer would receive now."""
        key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x10CA1)

        def one(acc, k):
            g = jax.grad(lambda p: loss_fn(forward(p, state.opt_state), batch_fn(k), k)[0])(state.params)
            return jax.tree.map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g), None

        acc = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), state.params)
        acc, _ = jax.lax.scan(one, acc, jax.random.split(key, local_batches))
        return jax.tree.map(lambda a: a / local_batches, acc)

    def at_chunk_end(ps: PremiseState, state: TrainState):
        nu, _, horizon = optimizer_second_moment(state.opt_state)
        c_v = 1 - b2 ** horizon.astype(jnp.float32)
        rel, logs, bias = [], [], []
        # ps.masks: the masks of the latest params (update() keeps them), so they are not sorted again here
        for (_, _, r, v), mk in zip(sparse(state.params, local_second_moment(state), nu), ps.masks):
            v_hat = v.astype(jnp.float32) / c_v
            rel.append(_rel(jnp.where(mk, v_hat, 0.0), jnp.where(mk, r, 0.0)))
            log_ratio = jnp.where(mk, jnp.log(v_hat + _TINY) - jnp.log(r + _TINY), 0.0)
            kept = jnp.maximum(jnp.sum(mk), 1)
            logs.append(jnp.sum(jnp.abs(log_ratio)) / kept)
            bias.append(jnp.sum(log_ratio) / kept)
        return ps, {"local_rel_err_kept": jnp.stack(rel), "local_log_err_kept": jnp.stack(logs),
                    "local_log_bias_kept": jnp.stack(bias)}

    return Probe(init, update, at_chunk_end if local_batches else None)


def premise_summary(trace: dict, every: int = 100) -> dict:
    """Per-``every``-step means of the probe's traces (``[runs, steps(, leaves)]`` from ``run_training``).

    Returns ``{"step": [end step of each window], "flip_rate": [runs][windows], "v_rel_err":
    [runs][windows] (mean over the sparse leaves), "v_rel_err_kept", "v_log_err": likewise, "v_rel_err_by_leaf":
    [windows][leaves] (mean over runs)}``; a last partial window is dropped. With the local reference,
    also ``"local_step"`` (the chunk ends) and ``"local_rel_err_kept"``, ``"local_log_err_kept"``,
    ``"local_log_bias_kept"`` as ``[runs][chunks]`` (means over the sparse leaves).
    """
    flips = np.asarray(trace["flip_rate"], np.float64)
    runs, steps = flips.shape
    k = steps // every
    if k < 1:
        raise ValueError(f"premise_summary: {steps} steps is less than one window of {every}")

    def win(x):  # [runs, steps, ...] -> [runs, k, ...]
        x = np.asarray(x, np.float64)[:, : k * every]
        return x.reshape(runs, k, every, *x.shape[2:]).mean(2)

    nan = np.full((runs, k, 1), np.nan)  # a probe without the shadow (shadow=False) has no such trace
    rel = win(trace["v_rel_err"]) if "v_rel_err" in trace else nan
    logs = win(trace["v_log_err"]) if "v_log_err" in trace else nan
    kept = win(trace["v_rel_err_kept"]) if "v_rel_err_kept" in trace else rel
    bias = win(trace["v_log_bias"]) if "v_log_bias" in trace else nan
    dense_loss = win(trace["dense_loss"]) if "dense_loss" in trace else nan[..., 0]
    local = {}
    if "local_rel_err_kept" in trace:  # chunk-end measurements: [runs, chunks, leaves] -> [runs][chunks]
        local = {"local_step": np.asarray(trace["chunk_end_step"])[0].tolist()}
        local.update({key: np.asarray(trace[key], np.float64).mean(-1).tolist()
                      for key in ("local_rel_err_kept", "local_log_err_kept", "local_log_bias_kept")})
    return {**local, "step": [every * (i + 1) for i in range(k)], "flip_rate": win(flips).tolist(),
            "v_rel_err": rel.mean(-1).tolist(), "v_rel_err_kept": kept.mean(-1).tolist(),
            "v_log_err": logs.mean(-1).tolist(), "v_log_bias": bias.mean(-1).tolist(),
            "dense_loss": dense_loss.tolist(),
            "v_rel_err_by_leaf": rel.mean(0).tolist()}


def plot_premise(path, curves: dict, switch_steps: dict | None = None, title: str = "") -> None:
    """Panels: the mask flip rate per window; with the shadow, ``v``'s relative error vs the dense shadow
    (all / kept weights) and the mean absolute log-ratio; with the local reference, ``v``'s relative error
    vs ``r`` and the mean signed log-ratio on the kept weights (per chunk end).

    Args:
      path: output PNG.
      curves: ``{label: premise_summary(...)}``; each curve is the mean over runs, with a band of the
        per-run min..max.
      switch_steps: ``{label: [T_0 per run]}`` drawn as dotted verticals (STEP).
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_local = any("local_step" in c for c in curves.values())
    has_shadow = any(np.isfinite(np.asarray(c["v_rel_err"], np.float64)).any() for c in curves.values())
    names = ["flips"] + (["shadow", "shadow_log"] if has_shadow else []) + (["local", "local_log"] if has_local else [])
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False)
    ax_of = dict(zip(names, axes[0]))
    every = 100
    for j, (label, s) in enumerate(curves.items()):
        x = np.asarray(s["step"])
        every = int(x[0])
        panels = [("flips", "flip_rate", "-", x)]
        if has_shadow:
            panels += [("shadow", "v_rel_err", "-", x), ("shadow_log", "v_log_err", "-", x), ("shadow", "v_rel_err_kept", "--", x)]
        if "local_step" in s:
            xl = np.asarray(s["local_step"])
            panels += [("local", "local_rel_err_kept", "-", xl), ("local_log", "local_log_bias_kept", "-", xl)]
        for name, key, ls, xs in panels:
            y = np.asarray(s[key])
            ax_of[name].plot(xs, y.mean(0), color=f"C{j}", lw=1.5, ls=ls, label=label if ls == "-" else None)
            ax_of[name].fill_between(xs, y.min(0), y.max(0), color=f"C{j}", alpha=0.15, lw=0)
        for t0 in (switch_steps or {}).get(label, []) or []:
            for ax in axes[0]:
                ax.axvline(t0, color=f"C{j}", ls=":", lw=0.8)
    ax_of["flips"].set(ylabel="mask flips per weight per step", yscale="log",
                       xlabel=f"step (window end; {every}-step means)")
    if has_shadow:
        ax_of["shadow"].set(ylabel="rel. error of v vs dense shadow", title="solid: all N:M weights; dashed: kept ones",
                            xlabel=f"step (window end; {every}-step means)")
        ax_of["shadow_log"].set(ylabel="mean |log v_hat - log s_hat| per element",
                                xlabel=f"step (window end; {every}-step means)")
    if has_local:
        ax_of["local"].set(ylabel="rel. error of v vs local r (kept weights)", xlabel="step (chunk end)", yscale="log",
                           title="r: K fresh batches at the current weights")
        ax_of["local_log"].set(ylabel="mean log(v_hat / r) over kept weights", xlabel="step (chunk end)",
                               title="> 0: v larger than r (smaller steps)")
        ax_of["local_log"].axhline(0, color="k", lw=0.6)
    axes = axes[0]
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94) if title else None)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def premise_table(rows: dict, fractions=(0.1, 0.5, 1.0)) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of a markdown table: flip rate and ``v`` errors at fractions of the budget.

    Args:
      rows: ``{label: premise_summary(...)}``.
      fractions: where to read the windows (the window ending nearest ``fraction * budget``).

    Cells are mean ± sample std (ddof = 1) over runs, 3 significant digits.
    """

    def cell(x):
        x = np.asarray(x, np.float64)
        sd = x.std(ddof=1) if x.size > 1 else float("nan")
        return f"{x.mean():.3g} ± {sd:.2g}"

    header, body = ["run"], []
    first = next(iter(rows.values()), None)
    if first is None:
        return header, body
    steps = np.asarray(first["step"])
    picks = sorted({int(np.argmin(np.abs(steps - f * steps[-1]))) for f in fractions})
    cols = (("flip_rate", "flips/weight/step"), ("v_rel_err", "v rel. err"),
            ("v_rel_err_kept", "v rel. err (kept)"), ("v_log_err", "mean abs log ratio"),
            ("v_log_bias", "mean log ratio"), ("dense_loss", "dense-weights loss"))
    cols = tuple((key, name) for key, name in cols  # columns no row measured (shadow=False) are left out
                 if any(np.isfinite(np.asarray(s[key], np.float64)).any() for s in rows.values()))
    for _, name in cols:
        header += [f"{name} @ {steps[i]}" for i in picks]
    local = [s for s in rows.values() if "local_step" in s]
    lcols = (("local_rel_err_kept", "v vs local r, rel. err (kept)"), ("local_log_bias_kept", "log(v/r) (kept)"))
    if local:
        lsteps = np.asarray(local[0]["local_step"])
        lpicks = sorted({int(np.argmin(np.abs(lsteps - f * lsteps[-1]))) for f in fractions})
        header += [f"{name} @ {lsteps[i]}" for _, name in lcols for i in lpicks]
    for label, s in rows.items():
        row = [label] + [cell(np.asarray(s[key])[:, i]) for key, _ in cols for i in picks]
        if local:
            row += ([cell(np.asarray(s[key])[:, i]) for key, _ in lcols for i in lpicks] if "local_step" in s
                    else ["-"] * (len(lcols) * len(lpicks)))
        body.append(row)
    return header, body
