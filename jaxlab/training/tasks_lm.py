"""Built-in language-model task for ``jaxlab train``: a byte-level decoder LM on the CPython standard
library's sources, trained with any registered method (``optim.name``: AdamW, STEP / STE / SR-STE /
ASP N:M sparsity, ...) or fine-tuned with LoRA (+ GRASP).

The task adds nothing to the methods themselves: it wires the public pieces (the method registry,
:func:`jaxlab.sparse_forward_params`, :func:`jaxlab.lora.inject` / ``merge`` / ``freeze_base``,
:func:`jaxlab.grasp`) into the generic runtime, so a method runs from a YAML config on one CPU, under
``--dry-run`` for a TPU slice, or on a pod, through the same sharded step.

Registered names: model ``transformer`` (:class:`TransformerOptions`), task ``lm`` (:class:`LMTaskOptions`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.data.text import eval_windows, load_stdlib_corpus, random_windows
from jaxlab.distributed import unbox
from jaxlab.nn import lora
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss
from jaxlab.training.config import ConfigError, RunConfig
from jaxlab.training.methods import get_method
from jaxlab.training.registry import Task, register_model, register_task
from jaxlab.transforms import grasp, grasp_init_params

__all__ = ["LMTaskOptions", "TransformerOptions"]


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
    return Transformer(TransformerConfig(**dataclasses.asdict(opts)))


@dataclasses.dataclass
class LMTaskOptions:
    """Byte-level LM on the CPython standard library's sources (``jaxlab.data.load_stdlib_corpus``).

    The optimizer is ``optim.name`` from the method registry: ``adamw`` (dense), or an N:M method
    (``step``, ``ste``, ``sr_ste``, ``asp``; their ``n``, ``m``, ``switch_eps``... under
    ``optim.options``), which trains with the straight-through sparse forward.
    ``lora_rank > 0`` fine-tunes LoRA factors on ``lora_targets`` (base frozen); ``grasp_subspace``
    (``"random:K"`` for a random orthonormal K-dim basis, or a ``.npy`` file of shape ``(d_model, K)``,
    e.g. ``identify_spurious_subspace(...).U`` saved from a naive fine-tune) adds :func:`jaxlab.grasp`
    after the optimizer.
    """

    seq_len: int = 128
    max_train_bytes: int = 2_000_000
    max_val_bytes: int = 200_000
    eval_windows: int = 64
    lora_rank: int = 0
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["attn/(q|k|v|o)$", "mlp/(up|down)$"])
    grasp_subspace: str | None = None
    grasp_beta: float = 1.0


def _grasp_basis(spec: str, d_model: int, seed: int) -> np.ndarray:
    if spec.startswith("random:"):
        k = int(spec.split(":", 1)[1])
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d_model, k)))
        return q.astype(np.float32)
    u = np.load(spec)
    if u.ndim != 2 or u.shape[0] != d_model:
        raise ConfigError(f"task.options.grasp_subspace: {spec} has shape {u.shape}, expected ({d_model}, k)")
    return u.astype(np.float32)


def _build_lm(cfg: RunConfig, opts: LMTaskOptions, model) -> Task:
    sparse = get_method(cfg.optim.name).sparse
    if sparse and (opts.lora_rank > 0 or opts.grasp_subspace is not None):
        raise ConfigError(f"optim.name: {cfg.optim.name!r} (N:M sparsity) does not combine with LoRA/GRASP "
                          "(task.options.lora_rank / grasp_subspace); use a dense method such as adamw")
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

    def wrap_tx(tx):
        if lora_on:
            tx = lora.freeze_base(tx, unbox(abstract))
        if u is not None:
            tx = optax.chain(tx, grasp(u, beta=opts.grasp_beta, only=("lora_a", "lora_b") if lora_on else None))
        return tx

    return Task(
        init_params=init_params,
        loss_fn=loss_fn,
        batch_fn=batch_fn,
        eval_fn=lambda params, key: {"val_bits_per_byte": float(_eval(params))},
        wrap_tx=wrap_tx,
        apply_fn=lambda params, tokens: model.apply({"params": forward(params)}, tokens),
        # LoRA: the frozen base gets no gradient at all (nothing computed or all-reduced for it)
        trainable=lora.trainable_mask(unbox(abstract)) if lora_on else None,
    )


register_model("transformer", _build_transformer, TransformerOptions)
register_task("lm", _build_lm, LMTaskOptions)
