"""Losses: flow matching (and MeanFlow with its variance-reduced family)."""

from jaxlab.losses.flow_matching import euler_sample, flow_matching_loss
from jaxlab.losses.meanflow import (
    MeanFlowConfig,
    make_meanflow_loss_fn,
    meanflow_init_state,
    meanflow_loss,
    meanflow_sample,
    meanflow_target,
)
from jaxlab.losses.oracle import GMMOracle, gmm_oracle
from jaxlab.losses.time_sampling import logit_normal_time_pairs, num_flow_matching_rows

__all__ = ["euler_sample", "flow_matching_loss"]
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
