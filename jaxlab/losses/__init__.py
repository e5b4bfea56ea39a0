"""Losses: flow matching (and MeanFlow with its variance-reduced family)."""

from jaxlab.losses.flow_matching import euler_sample, flow_matching_loss

__all__ = ["euler_sample", "flow_matching_loss"]
