"""MeanFlow and its variance-reduced family (the JVP tangent's conditional-velocity weight).

Path ``z_t = (1 - t) x + t e`` (``t = 0`` data, ``t = 1`` noise), conditional velocity ``v_c = e - x``,
average velocity ``u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds``. The MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = (dz/dt) . d_z u + d_t u

turns into a regression target by one ``jax.jvp`` of ``u_theta`` at ``(z, r, t)`` with tangent
``(w, 0, 1)``. Original MeanFlow uses ``w = v_c``. The variance-reduced family (Lu & Wang, arXiv 2605.09235)
separates the two roles of ``v_c``:

    w     = lam * v_c + (1 - lam) * vhat                (lam = ``jvp_cond_weight``)
    T_lam = sg( v_c - (t - r) (J w + d_t u_theta) ),    J = d_z u_theta

``lam = 1`` is original MeanFlow (the unbiased corner); ``lam = 0`` with ``vhat = u_theta(z, t, t)`` is
the improved-MeanFlow (iMF) tangent. With ``h = t - r``, ``A = h J``, ``eps = v_c - v`` and
``delta = vhat - v`` the target error against the ideal ``T* = v - h (J v + d_t u)`` is
``(I - lam A) eps - (1 - lam) A delta``.

Improved MeanFlow (iMF) in full is a set of options of the same loss (all off by default):
``aux_v_head`` (the model returns ``(u, v_aux)``; an adaptively weighted ``||v_aux - v||^2`` term trains the
auxiliary instantaneous-velocity head), ``vhat="head"`` (the JVP tangent from that head), and
``guidance_conditioning`` (per-sample guidance scale ``omega`` and interval ``(t_lo, t_hi)`` drawn as the
official code draws them and fed to the network; :func:`conditioned_guided_velocity`).
:meth:`MeanFlowConfig.imf` sets all of them together with the official code's other settings.

References:
  Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447 (eqs. 6-11, Alg. 1).
  Lu & Wang, "On Variance Reduction in Learning Mean Flows", arXiv 2605.09235.
  Geng et al., "Improved Mean Flows", arXiv 2512.02012.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.losses.flow_matching import _check_unit_times, _concrete
from jaxlab.losses.time_sampling import (
    PREFIX_ROUNDINGS,
    _prefix_count,
    logit_normal_time_pairs,
    num_flow_matching_rows,
)

__all__ = [
    "MeanFlowConfig",
    "meanflow_loss",
    "meanflow_target",
    "meanflow_init_state",
    "make_meanflow_loss_fn",
    "meanflow_sample",
    # the pieces meanflow_loss is composed of
    "drop_labels",
    "drop_label_prefix",
    "guided_velocity",
    "sample_guidance_conditions",
    "conditioned_guided_velocity",
    "vhat_estimate",
    "two_tangent_jvp",
    "two_tangent_target",
    "jvp_cond_weight_at",
    "auto_jvp_cond_weight",
    "control_variate_statistics",
    "update_auto_state",
    "per_row_error",
    "adaptive_weights",
    "adaptive_loss",
    "target_variance",
    "meanflow_metrics",
    "update_vhat_ema",
]

_sg = jax.lax.stop_gradient

_LABEL_DROPOUT_MODES = ("iid", "prefix")

# Old field names (``cfg`` means "config" everywhere else in jaxlab) -> their current names.
_RENAMED_FIELDS = {
    "cfg_omega": "guidance_scale",
    "cfg_kappa": "guidance_kappa",
    "cfg_interval": "guidance_interval",
}
_RENAMED_ATTRS = {**_RENAMED_FIELDS, "cfg_on": "guidance_on"}


def _is_concrete_number(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int | float):
        return True
    return isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer) and v.ndim == 0


def _is_one(lam) -> bool:
    """Whether ``lam`` is known at trace time to be exactly 1 (original MeanFlow: no ``vhat`` needed)."""
    return _is_concrete_number(lam) and float(lam) == 1.0


def _is_ema(vhat) -> bool:
    return isinstance(vhat, str) and vhat == "ema"


def _is_head(vhat) -> bool:
    return isinstance(vhat, str) and vhat == "head"


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
      prefix_rounding: how a fraction of the batch ``B`` (the batch the loss sees: per device under
        ``shard_map``/``pmap``) becomes a static row count: the ``r = t`` rows are the first
        ``n_eq = round(flow_matching_fraction * B)`` (``"round"``, nearest with ties to even: jaxlab's
        earlier behaviour and the default) or ``floor(flow_matching_fraction * B)`` (``"floor"``: the
        official MeanFlow code's ``int(bz * data_proportion)``) rows; the same rule counts the null-label
        rows of ``label_dropout_mode="prefix"``. The two agree whenever ``fraction * B`` is an integer
        (the default 0.75 with ``B`` divisible by 4); see :func:`num_flow_matching_rows`.
      adaptive_p, adaptive_c: adaptive weight ``loss_i = d_i / sg((d_i + c)^p)``; ``p = 0`` is plain
        squared error. Paper defaults: ``p = 1, c = 1e-2`` (latents), ``p = 0.75, c = 1e-3`` (pixels).
      reduction: ``"sum"`` (MeanFlow: ``d_i`` sums over dims) or ``"mean"``; it changes the effective ``c``.
      vhat: source of the stop-gradient marginal-velocity estimate in the tangent: ``"boundary"``
        (``u_theta(z, t, t)`` of the same params), ``"ema"`` (``u(z, t, t)`` of an EMA of the params kept
        in the loss state), ``"head"`` (``v_aux(z, t, t)``, the auxiliary v-head's output at ``r = t``;
        needs ``aux_v_head=True``; the official iMF code's tangent, its ``v_cond_fn``, with
        ``jvp_cond_weight=0``) or a callable ``(z, t) -> v`` (e.g. :meth:`GMMOracle.marginal_velocity`).
      vhat_ema_decay: decay of the ``"ema"`` vhat params.
      auto_ema_decay: decay of the pooled numerator/denominator EMA of the ``"auto"`` estimator.
      auto_init: coefficient used by ``"auto"`` before any statistics exist.
      diagnostics: compute the second tangent (and ``target_var``/``lam_hat``) for fixed coefficients too.
      guidance_scale: classifier-free guidance scale ``omega``; ``None`` turns guidance off
        (formerly ``cfg_omega``).
      guidance_kappa: the ``kappa`` mixing weight of the conditional model velocity (MeanFlow eq. 19)
        (formerly ``cfg_kappa``).
      guidance_interval: guidance is applied only for ``t`` in this closed interval (formerly
        ``cfg_interval``).
      label_dropout: probability ``p`` of replacing a label by the null class (how: ``label_dropout_mode``).
      label_dropout_mode: which rows get the null label (index ``num_classes``):

        ``"iid"`` (default; jaxlab's earlier behaviour): only with guidance on, each row independently
        with probability ``p`` (:func:`drop_labels` on the third key of ``split(key, 3)``); dropped rows
        may be ``r = t`` or ``r != t`` rows. Without guidance labels are passed through unchanged.

        ``"prefix"`` (as the official MeanFlow and improved-MeanFlow codes): whenever labels ``y`` are
        given, guidance on *or off*, exactly the first ``n_drop`` rows, ``n_drop = round(p B)`` or
        ``floor(p B)`` by ``prefix_rounding`` (:func:`drop_label_prefix`; no randomness). These are
        ``r = t`` rows: the loss raises a ``ValueError`` if ``n_drop`` exceeds the number ``n_eq`` of
        leading ``r = t`` rows, which cannot happen for sampled times when ``p <= flow_matching_fraction``
        (required here) since both counts use the same monotone rule. The official code drops the
        first ``K`` rows with ``K`` random (the number of successes of ``B`` Bernoulli(``p``) draws,
        mean ``p B``); here the count is the static ``n_drop`` (within one row of ``p B``).

        In both modes a dropped row is trained on the null label and, with guidance, is not guided
        (its target velocity is ``v_c``, as in the official code).
      num_classes: number of classes; the null class is index ``num_classes``. Required with guidance.
      aux_v_head: the improved-MeanFlow auxiliary instantaneous-velocity head (official iMF: on, the
        imfDiT's ``v_heads``/``v_final_layer``). ``True`` means ``apply_fn`` returns a pair ``(u, v_aux)``
        (e.g. ``DiT(aux_v_head=True)``); the loss then adds ``aux_v_weight * mean_i d^v_i / sg((d^v_i +
        c_v)^p_v)`` with ``d^v_i = sum_dims (v_aux_i - sg(v_i))^2``, ``v_aux`` taken from the same forward
        pass as ``u`` (the JVP's primal at ``(z, r, t)``, as the official ``jax.jvp(..., has_aux=True)``)
        and ``v`` the regression velocity (``v_c``, or the guided ``v_g``). With guidance the model terms
        of the guided velocity come from this head (official ``v_fn``), and ``vhat="head"`` takes the
        tangent from it. Default ``False``: ``apply_fn`` returns ``u`` only.
      aux_v_weight: weight of the v-head term (official: 1.0, ``loss = loss_u + loss_v``).
      aux_v_adaptive_p, aux_v_adaptive_c: the v-head term's own adaptive weight ``p_v, c_v``; ``None``
        (default) uses ``adaptive_p`` / ``adaptive_c`` (official: the same ``norm_p = 1.0``,
        ``norm_eps = 0.01`` for both terms).
      guidance_conditioning: the improved-MeanFlow guidance conditioning (official iMF: on). Each row gets
        a guidance scale ``omega_i`` (:func:`sample_guidance_conditions`, official ``sample_cfg_scale``) and
        an interval ``(t_lo_i, t_hi_i)`` (official ``sample_cfg_interval``), both passed to the network as
        ``apply_fn(params, z, r, t, y, omega=omega, interval=(t_lo, t_hi))`` (``(B,)`` arrays; e.g.
        ``DiT(guidance_conditioning=True)``), and the regression target is
        ``v_g = v_c + (1 - 1/omega_eff) (V(z, t, t | y, omega_eff) - V(z, t, t | null, 1))`` with
        ``omega_eff = omega`` inside the row's interval and 1 outside (the official ``guidance_fn``;
        :func:`conditioned_guided_velocity`). Needs ``num_classes`` and labels; replaces the fixed
        ``guidance_scale``/``guidance_kappa``/``guidance_interval`` (which must stay at their defaults).
        The scale and interval are drawn from ``jax.random.fold_in(key, 0x494D46)`` (the loss's time,
        noise and dropout keys are unchanged) or passed explicitly to :func:`meanflow_loss`.
      guidance_scale_range: ``(omega_min, omega_max)`` of the per-sample scale (official: ``(1, 8)``,
        ``sample_cfg_scale(s_max=7.0)`` draws in ``[1, 1 + s_max]``).
      guidance_scale_beta: the scale's density is ``propto omega^-beta`` on the range; ``1.0`` (default,
        official ``cfg_beta = 1.0``) is log-uniform, i.e. ``log omega ~ U[log omega_min, log omega_max]``.
      guidance_t_lo_range, guidance_t_hi_range: ``t_lo ~ U(guidance_t_lo_range)``, ``t_hi ~
        U(guidance_t_hi_range)`` (official: ``U[0, 0.5]`` and ``U[0.5, 1]``).
      guidance_interval_on_fm_rows: whether the interval applies on ``r = t`` rows too. ``False``
        (default, official): on rows with ``r = t`` the network's interval input is ``(0, 1)`` and the
        row is guided at every ``t`` (the official code's ``t_min = where(fm_mask, 0, .)``,
        ``t_max = where(fm_mask, 1, .)`` and ``v_g = where(fm_mask, v_g_fm, v_g)``). ``True``: they keep
        their drawn interval and it is applied.
    The old names ``cfg_omega``, ``cfg_kappa``, ``cfg_interval`` raise a ``TypeError`` naming the new field.

    To follow the official MeanFlow code in the two places where jaxlab's defaults differ, set
    ``prefix_rounding="floor", label_dropout_mode="prefix"``; the defaults ``"round"`` and ``"iid"`` keep
    jaxlab's earlier numbers bit for bit.

    Example:
      >>> from jaxlab.losses import MeanFlowConfig
      >>> cfg = MeanFlowConfig(jvp_cond_weight=0.9, flow_matching_fraction=0.5, adaptive_p=1.0)
      >>> MeanFlowConfig(guidance_scale=2.0, num_classes=10).guidance_on
      True
      >>> official = MeanFlowConfig(prefix_rounding="floor", label_dropout_mode="prefix", num_classes=10)
      >>> official.prefix_rounding, official.label_dropout_mode, MeanFlowConfig().label_dropout_mode
      ('floor', 'prefix', 'iid')
      >>> MeanFlowConfig(label_dropout_mode="prefix", label_dropout=0.8, num_classes=10)
      Traceback (most recent call last):
        ...
      ValueError: MeanFlowConfig.label_dropout: expected a probability <= flow_matching_fraction = 0.75 with label_dropout_mode="prefix" (the null-label rows must be r = t rows), got 0.8
      >>> MeanFlowConfig(cfg_omega=2.0, num_classes=10)
      Traceback (most recent call last):
        ...
      TypeError: MeanFlowConfig: 'cfg_omega' was renamed to 'guidance_scale'
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
    guidance_scale: float | None = None
    guidance_kappa: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    label_dropout: float = 0.1
    num_classes: int | None = None
    prefix_rounding: str = "round"
    label_dropout_mode: str = "iid"
    aux_v_head: bool = False
    aux_v_weight: float = 1.0
    aux_v_adaptive_p: float | None = None
    aux_v_adaptive_c: float | None = None
    guidance_conditioning: bool = False
    guidance_scale_range: tuple[float, float] = (1.0, 8.0)
    guidance_scale_beta: float = 1.0
    guidance_t_lo_range: tuple[float, float] = (0.0, 0.5)
    guidance_t_hi_range: tuple[float, float] = (0.5, 1.0)
    guidance_interval_on_fm_rows: bool = False

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
        if not (isinstance(self.vhat, str) and self.vhat in ("boundary", "ema", "head") or callable(self.vhat)):
            bad("vhat", self.vhat, '"boundary", "ema", "head" or a callable (z, t) -> v')
        if not isinstance(self.aux_v_head, bool):
            bad("aux_v_head", self.aux_v_head, "a bool (True: apply_fn returns (u, v_aux))")
        if _is_head(self.vhat) and not self.aux_v_head:
            bad("vhat", self.vhat, 'a source other than "head" unless aux_v_head=True (apply_fn returns (u, v_aux))')
        if not self.aux_v_weight >= 0:
            bad("aux_v_weight", self.aux_v_weight, ">= 0")
        if self.aux_v_adaptive_p is not None and not self.aux_v_adaptive_p >= 0:
            bad("aux_v_adaptive_p", self.aux_v_adaptive_p, ">= 0 or None (= adaptive_p)")
        if self.aux_v_adaptive_c is not None and not self.aux_v_adaptive_c > 0:
            bad("aux_v_adaptive_c", self.aux_v_adaptive_c, "> 0 or None (= adaptive_c)")
        for f in ("vhat_ema_decay", "auto_ema_decay"):
            if not 0.0 <= getattr(self, f) < 1.0:
                bad(f, getattr(self, f), "a decay in [0, 1)")
        if not 0.0 <= self.auto_init <= 1.0:
            bad("auto_init", self.auto_init, "a number in [0, 1]")
        if self.prefix_rounding not in PREFIX_ROUNDINGS:
            bad("prefix_rounding", self.prefix_rounding, '"round" (jaxlab) or "floor" (official MeanFlow code)')
        if not 0.0 <= self.label_dropout <= 1.0:
            bad("label_dropout", self.label_dropout, "a probability in [0, 1]")
        if self.label_dropout_mode not in _LABEL_DROPOUT_MODES:
            bad("label_dropout_mode", self.label_dropout_mode, '"iid" (jaxlab) or "prefix" (official MeanFlow code)')
        if self.label_dropout_mode == "prefix" and self.label_dropout > self.flow_matching_fraction:
            bad("label_dropout", self.label_dropout,
                f"a probability <= flow_matching_fraction = {self.flow_matching_fraction!r} with "
                'label_dropout_mode="prefix" (the null-label rows must be r = t rows)')
        lo, hi = self.guidance_interval
        if not 0.0 <= lo <= hi <= 1.0:
            bad("guidance_interval", self.guidance_interval, "(lo, hi) with 0 <= lo <= hi <= 1")
        if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
            bad("num_classes", self.num_classes, "a positive int (the null class is index num_classes)")
        if not isinstance(self.guidance_conditioning, bool) or not isinstance(self.guidance_interval_on_fm_rows, bool):
            bad("guidance_conditioning", (self.guidance_conditioning, self.guidance_interval_on_fm_rows),
                "bools for guidance_conditioning and guidance_interval_on_fm_rows")
        s_lo, s_hi = self.guidance_scale_range
        if not 0.0 < s_lo <= s_hi:
            bad("guidance_scale_range", self.guidance_scale_range, "(omega_min, omega_max) with 0 < omega_min <= omega_max")
        if not self.guidance_scale_beta >= 0:
            bad("guidance_scale_beta", self.guidance_scale_beta, ">= 0 (1.0 = log-uniform)")
        for f in ("guidance_t_lo_range", "guidance_t_hi_range"):
            a, b = getattr(self, f)
            if not 0.0 <= a <= b <= 1.0:
                bad(f, getattr(self, f), "(a, b) with 0 <= a <= b <= 1")
        if self.guidance_conditioning:
            if self.num_classes is None:
                raise ValueError(
                    "MeanFlowConfig.num_classes: guidance_conditioning=True guides with labels: set num_classes "
                    "(null class = num_classes) and pass y to meanflow_loss"
                )
            if self.guidance_scale is not None:
                bad("guidance_scale", self.guidance_scale,
                    "None with guidance_conditioning=True (the scale is drawn per sample from guidance_scale_range)")
            if self.guidance_kappa != 0.0:
                bad("guidance_kappa", self.guidance_kappa, "0.0 with guidance_conditioning=True (iMF has no kappa term)")
            if tuple(self.guidance_interval) != (0.0, 1.0):
                bad("guidance_interval", self.guidance_interval,
                    "(0.0, 1.0) with guidance_conditioning=True (the interval is drawn per sample, see "
                    "guidance_t_lo_range / guidance_t_hi_range)")
        if self.guidance_scale is not None:
            if self.num_classes is None:
                raise ValueError(
                    "MeanFlowConfig.num_classes: classifier-free guidance is on (guidance_scale="
                    f"{self.guidance_scale!r}) so labels are required: set num_classes (null class = num_classes) "
                    "and pass y to meanflow_loss"
                )
            if self.guidance_scale < 0:
                bad("guidance_scale", self.guidance_scale, ">= 0")

    def __getattr__(self, name):  # only reached when normal lookup fails
        if name in _RENAMED_ATTRS:
            raise AttributeError(f"MeanFlowConfig: {name!r} was renamed to {_RENAMED_ATTRS[name]!r}")
        raise AttributeError(f"'MeanFlowConfig' object has no attribute {name!r}")

    @property
    def guidance_on(self) -> bool:
        """Whether classifier-free guidance is on (``guidance_scale`` is set, or ``guidance_conditioning``)."""
        return self.guidance_scale is not None or self.guidance_conditioning

    @classmethod
    def imf(cls, num_classes: int, **overrides) -> MeanFlowConfig:
        """The improved-MeanFlow settings of the official code (``imf.py`` + ``configs/default.py``).

        ``jvp_cond_weight=0, vhat="head", aux_v_head=True, guidance_conditioning=True`` (scale log-uniform
        in ``[1, 8]``, ``t_lo ~ U[0, 0.5]``, ``t_hi ~ U[0.5, 1]``, no interval on ``r = t`` rows),
        ``flow_matching_fraction=0.5`` (``data_proportion``), ``adaptive_p=1.0, adaptive_c=0.01``
        (``norm_p``, ``norm_eps``), ``label_dropout=0.1`` on a prefix (``class_dropout_prob``; the official
        count is random, here static), ``prefix_rounding="floor"`` (``int(bz * data_proportion)``), time
        sampler ``(-0.4, 1.0)`` (``P_mean``, ``P_std``). Keyword ``overrides`` replace any of these.

        Example:
          >>> from jaxlab.losses import MeanFlowConfig
          >>> cfg = MeanFlowConfig.imf(num_classes=10)
          >>> cfg.vhat, cfg.aux_v_head, cfg.guidance_conditioning, cfg.flow_matching_fraction
          ('head', True, True, 0.5)
        """
        kw = dict(jvp_cond_weight=0.0, vhat="head", aux_v_head=True, guidance_conditioning=True,
                  flow_matching_fraction=0.5, adaptive_p=1.0, adaptive_c=0.01, label_dropout=0.1,
                  label_dropout_mode="prefix", prefix_rounding="floor", time_mu=-0.4, time_sigma=1.0,
                  num_classes=num_classes)
        kw.update(overrides)
        return cls(**kw)

    @property
    def auto(self) -> bool:
        return isinstance(self.jvp_cond_weight, str) and self.jvp_cond_weight == "auto"

    @property
    def two_tangents(self) -> bool:
        """Whether the loss pushes the extra tangent ``(v_c - vhat, 0, 0)`` (``"auto"`` or diagnostics)."""
        return self.auto or self.diagnostics


def _reject_renamed_fields(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old in sorted(kwargs.keys() & _RENAMED_FIELDS.keys()):
            raise TypeError(f"MeanFlowConfig: {old!r} was renamed to {_RENAMED_FIELDS[old]!r}")
        init(self, *args, **kwargs)

    return __init__


MeanFlowConfig.__init__ = _reject_renamed_fields(MeanFlowConfig.__init__)


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

    Example:
      >>> from jaxlab.losses import MeanFlowConfig, meanflow_init_state
      >>> sorted(meanflow_init_state(MeanFlowConfig(jvp_cond_weight="auto")))
      ['auto_den', 'auto_num', 'step']
    """
    state = {
        "step": jnp.zeros((), jnp.int32),
        "auto_num": jnp.zeros((), jnp.float32),
        "auto_den": jnp.zeros((), jnp.float32),
    }
    if _is_ema(config.vhat):
        if params is None:
            raise ValueError('meanflow_init_state: MeanFlowConfig.vhat="ema" needs params to start the EMA from')
        state["vhat_params"] = jax.tree.map(lambda p: jnp.asarray(p).copy(), params)
    return state


def _call(apply_fn, params, z, r, t, y, cond=None):
    if cond is None:
        return apply_fn(params, z, r, t) if y is None else apply_fn(params, z, r, t, y)
    return apply_fn(params, z, r, t, **cond) if y is None else apply_fn(params, z, r, t, y, **cond)


def _heads(out, aux_v_head: bool, where: str):
    """``(u, v_aux)`` from an ``apply_fn`` output: the pair with ``aux_v_head``, else ``(out, None)``."""
    if not aux_v_head:
        return out, None
    if not isinstance(out, tuple | list) or len(out) != 2:
        raise ValueError(
            f"{where}: MeanFlowConfig.aux_v_head=True expects apply_fn to return a pair (u, v_aux), got "
            f"{type(out).__name__}"
        )
    return out[0], out[1]


def _rows(cond, s):
    """The rows ``s`` of the per-row network conditioning inputs (``None`` stays ``None``)."""
    return None if cond is None else jax.tree.map(lambda a: a[s], cond)


def _bcast(v, ndim):
    return jnp.reshape(v, v.shape + (1,) * (ndim - 1))


# ------------------------------------------------------------------------------------------------------
# Classifier-free guidance: the regression velocity.


def drop_labels(key: jax.Array, y: jax.Array, rate: float, num_classes: int):
    """Label dropout for classifier-free guidance: ``y_in_i = null`` with probability ``rate``, else ``y_i``.

    ``drop_i ~ Bernoulli(rate)`` i.i.d.; the null class is index ``num_classes``.

    Args:
      key: PRNG key (``meanflow_loss`` passes the third of its ``split(key, 3)``).
      y: integer labels ``(B,)`` in ``[0, num_classes)``.
      rate: dropout probability in ``[0, 1]``.
      num_classes: number of real classes.
    Returns:
      ``(y_in, drop)``: the ``int32`` labels the model is trained on and the boolean ``(B,)`` drop mask.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import drop_labels
      >>> y_in, drop = drop_labels(jax.random.PRNGKey(0), jnp.array([0, 1, 2]), 1.0, num_classes=3)
      >>> y_in.tolist(), drop.tolist()
      ([3, 3, 3], [True, True, True])
    """
    null = jnp.full(y.shape, num_classes, jnp.int32)
    drop = jax.random.bernoulli(key, rate, y.shape)
    return jnp.where(drop, null, y.astype(jnp.int32)), drop


def drop_label_prefix(y: jax.Array, n_drop: int, num_classes: int):
    """Prefix label dropout (``label_dropout_mode="prefix"``): the first ``n_drop`` rows get the null label.

        drop_i = (i < n_drop),    y_in_i = null if drop_i else y_i,    null = num_classes

    :func:`meanflow_loss` passes ``n_drop = round(p B)`` or ``floor(p B)`` (``prefix_rounding``), which
    is at most the number of leading ``r = t`` rows, so only flow-matching rows lose their label.

    Args:
      y: integer labels ``(B,)`` in ``[0, num_classes)``.
      n_drop: static number of leading rows to drop, in ``[0, B]``.
      num_classes: number of real classes.
    Returns:
      ``(y_in, drop)``: the ``int32`` labels the model is trained on and the boolean ``(B,)`` drop mask.
    Raises:
      ValueError: ``n_drop`` not an int in ``[0, B]``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import drop_label_prefix
      >>> y_in, drop = drop_label_prefix(jnp.array([0, 1, 2, 0]), 2, num_classes=3)
      >>> y_in.tolist(), drop.tolist()
      ([3, 3, 2, 0], [True, True, False, False])
    """
    B = y.shape[0]
    if isinstance(n_drop, bool) or not isinstance(n_drop, int) or not 0 <= n_drop <= B:
        raise ValueError(f"drop_label_prefix: n_drop must be a static int in [0, {B}], got {n_drop!r}")
    drop = jnp.arange(B) < n_drop
    return jnp.where(drop, jnp.int32(num_classes), y.astype(jnp.int32)), drop


def guided_velocity(
    apply_fn: Callable,
    params,
    z: jax.Array,
    t: jax.Array,
    v_c: jax.Array,
    y: jax.Array,
    *,
    scale: float,
    kappa: float = 0.0,
    null_class: int,
    interval: tuple[float, float] = (0.0, 1.0),
    drop: jax.Array | None = None,
    aux_v_head: bool = False,
):
    """The classifier-free-guidance regression velocity (MeanFlow eq. 19) and the boundary velocity.

        v_g = omega v_c + kappa sg(u(z, t, t | y)) + (1 - omega - kappa) sg(u(z, t, t | null))
        v_i = v_g,i   if lo <= t_i <= hi and row i's label was not dropped,   else v_c,i

    with ``omega = scale``, ``(lo, hi) = interval``. ``omega = 1, kappa = 0`` gives ``v = v_c``. ``v``
    replaces ``v_c`` both as regression target and inside the JVP tangent.

    Args:
      apply_fn: ``apply_fn(params, z, r, t, y) -> u``.
      params: model params (the model terms are under stop-gradient).
      z: ``(B, ...)`` points on the path; t: ``(B,)`` times.
      v_c: conditional velocity ``e - x``, shape of ``z``.
      y: the original integer labels ``(B,)``.
      scale: ``omega``; kappa: the weight of the conditional model velocity.
      null_class: the null label (``num_classes``).
      interval: guidance only for ``t`` in this closed interval.
      drop: optional boolean ``(B,)`` label-dropout mask (:func:`drop_labels`); dropped rows are unguided.
      aux_v_head: ``apply_fn`` returns ``(u, v_aux)``; the model terms are then the v-head's ``v_aux``
        (``MeanFlowConfig.aux_v_head``, the official iMF code's ``v_fn``) instead of ``u``.
    Returns:
      ``(v, u_boundary)``: the regression velocity and ``sg(u(z, t, t | y_in))`` (``sg(v_aux(...))`` with
      ``aux_v_head``) with ``y_in`` the label the row trains on (null where dropped), reusable as ``vhat``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import guided_velocity
      >>> apply = lambda p, z, r, t, y: z * p + y[:, None]       # toy label-conditional model
      >>> z, t, v_c, y = jnp.ones((2, 2)), jnp.array([0.2, 0.9]), jnp.zeros((2, 2)), jnp.array([1, 2])
      >>> v, ub = guided_velocity(apply, 1.0, z, t, v_c, y, scale=2.0, kappa=0.5, null_class=3,
      ...                         interval=(0.0, 0.5))
      >>> v.tolist()        # row 0: 0.5 * (1 + 1) - 1.5 * (1 + 3) = -5; row 1 is outside the interval
      [[-5.0, -5.0], [0.0, 0.0]]
    """
    nd = z.ndim
    null = jnp.full(t.shape, null_class, jnp.int32)
    pick = lambda out: _heads(out, aux_v_head, "guided_velocity")[1 if aux_v_head else 0]
    u_cond = _sg(pick(apply_fn(params, z, t, t, y.astype(jnp.int32))))
    u_unc = _sg(pick(apply_fn(params, z, t, t, null)))
    v_g = scale * v_c + kappa * u_cond + (1 - scale - kappa) * u_unc
    lo, hi = interval
    guide = (t >= lo) & (t <= hi)
    if drop is None:
        return jnp.where(_bcast(guide, nd), v_g, v_c), u_cond
    v = jnp.where(_bcast(guide & ~drop, nd), v_g, v_c)
    return v, jnp.where(_bcast(drop, nd), u_unc, u_cond)


def sample_guidance_conditions(
    key: jax.Array,
    batch_size: int,
    *,
    scale_range: tuple[float, float] = (1.0, 8.0),
    beta: float = 1.0,
    t_lo_range: tuple[float, float] = (0.0, 0.5),
    t_hi_range: tuple[float, float] = (0.5, 1.0),
    dtype=jnp.float32,
):
    """Per-sample guidance scale and interval, drawn as the official improved-MeanFlow code draws them.

        u ~ U[0, 1],   log omega = log a + log1p(u expm1((1 - beta) L)) / (1 - beta),   L = log(b / a)
                       (beta = 1: log omega = log a + u L, i.e. log-uniform on [a, b])
        t_lo ~ U(t_lo_range),   t_hi ~ U(t_hi_range)

    with ``(a, b) = scale_range``: the density of ``omega`` is ``propto omega^-beta`` on ``[a, b]`` (for
    ``a = 1`` this is the official ``sample_cfg_scale`` with ``s_max = b - 1``, ``cfg_beta = beta``; its
    defaults ``s_max = 7``, ``cfg_beta = 1`` give log-uniform on ``[1, 8]``); the interval is the official
    ``sample_cfg_interval`` (``U[0, 0.5]`` and ``U[0.5, 1]``). The key is used as ``k_lo, k_hi, k_u =
    jax.random.split(key, 3)``. :func:`meanflow_loss` then sets the interval to ``(0, 1)`` on ``r = t`` rows
    unless ``MeanFlowConfig.guidance_interval_on_fm_rows``.

    Args:
      key: PRNG key.
      batch_size: ``B``.
      scale_range: ``(omega_min, omega_max)``, ``0 < omega_min <= omega_max``.
      beta: exponent of the power-law density (``1.0`` log-uniform).
      t_lo_range, t_hi_range: ranges of the interval's ends.
      dtype: float dtype of the results.
    Returns:
      ``(omega, (t_lo, t_hi))``, each ``(B,)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import sample_guidance_conditions
      >>> omega, (lo, hi) = sample_guidance_conditions(jax.random.PRNGKey(0), 1000)
      >>> bool(jnp.all((omega >= 1) & (omega <= 8))), bool(jnp.all((lo <= 0.5) & (hi >= 0.5)))
      (True, True)
    """
    a, b = (float(v) for v in scale_range)
    if not 0.0 < a <= b:
        raise ValueError(f"sample_guidance_conditions: scale_range must satisfy 0 < min <= max, got {scale_range!r}")
    k_lo, k_hi, k_u = jax.random.split(key, 3)
    lo = jax.random.uniform(k_lo, (batch_size,), jnp.float32, t_lo_range[0], t_lo_range[1])
    hi = jax.random.uniform(k_hi, (batch_size,), jnp.float32, t_hi_range[0], t_hi_range[1])
    u = jax.random.uniform(k_u, (batch_size,), jnp.float32)
    L = jnp.float32(np.log(b) - np.log(a))
    if float(beta) == 1.0:
        log_omega = np.float32(np.log(a)) + u * L
    else:
        k = jnp.float32(1.0 - float(beta))
        log_omega = np.float32(np.log(a)) + jnp.log1p(u * jnp.expm1(k * L)) / k
    omega = jnp.exp(log_omega)
    return omega.astype(dtype), (lo.astype(dtype), hi.astype(dtype))


def conditioned_guided_velocity(
    apply_fn: Callable,
    params,
    z: jax.Array,
    t: jax.Array,
    v_c: jax.Array,
    y: jax.Array,
    *,
    omega: jax.Array,
    interval: tuple[jax.Array, jax.Array],
    null_class: int,
    drop: jax.Array | None = None,
    aux_v_head: bool = False,
):
    """The improved-MeanFlow guided velocity with the scale and interval as network inputs (official ``guidance_fn``).

        g_i        = (t_lo_i <= t_i <= t_hi_i)                       (guidance on for row i)
        omega_eff  = omega if g else 1
        V_cond     = sg(V(z, t, t | y,    omega=omega_eff, interval=(0, 1)))
        V_unc      = sg(V(z, t, t | null, omega=1,         interval=(0, 1)))
        v_g        = v_c + (1 - 1/omega_eff) (V_cond - V_unc)
        v_i        = v_c,i on rows whose label was dropped, else v_g,i

    ``V`` is the model's instantaneous velocity: the u-output at ``r = t``, or the v-head with
    ``aux_v_head`` (as the official ``v_cond_fn``/``v_fn``, which evaluate the v-head with ``h = 0`` and
    interval inputs ``(0, 1)``). A model conditioned on ``omega`` learns the guided velocity
    ``V_unc + omega (v - V_unc)``, of which ``v_g`` is the single-sample estimate. Evaluating ``V_cond`` once
    at ``omega_eff`` gives the official targets exactly (the official code evaluates it at ``omega`` for the
    ``r = t`` rows and at ``omega_eff`` for the others; the two agree wherever ``1 - 1/omega_eff != 0``).
    The caller passes the interval the network sees: :func:`meanflow_loss` sets it to ``(0, 1)`` on ``r = t``
    rows (the official rule), so those rows are guided at every ``t``.

    Args:
      apply_fn: ``apply_fn(params, z, r, t, y, omega=, interval=) -> u`` (or ``(u, v_aux)``).
      params: model params (the model terms are under stop-gradient).
      z: ``(B, ...)``; t: ``(B,)``; v_c: ``e - x``; y: the original integer labels ``(B,)``.
      omega: per-row scales ``(B,)``; interval: ``(t_lo, t_hi)``, each ``(B,)``.
      null_class: the null label (``num_classes``).
      drop: optional boolean ``(B,)`` label-dropout mask; dropped rows are unguided.
      aux_v_head: take ``V`` from the v-head.
    Returns:
      ``(v, boundary, omega_b)``: the regression velocity; the stop-gradient instantaneous velocity of the
      label each row trains on (``V_unc`` where dropped, else ``V_cond``), reusable as ``vhat`` (the
      official tangent ``v_c``; on dropped rows jaxlab uses ``V_unc``, as :func:`guided_velocity`); and the
      scale input ``omega_b`` that boundary was evaluated at (1 where dropped, else ``omega_eff``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import conditioned_guided_velocity
      >>> def apply(p, z, r, t, y, *, omega, interval):   # a toy guided velocity: V = z + y (omega - 1)
      ...     return z + (y * (omega - 1))[:, None]
      >>> z, t, v_c, y = jnp.zeros((2, 1)), jnp.array([0.3, 0.9]), jnp.ones((2, 1)), jnp.array([2, 2])
      >>> v, _, om = conditioned_guided_velocity(apply, None, z, t, v_c, y, omega=jnp.array([2.0, 2.0]),
      ...     interval=(jnp.array([0.2, 0.2]), jnp.array([0.6, 0.6])), null_class=3)
      >>> v.ravel().tolist(), om.tolist()        # row 0: 1 + (1 - 1/2) * (2 - 0); row 1 is outside its interval
      ([2.0, 1.0], [2.0, 1.0])
    """
    nd = z.ndim
    lo, hi = interval
    guide = (t >= lo) & (t <= hi)
    omega = jnp.asarray(omega, z.dtype)
    omega_eff = jnp.where(guide, omega, jnp.ones_like(omega))
    full = (jnp.zeros_like(t), jnp.ones_like(t))
    pick = lambda out: _heads(out, aux_v_head, "conditioned_guided_velocity")[1 if aux_v_head else 0]
    null = jnp.full(t.shape, null_class, jnp.int32)
    v_cond = _sg(pick(apply_fn(params, z, t, t, y.astype(jnp.int32), omega=omega_eff, interval=full)))
    v_unc = _sg(pick(apply_fn(params, z, t, t, null, omega=jnp.ones_like(omega), interval=full)))
    v_g = v_c + _bcast(1 - 1 / omega_eff, nd) * (v_cond - v_unc)
    if drop is None:
        return v_g, v_cond, omega_eff
    dropb = _bcast(drop, nd)
    return (jnp.where(dropb, v_c, v_g), jnp.where(dropb, v_unc, v_cond),
            jnp.where(drop, jnp.ones_like(omega_eff), omega_eff))


# ------------------------------------------------------------------------------------------------------
# The marginal-velocity estimate vhat and the JVP targets.


def vhat_estimate(
    apply_fn: Callable,
    params,
    z: jax.Array,
    t: jax.Array,
    y: jax.Array | None = None,
    *,
    source: str | Callable = "boundary",
    ema_params=None,
    boundary: jax.Array | None = None,
    cond: dict | None = None,
    aux_v_head: bool = False,
) -> jax.Array:
    """Stop-gradient estimate ``vhat(z, t)`` of the marginal velocity ``v(z, t) = E[v_c | z_t = z]``.

        "boundary":  vhat = sg(u_theta(z, t, t))       (iMF; reuses ``boundary`` when given)
        "ema":       vhat = sg(u_theta_ema(z, t, t))   (EMA params kept in the loss state)
        "head":      vhat = sg(v_aux(z, t, t))         (the auxiliary v-head; needs ``aux_v_head``)
        callable:    vhat = sg(source(z, t))          (e.g. the exact GMMOracle.marginal_velocity)

    Its error ``delta = vhat - v`` enters the target as ``-(1 - lam) A delta``.

    Args:
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u``.
      params: model params.
      z: ``(B, ...)``; t: ``(B,)``; y: optional labels passed to ``apply_fn``.
      source: ``"boundary"``, ``"ema"``, ``"head"`` or a callable ``(z, t) -> v``.
      ema_params: the EMA params (``source="ema"``).
      boundary: an already computed ``sg(u_theta(z, t, t | y))`` (e.g. from :func:`guided_velocity`),
        used by ``"boundary"`` (or, with ``aux_v_head``, by ``"head"``) instead of a new forward pass.
      cond: optional network conditioning inputs ``{"omega": ..., "interval": ...}`` passed to ``apply_fn``
        as keywords (``MeanFlowConfig.guidance_conditioning``).
      aux_v_head: ``apply_fn`` returns ``(u, v_aux)``: ``"boundary"``/``"ema"`` take ``u``, ``"head"``
        takes ``v_aux``.
    Returns:
      ``vhat``, shape and dtype of ``z``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import vhat_estimate
      >>> apply = lambda p, z, r, t: p * z * t[:, None]
      >>> z, t = jnp.ones((2, 2)), jnp.array([0.5, 1.0])
      >>> vhat_estimate(apply, 2.0, z, t).tolist()
      [[1.0, 1.0], [2.0, 2.0]]
      >>> vhat_estimate(apply, 2.0, z, t, source="ema", ema_params=4.0).tolist()
      [[2.0, 2.0], [4.0, 4.0]]
      >>> vhat_estimate(apply, 2.0, z, t, source=lambda z, t: -z).tolist()
      [[-1.0, -1.0], [-1.0, -1.0]]
    """
    if callable(source):
        return _sg(jnp.asarray(source(z, t), z.dtype))
    u_of = lambda out: _heads(out, aux_v_head, "vhat_estimate")[0]
    if _is_ema(source):
        if ema_params is None:
            raise ValueError('vhat_estimate: source="ema" needs ema_params (loss_state["vhat_params"])')
        return _sg(u_of(_call(apply_fn, ema_params, z, t, t, y, cond)))
    if _is_head(source):
        if not aux_v_head:
            raise ValueError('vhat_estimate: source="head" needs aux_v_head=True (apply_fn returns (u, v_aux))')
        if boundary is not None:
            return boundary
        return _sg(_heads(_call(apply_fn, params, z, t, t, y, cond), True, "vhat_estimate")[1])
    if source != "boundary":
        raise ValueError(
            f'vhat_estimate: source must be "boundary", "ema", "head" or a callable (z, t) -> v, got {source!r}')
    if boundary is not None:
        return boundary
    return _sg(u_of(_call(apply_fn, params, z, t, t, y, cond)))


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
    *,
    cond: dict | None = None,
    aux_v_head: bool = False,
):
    """The (variance-reduced) MeanFlow target with one ``jax.jvp``.

        u, du/dt = jvp(u_theta, (z, r, t), (w, 0, 1)),    w = lam v + (1 - lam) vhat
        T = sg(v - (t - r) du/dt)

    The tangent order matches the inputs ``(z, r, t)``.

    Args:
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u``.
      params: model params.
      z: ``(B, ...)`` points on the path; r, t: ``(B,)`` times with ``r <= t``.
      v: regression velocity (``v_c``, or ``v_g`` with guidance), shape of ``z``.
      vhat: stop-gradient marginal-velocity estimate (ignored, may be ``None``, when ``lam == 1``).
      jvp_cond_weight: ``lam`` (scalar).
      y: optional labels passed to ``apply_fn``.
      cond: optional network conditioning inputs passed to ``apply_fn`` as keywords (not differentiated).
      aux_v_head: ``apply_fn`` returns ``(u, v_aux)``; the JVP pushes the tangent through ``u`` only and
        ``v_aux`` comes from the same forward pass (``jax.jvp(..., has_aux=True)``).
    Returns:
      ``(u, target, dudt)``: the model output (carries gradients), the stop-gradient target and ``du/dt``;
      with ``aux_v_head`` a fourth entry ``v_aux`` (carries gradients).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import meanflow_target
      >>> apply = lambda p, z, r, t: p * z * (t - r)[:, None] + t[:, None]    # du/dt = p (t - r) w + p z + 1
      >>> z, v = jnp.ones((1, 2)), jnp.full((1, 2), 2.0)
      >>> r, t = jnp.array([0.25]), jnp.array([0.75])
      >>> u, T, dudt = meanflow_target(apply, 1.0, z, r, t, v, None, 1.0)   # original MeanFlow: w = v
      >>> dudt.tolist(), T.tolist()
      ([[3.0, 3.0]], [[0.5, 0.5]])
    """
    lam = jvp_cond_weight
    if vhat is None or _is_one(lam):
        w = v
    else:
        w = lam * v + (1.0 - lam) * vhat
    tangents = (_sg(w), jnp.zeros_like(r), jnp.ones_like(t))
    if aux_v_head:
        f = lambda z_, r_, t_: _heads(_call(apply_fn, params, z_, r_, t_, y, cond), True, "meanflow_target")
        u, dudt, v_aux = jax.jvp(f, (z, r, t), tangents, has_aux=True)
    else:
        f = lambda z_, r_, t_: _call(apply_fn, params, z_, r_, t_, y, cond)
        u, dudt = jax.jvp(f, (z, r, t), tangents)
    h = _bcast(t - r, z.ndim)
    target = _sg(v - h * dudt)
    if aux_v_head:
        return u, target, _sg(dudt), v_aux
    return u, target, _sg(dudt)


def two_tangent_jvp(
    apply_fn: Callable,
    params,
    z: jax.Array,
    r: jax.Array,
    t: jax.Array,
    vhat: jax.Array,
    epshat: jax.Array,
    y: jax.Array | None = None,
    *,
    cond: dict | None = None,
    aux_v_head: bool = False,
):
    """Two tangents on one linearisation: ``J vhat + d_t u`` and ``J epshat`` (``J = d_z u_theta``).

        u, base  = jvp(u_theta, (z, r, t), (vhat,   0, 1))     base  = J vhat + d_t u
        u, j_eps = jvp(u_theta, (z, r, t), (epshat, 0, 0))     j_eps = J epshat

    (one ``vmap`` over the two tangents, the primal ``u`` shared). With ``epshat = v - vhat`` the
    tangent of any coefficient follows by linearity, ``J w + d_t u = base + lam j_eps`` for
    ``w = lam v + (1 - lam) vhat``, which is what :func:`two_tangent_target` uses.

    Args:
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u``.
      params: model params.
      z: ``(B, ...)``; r, t: ``(B,)``.
      vhat: the stop-gradient marginal-velocity estimate; epshat: ``v - vhat``; both shape of ``z``.
      y: optional labels passed to ``apply_fn``.
      cond, aux_v_head: as in :func:`meanflow_target` (with ``aux_v_head`` a fourth entry ``v_aux``).
    Returns:
      ``(u, base, j_eps)``: the model output (carries gradients) and the two stop-gradient JVPs.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import two_tangent_jvp
      >>> apply = lambda p, z, r, t: p * z + t[:, None]          # J = p I, d_t u = 1
      >>> z, r, t = jnp.ones((1, 2)), jnp.array([0.0]), jnp.array([0.5])
      >>> u, base, j_eps = two_tangent_jvp(apply, 3.0, z, r, t, jnp.ones((1, 2)), jnp.full((1, 2), 2.0))
      >>> base.tolist(), j_eps.tolist()
      ([[4.0, 4.0]], [[6.0, 6.0]])
    """
    zeros_r = jnp.zeros_like(r)
    tz = jnp.stack([vhat, epshat])
    tt = jnp.stack([jnp.ones_like(t), jnp.zeros_like(t)])
    if aux_v_head:
        fa = lambda z_, r_, t_: _heads(_call(apply_fn, params, z_, r_, t_, y, cond), True, "two_tangent_jvp")
        push_a = lambda tz_, tt_: jax.jvp(fa, (z, r, t), (tz_, zeros_r, tt_), has_aux=True)
        u, d, v_aux = jax.vmap(push_a, out_axes=(None, 0, None))(tz, tt)
        return u, _sg(d[0]), _sg(d[1]), v_aux
    f = lambda z_, r_, t_: _call(apply_fn, params, z_, r_, t_, y, cond)

    def push(tz, tt):
        return jax.jvp(f, (z, r, t), (tz, zeros_r, tt))

    u, d = jax.vmap(push, out_axes=(None, 0))(tz, tt)
    return u, _sg(d[0]), _sg(d[1])


def two_tangent_target(v: jax.Array, h: jax.Array, base: jax.Array, j_eps: jax.Array, lam) -> jax.Array:
    """The target at coefficient ``lam`` from :func:`two_tangent_jvp`: ``T_lam = sg(v - h (base + lam j_eps))``.

    Equal to :func:`meanflow_target`'s ``sg(v - h (J w + d_t u))``, ``w = lam v + (1 - lam) vhat``.

    Args:
      v: regression velocity ``(B, ...)``; h: ``t - r``, ``(B,)``.
      base, j_eps: ``J vhat + d_t u`` and ``J epshat`` from :func:`two_tangent_jvp`.
      lam: the coefficient (scalar, may be traced).
    Returns:
      the stop-gradient target, shape of ``v``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import two_tangent_target
      >>> two_tangent_target(jnp.ones((1, 2)), jnp.array([0.5]), jnp.ones((1, 2)), jnp.ones((1, 2)), 0.5).tolist()
      [[0.25, 0.25]]
    """
    return _sg(v - _bcast(h, v.ndim) * (base + lam * j_eps))


# ------------------------------------------------------------------------------------------------------
# The coefficient lam = jvp_cond_weight: fixed, scheduled or "auto" (pooled control-variate estimate).


def auto_jvp_cond_weight(num: jax.Array, den: jax.Array, init: float) -> jax.Array:
    """The ``"auto"`` coefficient from the pooled statistics: ``clip(num / den, 0, 1)``, ``init`` while ``den = 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import auto_jvp_cond_weight
      >>> float(auto_jvp_cond_weight(jnp.float32(1.5), jnp.float32(2.0), 1.0))
      0.75
      >>> float(auto_jvp_cond_weight(jnp.float32(0.0), jnp.float32(0.0), 0.25))
      0.25
    """
    ratio = num / jnp.maximum(den, 1e-30)
    return jnp.clip(jnp.where(den > 0, ratio, init), 0.0, 1.0)


def jvp_cond_weight_at(config: MeanFlowConfig, state: dict):
    """The coefficient ``lam`` in force at the start of this step.

        fixed:       lam = config.jvp_cond_weight                 (float or 0-d array, as given)
        scheduled:   lam = schedule(state["step"])                (float32)
        "auto":      lam = clip(auto_num / auto_den, 0, 1)         (``auto_init`` before any statistics)

    With ``"auto"`` the loss then updates the pooled EMA with this batch and uses the updated estimate
    for the target (:func:`update_auto_state`); this value weights the rows for the statistics.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import MeanFlowConfig, jvp_cond_weight_at, meanflow_init_state
      >>> cfg = MeanFlowConfig(jvp_cond_weight=lambda step: jnp.where(step < 10, 1.0, 0.5))
      >>> float(jvp_cond_weight_at(cfg, meanflow_init_state(cfg)))
      1.0
    """
    lam = config.jvp_cond_weight
    if config.auto:
        return auto_jvp_cond_weight(state["auto_num"], state["auto_den"], config.auto_init)
    if callable(lam):
        return jnp.asarray(lam(state["step"]), jnp.float32)
    return lam


def control_variate_statistics(epshat: jax.Array, a: jax.Array, weights: jax.Array, axis_name: str | None = None):
    """Pooled batch statistics of the ``"auto"`` estimator, over the ``r != t`` rows.

        num = mean_i w_i <epshat_i, a_i>,    den = mean_i w_i ||a_i||^2,    a_i = (t_i - r_i) J_i epshat_i

    summed (``psum``) over ``axis_name`` before the mean when given. ``num / den`` minimises
    ``sum_i w_i ||epshat_i - lam a_i||^2`` (the weighted spread of the target around its deterministic part).

    Args:
      epshat: ``v - vhat``, ``(n, ...)``; a: ``h J epshat``, ``(n, ...)``.
      weights: stop-gradient adaptive weights ``(n,)``.
      axis_name: optional ``pmap``/``shard_map`` axis.
    Returns:
      ``(num, den)`` scalars.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import control_variate_statistics
      >>> num, den = control_variate_statistics(jnp.ones((2, 2)), jnp.full((2, 2), 2.0), jnp.ones(2))
      >>> float(num), float(den)
      (4.0, 8.0)
    """
    n = epshat.shape[0]
    dot = jnp.sum(jnp.reshape(epshat * a, (n, -1)), -1)
    aa = jnp.sum(jnp.reshape(a * a, (n, -1)), -1)
    num, den, cnt = jnp.sum(weights * dot), jnp.sum(weights * aa), jnp.asarray(n, jnp.float32)
    if axis_name is not None:
        num, den, cnt = jax.lax.psum((num, den, cnt), axis_name)
    return num / cnt, den / cnt


def update_auto_state(state: dict, num: jax.Array, den: jax.Array, decay: float) -> dict:
    """EMA of the pooled statistics: ``auto_num <- decay auto_num + (1 - decay) num`` (same for ``den``).

    Returns a new state dict (other entries unchanged).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import MeanFlowConfig, meanflow_init_state, update_auto_state
      >>> st = update_auto_state(meanflow_init_state(MeanFlowConfig()), jnp.float32(1.0), jnp.float32(2.0), 0.5)
      >>> float(st["auto_num"]), float(st["auto_den"])
      (0.5, 1.0)
    """
    new = dict(state)
    new["auto_num"] = decay * state["auto_num"] + (1 - decay) * num
    new["auto_den"] = decay * state["auto_den"] + (1 - decay) * den
    return new


# ------------------------------------------------------------------------------------------------------
# Adaptive weighting and metrics.


def per_row_error(u: jax.Array, target: jax.Array, reduction: str = "sum") -> jax.Array:
    """``d_i = sum_dims (u_i - T_i)^2`` (``"sum"``, MeanFlow) or the mean over dims (``"mean"``), ``(B,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import per_row_error
      >>> per_row_error(jnp.ones((2, 2)), jnp.array([[0.0, 0.0], [1.0, 3.0]])).tolist()
      [2.0, 4.0]
    """
    red = jnp.sum if reduction == "sum" else jnp.mean
    return red(jnp.reshape((u - target) ** 2, (u.shape[0], -1)), -1)


def adaptive_weights(d: jax.Array, p: float, c: float) -> jax.Array:
    """Stop-gradient adaptive weights ``w_i = sg(1 / (d_i + c)^p)`` (``p = 0``: all ones).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import adaptive_weights
      >>> adaptive_weights(jnp.array([1.0, 3.0]), 1.0, 1.0).tolist()
      [0.5, 0.25]
    """
    return _sg(1.0 / (d + c) ** p)


def adaptive_loss(d: jax.Array, p: float, c: float) -> jax.Array:
    """The MeanFlow adaptive loss ``mean_i d_i / sg((d_i + c)^p)``; its gradient is ``w_i`` times that of ``d_i``.

    With ``p = 1`` the value sits near 1 and says little: log the unweighted MSE as well.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import adaptive_loss
      >>> float(adaptive_loss(jnp.array([1.0, 3.0]), 1.0, 1.0))
      0.625
    """
    return jnp.mean(d / _sg((d + c) ** p))


def target_variance(epshat: jax.Array, a: jax.Array, lam, weights: jax.Array) -> jax.Array:
    """Weighted proxy of the target's spread around its deterministic part at coefficient ``lam``.

        target_var = sum_i w_i ||(I - lam A_i) epshat_i||^2 / sum_i w_i,     A_i epshat_i = a_i

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import target_variance
      >>> float(target_variance(jnp.ones((2, 2)), jnp.ones((2, 2)), 0.5, jnp.ones(2)))
      0.5
    """
    n = epshat.shape[0]
    resid = epshat - lam * a
    rr = jnp.sum(jnp.reshape(resid * resid, (n, -1)), -1)
    return jnp.sum(weights * rr) / jnp.maximum(jnp.sum(weights), 1e-30)


def meanflow_metrics(u: jax.Array, target: jax.Array, r: jax.Array, t: jax.Array, jvp_cond_weight) -> dict:
    """Unweighted per-dim MSE over all rows, the ``r = t`` rows and the ``r != t`` rows; the coefficient used.

        mse_i = mean_dims (u_i - T_i)^2;   mse = mean_i mse_i;   mse_fm / mse_mf = mean over r = t / r != t
        rows (0 when there are none);      jvp_cond_weight = lam as float32

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import meanflow_metrics
      >>> m = meanflow_metrics(jnp.array([[1.0], [3.0]]), jnp.zeros((2, 1)), jnp.array([0.5, 0.1]),
      ...                      jnp.array([0.5, 0.5]), 1.0)
      >>> {k: float(v) for k, v in m.items()}
      {'mse': 5.0, 'mse_fm': 1.0, 'mse_mf': 9.0, 'jvp_cond_weight': 1.0}
    """
    sq = jnp.mean(jnp.reshape((u - target) ** 2, (u.shape[0], -1)), -1)
    eq = (t == r).astype(sq.dtype)
    n_e, n_m = jnp.sum(eq), jnp.sum(1 - eq)
    return {
        "mse": jnp.mean(sq),
        "mse_fm": jnp.sum(sq * eq) / jnp.maximum(n_e, 1.0),
        "mse_mf": jnp.sum(sq * (1 - eq)) / jnp.maximum(n_m, 1.0),
        "jvp_cond_weight": jnp.asarray(jvp_cond_weight, jnp.float32),
    }


def update_vhat_ema(ema_params, params, decay: float):
    """The ``vhat="ema"`` params: ``ema <- decay ema + (1 - decay) sg(params)`` leaf by leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import update_vhat_ema
      >>> update_vhat_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.75)["w"].tolist()
      [0.25, 0.25]
    """
    return jax.tree.map(lambda ev, pv: decay * ev + (1 - decay) * _sg(pv), ema_params, params)


# ------------------------------------------------------------------------------------------------------
# The loss.


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
    if t is not None:
        _check_time_values(t, r)
    if noise is not None and tuple(jnp.shape(noise)) != tuple(x.shape):
        raise ValueError(f"meanflow_loss: noise must have the shape of x {x.shape}, got {jnp.shape(noise)}")
    if y is not None and tuple(jnp.shape(y)) != (B,):
        raise ValueError(f"meanflow_loss: y must be integer labels of shape ({B},), got {jnp.shape(y)}")
    if config.guidance_on and y is None:
        what = ("guidance_conditioning=True" if config.guidance_conditioning
                else f"guidance_scale={config.guidance_scale!r}")
        raise ValueError(
            f"meanflow_loss: MeanFlowConfig.{what} turns classifier-free "
            "guidance on, which needs labels: pass y (shape (B,), values in [0, num_classes))"
        )


def _guidance_inputs(config, key, x, r, t, omega, interval):
    """``(omega, (t_lo, t_hi))`` the network sees: drawn (or given), the interval ``(0, 1)`` on ``r = t`` rows."""
    B, dtype = x.shape[0], x.dtype
    if omega is None or interval is None:
        d_omega, d_interval = sample_guidance_conditions(
            jax.random.fold_in(key, 0x494D46), B, scale_range=config.guidance_scale_range,
            beta=config.guidance_scale_beta, t_lo_range=config.guidance_t_lo_range,
            t_hi_range=config.guidance_t_hi_range, dtype=dtype,
        )
        omega = d_omega if omega is None else omega
        interval = d_interval if interval is None else interval
    omega = jnp.asarray(omega, dtype)
    lo, hi = (jnp.asarray(a, dtype) for a in interval)
    if not config.guidance_interval_on_fm_rows:
        fm = r == t
        lo, hi = jnp.where(fm, jnp.zeros_like(lo), lo), jnp.where(fm, jnp.ones_like(hi), hi)
    return omega, (lo, hi)


def _check_guidance_inputs(x, omega, interval, config):
    B = x.shape[0]
    if (omega is not None or interval is not None) and not config.guidance_conditioning:
        raise ValueError("meanflow_loss: omega/interval are network inputs of MeanFlowConfig.guidance_conditioning=True; "
                         "it is off")
    if omega is not None and tuple(jnp.shape(omega)) != (B,):
        raise ValueError(f"meanflow_loss: omega must have shape ({B},), got {jnp.shape(omega)}")
    if interval is not None:
        if not isinstance(interval, tuple | list) or len(interval) != 2 or any(
                tuple(jnp.shape(a)) != (B,) for a in interval):
            raise ValueError(f"meanflow_loss: interval must be a pair (t_lo, t_hi) of ({B},) arrays")


def _check_time_values(t, r):
    """Explicit times must satisfy ``0 <= r <= t <= 1``; checked on concrete arrays only (tracers skipped)."""
    _check_unit_times("meanflow_loss", "t", t)
    _check_unit_times("meanflow_loss", "r", r)
    tv, rv = _concrete(t), _concrete(r)
    if tv is None or rv is None:
        return
    bad = rv > tv
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"meanflow_loss: r must satisfy 0 <= r <= t <= 1; {int(bad.sum())} of {rv.size} rows have r > t, "
            f"first r[{i}] = {rv[i]!s} > t[{i}] = {tv[i]!s}"
        )


def _time_pairs(config, key, x, t, r, prefix):
    """``(r, t, n_eq)``: sampled (static ``r = t`` prefix of ``round``/``floor(fraction B)`` rows) or the given times."""
    B, dtype = x.shape[0], x.dtype
    if t is None:
        r, t = logit_normal_time_pairs(
            key, B, mu=config.time_mu, sigma=config.time_sigma,
            flow_matching_fraction=config.flow_matching_fraction,
            flow_matching_rounding=config.prefix_rounding, dtype=dtype,
        )
        if prefix is None:
            prefix = num_flow_matching_rows(B, config.flow_matching_fraction, config.prefix_rounding)
        n_eq = prefix
    else:
        t, r = jnp.asarray(t, dtype), jnp.asarray(r, dtype)
        n_eq = 0 if prefix is None else prefix
    if not isinstance(n_eq, int) or not 0 <= n_eq <= B:
        raise ValueError(f"meanflow_loss: prefix must be a static int in [0, {B}], got {n_eq!r}")
    return r, t, n_eq


def _labels_in(config, key, y, n_eq):
    """``(y_in, drop)``: the labels the model trains on and the drop mask (``None``: nothing dropped)."""
    if y is None:
        return None, None
    if config.label_dropout_mode == "iid":
        if not config.guidance_on:
            return y, None
        return drop_labels(key, y, config.label_dropout, config.num_classes)
    B = y.shape[0]
    n_drop = _prefix_count(config.label_dropout, B, config.prefix_rounding)
    if n_drop == 0:
        return y, None
    if config.num_classes is None:
        raise ValueError(
            f'meanflow_loss: MeanFlowConfig.label_dropout_mode="prefix" drops the labels of the first {n_drop} '
            "rows (guidance on or off) to the null class num_classes, but MeanFlowConfig.num_classes is None: "
            "set num_classes, set label_dropout=0, or do not pass y"
        )
    if n_drop > n_eq:
        raise ValueError(
            f'meanflow_loss: MeanFlowConfig.label_dropout_mode="prefix" puts the null label on the first '
            f"{n_drop} rows ({config.prefix_rounding} of label_dropout={config.label_dropout!r} * B={B}), but only "
            f"the first {n_eq} rows have r = t; expected at most {n_eq} null-label rows (with explicit t, r pass "
            "prefix= the number of leading r = t rows)"
        )
    return drop_label_prefix(y, n_drop, config.num_classes)


def _loss_state(config, params, loss_state):
    if loss_state is None:
        return meanflow_init_state(config, params if _is_ema(config.vhat) else None)
    if _is_ema(config.vhat) and "vhat_params" not in loss_state:
        raise ValueError('meanflow_loss: MeanFlowConfig.vhat="ema" but loss_state has no "vhat_params" '
                         "(create it with meanflow_init_state(config, params))")
    return loss_state


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
    omega: jax.Array | None = None,
    interval: tuple[jax.Array, jax.Array] | None = None,
):
    """MeanFlow loss with the variance-reduced JVP tangent ``w = lam v_c + (1 - lam) vhat``.

    For each row: ``z = (1 - t) x + t e``, ``v_c = e - x``;

        rows with r = t (static prefix [:n_eq]):  T = v_c                       (flow matching)
        rows with r < t ([n_eq:]):                u, du/dt = jvp(u_theta, (z, r, t), (w, 0, 1))
                                                  T = sg(v_c - (t - r) du/dt)
        d_i = sum_dims (u_i - T_i)^2,   loss = mean_i d_i / sg((d_i + c)^p)

    With guidance, ``v_c`` is replaced (as regression target and in ``w``) by
    ``v_g = omega v_c + kappa u(z, t, t | y) + (1 - omega - kappa) u(z, t, t | null)`` (stop-gradient) for
    ``t`` in ``guidance_interval`` on rows whose label was not dropped (:func:`guided_velocity`).

    Label dropout (``MeanFlowConfig.label_dropout_mode``): ``"iid"`` drops each label with probability
    ``label_dropout`` and only with guidance on; ``"prefix"`` (official MeanFlow code) gives the null label
    to exactly the first ``n_drop = round/floor(label_dropout * B)`` rows whenever ``y`` is given, guidance
    on or off, and raises if those are not all among the ``n_eq`` leading ``r = t`` rows.

    Improved-MeanFlow options (``MeanFlowConfig``; all off by default, :meth:`MeanFlowConfig.imf` turns on
    the official set):

        guidance_conditioning:  omega_i, (t_lo_i, t_hi_i) drawn per row (or given); (0, 1) on r = t rows
                                (unless guidance_interval_on_fm_rows); every apply_fn call gets them as
                                keywords omega=, interval=;  v = conditioned_guided_velocity(...)
        aux_v_head:             apply_fn returns (u, v_aux);  loss = L_u + aux_v_weight * mean_i d^v_i /
                                sg((d^v_i + c_v)^p_v),  d^v_i = sum_dims (v_aux_i - sg(v_i))^2, v_aux from
                                the same forward as u (the JVP primal on r != t rows)
        vhat="head":            w = lam v + (1 - lam) sg(v_aux(z, t, t)) (official iMF: lam = 0; with
                                guidance conditioning evaluated at omega_eff, interval (0, 1))

    The official iMF loss ``mean_i [adp(||u + h sg(du/dt) - sg(v_g)||^2) + adp(||v_aux - sg(v_g)||^2)]``
    is this one: ``u + h sg(du/dt) - v_g = u - T`` with ``T = sg(v_g - h du/dt)``.

    ``"auto"`` coefficient: with ``epshat = v_c - vhat`` a second tangent ``(epshat, 0, 0)`` on the same
    linearisation gives ``a_i = (t_i - r_i) J_i epshat_i`` (so ``J w + d_t u`` for any ``lam`` is
    ``(J vhat + d_t u) + lam J epshat``, :func:`two_tangent_jvp`). The pooled estimate

        lam = clip( EMA[mean_i w_i <epshat_i, a_i>] / EMA[mean_i w_i ||a_i||^2], 0, 1 )

    (``w_i`` the stop-gradient adaptive weights, r != t rows only, psum'ed over ``axis_name``) minimises
    ``sum_i w_i ||(I - lam A_i) epshat_i||^2``; with an exact ``vhat`` it converges to the control-variate
    optimum ``E tr(A Sigma) / E tr(A Sigma A^T)`` (see :func:`jaxlab.losses.gmm_oracle`). With an inexact
    ``vhat`` (``delta = vhat - v != 0``, e.g. the boundary default) it converges to
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
      apply_fn: ``apply_fn(params, z, r, t[, y]) -> u`` with ``z: (B, ...)``, ``r, t: (B,)``; with
        ``guidance_conditioning`` also keywords ``omega=`` ``(B,)`` and ``interval=(t_lo, t_hi)``; with
        ``aux_v_head`` it returns ``(u, v_aux)``.
      params: model params (any pytree; gradients flow through ``u``, and ``v_aux`` with ``aux_v_head``).
      x: ``(B, ...)`` data.
      key: PRNG key for times, noise and label dropout (split as ``k_time, k_noise, k_drop``; ``k_drop`` is
        used by ``label_dropout_mode="iid"`` only).
      config: :class:`MeanFlowConfig` (default: original MeanFlow).
      t, r: explicit times ``(B,)`` (both or neither) with ``0 <= r <= t <= 1``. With them given the loss
        is deterministic in its inputs and every row goes through the JVP (``r = t`` rows give exactly
        ``T = v_c``) unless ``prefix`` says how many leading rows have ``r = t``.
      noise: explicit ``e`` (shape of ``x``).
      y: integer labels ``(B,)`` (required with guidance; with ``label_dropout_mode="prefix"`` their first
        ``n_drop`` rows are replaced by the null class even without guidance).
      loss_state: the state from :func:`meanflow_init_state` / the previous ``aux["loss_state"]``;
        ``None`` starts fresh.
      prefix: static number of leading ``r = t`` rows (default: ``round(fraction * B)`` or
        ``floor(fraction * B)`` by ``MeanFlowConfig.prefix_rounding`` when sampling, 0 with explicit times).
      axis_name: a ``pmap``/``shard_map`` axis over which the ``"auto"`` statistics are summed.
      omega: explicit per-row guidance scales ``(B,)`` (``guidance_conditioning`` only; default: drawn).
      interval: explicit per-row guidance intervals ``(t_lo, t_hi)``, each ``(B,)`` (``guidance_conditioning``
        only; default: drawn); set to ``(0, 1)`` on ``r = t`` rows unless ``guidance_interval_on_fm_rows``.
    Returns:
      ``(loss, aux)`` with ``aux``: ``mse`` (unweighted per-dim MSE, all rows), ``mse_fm`` / ``mse_mf``
      (rows with ``r = t`` / ``r != t``; 0 when there are none), ``jvp_cond_weight`` (the coefficient
      used), ``loss_state``, and with two tangents ``target_var`` (weighted mean of
      ``||(I - lam A) epshat||^2``, the target's spread around its deterministic part) and ``lam_hat``
      (this batch's clipped estimate). With ``aux_v_head`` also ``loss_u``, ``loss_v`` (the two weighted
      terms, ``loss = loss_u + aux_v_weight * loss_v``) and ``mse_v`` (unweighted per-dim MSE of ``v_aux``).
    Raises:
      ValueError: inputs of the wrong shape; explicit ``t``/``r`` outside ``[0, 1]`` or with ``r > t`` in
        some row (the message names the argument, how many entries are bad and the first one). The value
        checks run eagerly only: under ``jit``/``vmap``/``grad`` the times are tracers and only their
        shapes are checked. With ``label_dropout_mode="prefix"`` and labels: more null-label rows than
        leading ``r = t`` rows (e.g. explicit times without ``prefix``), or ``num_classes`` unset.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import MeanFlowConfig, meanflow_loss
      >>> def apply(p, z, r, t):                        # a toy average-velocity model u(z, r, t)
      ...     return jnp.tanh(z @ p["w"]) * (1 + t - r)[:, None] + p["b"] * t[:, None]
      >>> params = {"w": jnp.eye(2), "b": jnp.ones(2)}
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
      >>> cfg = MeanFlowConfig(jvp_cond_weight=0.5, flow_matching_fraction=0.75)
      >>> loss, aux = meanflow_loss(apply, params, x, jax.random.PRNGKey(1), config=cfg)
      >>> sorted(aux), int(aux["loss_state"]["step"])
      (['jvp_cond_weight', 'loss_state', 'mse', 'mse_fm', 'mse_mf'], 1)
      >>> t = jnp.full(8, 0.5)
      >>> meanflow_loss(apply, params, x, jax.random.PRNGKey(1), t=t, r=t.at[3].set(0.7), config=cfg)
      Traceback (most recent call last):
        ...
      ValueError: meanflow_loss: r must satisfy 0 <= r <= t <= 1; 1 of 8 rows have r > t, first r[3] = 0.7 > t[3] = 0.5

    References:
      Geng et al. 2025 (arXiv 2505.13447) eqs. 9-11 and 19, adaptive weight sec. 4.3.
    """
    config = MeanFlowConfig() if config is None else config
    if not isinstance(config, MeanFlowConfig):
        raise TypeError(f"meanflow_loss: config must be a MeanFlowConfig, got {type(config).__name__}")
    _check_inputs(x, t, r, noise, y, config)
    _check_guidance_inputs(x, omega, interval, config)
    B, nd = x.shape[0], x.ndim
    k_time, k_noise, k_drop = jax.random.split(key, 3)
    r, t, n_eq = _time_pairs(config, k_time, x, t, r, prefix)
    e = jax.random.normal(k_noise, x.shape, x.dtype) if noise is None else jnp.asarray(noise, x.dtype)
    state = _loss_state(config, params, loss_state)
    p, c, reduction = config.adaptive_p, config.adaptive_c, config.reduction

    # The path and the regression velocity: v_c, or the guided v_g (then also the boundary u(z, t, t | y_in), or
    # the v-head's with aux_v_head; with guidance_conditioning the network inputs omega, interval as well).
    tb = _bcast(t, nd)
    z = (1 - tb) * x + tb * e
    v, boundary = e - x, None
    y_in, drop = _labels_in(config, k_drop, y, n_eq)
    aux_head = config.aux_v_head
    cond = cond_b = None  # network conditioning inputs at (z, r, t) and at the boundary r = t (vhat)
    if config.guidance_conditioning:
        g_omega, g_interval = _guidance_inputs(config, key, x, r, t, omega, interval)
        v, boundary, omega_b = conditioned_guided_velocity(
            apply_fn, params, z, t, v, y, omega=g_omega, interval=g_interval, null_class=config.num_classes,
            drop=drop, aux_v_head=aux_head,
        )
        cond = {"omega": g_omega, "interval": g_interval}
        cond_b = {"omega": omega_b, "interval": (jnp.zeros_like(t), jnp.ones_like(t))}
    elif config.guidance_on:
        v, boundary = guided_velocity(
            apply_fn, params, z, t, v, y, scale=config.guidance_scale, kappa=config.guidance_kappa,
            null_class=config.num_classes, interval=config.guidance_interval, drop=drop,
            **({"aux_v_head": True} if aux_head else {}),
        )
    if boundary is not None and (_is_head(config.vhat) != aux_head):
        boundary = None  # the guidance terms came from the other head than the one vhat asks for
    fm, mf = slice(0, n_eq), slice(n_eq, B)
    labels = lambda s: None if y_in is None else y_in[s]
    us, targets, v_auxs = [], [], []

    # Rows with r = t: flow matching, T = v.
    if n_eq > 0:
        out = _call(apply_fn, params, z[fm], t[fm], t[fm], labels(fm), _rows(cond, fm))
        u_fm, v_aux_fm = _heads(out, aux_head, "meanflow_loss")
        us.append(u_fm)
        v_auxs.append(v_aux_fm)
        targets.append(v[fm])

    # Rows with r < t: the JVP target at the coefficient lam.
    lam = jvp_cond_weight_at(config, state)
    new_state = {**state, "step": state["step"] + 1}
    extra = {}
    if n_eq < B:
        zm, rm, tm, vm, ym = z[mf], r[mf], t[mf], v[mf], labels(mf)
        vhat = None
        if config.two_tangents or not _is_one(lam):
            vhat = vhat_estimate(apply_fn, params, zm, tm, ym, source=config.vhat, ema_params=state.get("vhat_params"),
                                 boundary=None if boundary is None else boundary[mf], cond=_rows(cond_b, mf),
                                 aux_v_head=aux_head)
        heads_kw = {"cond": _rows(cond, mf), "aux_v_head": aux_head}
        if config.two_tangents:
            epshat = vm - vhat
            u_mf, base, j_eps, *v_aux_mf = two_tangent_jvp(apply_fn, params, zm, rm, tm, vhat, epshat, ym, **heads_kw)
            a = _bcast(tm - rm, nd) * j_eps
            # Weights at the coefficient in force, then (auto) update the pooled EMA, then the target.
            wts = adaptive_weights(per_row_error(u_mf, two_tangent_target(vm, tm - rm, base, j_eps, lam), reduction), p, c)
            num, den = control_variate_statistics(epshat, a, wts, axis_name)
            if config.auto:
                new_state = update_auto_state(new_state, num, den, config.auto_ema_decay)
                lam = _sg(auto_jvp_cond_weight(new_state["auto_num"], new_state["auto_den"], config.auto_init))
            T_mf = two_tangent_target(vm, tm - rm, base, j_eps, lam)
            extra = {"target_var": target_variance(epshat, a, lam, wts),
                     "lam_hat": jnp.clip(num / jnp.maximum(den, 1e-30), 0.0, 1.0)}
        else:
            u_mf, T_mf, _, *v_aux_mf = meanflow_target(apply_fn, params, zm, rm, tm, vm, vhat, lam, ym, **heads_kw)
        us.append(u_mf)
        v_auxs.append(v_aux_mf[0] if v_aux_mf else None)
        targets.append(T_mf)

    if _is_ema(config.vhat):
        new_state["vhat_params"] = update_vhat_ema(state["vhat_params"], params, config.vhat_ema_decay)

    u = jnp.concatenate(us, 0) if len(us) > 1 else us[0]
    target = jnp.concatenate(targets, 0) if len(targets) > 1 else targets[0]
    loss = adaptive_loss(per_row_error(u, target, reduction), p, c)
    aux = {**meanflow_metrics(u, target, r, t, lam), "loss_state": new_state, **extra}
    if aux_head:
        # The auxiliary v-head term: the same regression velocity v (v_c or v_g) for every row.
        v_aux = jnp.concatenate(v_auxs, 0) if len(v_auxs) > 1 else v_auxs[0]
        p_v = p if config.aux_v_adaptive_p is None else config.aux_v_adaptive_p
        c_v = c if config.aux_v_adaptive_c is None else config.aux_v_adaptive_c
        loss_v = adaptive_loss(per_row_error(v_aux, _sg(v), reduction), p_v, c_v)
        aux.update(loss_u=loss, loss_v=loss_v, mse_v=jnp.mean((v_aux - _sg(v)) ** 2))
        loss = loss + config.aux_v_weight * loss_v
    return loss, aux


def make_meanflow_loss_fn(apply_fn: Callable, config: MeanFlowConfig, *, axis_name: str | None = None):
    """Adapt :func:`meanflow_loss` to ``make_train_step(..., has_loss_state=True)``.

    Returns ``loss_fn(params, batch, key, loss_state) -> (loss, (metrics, new_loss_state))`` where
    ``batch`` is ``x`` or a dict ``{"x": x, "y": labels}``; ``metrics`` are the scalar entries of ``aux``.
    Initialise the train state with ``loss_state=meanflow_init_state(config, params)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlab.losses import MeanFlowConfig, make_meanflow_loss_fn, meanflow_init_state
      >>> apply = lambda p, z, r, t: jnp.tanh(z @ p) * (1 + t - r)[:, None]
      >>> cfg = MeanFlowConfig(jvp_cond_weight="auto", flow_matching_fraction=0.5)
      >>> loss_fn = make_meanflow_loss_fn(apply, cfg)
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (8, 2))
      >>> loss, (metrics, state) = loss_fn(jnp.eye(2), x, jax.random.PRNGKey(1), meanflow_init_state(cfg))
      >>> int(state["step"]), "target_var" in metrics
      (1, True)
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
    omega=None,
    interval=None,
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
      y: optional labels (guidance is baked into a MeanFlow model, so 1-NFE guided sampling is one call).
      omega, interval: the guidance conditioning inputs of a model trained with
        ``MeanFlowConfig.guidance_conditioning`` (the official iMF sampler's ``omega, t_min, t_max``): a
        scale (scalar or ``(B,)``) and an interval ``(t_lo, t_hi)`` (scalars or ``(B,)``), e.g.
        ``omega=8.0, interval=(0.4, 0.65)`` (the official iMF-B/2 evaluation setting). When either is
        given both are passed as keywords ``apply_fn(params, z, r, t[, y], omega=, interval=)`` (the other
        defaulting to ``1`` / ``(0, 1)``: no guidance), broadcast to ``(B,)``.

    A model with an auxiliary v-head (``apply_fn`` returning a pair ``(u, v_aux)``) is sampled with ``u``.

    Returns:
      samples, shape of ``noise``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.losses import meanflow_sample
      >>> apply = lambda p, z, r, t: z - p          # the exact average velocity when all data sit at p
      >>> meanflow_sample(apply, 3.0, jnp.array([[0.5, -1.0]]), steps=1).tolist()
      [[3.0, 3.0]]
    """
    if times is None:
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"meanflow_sample: steps must be a positive int, got {steps!r}")
        times = jnp.linspace(1.0, 0.0, steps + 1)
    times = jnp.asarray(times, noise.dtype)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"meanflow_sample: times must have shape (k + 1,) with k >= 1, got {times.shape}")
    B = noise.shape[0]
    cond = None
    if omega is not None or interval is not None:
        row = lambda a: jnp.broadcast_to(jnp.reshape(jnp.asarray(a, noise.dtype), (-1,)), (B,))
        lo, hi = (0.0, 1.0) if interval is None else interval
        cond = {"omega": row(1.0 if omega is None else omega), "interval": (row(lo), row(hi))}

    def body(z, i):
        t, r = times[i], times[i + 1]
        u = _call(apply_fn, params, z, jnp.full((B,), r, z.dtype), jnp.full((B,), t, z.dtype), y, cond)
        if isinstance(u, tuple | list):
            u = u[0]
        return z - (t - r) * u, None

    z, _ = jax.lax.scan(body, noise, jnp.arange(times.shape[0] - 1))
    return z
