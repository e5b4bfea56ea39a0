"""Built-in task for ``jaxlab train`` on a pretrained Hugging Face checkpoint: supervised fine-tuning (SFT)
with full weights, LoRA, LoRA + GRASP, or N:M sparsification (STEP / SR-STE / STE / ASP), then export.

Registered names: model ``hf`` (:class:`HFModelOptions`: a Hugging Face directory, read with
:func:`jaxlab.models.load_hf`), task ``sft`` (:class:`SFTTaskOptions`). The batches are packed JSONL
chat/prompt-response records (:func:`jaxlab.data.sft_batches`); the loss is the next-token cross-entropy
on the response tokens only, with attention kept inside each packed example. The pretrained weights are
read once, sharded as they are read under a mesh, and enter the jitted init as arguments.

When the run reaches its last step the task writes ``run_dir/hf/``: a Hugging Face directory of the
trained model (LoRA merged; N:M methods hard-pruned to exactly N:M, plus the compressed sidecar with
``export_nm``) with the tokenizer files, loadable by ``transformers`` and by :func:`jaxlab.models.load_hf`.
LoRA runs also write ``run_dir/adapter.safetensors`` (the factors), which a GRASP run identifies its
subspace from: ``task.options.grasp_subspace: identify:RUN_DIR`` (the naive LoRA run).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlab.data.sft import pack_examples, read_jsonl, render_example, sft_batches
from jaxlab.distributed import unbox
from jaxlab.models import decoder_from_hf, load_hf, load_tokenizer, save_hf
from jaxlab.nm import default_sparsify
from jaxlab.nn import lora
from jaxlab.nn.transformer import causal_lm_loss
from jaxlab.paths import path_keys, slash_path
from jaxlab.training.config import ConfigError, RunConfig
from jaxlab.training.methods import get_method
from jaxlab.training.registry import Task, register_model, register_task
from jaxlab.training.tasks_lm import _grasp_basis as lm_grasp_basis
from jaxlab.transforms import grasp, grasp_init_params, identify_spurious_subspace, prune

__all__ = ["HFModelOptions", "SFTTaskOptions", "load_adapter", "save_adapter"]

_DTYPE = {"auto": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class HFModelOptions:
    """A pretrained Hugging Face causal LM directory (Llama / Qwen2 / Gemma families).

    ``path`` defaults to the tiny random Llama the tests use; ``dtype: auto`` keeps the checkpoint's.
    """

    path: str = "tests/fixtures/hf/llama"
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"


def _build_hf_model(opts: HFModelOptions, cfg):
    return decoder_from_hf(opts.path, dtype=_DTYPE[opts.dtype], scan_layers=opts.scan_layers, remat=opts.remat)


@dataclasses.dataclass
class SFTTaskOptions:
    """SFT on JSONL records; see the module docstring.

    Attributes:
      data, val_data: JSONL files (``{"prompt", "response"}`` or ``{"messages": [...]}``).
      tokenizer: directory with ``tokenizer.json`` (``None``: the model directory).
      seq_len: packed row length.
      eval_rows: validation rows (packed) for the ``val_loss`` metric.
      lora_rank: ``> 0``: LoRA on ``lora_targets`` (module-path regexes), base frozen; ``lora_alpha`` the
        scale numerator (``None``: scale 1).
      grasp_subspace: ``None``; ``random:K``; a ``.npy`` ``(d_model, K)``; or ``identify:RUN_DIR`` (the
        subspace identified from RUN_DIR's ``adapter.safetensors``, a naive LoRA run; with ``identify_k``
        directions, ``None`` = chosen by the eigengap). GRASP then projects the LoRA updates.
      grasp_beta: projection strength.
      sparsify_unembed: N:M methods also sparsify the output projection (default: only the layers' q, k,
        v, o, gate, up, down).
      export: write ``run_dir/hf`` at the end; ``export_nm``: also the compressed N:M sidecar.
    """

    data: str = "tests/fixtures/hf/sft/train.jsonl"
    val_data: str | None = "tests/fixtures/hf/sft/val.jsonl"
    tokenizer: str | None = None
    seq_len: int = 128
    eval_rows: int = 16
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["attn/(q|k|v|o)$", "mlp/(gate|up|down)$"])
    grasp_subspace: str | None = None
    grasp_beta: float = 1.0
    identify_k: int | None = None
    sparsify_unembed: bool = False
    export: bool = True
    export_nm: bool = False


# --------------------------------------------------------------------------------------- adapters


def save_adapter(path, params) -> Path:
    """Write the LoRA factors of ``params`` (``lora_a``/``lora_b`` leaves) to one safetensors file, keyed by
    their slash paths (e.g. ``layers/layer/attn/q/lora_a``)."""
    from safetensors.numpy import save_file

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    arrays = {slash_path(p): np.asarray(jax.device_get(x)) for p, x in leaves if path_keys(p)[-1] in ("lora_a", "lora_b")}
    if not arrays:
        raise ValueError("save_adapter: params hold no lora_a/lora_b leaves")
    save_file(arrays, str(path), metadata={"format": "jaxlab-lora"})
    return Path(path)


def load_adapter(path) -> dict:
    """The nested LoRA-factor tree :func:`save_adapter` wrote (input of ``identify_spurious_subspace``)."""
    from safetensors.numpy import load_file

    out: dict = {}
    for name, arr in load_file(str(path)).items():
        d = out
        keys = name.split("/")
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = arr
    return out


def _grasp_basis(spec: str, d_model: int, seed: int, k: int | None, lora_alpha, rank):
    """``(U, identification or None)`` for ``task.options.grasp_subspace`` (``random:K`` and ``.npy`` as in the
    ``lm`` task)."""
    if spec.startswith("identify:"):
        src = Path(spec.split(":", 1)[1])
        adapter = src / "adapter.safetensors" if src.is_dir() else src
        if not adapter.exists():
            raise ConfigError(f"task.options.grasp_subspace: {adapter} does not exist (run the naive LoRA config first)")
        scale = 1.0 if lora_alpha is None else lora_alpha / rank
        ident = identify_spurious_subspace(load_adapter(adapter), k=k, scale=scale)
        return np.asarray(ident.U, np.float32), ident
    return lm_grasp_basis(spec, d_model, seed), None


# --------------------------------------------------------------------------------------- batches


class _StepBatches:
    """``batch_fn(step)`` over the packed SFT stream: deterministic per step, so a resumed run sees the
    batches an uninterrupted one would (a jump re-creates the stream and skips ahead)."""

    def __init__(self, make):
        self.make, self.it, self.next = make, None, 0

    def __call__(self, step: int):
        if self.it is None or step != self.next:
            self.it, self.next = self.make(), 0
            for _ in range(step):
                next(self.it)
                self.next += 1
        self.next += 1
        return next(self.it)


def _batch_loss(model, params, batch):
    logits = model.apply(
        {"params": params}, batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    return causal_lm_loss(logits, batch["tokens"], mask=batch["loss_mask"])


def _build_sft(cfg: RunConfig, opts: SFTTaskOptions, model) -> Task:
    if cfg.model.name != "hf":
        raise ConfigError(f"task 'sft' needs model.name: hf, got {cfg.model.name!r}")
    method = get_method(cfg.optim.name)
    lora_on = opts.lora_rank > 0
    if method.sparse and (lora_on or opts.grasp_subspace is not None):
        raise ConfigError(f"optim.name: {cfg.optim.name!r} (N:M sparsity) does not combine with LoRA/GRASP "
                          "(task.options.lora_rank / grasp_subspace)")
    if opts.grasp_subspace is not None and not lora_on:
        raise ConfigError("task.options.grasp_subspace needs task.options.lora_rank > 0 (GRASP projects LoRA updates)")
    model_path = Path(cfg.model.options["path"] if isinstance(cfg.model.options, dict) else cfg.model.options.path)
    tok = load_tokenizer(opts.tokenizer or model_path)
    if tok.vocab_size > model.cfg.vocab:
        raise ConfigError(f"task.options.tokenizer: {tok.vocab_size} tokens, but the model's vocabulary has "
                          f"{model.cfg.vocab}")
    for f in (opts.data, opts.val_data):
        if f is not None and not Path(f).exists():
            raise ConfigError(f"task.options: data file {f} does not exist")
    nproc, pid = jax.process_count(), jax.process_index()
    if cfg.data.batch_size % nproc:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is not divisible by the {nproc} processes")
    records = list(read_jsonl(opts.data))
    batch_fn = _StepBatches(lambda: sft_batches(
        records, tok, seq_len=opts.seq_len, batch_size=cfg.data.batch_size // nproc, seed=cfg.seed,
        process_index=pid, process_count=nproc, progress=False))

    dtype = model.cfg.param_dtype
    u = ident = None
    if opts.grasp_subspace is not None:
        u, ident = _grasp_basis(opts.grasp_subspace, model.cfg.d_model, cfg.seed, opts.identify_k,
                                opts.lora_alpha, opts.lora_rank)

    def load_base(mesh):
        _, params = load_hf(model_path, mesh=mesh, dtype=dtype, scan_layers=model.cfg.scan_layers,
                            remat=model.cfg.remat)
        return params

    abstract_base = unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])

    def init_params(key, base):
        params = base
        if lora_on:
            params = lora.inject(params, opts.lora_targets, opts.lora_rank, key=jax.random.fold_in(key, 1))
            if u is not None:
                params = grasp_init_params(params, u)
        return params

    def forward(params):
        return lora.merge(params, alpha=opts.lora_alpha) if lora_on else params

    def loss_fn(params, batch, key):
        loss = _batch_loss(model, forward(params), batch)
        return loss, {"response_tokens": jnp.sum(batch["loss_mask"])}

    eval_fn = None
    if opts.val_data is not None:
        rows = list(pack_examples((render_example(r, tok) for r in read_jsonl(opts.val_data)), opts.seq_len,
                                  pad_id=tok.pad_id))[: opts.eval_rows]
        val = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
        _eval = jax.jit(lambda p: _batch_loss(model, forward(p), val))

        def eval_fn(params, key):
            return {"val_loss": float(_eval(params))}

    abstract = jax.eval_shape(init_params, jax.random.PRNGKey(0), abstract_base)

    def wrap_tx(tx):
        if lora_on:
            tx = lora.freeze_base(tx, abstract)
        if u is not None:
            tx = optax.chain(tx, grasp(u, beta=opts.grasp_beta, only=("lora_a", "lora_b")))
        return tx

    optim_hyper = None
    if method.sparse:
        m = int(cfg.optim.options.get("m", 4))

        def sparsify(path, leaf):
            keys = path_keys(path)
            if not opts.sparsify_unembed and keys[:1] == ("unembed",):
                return False
            return default_sparsify(path, leaf, m)

        optim_hyper = {"sparsify": sparsify}

    def report_fn(params, run_dir):
        if ident is None:
            return []
        np.save(run_dir / "grasp_U.npy", np.asarray(ident.U))
        return [
            "## GRASP subspace (identified from the naive LoRA run)",
            "",
            f"source: `{opts.grasp_subspace}`; k = {ident.k}; eigengap = {ident.eigengap:.3g}; "
            f"explained energy = {ident.explained_energy:.3g}; trustworthy = {ident.trustworthy} "
            f"({ident.reason or 'eigengap >= 2'}). U saved to `grasp_U.npy`.",
            "",
        ]

    def export_fn(state, run_dir):
        lines = []
        params = state.params
        if lora_on:
            save_adapter(run_dir / "adapter.safetensors", params)
            lines.append("LoRA factors: `adapter.safetensors`.")
        nm = None
        if method.sparse:
            params = prune(params, state.opt_state)
            if opts.export_nm:
                nm = (int(cfg.optim.options.get("n", 2)), int(cfg.optim.options.get("m", 4)))
        if opts.export:
            out = save_hf(run_dir / "hf", model, params, lora_alpha=opts.lora_alpha, nm=nm)
            tok_src = Path(opts.tokenizer or model_path)
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
                if (tok_src / f).exists():
                    shutil.copy(tok_src / f, out / f)
            lines.append(f"Exported Hugging Face directory: `{out}`" + (" (+ N:M sidecar)" if nm else "") + ".")
        return ["## Export", "", *lines, ""] if lines else []

    return Task(
        init_params=init_params,
        loss_fn=loss_fn,
        batch_fn=batch_fn,
        eval_fn=eval_fn,
        report_fn=report_fn,
        wrap_tx=wrap_tx,
        apply_fn=lambda params, tokens: model.apply({"params": forward(params)}, tokens),
        trainable=lora.trainable_mask(abstract) if lora_on else None,
        load_base=load_base,
        abstract_base=abstract_base,
        export_fn=export_fn,
        optim_hyper=optim_hyper,
    )


register_model("hf", _build_hf_model, HFModelOptions)
register_task("sft", _build_sft, SFTTaskOptions)
