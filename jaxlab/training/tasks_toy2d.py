"""Built-in toy-2D tasks for ``jaxlab train``: flow matching and MeanFlow on the 2D distributions of
:mod:`jaxlab.data.toy2d`, with the :class:`jaxlab.nn.VelocityMLP` model.

Registered names: model ``velocity_mlp`` (:class:`VelocityMLPOptions`), tasks ``flow_matching``
(:class:`FlowMatchingOptions`) and ``meanflow`` (:class:`MeanFlowTaskOptions`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.data import TOY2D_DATASETS, toy2d_sampler
from jaxlab.losses import (
    MeanFlowConfig,
    euler_sample,
    flow_matching_loss,
    make_meanflow_loss_fn,
    meanflow_init_state,
    meanflow_sample,
)
from jaxlab.metrics import energy_distance, sliced_wasserstein2
from jaxlab.nn import VelocityMLP
from jaxlab.training.config import ConfigError, RunConfig
from jaxlab.training.registry import Task, register_model, register_task

__all__ = ["FlowMatchingOptions", "MeanFlowTaskOptions", "VelocityMLPOptions", "toy2d_batch_fn"]


@dataclasses.dataclass
class VelocityMLPOptions:
    """Options of :class:`jaxlab.nn.VelocityMLP` (see its docstring)."""

    hidden: int = 256
    depth: int = 4
    time_dim: int = 64
    time_scale: float = 1000.0

    def __post_init__(self):
        if self.hidden <= 0 or self.depth <= 0:
            raise ValueError(f"hidden and depth must be positive, got hidden={self.hidden}, depth={self.depth}")
        if self.time_dim % 2:
            raise ValueError(f"time_dim must be even, got {self.time_dim}")


def _build_velocity_mlp(opts: VelocityMLPOptions, cfg):
    return VelocityMLP(hidden=opts.hidden, depth=opts.depth, time_dim=opts.time_dim, time_scale=opts.time_scale)


@dataclasses.dataclass
class FlowMatchingOptions:
    """Flow matching on a toy 2D dataset: Euler steps used to sample, projections for SW2."""

    sample_steps: int = 50
    sw_projections: int = 1024

    def __post_init__(self):
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.sw_projections < 1:
            raise ValueError(f"sw_projections must be >= 1, got {self.sw_projections}")


def toy2d_batch_fn(name: str, batch_size: int, seed: int):
    """``(batch_fn, sampler)``: ``batch_fn(step)`` is this process's share of step ``step``'s batch, a pure
    function of ``(seed, step, process)`` so a resumed run sees the same data."""
    sampler = jax.jit(toy2d_sampler(name), static_argnums=1)
    nproc, pid = jax.process_count(), jax.process_index()
    if batch_size % nproc:
        raise ConfigError(f"data.batch_size={batch_size} is not divisible by the {nproc} processes")
    local = batch_size // nproc
    data_key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xDA7A)

    def batch_fn(step: int):
        key = jax.random.fold_in(jax.random.fold_in(data_key, step), pid)
        return np.asarray(sampler(key, local))

    return batch_fn, sampler


def _build_flow_matching(cfg: RunConfig, opts: FlowMatchingOptions, model: nn.Module) -> Task:
    batch_fn, sampler = toy2d_batch_fn(cfg.data.name, cfg.data.batch_size, cfg.seed)
    apply_fn = lambda params, z, r, t: model.apply({"params": params}, z, r, t)

    def init_params(key):
        return model.init(key, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.ones((1,)))["params"]

    def loss_fn(params, batch, key):
        return flow_matching_loss(apply_fn, params, batch, key)

    n_eval = cfg.data.eval_size

    @jax.jit
    def _eval(params, key):
        kn, kd, kp = jax.random.split(key, 3)
        gen = euler_sample(apply_fn, params, jax.random.normal(kn, (n_eval, 2)), steps=opts.sample_steps)
        ref = sampler(kd, n_eval)
        return {
            "sw2": sliced_wasserstein2(gen, ref, kp, opts.sw_projections),
            "energy": energy_distance(gen, ref),
        }

    def eval_fn(params, key):
        return {k: float(v) for k, v in _eval(params, key).items()}

    def report_fn(params, run_dir: Path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        key = jax.random.PRNGKey(cfg.seed + 1)
        gen = np.asarray(euler_sample(apply_fn, params, jax.random.normal(key, (n_eval, 2)), steps=opts.sample_steps))
        ref = np.asarray(sampler(jax.random.fold_in(key, 1), n_eval))
        fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
        axes[0].scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.5)
        axes[0].set_title(f"data: {cfg.data.name}")
        axes[1].scatter(gen[:, 0], gen[:, 1], s=2, alpha=0.5, color="C1")
        axes[1].set_title(f"flow matching, {opts.sample_steps} Euler steps")
        for ax in axes:
            ax.set_xlim(-3.5, 3.5)
            ax.set_ylim(-3.5, 3.5)
            ax.set_aspect("equal")
        fig.tight_layout()
        (run_dir / "plots").mkdir(parents=True, exist_ok=True)
        fig.savefig(run_dir / "plots" / "samples.png", dpi=110)
        plt.close(fig)
        return ["![samples](plots/samples.png)"]

    return Task(
        init_params=init_params,
        loss_fn=loss_fn,
        batch_fn=batch_fn,
        eval_fn=eval_fn,
        report_fn=report_fn,
        apply_fn=apply_fn,
    )


@dataclasses.dataclass
class MeanFlowTaskOptions:
    """MeanFlow on a toy 2D dataset (see :class:`jaxlab.MeanFlowConfig` for the meaning of each knob).

    ``jvp_cond_weight``: 1.0 = original MeanFlow, 0.0 = improved-MeanFlow tangent, or ``"auto"``.
    ``eval_nfe``: sampler steps used for the evaluation metrics (1 = one-step generation).
    """

    jvp_cond_weight: float | str = 1.0
    flow_matching_fraction: float = 0.75
    time_mu: float = -0.4
    time_sigma: float = 1.0
    adaptive_p: float = 1.0
    adaptive_c: float = 1e-3
    eval_nfe: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    sw_projections: int = 1024

    def __post_init__(self):
        if isinstance(self.jvp_cond_weight, str) and self.jvp_cond_weight != "auto":
            raise ValueError(f"jvp_cond_weight must be a number in [0, 1] or 'auto', got {self.jvp_cond_weight!r}")
        if not self.eval_nfe or any(k < 1 for k in self.eval_nfe):
            raise ValueError(f"eval_nfe must be a non-empty list of positive step counts, got {self.eval_nfe}")

    def meanflow_config(self):
        return MeanFlowConfig(
            jvp_cond_weight=self.jvp_cond_weight, flow_matching_fraction=self.flow_matching_fraction,
            time_mu=self.time_mu, time_sigma=self.time_sigma, adaptive_p=self.adaptive_p, adaptive_c=self.adaptive_c,
        )


def _build_meanflow(cfg: RunConfig, opts: MeanFlowTaskOptions, model) -> Task:

    mf = opts.meanflow_config()
    batch_fn, sampler = toy2d_batch_fn(cfg.data.name, cfg.data.batch_size, cfg.seed)
    apply_fn = lambda params, z, r, t: model.apply({"params": params}, z, r, t)
    init_params = lambda key: model.init(key, jnp.zeros((1, 2)), jnp.zeros((1,)), jnp.ones((1,)))["params"]
    n_eval = cfg.data.eval_size

    @jax.jit
    def _eval(params, key):
        kn, kd, kp = jax.random.split(key, 3)
        ref = sampler(kd, n_eval)
        noise = jax.random.normal(kn, (n_eval, 2))
        out = {}
        for k in opts.eval_nfe:
            gen = meanflow_sample(apply_fn, params, noise, steps=k)
            out[f"sw2_{k}nfe"] = sliced_wasserstein2(gen, ref, kp, opts.sw_projections)
            out[f"energy_{k}nfe"] = energy_distance(gen, ref)
        return out

    return Task(
        init_params=init_params,
        loss_fn=make_meanflow_loss_fn(apply_fn, mf),
        batch_fn=batch_fn,
        eval_fn=lambda params, key: {k: float(v) for k, v in _eval(params, key).items()},
        has_loss_state=True,
        init_loss_state=meanflow_init_state(mf),
        apply_fn=apply_fn,
    )


register_model("velocity_mlp", _build_velocity_mlp, VelocityMLPOptions)
register_task("flow_matching", _build_flow_matching, FlowMatchingOptions, datasets=TOY2D_DATASETS)
register_task("meanflow", _build_meanflow, MeanFlowTaskOptions, datasets=TOY2D_DATASETS)
