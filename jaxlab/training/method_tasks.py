"""The methods as ``jaxlab train`` tasks: MeanFlow on toy 2D data, and a byte-level transformer LM
with STEP / STE / SR-STE / ASP N:M sparsity or LoRA + GRASP fine-tuning.

These adapters add nothing to the methods themselves: they wire the public pieces
(:func:`jaxlab.make_meanflow_loss_fn`, :func:`jaxlab.step_adamw` and baselines with
:func:`jaxlab.sparse_forward_params`, :func:`jaxlab.lora.inject` / ``merge`` / ``freeze_base`` with
:func:`jaxlab.grasp`) into the generic runtime, so a method runs from a YAML config on one CPU, under
``--dry-run`` for a TPU slice, or on a pod, through the same sharded step.

Registered names:

* model ``transformer`` (:class:`jaxlab.nn.transformer.Transformer`, options = its config fields)
* task ``meanflow`` (:class:`MeanFlowTaskOptions`) — uses model ``velocity_mlp``
* task ``lm`` (:class:`LMTaskOptions`) — uses model ``transformer``
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.distributed import unbox
from jaxlab.training.config import ConfigError, RunConfig
from jaxlab.training.tasks import Task, _toy2d_batch_fn, register_model, register_task

__all__ = ["MeanFlowTaskOptions", "LMTaskOptions", "TransformerOptions", "register_method_tasks"]


# --------------------------------------------------------------------------------------------- MeanFlow


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
        from jaxlab.losses import MeanFlowConfig

        return MeanFlowConfig(
            jvp_cond_weight=self.jvp_cond_weight, flow_matching_fraction=self.flow_matching_fraction,
            time_mu=self.time_mu, time_sigma=self.time_sigma, adaptive_p=self.adaptive_p, adaptive_c=self.adaptive_c,
        )


def _build_meanflow(cfg: RunConfig, opts: MeanFlowTaskOptions, model) -> Task:
    from jaxlab.losses import make_meanflow_loss_fn, meanflow_init_state, meanflow_sample
    from jaxlab.metrics import energy_distance, sliced_wasserstein2

    mf = opts.meanflow_config()
    batch_fn, sampler = _toy2d_batch_fn(cfg.data.name, cfg.data.batch_size, cfg.seed)
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


# --------------------------------------------------------------------------------------------- LM


@dataclasses.dataclass
class TransformerOptions:
    """The YAML-typed subset of :class:`jaxlab.nn.transformer.TransformerConfig` (byte vocabulary by default).

    A separate dataclass because the config validator types every field; ``TransformerConfig``'s dtype
    fields are ``Any`` (runs from configs stay float32). Validation of the values is the model config's.
    """

    vocab: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    positions: Literal["learned", "rotary"] = "learned"

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


def _build_transformer(opts: TransformerOptions, cfg):
    from jaxlab.nn.transformer import Transformer, TransformerConfig

    return Transformer(TransformerConfig(**dataclasses.asdict(opts)))


@dataclasses.dataclass
class LMTaskOptions:
    """Byte-level LM on the CPython standard library's sources (``jaxlab.data.load_stdlib_corpus``).

    ``method`` picks the optimizer: ``dense`` (AdamW from ``optim``), ``step`` (:func:`jaxlab.step_adamw`),
    ``ste``, ``sr_ste``, ``asp`` — each N:M one with the straight-through sparse forward.
    ``lora_rank > 0`` fine-tunes LoRA factors on ``lora_targets`` (base frozen); ``grasp_subspace``
    (``"random:K"`` for a random orthonormal K-dim basis, or a ``.npy`` file of shape ``(d_model, K)``,
    e.g. ``identify_spurious_subspace(...).U`` saved from a naive fine-tune) adds :func:`jaxlab.grasp`.
    """

    seq_len: int = 128
    max_train_bytes: int = 2_000_000
    max_val_bytes: int = 200_000
    eval_windows: int = 64
    method: Literal["dense", "step", "ste", "sr_ste", "asp"] = "dense"
    n: int = 2
    m: int = 4
    switch_eps: float = 1e-7
    t_min: int = 100
    t_max: int = 2000
    sr_ste_lambda: float = 2e-4
    prune_step: int = 500
    lora_rank: int = 0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["attn/(q|k|v|o)$", "mlp/(up|down)$"])
    grasp_subspace: str | None = None
    grasp_beta: float = 1.0

    def __post_init__(self):
        if self.n > self.m or self.n < 1:
            raise ValueError(f"need 1 <= n <= m, got n={self.n}, m={self.m}")
        if self.t_min > self.t_max:
            raise ValueError(f"t_min={self.t_min} > t_max={self.t_max}")
        if self.method != "dense" and (self.lora_rank > 0 or self.grasp_subspace is not None):
            raise ValueError(f"method {self.method!r} (N:M sparsity) does not combine with LoRA/GRASP; use method: dense")


def _grasp_basis(spec: str, d_model: int, seed: int) -> np.ndarray:
    if spec.startswith("random:"):
        k = int(spec.split(":", 1)[1])
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d_model, k)))
        return q.astype(np.float32)
    u = np.load(spec)
    if u.ndim != 2 or u.shape[0] != d_model:
        raise ConfigError(f"task.options.grasp_subspace: {spec} has shape {u.shape}, expected ({d_model}, k)")
    return u.astype(np.float32)


def _lm_tx(cfg: RunConfig, opts: LMTaskOptions, steps: int, params_like):
    from jaxlab import transforms as T

    o = cfg.optim
    if o.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, max(steps, o.warmup_steps + 1))
    elif o.warmup_steps > 0:
        sched = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    else:
        sched = o.learning_rate
    common = dict(n=opts.n, m=opts.m, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if opts.method == "step":
        tx = T.step_adamw(sched, switch_eps=opts.switch_eps, t_min=opts.t_min, t_max=opts.t_max,
                          sr_ste_lambda=opts.sr_ste_lambda, **common)
    elif opts.method == "ste":
        tx = T.ste_adamw(sched, **common)
    elif opts.method == "sr_ste":
        tx = T.sr_ste_adamw(sched, sr_ste_lambda=opts.sr_ste_lambda, **common)
    elif opts.method == "asp":
        tx = T.asp_adamw(sched, prune_step=opts.prune_step, **common)
    else:
        tx = optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if opts.lora_rank > 0:
        from jaxlab.nn import lora

        tx = lora.freeze_base(tx, params_like)
    if o.grad_clip is not None:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    if opts.grasp_subspace is not None:
        d_model = cfg.model.options.get("d_model", TransformerOptions.d_model)
        u = _grasp_basis(opts.grasp_subspace, d_model, cfg.seed)
        only = ("lora_a", "lora_b") if opts.lora_rank > 0 else None
        tx = optax.chain(tx, T.grasp(u, beta=opts.grasp_beta, only=only))
    return tx


def _build_lm(cfg: RunConfig, opts: LMTaskOptions, model) -> Task:
    from jaxlab.data.text import eval_windows, load_stdlib_corpus, random_windows
    from jaxlab.nn import lora
    from jaxlab.nn.transformer import causal_lm_loss
    from jaxlab.transforms import grasp_init_params, sparse_forward_params

    if cfg.model.name != "transformer":
        raise ConfigError(f"task 'lm' needs model.name: transformer, got {cfg.model.name!r}")
    if opts.seq_len > model.cfg.max_len:
        raise ConfigError(f"task.options.seq_len={opts.seq_len} exceeds model.options.max_len={model.cfg.max_len}")
    corpus = load_stdlib_corpus(max_train_bytes=opts.max_train_bytes, max_val_bytes=opts.max_val_bytes)
    nproc, pid = jax.process_count(), jax.process_index()
    if cfg.data.batch_size % nproc:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {nproc} processes")
    local = cfg.data.batch_size // nproc
    train = jnp.asarray(corpus.train)
    data_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x7E57)
    windows = jax.jit(lambda k: random_windows(train, k, local, opts.seq_len))

    def batch_fn(step: int):
        return np.asarray(windows(jax.random.fold_in(jax.random.fold_in(data_key, step), pid)))

    lora_on = opts.lora_rank > 0
    u = None
    if opts.grasp_subspace is not None:
        u = _grasp_basis(opts.grasp_subspace, model.cfg.d_model, cfg.seed)

    def init_params(key):
        params = model.init(key, jnp.zeros((1, opts.seq_len), jnp.int32))["params"]
        if lora_on:
            params = lora.inject(unbox(params), opts.lora_targets, opts.lora_rank, key=jax.random.fold_in(key, 1))
            if u is not None:
                params = grasp_init_params(params, u)
        return params

    sparse = opts.method != "dense"

    def forward(params):
        return lora.merge(params) if lora_on else params

    def loss_fn(params, batch, key):
        loss = causal_lm_loss(model.apply({"params": forward(params)}, batch), batch)
        return loss, {"bits_per_byte": loss / math.log(2.0)}

    val = jnp.asarray(eval_windows(corpus.val, opts.seq_len, opts.eval_windows, spread=True))

    @jax.jit
    def _eval(params):
        return causal_lm_loss(model.apply({"params": forward(params)}, val), val) / math.log(2.0)

    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0))

    def make_tx(optim, steps):
        return _lm_tx(cfg, opts, steps, unbox(abstract))

    return Task(
        init_params=init_params,
        loss_fn=loss_fn,
        batch_fn=batch_fn,
        eval_fn=lambda params, key: {"val_bits_per_byte": float(_eval(params))},
        make_tx=make_tx,
        forward_params_fn=sparse_forward_params if sparse else None,
        apply_fn=lambda params, tokens: model.apply({"params": forward(params)}, tokens),
        # LoRA: the frozen base gets no gradient at all (nothing computed or all-reduced for it)
        trainable=lora.trainable_mask(unbox(abstract)) if lora_on else None,
    )


def register_method_tasks() -> None:
    register_model("transformer", _build_transformer, TransformerOptions)
    register_task("meanflow", _build_meanflow, MeanFlowTaskOptions)
    register_task("lm", _build_lm, LMTaskOptions)

