"""MeanFlow and its variance-reduced family (the JVP tangent's conditional-velocity weight).

Path ``z_t = (1 - t) x + t e`` (``t = 0`` data, ``t = 1`` noise), conditional velocity ``v_c = e - x``,
average velocity ``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds``. The MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = (dz/dt) . d_z u + d_t u

turns into a regression target by one ``jax.jvp`` of ``u_theta`` at ``(z, r, t)`` with tangent
``(w, 0, 1)``. Original MeanFlow uses ``w = v_c``. The variance-reduced family (specs/meanflow.md sec. 3)
separates the two roles of ``v_c``:

    w     = lam * v_c + (1 - lam) * vhat                (lam = ``jvp_cond_weight``)
    T_lam = sg( v_c - (t - r) (J w + d_t u_theta) ),    J = d_z u_theta

``lam = 1`` is original MeanFlow (the unbiased corner); ``lam = 0`` with ``vhat = u_theta(z, t, t)`` is
the improved-MeanFlow (iMF) tangent. With ``h = t - r``, ``A = h J``, ``eps = v_c - v`` and
``delta = vhat - v`` the target error against the ideal ``T* = v - h (J v + d_t u)`` is
``(I - lam A) eps - (1 - lam) A delta``.

References:
  Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447 (eqs. 6-11, Alg. 1).
  Lu & Wang, "On Variance Reduction in Learning Mean Flows", arXiv 2605.09235.
  Geng et al., "Improved Mean Flows", arXiv 2512.02012.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxlab.losses.time_sampling import logit_normal_time_pairs, num_flow_matching_rows

__all__ = [
    "MeanFlowConfig",
    "meanflow_loss",
    "meanflow_target",
    "meanflow_init_state",
    "make_meanflow_loss_fn",
    "meanflow_sample",
]

_sg = jax.lax.stop_gradient


def _is_concrete_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    return isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer) and v.ndim == 0


@dataclasses.dataclass(frozen=True, eq=False)
class MeanFlowConfig:
    """Everything :func:`meanflow_loss` needs besides the model and data (validated on construction).

    Attributes:
      jvp_cond_weight: ``lam``, the weight of the conditional velocity ``v_c`` in the JVP tangent,
        ``w = lam v_c + (1 - lam) vhat``. ``1.0`` = original MeanFlow (unbiased corner), ``0.0`` =
        improved-MeanFlow tangent; a float (or 0-d array, e.g. a traced value in a vmapped sweep) in
        ``[0, 1]``; ``"auto"`` = the pooled online estimate of the optimal coefficient (kept in the loss
        state, see :func:`meanflow_loss`); or a schedule ``step -> lam`` (the step is counted in the
        loss state).
      time_mu, time_sigma: logit-normal time sampler parameters.
      flow_matching_fraction: fraction of rows with ``r = t`` (static leading prefix), in ``[0, 1]``.
      adaptive_p, adaptive_c: adaptive weight ``loss_i = d_i / sg((d_i + c)^p)``; ``p = 0`` is plain
        squared error. Paper defaults: ``p = 1, c = 1e-2`` (latents), ``p = 0.75, c = 1e-3`` (pixels).
      reduction: ``"sum"`` (MeanFlow: ``d_i`` sums over dims) or ``"mean"``; it changes the effective ``c``.
      vhat: source of the stop-gradient marginal-velocity estimate in the tangent: ``"boundary"``
        (``u_theta(z, t, t)`` of the same params), ``"ema"`` (``u(z, t, t)`` of an EMA of the params kept
        in the loss state) or a callable ``(z, t) -> v`` (e.g. :meth:`GMMOracle.marginal_velocity`).
      vhat_ema_decay: decay of the ``"ema"`` vhat params.
      auto_ema_decay: decay of the pooled numerator/denominator EMA of the ``"auto"`` estimator.
      auto_init: coefficient used by ``"auto"`` before any statistics exist.
      diagnostics: compute the second tangent (and ``target_var``/``lam_hat``) for fixed coefficients too.
      cfg_omega: classifier-free guidance scale ``omega``; ``None`` turns CFG off.
      cfg_kappa: the ``kappa`` mixing weight of the conditional model velocity (MeanFlow eq. 19).
      cfg_interval: guidance is applied only for ``t`` in this closed interval.
      label_dropout: probability of replacing a label by the null class (CFG only).
      num_classes: number of classes; the null class is index ``num_classes``. Required with CFG.

    Example:
      >>> cfg = MeanFlowConfig(jvp_cond_weight=0.9, flow_matching_fraction=0.5, adaptive_p=1.0)
    """

    jvp_cond_weight: Any = 1.0
    time_mu: float = -0.4
    time_sigma: float = 1.0
    flow_matching_fraction: float = 0.75
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    reduction: str = "sum"
    vhat: Any = "boundary"
    vhat_ema_decay: float = 0.999
    auto_ema_decay: float = 0.99
    auto_init: float = 1.0
    diagnostics: bool = False
    cfg_omega: float | None = None
    cfg_kappa: float = 0.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    label_dropout: float = 0.1
    num_classes: int | None = None

    def __post_init__(self):
        def bad(field, got, expected):
            raise ValueError(f"MeanFlowConfig.{field}: expected {expected}, got {got!r}")

        lam = self.jvp_cond_weight
        if isinstance(lam, str):
            if lam != "auto":
                bad("jvp_cond_weight", lam, 'a number in [0, 1], "auto" or a callable step -> coefficient')
        elif callable(lam):
            pass
        elif _is_concrete_number(lam):
            if not 0.0 <= float(lam) <= 1.0:
                bad("jvp_cond_weight", float(lam), "a number in [0, 1] (1.0 = original MeanFlow, 0.0 = iMF tangent)")
        elif not (isinstance(lam, jax.Array) and jnp.ndim(lam) == 0):
            raise TypeError(
                "MeanFlowConfig.jvp_cond_weight: expected a float in [0, 1], a 0-d array, \"auto\" or a "
                f"callable, got {type(lam).__name__}"
            )
        if not 0.0 <= self.flow_matching_fraction <= 1.0:
            bad("flow_matching_fraction", self.flow_matching_fraction, "a fraction in [0, 1]")
        if self.time_sigma < 0:
            bad("time_sigma", self.time_sigma, ">= 0")
        if self.adaptive_p < 0:
            bad("adaptive_p", self.adaptive_p, ">= 0")
        if self.adaptive_c <= 0 and self.adaptive_p > 0:
            bad("adaptive_c", self.adaptive_c, "> 0 when adaptive_p > 0")
        if self.reduction not in ("sum", "mean"):
            bad("reduction", self.reduction, '"sum" or "mean"')
        if not (self.vhat in ("boundary", "ema") or callable(self.vhat)):
            bad("vhat", self.vhat, '"boundary", "ema" or a callable (z, t) -> v')
        for f in ("vhat_ema_decay", "auto_ema_decay"):
            if not 0.0 <= getattr(self, f) < 1.0:
                bad(f, getattr(self, f), "a decay in [0, 1)")
        if not 0.0 <= self.auto_init <= 1.0:
            bad("auto_init", self.auto_init, "a number in [0, 1]")
        if not 0.0 <= self.label_dropout <= 1.0:
            bad("label_dropout", self.label_dropout, "a probability in [0, 1]")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            bad("cfg_interval", self.cfg_interval, "(lo, hi) with 0 <= lo <= hi <= 1")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            bad("num_classes", self.num_classes, "a positive int (the null class is index num_classes)")
        if self.cfg_omega is not None:
            if self.num_classes is None:
                raise ValueError(
                    "MeanFlowConfig.num_classes: classifier-free guidance is on (cfg_omega="
                    f"{self.cfg_omega!r}) so labels are required: set num_classes (null class = num_classes) "
                    "and pass y to meanflow_loss"
                )
            if self.cfg_omega < 0:
                bad("cfg_omega", self.cfg_omega, ">= 0")

    @property
    def cfg_on(self) -> bool:
        return self.cfg_omega is not None

    @property
    def auto(self) -> bool:
        return isinstance(self.jvp_cond_weight, str) and self.jvp_cond_weight == "auto"

    @property
    def two_tangents(self) -> bool:
        """Whether the loss pushes the extra tangent ``(v_c - vhat, 0, 0)`` (``"auto"`` or diagnostics)."""
        return self.auto or self.diagnostics


def meanflow_init_state(config: MeanFlowConfig, params=None) -> dict:
    """The initial loss state: ``{"step", "auto_num", "auto_den"}`` (+ ``"vhat_params"`` for ``vhat="ema"``).

    ``auto_num``/``auto_den`` are EMAs of the batch means of ``w_i <epshat_i, a_i>`` and ``w_i ||a_i||^2``;
    the ``"auto"`` coefficient is ``clip(auto_num / auto_den, 0, 1)`` (the EMA's bias correction cancels
    in the ratio). ``step`` drives scheduled coefficients.

    Args:
      config: the loss configuration.
      params: model params; required with ``vhat="ema"`` (the EMA starts as a copy).
    Returns:
      a dict pytree of arrays.
    """
    state = {
        "step": jnp.zeros((), jnp.int32),
        "auto_num": jnp.zeros((), jnp.float32),
        "auto_den": jnp.zeros((), jnp.float32),
    }
    if isinstance(config.vhat, str) and config.vhat == "ema":
        if params is None:
            raise ValueError('meanflow_init_state: MeanFlowConfig.vhat="ema" needs params to start the EMA from')
        state["vhat_params"] = jax.tree.map(lambda p: jnp.asarray(p).copy(), params)
    return state


def _call(apply_fn, params, z, r, t, y):
    return apply_fn(params, z, r, t) if y is None else apply_fn(params, z, r, t, y)


def _bcast(v, ndim):
    return jnp.reshape(v, v.shape + (1,) * (ndim - 1))


def meanflow_target(
    apply_fn: Callable,
    params,
    z: jax.Array,
    r: jax.Array,
    t: jax.Array,
    v: jax.Array,
    vhat: jax.Array | None,
    jvp_cond_weight,
    y: jax.Array | None = None,
):
    """The (variance-reduced) MeanFlow target with one ``jax.jvp``.

    ``u, du/dt = jvp(u_theta, (z, r, t), (w, 0, 1))`` with ``w = lam v + (1 - lam) vhat`` and
    ``T = sg(v - (t - r) du/dt)``. The tangent order matches the inputs ``(z, r, t)``.

    Args:
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u``.
      params: model params.
      z: ``(B, ...)`` points on the path; r, t: ``(B,)`` times with ``r <= t``.
      v: regression velocity (``v_c``, or ``v_g`` with CFG), shape of ``z``.
      vhat: stop-gradient marginal-velocity estimate (ignored, may be ``None``, when ``lam == 1``).
      jvp_cond_weight: ``lam`` (scalar).
      y: optional labels passed to ``apply_fn``.
    Returns:
      ``(u, target, dudt)``: the model output (carries gradients), the stop-gradient target and ``du/dt``.

    Example:
      >>> u, T, dudt = meanflow_target(apply, params, z, r, t, e - x, None, 1.0)   # original MeanFlow
    """
    lam = jvp_cond_weight
    if vhat is None or (_is_concrete_number(lam) and float(lam) == 1.0):
        w = v
    else:
        w = lam * v + (1.0 - lam) * vhat
    f = lambda z_, r_, t_: _call(apply_fn, params, z_, r_, t_, y)
    u, dudt = jax.jvp(f, (z, r, t), (_sg(w), jnp.zeros_like(r), jnp.ones_like(t)))
    h = _bcast(t - r, z.ndim)
    target = _sg(v - h * dudt)
    return u, target, _sg(dudt)


def _check_inputs(x, t, r, noise, y, config):
    if not isinstance(x, jax.Array | jnp.ndarray) and not hasattr(x, "shape"):
        raise TypeError(f"meanflow_loss: x must be an array (B, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"meanflow_loss: x must have shape (B, ...) with at least 2 dims, got {x.shape}")
    B = x.shape[0]
    if (t is None) != (r is None):
        raise ValueError("meanflow_loss: pass both t and r (shape (B,)) or neither (then they are sampled)")
    for name, a in (("t", t), ("r", r)):
        if a is not None and tuple(jnp.shape(a)) != (B,):
            raise ValueError(f"meanflow_loss: {name} must have shape ({B},) to match x {x.shape}, got {jnp.shape(a)}")
    if noise is not None and tuple(jnp.shape(noise)) != tuple(x.shape):
        raise ValueError(f"meanflow_loss: noise must have the shape of x {x.shape}, got {jnp.shape(noise)}")
    if y is not None and tuple(jnp.shape(y)) != (B,):
        raise ValueError(f"meanflow_loss: y must be integer labels of shape ({B},), got {jnp.shape(y)}")
    if config.cfg_on and y is None:
        raise ValueError(
            f"meanflow_loss: MeanFlowConfig.cfg_omega={config.cfg_omega!r} turns classifier-free guidance on, "
            "which needs labels: pass y (shape (B,), values in [0, num_classes))"
        )


def _auto_estimate(config, state):
    """``clip(auto_num / auto_den, 0, 1)``, or ``auto_init`` before any statistics exist."""
    ratio = state["auto_num"] / jnp.maximum(state["auto_den"], 1e-30)
    return jnp.clip(jnp.where(state["auto_den"] > 0, ratio, config.auto_init), 0.0, 1.0)


def _coefficient(config, state):
    lam = config.jvp_cond_weight
    if config.auto:
        return None  # resolved from the batch statistics
    if isinstance(lam, str):  # pragma: no cover - rejected by validation
        raise ValueError(lam)
    if callable(lam):
        return jnp.asarray(lam(state["step"]), jnp.float32)
    return lam


def meanflow_loss(
    apply_fn: Callable,
    params,
    x: jax.Array,
    key: jax.Array,
    *,
    config: MeanFlowConfig | None = None,
    t: jax.Array | None = None,
    r: jax.Array | None = None,
    noise: jax.Array | None = None,
    y: jax.Array | None = None,
    loss_state: dict | None = None,
    prefix: int | None = None,
    axis_name: str | None = None,
):
    """MeanFlow loss with the variance-reduced JVP tangent ``w = lam v_c + (1 - lam) vhat``.

    For each row: ``z = (1 - t) x + t e``, ``v_c = e - x``;

        rows with r = t (static prefix [:n_eq]):  T = v_c                       (flow matching)
        rows with r < t ([n_eq:]):                u, du/dt = jvp(u_theta, (z, r, t), (w, 0, 1))
                                                  T = sg(v_c - (t - r) du/dt)
        d_i = sum_dims (u_i - T_i)^2,   loss = mean_i d_i / sg((d_i + c)^p)

    With CFG, ``v_c`` is replaced (as regression target and in ``w``) by
    ``v_g = omega v_c + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)`` (stop-gradient) for
    ``t`` in ``cfg_interval`` on rows whose label was not dropped.

    ``"auto"`` coefficient: with ``epshat = v_c - vhat`` a second tangent ``(epshat, 0, 0)`` on the same
    linearisation gives ``a_i = (t_i - r_i) J_i epshat_i`` (so ``J w + d_t u`` for any ``lam`` is
    ``(J vhat + d_t u) + lam J epshat``). The pooled estimate

        lam = clip( EMA[mean_i w_i <epshat_i, a_i>] / EMA[mean_i w_i ||a_i||^2], 0, 1 )

    (``w_i`` the stop-gradient adaptive weights, r != t rows only, psum'ed over ``axis_name``) minimises
    ``sum_i w_i ||(I - lam A_i) epshat_i||^2``; with an exact ``vhat`` it converges to the control-variate
    optimum ``E tr(A Sigma) / E tr(A Sigma A^T)`` (see :func:`jaxlab.gmm_oracle`). With an inexact ``vhat``
    (``delta = vhat - v != 0``, e.g. the boundary default) it converges to
    ``(E tr(A Sigma) + E delta^T A delta) / (E tr(A Sigma A^T) + E ||A delta||^2)``, which is not the exact
    target-MSE minimiser (that has ``E ||A delta||^2`` in the numerator): the estimator cannot see ``delta``.
    :meth:`GMMOracle.estimator_limit_from_terms` computes this limit. The EMA lives in the loss
    state, which is *passed in and returned*::

        state = meanflow_init_state(cfg)
        for step in range(n):
            (loss, aux), g = jax.value_and_grad(meanflow_loss, argnums=1, has_aux=True)(
                apply, params, x, key, config=cfg, loss_state=state)
            state = aux["loss_state"]          # feed it back next step

    (:func:`make_meanflow_loss_fn` wraps this for :func:`jaxlab.training.make_train_step` with
    ``has_loss_state=True``.)

    Args:
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u`` with ``z: (B, ...)``, ``r, t: (B,)``.
      params: model params (any pytree; gradients flow through ``u`` only).
      x: ``(B, ...)`` data.
      key: PRNG key for times, noise and label dropout (split as ``k_time, k_noise, k_drop``).
      config: :class:`MeanFlowConfig` (default: original MeanFlow).
      t, r: explicit times ``(B,)`` (both or neither). With them given the loss is deterministic in its
        inputs and every row goes through the JVP (``r = t`` rows give exactly ``T = v_c``) unless
        ``prefix`` says how many leading rows have ``r = t``.
      noise: explicit ``e`` (shape of ``x``).
      y: integer labels ``(B,)`` (required with CFG).
      loss_state: the state from :func:`meanflow_init_state` / the previous ``aux["loss_state"]``;
        ``None`` starts fresh.
      prefix: static number of leading ``r = t`` rows (default: ``round(fraction * B)`` when sampling,
        0 with explicit times).
      axis_name: a ``pmap``/``shard_map`` axis over which the ``"auto"`` statistics are summed.
    Returns:
      ``(loss, aux)`` with ``aux``: ``mse`` (unweighted per-dim MSE, all rows), ``mse_fm`` / ``mse_mf``
      (rows with ``r = t`` / ``r != t``; 0 when there are none), ``jvp_cond_weight`` (the coefficient
      used), ``loss_state``, and with two tangents ``target_var`` (weighted mean of
      ``||(I - lam A) epshat||^2``, the target's spread around its deterministic part) and ``lam_hat``
      (this batch's clipped estimate).

    Example:
      >>> cfg = MeanFlowConfig(jvp_cond_weight=0.5, flow_matching_fraction=0.75)
      >>> loss, aux = meanflow_loss(model.apply, params, x, key, config=cfg)

    References:
      Geng et al. 2025 (arXiv 2505.13447) eqs. 9-11 and 19, adaptive weight sec. 4.3; specs/meanflow.md.
    """
    config = MeanFlowConfig() if config is None else config
    if not isinstance(config, MeanFlowConfig):
        raise TypeError(f"meanflow_loss: config must be a MeanFlowConfig, got {type(config).__name__}")
    _check_inputs(x, t, r, noise, y, config)
    B, dtype, nd = x.shape[0], x.dtype, x.ndim
    k_time, k_noise, k_drop = jax.random.split(key, 3)
    if t is None:
        r, t = logit_normal_time_pairs(
            k_time, B, mu=config.time_mu, sigma=config.time_sigma,
            flow_matching_fraction=config.flow_matching_fraction, dtype=dtype,
        )
        n_eq = num_flow_matching_rows(B, config.flow_matching_fraction) if prefix is None else prefix
    else:
        t, r = jnp.asarray(t, dtype), jnp.asarray(r, dtype)
        n_eq = 0 if prefix is None else prefix
    if not isinstance(n_eq, int) or not 0 <= n_eq <= B:
        raise ValueError(f"meanflow_loss: prefix must be a static int in [0, {B}], got {n_eq!r}")
    e = jax.random.normal(k_noise, x.shape, dtype) if noise is None else jnp.asarray(noise, dtype)
    state = meanflow_init_state(config, params if config.vhat == "ema" else None) if loss_state is None else loss_state
    if config.vhat == "ema" and "vhat_params" not in state:
        raise ValueError('meanflow_loss: MeanFlowConfig.vhat="ema" but loss_state has no "vhat_params" '
                         "(create it with meanflow_init_state(config, params))")

    tb = _bcast(t, nd)
    z = (1 - tb) * x + tb * e
    v_c = e - x

    # Labels, classifier-free guidance and the regression velocity.
    y_in, boundary = y, None
    if config.cfg_on:
        null = jnp.full((B,), config.num_classes, jnp.int32)
        drop = jax.random.bernoulli(k_drop, config.label_dropout, (B,))
        y_in = jnp.where(drop, null, y.astype(jnp.int32))
        u_cond = _sg(apply_fn(params, z, t, t, y.astype(jnp.int32)))
        u_unc = _sg(apply_fn(params, z, t, t, null))
        v_g = config.cfg_omega * v_c + config.cfg_kappa * u_cond + (1 - config.cfg_omega - config.cfg_kappa) * u_unc
        lo, hi = config.cfg_interval
        guide = _bcast((t >= lo) & (t <= hi) & ~drop, nd)
        v_tgt = jnp.where(guide, v_g, v_c)
        boundary = jnp.where(_bcast(drop, nd), u_unc, u_cond)  # = u(z, t, t | y_in), reused as vhat
    else:
        v_tgt = v_c

    sl_fm, sl_mf = slice(0, n_eq), slice(n_eq, B)
    ys = (lambda s: None if y_in is None else y_in[s])
    us, ts_, p, c = [], [], config.adaptive_p, config.adaptive_c
    red = jnp.sum if config.reduction == "sum" else jnp.mean

    def per_row(u, T):
        return red(jnp.reshape((u - T) ** 2, (u.shape[0], -1)), -1)

    if n_eq > 0:
        us.append(_call(apply_fn, params, z[sl_fm], t[sl_fm], t[sl_fm], ys(sl_fm)))
        ts_.append(v_tgt[sl_fm])

    new_state = dict(state)
    new_state["step"] = state["step"] + 1
    extra = {}
    lam = _coefficient(config, state)
    if n_eq < B:
        zm, rm, tm, vm, ym = z[sl_mf], r[sl_mf], t[sl_mf], v_tgt[sl_mf], ys(sl_mf)
        hm = _bcast(tm - rm, nd)
        need_vhat = config.two_tangents or not (_is_concrete_number(lam) and float(lam) == 1.0)
        vhat = None
        if need_vhat:
            if callable(config.vhat):
                vhat = _sg(jnp.asarray(config.vhat(zm, tm), dtype))
            elif config.vhat == "ema":
                vhat = _sg(_call(apply_fn, state["vhat_params"], zm, tm, tm, ym))
            elif boundary is not None:
                vhat = boundary[sl_mf]
            else:
                vhat = _sg(_call(apply_fn, params, zm, tm, tm, ym))
        if config.two_tangents:
            epshat = vm - vhat
            f = lambda z_, r_, t_: _call(apply_fn, params, z_, r_, t_, ym)
            zeros_r = jnp.zeros_like(rm)

            def push(tz, tt):
                return jax.jvp(f, (zm, rm, tm), (tz, zeros_r, tt))

            tz = jnp.stack([vhat, epshat])
            tt = jnp.stack([jnp.ones_like(tm), jnp.zeros_like(tm)])
            u_mf, d = jax.vmap(push, out_axes=(None, 0))(tz, tt)
            d_base, j_eps = _sg(d[0]), _sg(d[1])  # J vhat + d_t u,  J epshat
            a = hm * j_eps
            T_of = lambda lam_: _sg(vm - hm * (d_base + lam_ * j_eps))
            n_mf = B - n_eq
            dot = jnp.sum(jnp.reshape(epshat * a, (n_mf, -1)), -1)
            aa = jnp.sum(jnp.reshape(a * a, (n_mf, -1)), -1)
            if config.auto:
                # Weights at the previous estimate, then update the pooled EMA, then the target.
                wts = _sg(1.0 / (per_row(u_mf, T_of(_auto_estimate(config, state))) + c) ** p)
            else:
                wts = _sg(1.0 / (per_row(u_mf, T_of(lam)) + c) ** p)
            num, den, cnt = jnp.sum(wts * dot), jnp.sum(wts * aa), jnp.asarray(n_mf, jnp.float32)
            if axis_name is not None:
                num, den, cnt = jax.lax.psum((num, den, cnt), axis_name)
            num, den = num / cnt, den / cnt
            lam_hat = jnp.clip(num / jnp.maximum(den, 1e-30), 0.0, 1.0)
            if config.auto:
                dcy = config.auto_ema_decay
                new_state["auto_num"] = dcy * state["auto_num"] + (1 - dcy) * num
                new_state["auto_den"] = dcy * state["auto_den"] + (1 - dcy) * den
                lam = _sg(_auto_estimate(config, new_state))
            T_mf = T_of(lam)
            resid = epshat - lam * a
            rr = jnp.sum(jnp.reshape(resid * resid, (n_mf, -1)), -1)
            tv = jnp.sum(wts * rr) / jnp.maximum(jnp.sum(wts), 1e-30)
            extra = {"target_var": tv, "lam_hat": lam_hat}
        else:
            u_mf, T_mf, _ = meanflow_target(apply_fn, params, zm, rm, tm, vm, vhat, lam, ym)
        us.append(u_mf)
        ts_.append(T_mf)

    if config.vhat == "ema":
        dv = config.vhat_ema_decay
        new_state["vhat_params"] = jax.tree.map(lambda ev, pv: dv * ev + (1 - dv) * _sg(pv), state["vhat_params"], params)

    u_all = jnp.concatenate(us, 0) if len(us) > 1 else us[0]
    T_all = jnp.concatenate(ts_, 0) if len(ts_) > 1 else ts_[0]
    d_row = per_row(u_all, T_all)
    loss = jnp.mean(d_row / _sg((d_row + c) ** p))

    sq = jnp.mean(jnp.reshape((u_all - T_all) ** 2, (B, -1)), -1)
    eq = (t == r).astype(sq.dtype)
    n_e, n_m = jnp.sum(eq), jnp.sum(1 - eq)
    aux = {
        "mse": jnp.mean(sq),
        "mse_fm": jnp.sum(sq * eq) / jnp.maximum(n_e, 1.0),
        "mse_mf": jnp.sum(sq * (1 - eq)) / jnp.maximum(n_m, 1.0),
        "jvp_cond_weight": jnp.asarray(_auto_estimate(config, state) if lam is None else lam, jnp.float32),
        "loss_state": new_state,
        **extra,
    }
    return loss, aux


def make_meanflow_loss_fn(apply_fn: Callable, config: MeanFlowConfig, *, axis_name: str | None = None):
    """Adapt :func:`meanflow_loss` to ``make_train_step(..., has_loss_state=True)``.

    Returns ``loss_fn(params, batch, key, loss_state) -> (loss, (metrics, new_loss_state))`` where
    ``batch`` is ``x`` or a dict ``{"x": x, "y": labels}``; ``metrics`` are the scalar entries of ``aux``.
    Initialise the train state with ``loss_state=meanflow_init_state(config, params)``.

    Example:
      >>> loss_fn = make_meanflow_loss_fn(model.apply, MeanFlowConfig(jvp_cond_weight="auto"))
      >>> step = make_train_step(loss_fn, tx, has_loss_state=True)
    """

    def loss_fn(params, batch, key, loss_state):
        x, y = (batch["x"], batch.get("y")) if isinstance(batch, dict) else (batch, None)
        loss, aux = meanflow_loss(apply_fn, params, x, key, config=config, y=y, loss_state=loss_state,
                                  axis_name=axis_name)
        new_state = aux.pop("loss_state")
        return loss, (aux, new_state)

    return loss_fn


def meanflow_sample(
    apply_fn: Callable,
    params,
    noise: jax.Array,
    *,
    steps: int = 1,
    times: jax.Array | None = None,
    y: jax.Array | None = None,
) -> jax.Array:
    """Sample with the average velocity: ``z_r = z_t - (t - r) u_theta(z_t, r, t)`` from ``t = 1`` to 0.

    One step is ``x = e - u_theta(e, 0, 1)``; ``k`` steps use the uniform schedule ``1, 1 - 1/k, ..., 0``
    or the given ``times``.

    Args:
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u``.
      params: model params.
      noise: ``(B, ...)`` standard normal draws (the ``t = 1`` end).
      steps: number of function evaluations (NFE) on the uniform schedule.
      times: optional decreasing ``(k + 1,)`` schedule starting at 1 and ending at 0 (overrides ``steps``).
      y: optional labels (CFG is baked into a MeanFlow model, so 1-NFE guided sampling is one call).
    Returns:
      samples, shape of ``noise``.

    Example:
      >>> x = meanflow_sample(model.apply, params, jax.random.normal(key, (16, 2)), steps=1)
    """
    if times is None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"meanflow_sample: steps must be a positive int, got {steps!r}")
        times = jnp.linspace(1.0, 0.0, steps + 1)
    times = jnp.asarray(times, noise.dtype)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"meanflow_sample: times must have shape (k + 1,) with k >= 1, got {times.shape}")
    B = noise.shape[0]

    def body(z, i):
        t, r = times[i], times[i + 1]
        u = _call(apply_fn, params, z, jnp.full((B,), r, z.dtype), jnp.full((B,), t, z.dtype), y)
        return z - (t - r) * u, None

    z, _ = jax.lax.scan(body, noise, jnp.arange(times.shape[0] - 1))
    return z
