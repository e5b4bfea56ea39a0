"""Hugging Face checkpoints in and out: ``config.json`` + safetensors <-> :class:`jaxlab.nn.Decoder`.

:func:`load_hf` reads a Hugging Face model directory (``config.json`` and one ``model.safetensors`` or
sharded ``model-XXXXX-of-YYYYY.safetensors`` with ``model.safetensors.index.json``) of a Llama-2/3,
Qwen2/2.5 or Gemma 1/2 causal LM and returns ``(model, params)`` whose logits are ``transformers``'
(checked by the fixture tests to <= 1e-4 in float32). With a ``mesh``, every parameter is created
with its sharding (logical axis names -> :data:`jaxlab.distributed.DEFAULT_RULES`) by
``jax.make_array_from_callback``: each device's block is read from the file as a slice, so no host ever
holds the whole model. :func:`save_hf` writes the directory back (LoRA factors merged, N:M-pruned
weights as dense tensors, optionally the compressed N:M form as a sidecar ``nm_compressed.safetensors``
that :func:`load_hf` reads with ``nm_sidecar=True``).

Layout conversion: PyTorch ``nn.Linear.weight`` is ``(d_out, d_in)``, a Flax ``Dense`` kernel
``(d_in, d_out)``: every projection is transposed on the way in and out; embeddings and norm scales are
copied as they are. Gemma's RMSNorm weights ``w`` are stored as such (the model applies ``1 + w``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlab.distributed.sharding import DEFAULT_RULES, param_shardings
from jaxlab.nm import NMCompressed, compress, decompress, reduction_axis
from jaxlab.nn import lora
from jaxlab.nn.decoder import Decoder, DecoderConfig
from jaxlab.paths import path_keys

__all__ = [
    "SUPPORTED_FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "decoder_from_hf",
    "hf_tensor_map",
    "load_hf",
    "save_hf",
]

SUPPORTED_FAMILIES = ("llama", "qwen2", "gemma", "gemma2")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
         "gemma2": "Gemma2ForCausalLM"}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "gelu": "gelu"}
#: Stored by some exporters; derived, never a parameter.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SIDECAR = "nm_compressed.safetensors"


# ----------------------------------------------------------------------------------------------- config


def _rope_from_hf(hf: Mapping) -> dict:
    """RoPE fields from either layout: ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (checkpoints written by transformers 4, e.g. every Llama 3 on the Hub)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    out = {"rope_base": float(theta)}
    if kind in (None, "default"):
        return out
    if kind == "linear":
        return out | {"rope_scaling": "linear", "rope_factor": float(merged["factor"])}
    if kind == "llama3":
        return out | {
            "rope_scaling": "llama3",
            "rope_factor": float(merged["factor"]),
            "rope_low_freq_factor": float(merged["low_freq_factor"]),
            "rope_high_freq_factor": float(merged["high_freq_factor"]),
            "rope_original_max_len": int(merged["original_max_position_embeddings"]),
        }
    raise ValueError(f"config.json: RoPE scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def config_from_hf(hf: Mapping, *, dtype=None, scan_layers: bool = True, remat: str = "none") -> DecoderConfig:
    """:class:`DecoderConfig` of a Hugging Face ``config.json`` (as a dict).

    Args:
      hf: the parsed ``config.json``.
      dtype: parameter and computation dtype (``None``: the checkpoint's ``torch_dtype``/``dtype``, else
        float32).
      scan_layers, remat: passed to the config (see :class:`DecoderConfig`).

    Raises:
      ValueError: an architecture outside :data:`SUPPORTED_FAMILIES` (named with its ``architectures``),
        or an option of a supported family that the decoder does not implement.

    Example:
      >>> from jaxlab.models import config_from_hf
      >>> llama3_8b = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
      ...     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
      ...     "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
      ...     "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      ...                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      ...     "torch_dtype": "bfloat16", "tie_word_embeddings": False}
      >>> cfg = config_from_hf(llama3_8b)
      >>> cfg.kv_heads, cfg.dh, cfg.rope_scaling, cfg.param_dtype.__name__
      (8, 128, 'llama3', 'bfloat16')
      >>> config_from_hf({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]})
      Traceback (most recent call last):
      ...
      ValueError: config.json: architecture 'qwen3' (Qwen3ForCausalLM) is not supported; supported model_type: llama, qwen2, gemma, gemma2
    """
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        archs = ", ".join(hf.get("architectures") or []) or "no architectures listed"
        raise ValueError(
            f"config.json: architecture {family!r} ({archs}) is not supported; "
            f"supported model_type: {', '.join(SUPPORTED_FAMILIES)}"
        )
    req = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in req if k not in hf]
    if missing:
        raise ValueError(f"config.json ({family}): missing keys {missing}")
    if dtype is None:
        name = hf.get("torch_dtype") or hf.get("dtype") or "float32"
        if name not in _DTYPES:
            raise ValueError(f"config.json: dtype {name!r} not one of {sorted(_DTYPES)}; pass dtype=")
        dtype = _DTYPES[name]
    gemma = family in ("gemma", "gemma2")
    if gemma:  # the Gemma reference uses tanh-GELU; old configs say "gelu" in hidden_act
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        act = hf.get("hidden_act", "silu")
    if act not in _ACT:
        raise ValueError(f"config.json: activation {act!r} not supported (supported: {sorted(_ACT)})")
    n_layers = int(hf["num_hidden_layers"])
    kw: dict[str, Any] = dict(
        vocab=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=n_layers,
        n_heads=int(hf["num_attention_heads"]),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"])),
        d_ff=int(hf["intermediate_size"]),
        mlp_activation=_ACT[act],
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        scan_layers=scan_layers,
        remat=remat,
        dtype=dtype,
        param_dtype=dtype,
        family=family,
        **_rope_from_hf(hf),
    )
    if family == "llama":
        kw |= dict(qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
                   mlp_bias=bool(hf.get("mlp_bias", False)))
    elif family == "qwen2":
        if hf.get("use_sliding_window"):
            raise ValueError("config.json (qwen2): use_sliding_window=true is not supported")
        kw |= dict(qkv_bias=True)
    else:
        kw |= dict(norm_offset=1.0, embed_scale=True, qkv_bias=bool(hf.get("attention_bias", False)),
                   o_bias=bool(hf.get("attention_bias", False)))
    if family == "gemma2":
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                          for i in range(n_layers)]
        kw |= dict(
            sandwich_norms=True,
            query_scale=float(hf.get("query_pre_attn_scalar", kw["head_dim"])) ** -0.5,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            sliding_window=hf.get("sliding_window"),
            layer_types=tuple("sliding" if t == "sliding_attention" else "full" for t in types),
        )
    return DecoderConfig(**kw)


def config_to_hf(cfg: DecoderConfig, base: Mapping | None = None) -> dict:
    """The ``config.json`` dict of ``cfg`` (written in the transformers-4 layout, which 4.x and 5.x read).

    Keys of ``base`` (e.g. the loaded checkpoint's own config: token ids, context length) are kept unless
    ``cfg`` determines them.
    """
    if cfg.family not in SUPPORTED_FAMILIES:
        raise ValueError(f"config_to_hf: DecoderConfig.family must be one of {SUPPORTED_FAMILIES}, got {cfg.family!r}")
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "dtype", "transformers_version")}
    dtype = {jnp.dtype(v): k for k, v in _DTYPES.items()}[jnp.dtype(cfg.param_dtype)]
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[cfg.mlp_activation]
    out |= {
        "architectures": [_ARCH[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dh,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
    }
    if cfg.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    else:
        out["rope_scaling"] = None
    if cfg.family in ("gemma", "gemma2"):
        out["hidden_activation"] = act
        out["hidden_act"] = act
        out["attention_bias"] = cfg.qkv_bias
    else:
        out["hidden_act"] = act
    if cfg.family == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "gemma2":
        out |= {
            "query_pre_attn_scalar": (cfg.query_scale or cfg.dh**-0.5) ** -2,
            "attn_logit_softcapping": cfg.attn_logit_softcap,
            "final_logit_softcapping": cfg.final_logit_softcap,
            "sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers],
        }
        q = out["query_pre_attn_scalar"]
        if abs(q - round(q)) < 1e-6:
            out["query_pre_attn_scalar"] = int(round(q))
    return out


# ----------------------------------------------------------------------------------------------- names


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where a jaxlab leaf lives in the checkpoint: one key, or one key per layer (stacked leaf)."""

    keys: tuple[str, ...]
    transpose: bool
    stacked: bool


def _layer_entries(cfg: DecoderConfig) -> list[tuple[tuple[str, ...], str, bool]]:
    e = []
    for p in ("q", "k", "v", "o"):
        e.append((("attn", p, "kernel"), f"self_attn.{p}_proj.weight", True))
        if (cfg.qkv_bias and p != "o") or (cfg.o_bias and p == "o"):
            e.append((("attn", p, "bias"), f"self_attn.{p}_proj.bias", False))
    for p in ("gate", "up", "down"):
        e.append((("mlp", p, "kernel"), f"mlp.{p}_proj.weight", True))
        if cfg.mlp_bias:
            e.append((("mlp", p, "bias"), f"mlp.{p}_proj.bias", False))
    e.append((("attn_norm", "scale"), "input_layernorm.weight", False))
    if cfg.sandwich_norms:
        e += [
            (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False),
            (("mlp_norm", "scale"), "pre_feedforward_layernorm.weight", False),
            (("post_mlp_norm", "scale"), "post_feedforward_layernorm.weight", False),
        ]
    else:
        e.append((("mlp_norm", "scale"), "post_attention_layernorm.weight", False))
    return e


def hf_tensor_map(cfg: DecoderConfig) -> dict[tuple[str, ...], _Tensor]:
    """jaxlab parameter path (tuple of keys under ``params``) -> checkpoint tensor name(s).

    Example:
      >>> from jaxlab.models import hf_tensor_map
      >>> from jaxlab.nn import DecoderConfig
      >>> m = hf_tensor_map(DecoderConfig(n_layers=2))
      >>> m[("layers", "layer", "attn", "q", "kernel")].keys
      ('model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.q_proj.weight')
      >>> m[("unembed", "kernel")].keys, m[("unembed", "kernel")].transpose
      (('lm_head.weight',), True)
    """
    out = {
        ("embed", "embedding"): _Tensor(("model.embed_tokens.weight",), False, False),
        ("final_norm", "scale"): _Tensor(("model.norm.weight",), False, False),
    }
    if not cfg.tie_embeddings:
        out[("unembed", "kernel")] = _Tensor(("lm_head.weight",), True, False)
    for sub, name, tr in _layer_entries(cfg):
        keys = tuple(f"model.layers.{i}.{name}" for i in range(cfg.n_layers))
        if cfg.scan_layers:
            out[("layers", "layer", *sub)] = _Tensor(keys, tr, True)
        else:
            for i, k in enumerate(keys):
                out[(f"layer_{i}", *sub)] = _Tensor((k,), tr, False)
    return out


def _unbox(tree):
    box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    return jax.tree.map(lambda x: x.value if box(x) else x, tree, is_leaf=box)


def _abstract_params(model: Decoder):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]


def _flat(tree) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))[0]
    return {path_keys(p): x for p, x in leaves}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, x in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = x
    return out


# ----------------------------------------------------------------------------------------------- load


def _weight_files(d: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index (sharded) or by listing the file(s)."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        files = {k: d / v for k, v in wm.items()}
        absent = sorted({str(f.name) for f in files.values() if not f.exists()})
        if absent:
            raise FileNotFoundError(f"{index}: lists shard files that do not exist: {absent}")
        return files
    shards = sorted(d.glob("*.safetensors"))
    shards = [s for s in shards if s.name != SIDECAR]
    if not shards:
        raise FileNotFoundError(f"{d}: no *.safetensors files and no model.safetensors.index.json")
    from safetensors import safe_open

    files = {}
    for s in shards:
        with safe_open(str(s), framework="numpy") as f:
            for k in f.keys():
                files[k] = s
    return files


def _norm_index(index, shape) -> tuple[slice, ...]:
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(n)) for s, n in zip(index, shape))


def _read(handles, files, t: _Tensor, index: tuple[slice, ...], dtype) -> np.ndarray:
    """The block ``index`` of a jaxlab leaf, read as slices of the checkpoint tensor(s)."""

    def one(key, idx):
        sl = handles[files[key]].get_slice(key)
        if t.transpose:
            return np.asarray(sl[idx[1], idx[0]]).T
        return np.asarray(sl[idx] if idx else sl[:])

    if t.stacked:
        layers = range(*index[0].indices(len(t.keys)))
        arr = np.stack([one(t.keys[i], index[1:]) for i in layers])
    else:
        arr = one(t.keys[0], index)
    return arr.astype(dtype)


def decoder_from_hf(path, *, dtype=None, scan_layers: bool = True, remat: str = "none") -> Decoder:
    """The :class:`Decoder` of a Hugging Face directory's ``config.json`` (no weights read).

    For dry runs and for building a model before its weights (see :func:`config_from_hf` for the args).
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf = json.loads(cfg_file.read_text())
    cfg = config_from_hf(hf, dtype=dtype, scan_layers=scan_layers, remat=remat)
    return Decoder(dataclasses.replace(cfg, hf_config=json.dumps(hf, sort_keys=True)))


def load_hf(
    path,
    *,
    mesh=None,
    dtype=None,
    scan_layers: bool = True,
    remat: str = "none",
    rules: Sequence = DEFAULT_RULES,
    nm_sidecar: bool = False,
):
    """Load a Hugging Face causal-LM directory as ``(model, params)`` (``Decoder`` + plain param dict).

    Args:
      path: the model directory (``config.json`` + safetensors).
      mesh: optional ``jax.sharding.Mesh``; each parameter is then created sharded (see the module
        docstring) and every process reads only its own devices' blocks.
      dtype: parameter/computation dtype (``None``: the checkpoint's).
      scan_layers, remat: see :class:`jaxlab.nn.DecoderConfig`.
      rules: logical-axis sharding rules used with ``mesh``.
      nm_sidecar: also return the compressed N:M form written by ``save_hf(..., nm=(n, m))``:
        ``{param path: NMCompressed}`` (third return value; ``{}`` when the directory has no sidecar).
        Its decompressed weights are checked equal to the dense tensors.

    Returns:
      ``(model, params)``, or ``(model, params, compressed)`` with ``nm_sidecar=True``;
      ``model.apply({"params": params}, tokens)`` gives the checkpoint's logits.

    Raises:
      FileNotFoundError: no ``config.json`` or no weights.
      ValueError: unsupported architecture; missing, unexpected or mis-shaped tensors (named).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlab.models import load_hf
      >>> model, params = load_hf("tests/fixtures/hf/llama")       # tiny random Llama-3-style model
      >>> model.cfg.family, model.cfg.kv_heads, params["layers"]["layer"]["attn"]["q"]["kernel"].shape
      ('llama', 2, (2, 32, 32))
      >>> model.apply({"params": params}, jnp.zeros((1, 5), jnp.int32)).shape
      (1, 5, 300)
    """
    d = Path(path)
    model = decoder_from_hf(d, dtype=dtype, scan_layers=scan_layers, remat=remat)
    cfg = model.cfg
    abstract = _abstract_params(model)
    shapes = {p: tuple(x.shape) for p, x in _flat(_unbox(abstract)).items()}
    tmap = hf_tensor_map(cfg)
    if set(tmap) != set(shapes):  # the name table and the module disagree: a bug here, not in the file
        raise AssertionError(f"hf_tensor_map vs Decoder params: {sorted(set(tmap) ^ set(shapes))}")
    files = _weight_files(d)
    expected = {k for t in tmap.values() for k in t.keys}
    missing = sorted(expected - set(files))
    unexpected = sorted(
        k for k in set(files) - expected
        if not k.endswith(_IGNORED_SUFFIXES) and not (cfg.tie_embeddings and k == "lm_head.weight")
    )
    if missing or unexpected:
        msg = [f"{d}: checkpoint tensors do not match a {cfg.family} model with this config.json"]
        if missing:
            msg.append(f"missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            msg.append(f"unexpected ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        raise ValueError("; ".join(msg))
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    shardings = None
    if mesh is not None:
        shardings = _flat(param_shardings(abstract, mesh, rules))
    from safetensors import safe_open

    flat = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="numpy")) for f in set(files.values())}
        for p, t in tmap.items():
            shape = shapes[p]
            for k in t.keys:  # shape check per tensor, before any read
                got = tuple(handles[files[k]].get_slice(k).get_shape())
                want = shape[1:] if t.stacked else shape
                want = want[::-1] if t.transpose else want
                if got != tuple(want):
                    raise ValueError(
                        f"{d}: tensor {k!r} has shape {got}; the config implies {tuple(want)} "
                        f"(jaxlab leaf {'/'.join(p)}, shape {shape})"
                    )
            if shardings is None:
                flat[p] = jnp.asarray(_read(handles, files, t, _norm_index((), shape), np_dtype))
            else:
                flat[p] = jax.make_array_from_callback(
                    shape, shardings[p], lambda idx, t=t, shape=shape: _read(
                        handles, files, t, _norm_index(idx, shape), np_dtype)
                )
    params = _unflatten(flat)
    if not nm_sidecar:
        return model, params
    return model, params, _read_sidecar(d, params)


# ----------------------------------------------------------------------------------------------- save


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_hf(
    path,
    model: Decoder,
    params,
    *,
    dtype=None,
    max_shard_bytes: int = 2 * 1024**3,
    lora_alpha: float | None = None,
    lora_rslora: bool = False,
    nm: tuple[int, int] | None = None,
):
    """Write ``params`` of a :class:`Decoder` as a Hugging Face directory ``transformers`` loads.

    Args:
      path: output directory (created; existing weight files in it are replaced).
      model: the :class:`Decoder` (its ``cfg.family`` names the architecture; a config loaded by
        :func:`load_hf` keeps the original ``config.json``'s other keys).
      params: plain or boxed params; LoRA factors (``lora_a``/``lora_b``) are merged first with
        ``lora_alpha``/``lora_rslora`` (the training scale).
      dtype: dtype of the written tensors (``None``: the params').
      max_shard_bytes: shard the weights into files of at most this size (+ index file).
      nm: ``(n, m)``: also write the compressed N:M form of every projection kernel (``attn``/``mlp``;
        grouped along the input axis) to ``nm_compressed.safetensors`` + ``nm_compressed.json``. The
        kernels must already be exactly N:M (e.g. after STEP/SR-STE/ASP and hard pruning); a kernel that
        is not raises ``ValueError`` naming it.

    Returns:
      The directory as a ``Path``.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp
      >>> from jaxlab.models import load_hf, save_hf
      >>> model, params = load_hf("tests/fixtures/hf/qwen2")
      >>> out = save_hf(tempfile.mkdtemp(), model, params)
      >>> _, again = load_hf(out)
      >>> all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))
      True
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    params = _unbox(params)
    if any(k[-1] in ("lora_a", "lora_b") for k in _flat(params)):
        params = lora.merge(params, alpha=lora_alpha, rslora=lora_rslora)
    flat = _flat(params)
    tmap = hf_tensor_map(cfg)
    extra = sorted(set(flat) - set(tmap))
    absent = sorted(set(tmap) - set(flat))
    if extra or absent:
        raise ValueError(
            f"save_hf: params do not match the {cfg.family} decoder: "
            f"unexpected {['/'.join(p) for p in extra]}, missing {['/'.join(p) for p in absent]}"
        )
    np_dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))
    tensors: dict[str, np.ndarray] = {}
    for p, t in tmap.items():
        arr = np.asarray(jax.device_get(flat[p]))
        if np_dtype is not None:
            arr = arr.astype(np_dtype)
        parts = list(arr) if t.stacked else [arr]
        for k, a in zip(t.keys, parts):
            tensors[k] = np.ascontiguousarray(a.T if t.transpose else a)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors"):
        old.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(tensors):
        nb = tensors[k].nbytes
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nb
    for i, sh in enumerate(shards):
        save_file(sh, str(out / _shard_name(i, len(shards))), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
            "weight_map": {k: _shard_name(i, len(shards)) for i, sh in enumerate(shards) for k in sh},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    base = json.loads(cfg.hf_config) if cfg.hf_config else None
    hf = config_to_hf(cfg if np_dtype is None else dataclasses.replace(cfg, param_dtype=dtype), base)
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    (out / SIDECAR).unlink(missing_ok=True)
    (out / "nm_compressed.json").unlink(missing_ok=True)
    if nm is not None:
        _write_sidecar(out, flat, nm)
    return out


_compress_jit = jax.jit(compress, static_argnums=(1, 2, 3))  # one compiled program per shape, not op by op
_decompress_jit = jax.jit(decompress)


def _is_projection(p: tuple[str, ...]) -> bool:
    return p[-1] == "kernel" and len(p) >= 3 and p[-3] in ("attn", "mlp")


def _write_sidecar(out: Path, flat, nm):
    from safetensors.numpy import save_file

    n, m = nm
    arrays, meta = {}, {"n": n, "m": m, "leaves": {}}
    for p, w in flat.items():
        if not _is_projection(p):
            continue
        name = "/".join(p)
        axis = reduction_axis(p, w)
        c = _compress_jit(jnp.asarray(w), n, m, axis)
        if not np.array_equal(np.asarray(_decompress_jit(c)), np.asarray(w)):
            kept = int(np.count_nonzero(np.asarray(w)))
            raise ValueError(
                f"save_hf(nm={nm}): {name} (shape {tuple(w.shape)}) is not {n}:{m} sparse along axis {axis} "
                f"({kept} non-zeros of {w.size}); prune it first (e.g. jaxlab.nm.nm_mask)"
            )
        arrays[f"{name}.values"] = np.asarray(c.values)
        arrays[f"{name}.indices"] = np.asarray(c.indices)
        meta["leaves"][name] = {"axis": c.axis, "shape": list(c.shape), "dtype": str(np.dtype(c.dtype))}
    save_file(arrays, str(out / SIDECAR), metadata={"format": "jaxlab-nm"})
    (out / "nm_compressed.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _read_sidecar(d: Path, params) -> dict[tuple[str, ...], NMCompressed]:
    from safetensors.numpy import load_file

    if not (d / SIDECAR).exists():
        return {}
    meta = json.loads((d / "nm_compressed.json").read_text())
    arrays = load_file(str(d / SIDECAR))
    flat = _flat(params)
    out = {}
    for name, info in meta["leaves"].items():
        p = tuple(name.split("/"))
        if p not in flat:
            raise ValueError(f"{d / SIDECAR}: leaf {name} is not a parameter of this model")
        c = NMCompressed(
            values=jnp.asarray(arrays[f"{name}.values"]).astype(flat[p].dtype),
            indices=jnp.asarray(arrays[f"{name}.indices"]),
            n=int(meta["n"]), m=int(meta["m"]), axis=int(info["axis"]), shape=tuple(info["shape"]),
            dtype=jnp.dtype(flat[p].dtype),
        )
        if not bool(jnp.array_equal(_decompress_jit(c), flat[p])):
            raise ValueError(f"{d}: the N:M sidecar's {name} does not decompress to the dense tensor")
        out[p] = c
    return out
