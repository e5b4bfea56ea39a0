"""STEP: Adam-aware N:M sparsity -- dense precondition phase, AutoSwitch, frozen-variance mask learning.

Phase 1 (precondition, dense forward) is AdamW. While in phase 1, each step measures how much the
second moment of the sparsifiable leaves still moves,

.. math::

    Z_t = \\frac{1}{|S|}\\sum_{i \\in S} |v_{t,i} - v_{t-1,i}|
        = \\frac{1-\\beta_2}{|S|}\\sum_{i\\in S} |g_{t,i}^2 - v_{t-1,i}|,

(``statistic="mean"``; ``statistic="geometric"`` takes the geometric mean over the elements instead,
:math:`Z_t = \\exp\\big(\\frac{1}{|S|}\\sum_{i\\in S}\\log\\max(|v_{t,i} - v_{t-1,i}|, 10^{-30})\\big)`),
keeps the last ``T_w = round(1/(1-b2))`` values in a ring buffer and switches (one-way, globally) when

.. math:: (\\bar Z_t < \\epsilon_{switch} \\wedge t > t_{min}) \\vee t > t_{max},

where :math:`\\bar Z_t` is the (arithmetic) mean of the buffer's filled entries. Step ``T_0``
(the switching step) is still a phase-1 step. Phase 2 (mask learning) uses the straight-through forward
``w * mask(w)`` (:func:`jaxlab.transforms.sparse_forward_params`), adds the SR-STE term
``lam (1 - mask) * w`` to the gradient, keeps updating the first moment with the global bias correction
and divides by the **frozen** second moment ``v_{T_0}`` of the sparsifiable leaves:

.. math:: w \\leftarrow w - \\eta\\Big(\\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_{T_0}} + \\epsilon^{3/4}} + \\lambda_{wd} w\\Big).

Non-sparsifiable leaves (biases, norms, embeddings) run ordinary AdamW with a live ``v`` throughout.
The phase is an ``int32`` in the state and acts through ``lax.cond``, so one compiled step runs on both
sides of the switch (under ``jit``, ``pmap`` and sharded ``jit`` alike).

The math lives in named functions that :func:`scale_by_step` composes: :func:`sr_ste_phase2` (the SR-STE
term), optax's moment updates (``optax.tree.update_moment``/``update_moment_per_elem_norm``),
:func:`frozen_v_direction` (the live or frozen-``v`` Adam direction), :func:`z_statistic` and
:func:`autoswitch` (the ring buffer and the ``t_min``/``t_max`` rule).

**Defaults, and why.** ``switch_eps`` defaults to Adam's ``eps`` (the reference reading's mapping). A
threshold read off one run's ``Zbar`` trace is an option, but it is fragile: in ``experiments/step_lm``
(b2 = 0.99) ``3e-8`` taken from a trace made the switch fire right after ``t_min`` on every seed, i.e. a
``t_min`` clamp rather than a test. ``bias_correct_frozen_v`` defaults **on**: without it the frozen
denominator is ``sqrt(v_{T_0})`` instead of ``sqrt(v_{T_0} / (1 - b2^{T_0}))``, which inflates every
phase-2 step by ``1/sqrt(1 - b2^{T_0})`` -- x1.14-1.25 at b2 = 0.99 with ``T_0`` = 105-153, and x3.2 at
b2 = 0.999 with ``T_0 = 101``, where STEP collapsed in ``step_lm`` (2.997 bits/byte vs 2.959 with the
correction and 2.919 for SR-STE). For ``T_0 >= 3/(1 - b2)`` the factor is below 1.03 and the choice does
not matter; ``bias_correct_frozen_v=False`` gives the reference reading (used by the equality test
against it).

Reference: Lu, Agrawal, Subramanian, Rybakov, De Sa, Yazdanbakhsh, "STEP: Learning N:M Structured
Sparsity Masks from Scratch with Precondition", ICML 2023 (arXiv 2302.01172) -- the abstract (dense
precondition phase, AutoSwitch, frozen variance) and the public description transcribed in this
project's reference reading, which ``step_adamw`` matches to 6e-16 in float64 (the equation and
section numbers of the full text were not available to us). SR-STE term: Zhou et al., ICLR 2021,
checked against the original SR-STE code.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.nm.masks import nm_pruned_bits, unpack_pruned
from jaxlab.transforms._nm_common import (
    NMConfig,
    check_update,
    magnitude_prune,
    register_nm_state,
    sr_ste_refine,
    static_float,
    static_int,
    ste_forward,
    uses_sr_ste,
    with_lr_and_decay,
)
from jaxlab.transforms.tree import find_states

__all__ = [
    "StepState",
    "autoswitch",
    "frozen_v_direction",
    "scale_by_step",
    "sr_ste_phase2",
    "step_adamw",
    "step_phase",
    "step_statistics",
    "step_switch_step",
    "z_statistic",
]

_TINY = 1e-30


class StepState(NamedTuple):
    """State of :func:`scale_by_step` (moments laid out like ``optax.ScaleByAdamState``).

    Attributes:
      count: int32 number of updates done (``t`` of the last update).
      mu, nu: first and second moments (pytrees like params); ``nu`` of sparsifiable leaves is
        frozen at ``v_{T_0}`` in phase 2.
      phase: int32, 0 = precondition (dense AdamW), 1 = mask learning (frozen ``v``).
      switch_step: int32 ``T_0`` (the last phase-1 step), -1 before the switch.
      z_buffer: float32 ring buffer of the last ``ceil(window / z_every)`` statistics ``Z_t``.
      z_fill: int32 number of filled buffer entries (``<= window``).
      z_pos: int32 next write position.
      z: float32 ``Z_t`` of the last phase-1 step.
      zbar: float32 buffer statistic ``Zbar`` after the last phase-1 step (``inf`` before any).
      config: static N:M configuration (no leaves).
    """

    count: jax.Array
    mu: Any
    nu: Any
    phase: jax.Array
    switch_step: jax.Array
    z_buffer: jax.Array
    z_fill: jax.Array
    z_pos: jax.Array
    z: jax.Array
    zbar: jax.Array
    config: NMConfig


def sr_ste_phase2(grads, params, axes, in_p2, *, n: int, m: int, sr_ste_lambda) -> list:
    """STEP's SR-STE term: the refined gradient on the sparsifiable leaves in phase 2, the raw one in phase 1.

    .. math:: g \\leftarrow g + [\\text{phase} = 2]\\;\\lambda_w\\,(1 - \\operatorname{mask}(w))\\odot w
        \\quad\\text{(sparsifiable leaves; others unchanged)}

    Only the N:M ranking is phase-specific *work*, so only it sits under ``lax.cond``, packed one integer
    per group (:func:`jaxlab.nm.masks.nm_pruned_bits`: ``1/m`` of a boolean mask's bytes; phase 1 returns
    zeros, nothing pruned, nothing ranked). The rest is elementwise, so XLA fuses it into the moment update.

    Args:
      grads, params: flat lists of the gradient and dense weight leaves.
      axes: flat list of grouping axes (``None`` for dense leaves).
      in_p2: traced bool, ``phase == 1`` (mask learning).
      n, m: the N:M ratio.
      sr_ste_lambda: ``lambda_w``.

    Returns:
      The list of (refined) gradients.
    """
    sparse = [i for i, a in enumerate(axes) if a is not None]

    def bits_p2(w_s):
        return [nm_pruned_bits(w, n, m, axes[i]) for w, i in zip(w_s, sparse)]

    def bits_p1(w_s):
        return [jnp.zeros(b.shape, b.dtype) for b in jax.eval_shape(bits_p2, w_s)]

    bits = jax.lax.cond(in_p2, bits_p2, bits_p1, [params[i] for i in sparse])
    out = list(grads)
    for b, i in zip(bits, sparse):
        pruned = unpack_pruned(b, m, axes[i], params[i].shape)
        out[i] = sr_ste_refine(grads[i], params[i], pruned, sr_ste_lambda)
    return out


def frozen_v_direction(mus, nus, count, frozen, switch_step, *, b1, b2, eps, eps_frozen, bias_correct_frozen_v):
    """Adam's direction for a group of leaves whose second moment is live, or frozen at the switch.

    .. math::

        d_t = \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v / c_2} + \\epsilon'},\\qquad
        (v, c_2, \\epsilon') = \\begin{cases}
          (v_t,\\ 1-\\beta_2^t,\\ \\epsilon) & \\text{live (phase 1; dense leaves always)}\\\\
          (v_{T_0},\\ 1 \\text{ or } 1-\\beta_2^{T_0},\\ \\epsilon_{frozen}) & \\text{frozen (phase 2, sparsifiable)}
        \\end{cases}

    The frozen ``v_{T_0}`` is bias-corrected only with ``bias_correct_frozen_v`` (off in the reference reading); the
    first moment keeps its bias correction with the global ``t``. The scalars are computed once per group
    and written out rather than taken from ``optax.tree.bias_correction`` (whose ``jit`` makes XLA round
    differently in the last bit), so the numbers are those of the original implementation bit for bit.

    Args:
      mus: list of first moments ``m_t`` (already updated).
      nus: list of second moments (``v_t`` when live, ``v_{T_0}`` when frozen).
      count: ``t`` (int32, 1-based).
      frozen: traced bool (``phase == 1``: the sparsifiable leaves in phase 2) or ``False``.
      switch_step: ``T_0`` (int32; only read when frozen).
      b1, b2, eps, eps_frozen, bias_correct_frozen_v: as in :func:`scale_by_step`.

    Returns:
      The list of ``d_t``, shaped like ``mus``.
    """
    c1 = 1 - b1**count
    c2 = jnp.where(frozen, 1 - b2 ** jnp.maximum(switch_step, 1) if bias_correct_frozen_v else 1.0, 1 - b2**count)
    eps_t = jnp.where(frozen, eps_frozen, eps)
    return [(mu / c1.astype(mu.dtype)) / (jnp.sqrt(nu / c2.astype(nu.dtype)) + eps_t.astype(nu.dtype))
            for mu, nu in zip(mus, nus)]


def z_rows(x: jax.Array, stride: int, offset=0) -> tuple[jax.Array, jax.Array | None]:
    """The rows ``offset, offset + k, offset + 2k, ...`` of a leaf (``k = stride``): :func:`z_statistic`'s sample.

    Rows are the leading axes flattened, the last axis kept whole (a ``(d_in, d_out)`` kernel: the full
    rows of every ``k``-th input feature; a 1-D leaf: its elements), so the sample is contiguous runs of
    memory and a reduction over it reads about ``1/k`` of the leaf. ``offset`` may be traced (STEP rotates it
    with the step, so that ``k`` consecutive samples visit every row exactly once: a systematic sample with
    a moving start, unbiased for the mean over the rows whatever structure the rows have, e.g. the blank
    border pixels of an image's first layer). The first ``k * floor(rows / k)`` rows are taken through a
    reshape ``(rows/k, k, cols)[:, offset]`` (shard-local under a row-sharded layout whose shards hold a
    multiple of ``k`` rows); a tail of ``rows mod k`` rows contributes its row ``offset`` when there is one.

    Args:
      x: the leaf.
      stride: ``k >= 1``.
      offset: ``0 <= offset < k`` (int or traced int32).

    Returns:
      ``(rows, valid)``: the sampled rows as a 2-D array and, when a tail exists, a bool per row saying
      whether it belongs to the sample (``None``: all do). ``stride = 1``: all rows, ``None``.

    Example:
      >>> from jaxlab.transforms.step import z_rows
      >>> rows, valid = z_rows(jnp.arange(14.0).reshape(7, 2), 3, offset=1)
      >>> rows.tolist(), valid.tolist()   # rows 1, 4 and the tail row 6 (= 2*3 + 0) is not offset 1
      ([[2.0, 3.0], [8.0, 9.0], [12.0, 13.0]], [True, True, False])
    """
    if int(stride) < 1:
        raise ValueError(f"z_rows: stride must be >= 1, got {stride}")
    x2 = x.reshape(-1, 1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])
    if stride == 1:
        return x2, None
    rows, cols = x2.shape
    main, tail = divmod(rows, stride)
    offset = jnp.asarray(offset, jnp.int32)
    parts = []
    if main:
        blocks = x2[: main * stride].reshape(main, stride, cols)
        parts.append(jax.lax.dynamic_index_in_dim(blocks, offset, axis=1, keepdims=False))
    if not tail:
        return parts[0], None
    parts.append(jax.lax.dynamic_slice_in_dim(x2[main * stride:], jnp.minimum(offset, tail - 1), 1))
    valid = jnp.concatenate([jnp.ones([main], bool), (offset < tail)[None]])
    return jnp.concatenate(parts), valid


def z_statistic(grads, nus, b2, *, geometric: bool = False, stride: int = 1, offset=0) -> jax.Array:
    """AutoSwitch's statistic: how much the second moment of the sparsifiable leaves ``S`` still moves.

    With the per-element change :math:`\\Delta_{t,i} = |v_{t,i} - v_{t-1,i}|
    = \\frac{1-\\beta_2}{\\beta_2} |g_{t,i}^2 - v_{t,i}|`,

    .. math::

        Z_t = \\frac{1}{|S|}\\sum_{i \\in S} \\Delta_{t,i}\\quad\\text{(mean)},\\qquad
        Z_t = \\exp\\Big(\\frac{1}{|S|}\\sum_{i \\in S} \\log\\max(\\Delta_{t,i}, 10^{-30})\\Big)
        \\quad\\text{(geometric)}

    over all elements of all sparsifiable leaves of this one step (``stride = 1``), or over the rows
    ``offset, offset + k, ...`` of each leaf (``stride = k``; :func:`z_rows`): then ``S`` is that
    systematic sample of the elements and the mean is taken over it. The geometric mean floors each element
    at ``1e-30`` so that an exactly unchanged entry (``Delta = 0``, e.g. a zero gradient while ``v = 0``)
    contributes ``log 1e-30`` instead of ``-inf``. ``Delta`` is written with the *new* moment
    (``v_{t-1} = (v_t - (1-b2) g_t^2) / b2``) so that the old one is read only by its own update, which XLA
    can do in place. ``b2 = 0`` keeps no memory (``v_t = g_t^2``): then ``nus`` are the old moments and
    ``Delta = |g_t^2 - v_{t-1}|``.

    Args:
      grads: list of the sparsifiable leaves' raw gradients ``g_t``.
      nus: their ``v_t`` (``v_{t-1}`` when ``b2 = 0``).
      b2: Adam's second-moment decay.
      geometric: the element-wise geometric mean instead of the arithmetic one.
      stride: measure on every ``stride``-th row of each leaf (:func:`z_rows`; 1: all elements).
      offset: the first sampled row (``0 <= offset < stride``; may be traced).

    Returns:
      ``Z_t`` (float32 scalar; the sums are accumulated in float32).

    Example:
      >>> from jaxlab.transforms.step import z_statistic
      >>> g, v_new = [jnp.array([1.0, 2.0])], [jnp.array([0.5, 0.5])]   # b2 = 0.5: Delta = |g^2 - v_t|
      >>> float(z_statistic(g, v_new, 0.5)), round(float(z_statistic(g, v_new, 0.5, geometric=True)), 4)
      (2.0, 1.3229)
    """
    scale = 1.0 if _is_zero(b2) else (1 - b2) / b2
    sums, count = [], 0
    for g, nu in zip(grads, nus):
        (g_r, valid), (nu_r, _) = z_rows(g, stride, offset), z_rows(nu, stride, offset)
        delta = scale * jnp.abs(g_r * g_r - nu_r).astype(jnp.float32)
        term = jnp.log(jnp.maximum(delta, _TINY)) if geometric else delta
        if valid is None:
            sums.append(jnp.sum(term))
            count = count + float(term.size)  # float: > 2**31 elements at 8B
        else:
            sums.append(jnp.sum(jnp.where(valid[:, None], term, 0.0)))
            count = count + jnp.sum(valid).astype(jnp.float32) * float(term.shape[1])
    mean = sum(sums) / count
    return jnp.exp(mean) if geometric else mean


def autoswitch(state: StepState, z, t, *, window: int, switch_eps, t_min, t_max, record=True) -> StepState:
    """One AutoSwitch step: record ``Z_t`` in the ring buffer, average it, apply the one-way switch rule.

    .. math::

        B_{p} \\leftarrow Z_t,\\qquad
        \\bar Z_t = \\frac{1}{\\min(k_t, T_w)}\\sum_{j} B_j,

    .. math:: \\text{switch} \\iff \\text{phase 1} \\wedge \\big((\\bar Z_t < \\epsilon_{switch} \\wedge t > t_{min})
        \\vee t > t_{max}\\big),\\qquad T_0 = t

    with ``p`` the buffer position (advancing modulo ``T_w``) and ``k_t`` the number of samples so far.
    In phase 2 it is a no-op: every field keeps its value. With ``record`` false (a step that
    :func:`scale_by_step`'s ``z_every`` does not sample) the buffer and ``Zbar`` keep their values and
    only the switch rule is applied (so ``t > t_max`` still switches).

    Args:
      state: the state before this step (its ``phase``, ``switch_step`` and ``z_*`` fields are read).
      z: ``Z_t`` (:func:`z_statistic`; ignored in phase 2).
      t: the 1-based step number.
      window, switch_eps, t_min, t_max: as in :func:`scale_by_step` (``window`` here is the buffer length).
      record: traced or Python bool, whether ``z`` is a sample to record.

    Returns:
      ``state`` with ``phase``, ``switch_step``, ``z_buffer``, ``z_fill``, ``z_pos``, ``z``, ``zbar`` updated.
    """
    in_p2 = state.phase == 1
    buf = state.z_buffer.at[state.z_pos].set(z)
    fill = jnp.minimum(state.z_fill + 1, window)
    pos = (state.z_pos + 1) % window
    frozen = in_p2 | jnp.logical_not(record)
    zbar = jnp.where(frozen, state.zbar, jnp.sum(buf) / fill)
    switch = jnp.logical_not(in_p2) & (((zbar < switch_eps) & (t > t_min)) | (t > t_max))
    keep = lambda old, new: jnp.where(frozen, old, new)
    return state._replace(
        phase=jnp.where(switch, 1, state.phase).astype(jnp.int32),
        switch_step=jnp.where(switch, t, state.switch_step).astype(jnp.int32),
        z_buffer=keep(state.z_buffer, buf),
        z_fill=keep(state.z_fill, fill).astype(jnp.int32),
        z_pos=keep(state.z_pos, pos).astype(jnp.int32),
        z=keep(state.z, z).astype(jnp.float32),
        zbar=keep(state.zbar, zbar).astype(jnp.float32),
    )


def _is_zero(b2) -> bool:
    """``b2`` is a static 0 (no memory: ``v_t = g_t^2``)."""
    return not isinstance(b2, jax.core.Tracer) and float(b2) == 0.0


def scale_by_step(
    *,
    n: int = 2,
    m: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    switch_eps: float | None = None,
    t_min: int,
    t_max: int,
    window: int | None = None,
    statistic: str = "mean",
    z_every: int = 1,
    z_stride: int = 1,
    sr_ste_lambda: float = 2e-4,
    eps_frozen: float | None = None,
    bias_correct_frozen_v: bool = True,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """STEP's update direction (no learning rate, no weight decay): Adam, AutoSwitch, frozen ``v``.

    .. math::

        d_t = \\begin{cases}
          \\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon) & \\text{phase 1 (all leaves), phase 2 (dense leaves)}\\\\
          \\hat m_t / (\\sqrt{v_{T_0}} + \\epsilon_{frozen}) & \\text{phase 2, sparsifiable leaves}
        \\end{cases}

    Args:
      n, m: the N:M ratio (``m`` in :data:`jaxlab.nm.SUPPORTED_M`, so that the result can be compressed).
      b1, b2, eps: Adam's decays and epsilon.
      switch_eps: AutoSwitch threshold on ``Zbar`` (default ``None``: Adam's ``eps``, the reference
        mapping). ``Z`` scales with ``g^2``, so a value read off a run's ``Zbar`` trace is an option; check
        that the switch then fires by the test and not at ``t_min`` (see the module docstring).
      t_min, t_max: the switch never happens at ``t <= t_min`` and always happens by ``t = t_max + 1``.
      window: ring-buffer length ``T_w`` (default ``round(1 / (1 - b2))``).
      statistic: how one step's ``Z_t`` aggregates the per-element ``|v_t - v_{t-1}|`` over the
        sparsifiable leaves: ``"mean"`` (arithmetic mean) or ``"geometric"`` (``exp`` of the mean of
        ``log max(|v_t - v_{t-1}|, 1e-30)``; :func:`z_statistic`). Either way ``Zbar`` is the arithmetic
        mean of the last ``window`` values of ``Z_t``.
      z_every: measure ``Z_t`` only at steps ``t`` divisible by ``z_every`` (default 1: every step, the
        reference). ``Zbar`` is then the mean of the ``ceil(window / z_every)`` samples covering the same
        last ``window`` steps: a systematic sample in time of the same average, whose reduction (a full
        extra pass over the gradients and ``v`` of the N:M leaves: most of phase 1's cost over AdamW on
        CPU, see ``benchmarks/README.md``) runs on one step in ``z_every``. The switch rule is still
        checked every step.
      z_stride: measure ``Z_t`` on every ``k``-th row of each sparsifiable leaf (``k = z_stride``;
        :func:`z_rows`; default 1: every element, the reference), starting at row ``s mod k`` for the
        ``s``-th sample, so that ``k`` consecutive samples visit every row once. A systematic sample in
        space of the same per-element mean, taken at every sampled step, whose reduction reads ``1/k`` of
        the leaves; ``Zbar`` (a mean over ``window`` steps) then averages every row.
      sr_ste_lambda: SR-STE coefficient added in phase 2 (``0`` disables it).
      eps_frozen: epsilon of the frozen denominator (default ``eps ** 0.75``).
      bias_correct_frozen_v: divide ``v_{T_0}`` by ``1 - b2^{T_0}`` (default on; ``False`` is the
        reference reading, which over-steps by ``1/sqrt(1 - b2^{T_0})`` after an early switch).
      sparsify: leaf filter (``None``: floating ``kernel`` leaves whose reduction axis divides by
        ``m``; callable ``(path, leaf) -> bool``; or pytree of bools).
      nm_axis: grouping axis (``None``: :func:`jaxlab.nm.reduction_axis`; int; or callable).

    Returns:
      ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params)`` needs params.

    Raises:
      ValueError: ``n > m``, ``m`` not in :data:`jaxlab.nm.SUPPORTED_M`, ``t_min > t_max``, unknown
        ``statistic``, bad ``window``/``switch_eps``, or a selected leaf that cannot be grouped by ``m``
        (named by path, with its shape).
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)
    if window is None:
        window = int(round(1.0 / (1.0 - static_float(b2, "b2"))))
    window = static_int(window, "window")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    z_every = static_int(z_every, "z_every")
    if z_every < 1:
        raise ValueError(f"z_every must be >= 1, got {z_every}")
    samples = -(-window // z_every)  # ring-buffer length: the samples in one window
    z_stride = static_int(z_stride, "z_stride")
    if z_stride < 1:
        raise ValueError(f"z_stride must be >= 1, got {z_stride}")
    if statistic not in ("mean", "geometric"):
        raise ValueError(f"statistic must be 'mean' or 'geometric', got {statistic!r}")
    if not isinstance(t_min, jax.core.Tracer) and not isinstance(t_max, jax.core.Tracer):
        if int(t_min) < 0 or int(t_max) < 0:
            raise ValueError(f"t_min and t_max must be >= 0, got t_min={t_min}, t_max={t_max}")
        if int(t_min) > int(t_max):
            raise ValueError(f"t_min={t_min} must be <= t_max={t_max}")
    if switch_eps is None:
        switch_eps = eps
    if isinstance(switch_eps, str):  # float("3e-8") would pass the check below and fail inside jit
        raise TypeError(f"switch_eps must be a number, got the string {switch_eps!r}")
    if not isinstance(switch_eps, jax.core.Tracer) and not float(switch_eps) >= 0.0:
        raise ValueError(f"switch_eps must be a non-negative number, got {switch_eps}")
    if eps_frozen is None:
        eps_frozen = eps**0.75
    geometric = statistic == "geometric"
    use_sr = uses_sr_ste(sr_ste_lambda)
    b2_zero = _is_zero(b2)

    def init_fn(params):
        cfg.axes(params, require_any=True)  # validate the selection now (leaf paths in errors)
        return StepState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
            phase=jnp.zeros([], jnp.int32),
            switch_step=jnp.full([], -1, jnp.int32),
            z_buffer=jnp.zeros([samples], jnp.float32),
            z_fill=jnp.zeros([], jnp.int32),
            z_pos=jnp.zeros([], jnp.int32),
            z=jnp.zeros([], jnp.float32),
            zbar=jnp.full([], jnp.inf, jnp.float32),
            config=cfg,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        axes = check_update(updates, params, cfg, "scale_by_step")
        treedef = jax.tree_util.tree_structure(params)
        axes, gs, ws = (treedef.flatten_up_to(x) for x in (axes, updates, params))
        t = optax.safe_increment(state.count)
        in_p2 = state.phase == 1
        sparse = [i for i, a in enumerate(axes) if a is not None]

        # moments: m of the (phase-2 SR-STE refined) gradient; v of the raw gradient, frozen at v_T0 on the
        # sparsifiable leaves in phase 2 (the SR-STE term only enters in phase 2)
        g_ref = sr_ste_phase2(gs, ws, axes, in_p2, n=cfg.n, m=cfg.m, sr_ste_lambda=sr_ste_lambda) if use_sr else gs
        mus = treedef.flatten_up_to(optax.tree.update_moment(jax.tree_util.tree_unflatten(treedef, g_ref),
                                                             state.mu, b1, 1))
        nus_old = treedef.flatten_up_to(state.nu)
        nus = treedef.flatten_up_to(optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2))
        for i in sparse:
            nus[i] = jnp.where(in_p2, nus_old[i], nus[i])

        # directions: each dense leaf AdamW with a live v in both phases; the sparsifiable leaves as one group
        # that switches to the frozen v together
        kw = dict(b1=b1, b2=b2, eps=eps, eps_frozen=eps_frozen, bias_correct_frozen_v=bias_correct_frozen_v)
        dirs = [None] * len(axes)
        for group, frozen in [([i], False) for i, a in enumerate(axes) if a is None] + [(sparse, in_p2)]:
            ds = frozen_v_direction([mus[i] for i in group], [nus[i] for i in group], t, frozen, state.switch_step, **kw)
            for i, d in zip(group, ds):
                dirs[i] = d

        # AutoSwitch: Z_t only on sampled phase-1 steps (lax.cond), then the ring buffer and the switch rule
        record = (t % z_every == 0) if z_every > 1 else True
        z = jax.lax.cond(in_p2 | jnp.logical_not(record), lambda *_: jnp.zeros([], jnp.float32),
                         lambda g_s, nu_s: z_statistic(g_s, nu_s, b2, geometric=geometric, stride=z_stride,
                                                       offset=(t // z_every) % z_stride),
                         [gs[i] for i in sparse], [(nus_old if b2_zero else nus)[i] for i in sparse])
        new_state = autoswitch(state, z, t, window=samples, switch_eps=switch_eps, t_min=t_min, t_max=t_max,
                               record=record)
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)
        new_state = new_state._replace(count=t, mu=unflat(mus), nu=unflat(nus))
        return unflat([d.astype(g.dtype) for d, g in zip(dirs, gs)]), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def step_adamw(
    learning_rate,
    *,
    n: int = 2,
    m: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    switch_eps: float | None = None,
    t_min: int,
    t_max: int,
    window: int | None = None,
    statistic: str = "mean",
    z_every: int = 1,
    z_stride: int = 1,
    sr_ste_lambda: float = 2e-4,
    eps_frozen: float | None = None,
    bias_correct_frozen_v: bool = True,
    sparsify=None,
    nm_axis=None,
) -> optax.GradientTransformationExtraArgs:
    """STEP optimizer: ``chain(scale_by_step, add_decayed_weights, scale_by_learning_rate)``.

    .. math:: w \\leftarrow w - \\eta_t\\,(d_t + \\lambda_{wd}\\, w)

    with :func:`scale_by_step`'s direction ``d_t`` (AdamW in phase 1; frozen-``v`` Adam on the
    sparsifiable leaves in phase 2). Train with the forward params from
    :func:`jaxlab.transforms.sparse_forward_params` and deploy :func:`jaxlab.transforms.prune`'s output.

    Args:
      learning_rate: float or optax schedule.
      weight_decay: decoupled weight decay (all leaves, as ``optax.adamw`` with ``mask=None``).
      Others: see :func:`scale_by_step` (``t_min`` and ``t_max`` are required).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> from jaxlab.transforms import sparse_forward_params, step_adamw, step_phase, step_switch_step
      >>> params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (8, 4)), "bias": jnp.zeros(4)}
      >>> loss = lambda p: jnp.sum(jnp.sin(p["kernel"]) + p["bias"] ** 2)
      >>> tx = step_adamw(1e-3, n=2, m=4, switch_eps=1e-9, t_min=2, t_max=3)
      >>> state = tx.init(params)
      >>> update = jax.jit(tx.update)
      >>> for _ in range(5):
      ...     grads = jax.grad(lambda p: loss(sparse_forward_params(p, state)))(params)
      ...     updates, state = update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> int(step_phase(state)), int(step_switch_step(state))  # switched at t = t_max + 1
      (1, 4)

    Reference: Lu et al., "STEP", ICML 2023 (arXiv 2302.01172); see the module docstring.
    """
    return with_lr_and_decay(
        scale_by_step(
            n=n, m=m, b1=b1, b2=b2, eps=eps, switch_eps=switch_eps, t_min=t_min, t_max=t_max,
            window=window, statistic=statistic, z_every=z_every, z_stride=z_stride, sr_ste_lambda=sr_ste_lambda, eps_frozen=eps_frozen,
            bias_correct_frozen_v=bias_correct_frozen_v, sparsify=sparsify, nm_axis=nm_axis,
        ),
        learning_rate,
        weight_decay,
    )


def _step_state(opt_state) -> StepState:
    states = find_states(opt_state, StepState)
    if len(states) != 1:
        raise ValueError(f"expected exactly one STEP state in opt_state, found {len(states)}")
    return states[0]


def step_phase(opt_state) -> jax.Array:
    """STEP's phase (int32): 0 = precondition (dense AdamW), 1 = mask learning (frozen ``v``)."""
    return _step_state(opt_state).phase


def step_switch_step(opt_state) -> jax.Array:
    """The AutoSwitch step ``T_0`` (int32; -1 while still in phase 1)."""
    return _step_state(opt_state).switch_step


def step_statistics(opt_state) -> dict[str, jax.Array]:
    """``{"phase", "switch_step", "z", "zbar"}`` of STEP's state, for logging (``z``: last ``Z_t``)."""
    s = _step_state(opt_state)
    return {"phase": s.phase, "switch_step": s.switch_step, "z": s.z, "zbar": s.zbar}


def _forward(params, state: StepState):
    return jax.lax.cond(state.phase == 1, lambda p: ste_forward(p, state.config), lambda p: p, params)


register_nm_state(StepState, _forward, lambda params, state: magnitude_prune(params, state.config))
