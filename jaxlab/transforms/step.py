"""STEP: Adam-aware N:M sparsity -- dense precondition phase, AutoSwitch, frozen-variance mask learning.

Phase 1 (precondition, dense forward) is AdamW. While in phase 1, each step measures how much the
second moment of the sparsifiable leaves still moves,

.. math::

    Z_t = \\frac{1}{|S|}\\sum_{i \\in S} |v_{t,i} - v_{t-1,i}|
        = \\frac{1-\\beta_2}{|S|}\\sum_{i\\in S} |g_{t,i}^2 - v_{t-1,i}|,

keeps the last ``T_w = round(1/(1-b2))`` values in a ring buffer and switches (one-way, globally) when

.. math:: (\\bar Z_t < \\epsilon_{switch} \\wedge t > t_{min}) \\vee t > t_{max},

where :math:`\\bar Z_t` is the mean (or geometric mean) of the buffer's filled entries. Step ``T_0``
(the switching step) is still a phase-1 step. Phase 2 (mask learning) uses the straight-through forward
``w * mask(w)`` (:func:`jaxlab.transforms.sparse_forward_params`), adds the SR-STE term
``lam (1 - mask) * w`` to the gradient, keeps updating the first moment with the global bias correction
and divides by the **frozen** second moment ``v_{T_0}`` of the sparsifiable leaves:

.. math:: w \\leftarrow w - \\eta\\Big(\\frac{m_t/(1-\\beta_1^t)}{\\sqrt{v_{T_0}} + \\epsilon^{3/4}} + \\lambda_{wd} w\\Big).

Non-sparsifiable leaves (biases, norms, embeddings) run ordinary AdamW with a live ``v`` throughout.
The phase is an ``int32`` in the state and acts through ``lax.cond``, so one compiled step runs on both
sides of the switch (under ``jit``, ``pmap`` and sharded ``jit`` alike).

Reference: Lu, Agrawal, Subramanian, Rybakov, De Sa, Yazdanbakhsh, "STEP: Learning N:M Structured
Sparsity Masks from Scratch with Precondition", ICML 2023 (arXiv 2302.01172), Alg. 1 and Sec. 4
(AutoSwitch); SR-STE term from Zhou et al., ICLR 2021, Eq. 4.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxlab.nm.masks import nm_pruned_bits, unpack_pruned
from jaxlab.transforms._nm_common import (
    NMConfig,
    adam_direction,
    adam_moments,
    check_grads,
    check_params,
    magnitude_prune,
    register_nm_state,
    safe_increment,
    static_float,
    static_int,
    ste_forward,
)
from jaxlab.transforms._tree import find_states

__all__ = [
    "StepState",
    "scale_by_step",
    "step_adamw",
    "step_phase",
    "step_statistics",
    "step_switch_step",
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
      z_buffer: float32 ring buffer of the last ``window`` statistics (``Z_t``, or ``log Z_t`` for
        the geometric statistic).
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


def scale_by_step(
    *,
    n: int = 2,
    m: int = 4,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    switch_eps: float,
    t_min: int,
    t_max: int,
    window: int | None = None,
    statistic: str = "mean",
    sr_ste_lambda: float = 2e-4,
    eps_frozen: float | None = None,
    bias_correct_frozen_v: bool = False,
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
      n, m: the N:M ratio.
      b1, b2, eps: Adam's decays and epsilon.
      switch_eps: AutoSwitch threshold on ``Zbar`` (its own scale: ``Z`` scales with ``g^2``).
      t_min, t_max: the switch never happens at ``t <= t_min`` and always happens by ``t = t_max + 1``.
      window: ring-buffer length ``T_w`` (default ``round(1 / (1 - b2))``).
      statistic: ``"mean"`` (arithmetic mean of the buffer) or ``"geometric"`` (``exp`` of the mean
        of ``log max(Z, 1e-30)``).
      sr_ste_lambda: SR-STE coefficient added in phase 2 (``0`` disables it).
      eps_frozen: epsilon of the frozen denominator (default ``eps ** 0.75``).
      bias_correct_frozen_v: divide ``v_{T_0}`` by ``1 - b2^{T_0}`` (default off, as in the paper).
      sparsify: leaf filter (``None``: floating ``kernel`` leaves whose reduction axis divides by
        ``m``; callable ``(path, leaf) -> bool``; or pytree of bools).
      nm_axis: grouping axis (``None``: :func:`jaxlab.nm.reduction_axis`; int; or callable).

    Returns:
      ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state, params)`` needs params.

    Raises:
      ValueError: ``n > m``, ``t_min > t_max``, unknown ``statistic``, bad ``window``/``switch_eps``,
        or a selected leaf that cannot be grouped by ``m`` (named by path, with its shape).
    """
    cfg = NMConfig.make(n, m, sparsify, nm_axis)
    if window is None:
        window = int(round(1.0 / (1.0 - static_float(b2, "b2"))))
    window = static_int(window, "window")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if statistic not in ("mean", "geometric"):
        raise ValueError(f"statistic must be 'mean' or 'geometric', got {statistic!r}")
    if not isinstance(t_min, jax.core.Tracer) and not isinstance(t_max, jax.core.Tracer):
        if int(t_min) < 0 or int(t_max) < 0:
            raise ValueError(f"t_min and t_max must be >= 0, got t_min={t_min}, t_max={t_max}")
        if int(t_min) > int(t_max):
            raise ValueError(f"t_min={t_min} must be <= t_max={t_max}")
    if not isinstance(switch_eps, jax.core.Tracer) and not float(switch_eps) >= 0.0:
        raise ValueError(f"switch_eps must be a non-negative number, got {switch_eps}")
    if eps_frozen is None:
        eps_frozen = eps**0.75
    geometric = statistic == "geometric"
    # a traced lambda (inject_hyperparams) keeps the term; a static 0 skips the mask entirely
    use_sr = isinstance(sr_ste_lambda, jax.core.Tracer) or bool(sr_ste_lambda != 0)
    b2_zero = not isinstance(b2, jax.core.Tracer) and float(b2) == 0.0

    def init_fn(params):
        cfg.axes(params, require_any=True)  # validate the selection now (leaf paths in errors)
        return StepState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
            phase=jnp.zeros([], jnp.int32),
            switch_step=jnp.full([], -1, jnp.int32),
            z_buffer=jnp.zeros([window], jnp.float32),
            z_fill=jnp.zeros([], jnp.int32),
            z_pos=jnp.zeros([], jnp.int32),
            z=jnp.zeros([], jnp.float32),
            zbar=jnp.full([], jnp.inf, jnp.float32),
            config=cfg,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(params, "scale_by_step")
        check_grads(updates, params, "scale_by_step")
        treedef = jax.tree_util.tree_structure(params)
        axes = treedef.flatten_up_to(cfg.axes(params, require_any=True))
        gs, ws = treedef.flatten_up_to(updates), treedef.flatten_up_to(params)
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        t = safe_increment(state.count)
        in_p2 = state.phase == 1

        new_mu, new_nu, dirs = list(mus), list(nus), [None] * len(gs)
        sparse = [i for i, a in enumerate(axes) if a is not None]
        for i, a in enumerate(axes):  # dense leaves: AdamW with a live v in both phases
            if a is None:
                new_mu[i], new_nu[i] = adam_moments(gs[i], mus[i], nus[i], b1, b2)
                dirs[i] = adam_direction(new_mu[i], new_nu[i], t, b1, b2, eps)

        # Sparsifiable leaves. Only the N:M mask (for the SR-STE term) is phase-specific *work*, so only it
        # sits under lax.cond, packed one integer per group (1/m of a boolean mask's bytes; phase 1 returns
        # zeros: nothing pruned, nothing ranked). The rest is elementwise and selects between the phases
        # with jnp.where, so XLA fuses moments and direction per leaf as it does for optax.adamw.
        if use_sr:
            def bits_p2(w_s):
                return [nm_pruned_bits(w, cfg.n, cfg.m, axes[i]) for w, i in zip(w_s, sparse)]

            def bits_p1(w_s):
                return [jnp.zeros(b.shape, b.dtype) for b in jax.eval_shape(bits_p2, w_s)]

            bits = jax.lax.cond(in_p2, bits_p2, bits_p1, [ws[i] for i in sparse])
        c1 = 1 - b1**t
        # the second-moment estimate in the denominator is nu' / c2: live nu_t / (1 - b2^t) in phase 1,
        # the frozen v_T0 (optionally / (1 - b2^T0)) in phase 2; written through nu' so the update reads
        # the new moment (no second live copy of the old one)
        c2 = jnp.where(in_p2, 1 - b2 ** jnp.maximum(state.switch_step, 1) if bias_correct_frozen_v else 1.0,
                       1 - b2**t)
        eps_t = jnp.where(in_p2, eps_frozen, eps)

        for j, i in enumerate(sparse):
            g, w, mu, nu = gs[i], ws[i], mus[i], nus[i]
            if use_sr:
                pruned = unpack_pruned(bits[j], cfg.m, axes[i], w.shape)
                g = g + jnp.where(pruned, sr_ste_lambda * w, jnp.zeros((), w.dtype)).astype(g.dtype)
            new_mu[i] = (1 - b1) * g + b1 * mu
            # phase 1: the moment of the raw gradient (the SR-STE term only enters in phase 2)
            new_nu[i] = jnp.where(in_p2, nu, (1 - b2) * (gs[i] * gs[i]) + b2 * nu)
            denom = jnp.sqrt(new_nu[i] / c2.astype(nu.dtype)) + eps_t.astype(nu.dtype)
            dirs[i] = (new_mu[i] / c1.astype(mu.dtype)) / denom

        def z_sum(g_nu):
            # Z_t = mean |v_t - v_{t-1}| = (1 - b2) mean |g^2 - v_{t-1}|, written with the *new* moment
            # (v_{t-1} = (v_t - (1 - b2) g^2) / b2, so |v_t - v_{t-1}| = (1 - b2) / b2 |g^2 - v_t|): the old
            # moment is then read only by its own update, which XLA can do in place.
            # (b2 = 0 keeps no memory: v_t = g^2, and the old moment is needed after all)
            if b2_zero:
                return sum(jnp.sum(jnp.abs(g * g - nu).astype(jnp.float32)) for g, nu in zip(*g_nu))
            return sum(((1 - b2) / b2) * jnp.sum(jnp.abs(g * g - nu2).astype(jnp.float32)) for g, nu2 in zip(*g_nu))

        zsum = jax.lax.cond(in_p2, lambda _: jnp.zeros([], jnp.float32), z_sum,  # phase 2: not needed
                            ([gs[i] for i in sparse], [(nus if b2_zero else new_nu)[i] for i in sparse]))

        # AutoSwitch bookkeeping (a no-op in phase 2: every field keeps its value)
        size = sum(ws[i].size for i in sparse)
        z = zsum / size
        sample = jnp.log(jnp.maximum(z, _TINY)) if geometric else z
        buf = state.z_buffer.at[state.z_pos].set(sample)
        fill = jnp.minimum(state.z_fill + 1, window)
        pos = (state.z_pos + 1) % window
        stat = jnp.sum(buf) / fill
        zbar = jnp.exp(stat) if geometric else stat
        switch = jnp.logical_not(in_p2) & (((zbar < switch_eps) & (t > t_min)) | (t > t_max))
        keep = lambda old, new: jnp.where(in_p2, old, new)
        new_state = StepState(
            count=t,
            mu=jax.tree_util.tree_unflatten(treedef, new_mu),
            nu=jax.tree_util.tree_unflatten(treedef, new_nu),
            phase=jnp.where(switch, 1, state.phase).astype(jnp.int32),
            switch_step=jnp.where(switch, t, state.switch_step).astype(jnp.int32),
            z_buffer=keep(state.z_buffer, buf),
            z_fill=keep(state.z_fill, fill).astype(jnp.int32),
            z_pos=keep(state.z_pos, pos).astype(jnp.int32),
            z=keep(state.z, z).astype(jnp.float32),
            zbar=keep(state.zbar, zbar).astype(jnp.float32),
            config=cfg,
        )
        out = [d.astype(g.dtype) for d, g in zip(dirs, gs)]
        return jax.tree_util.tree_unflatten(treedef, out), new_state

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
    switch_eps: float,
    t_min: int,
    t_max: int,
    window: int | None = None,
    statistic: str = "mean",
    sr_ste_lambda: float = 2e-4,
    eps_frozen: float | None = None,
    bias_correct_frozen_v: bool = False,
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
      Others: see :func:`scale_by_step` (``switch_eps``, ``t_min``, ``t_max`` are required).

    Returns:
      ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Example:
      >>> tx = step_adamw(1e-3, n=2, m=4, switch_eps=1e-9, t_min=100, t_max=2000)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: loss(sparse_forward_params(p, state)))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> step_phase(state), step_switch_step(state)

    Reference: Lu et al., "STEP", ICML 2023 (arXiv 2302.01172), Alg. 1.
    """
    return optax.chain(
        scale_by_step(
            n=n, m=m, b1=b1, b2=b2, eps=eps, switch_eps=switch_eps, t_min=t_min, t_max=t_max,
            window=window, statistic=statistic, sr_ste_lambda=sr_ste_lambda, eps_frozen=eps_frozen,
            bias_correct_frozen_v=bias_correct_frozen_v, sparsify=sparsify, nm_axis=nm_axis,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
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
