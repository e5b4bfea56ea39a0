"""Losses: flow matching (and MeanFlow with its variance-reduced family)."""

from jaxlab.losses.coupling import OT_METHODS, ot_couple
from jaxlab.losses.flow_matching import euler_sample, flow_matching_loss
from jaxlab.losses.meanflow import (
    MeanFlowConfig,
    adaptive_loss,
    adaptive_weights,
    auto_jvp_cond_weight,
    conditioned_guided_velocity,
    control_variate_statistics,
    drop_label_prefix,
    drop_labels,
    guided_velocity,
    jvp_cond_weight_at,
    make_meanflow_loss_fn,
    meanflow_init_state,
    meanflow_loss,
    meanflow_metrics,
    meanflow_sample,
    meanflow_target,
    per_row_error,
    sample_guidance_conditions,
    target_variance,
    two_tangent_jvp,
    two_tangent_target,
    update_auto_state,
    update_vhat_ema,
    vhat_estimate,
)
from jaxlab.losses.oracle import GMMOracle, gmm_oracle
from jaxlab.losses.time_sampling import logit_normal_time_pairs, num_flow_matching_rows

__all__ = ["euler_sample", "flow_matching_loss", "ot_couple", "OT_METHODS"]
__all__ += [
    "MeanFlowConfig",
    "meanflow_loss",
    "meanflow_target",
    "meanflow_init_state",
    "make_meanflow_loss_fn",
    "meanflow_sample",
    "GMMOracle",
    "gmm_oracle",
    "logit_normal_time_pairs",
    "num_flow_matching_rows",
]
# the named pieces meanflow_loss is composed of (see jaxlab.losses.meanflow)
__all__ += [
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
