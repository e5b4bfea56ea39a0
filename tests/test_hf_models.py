"""Pretrained decoder family + Hugging Face checkpoints in and out (jaxlab.nn.decoder, jaxlab.models).

The fixtures under tests/fixtures/hf were written by tests/fixtures/hf/make_hf_fixtures.py with
``transformers`` (torch on CPU): tiny random Llama (GQA, Llama-3 RoPE scaling), Qwen2 (q/k/v biases, tied,
sharded files + index), Gemma (MQA, explicit head_dim, 1 + w norms, embedding scale) and Gemma 2 (soft
caps, sandwich norms, sliding window 4 < sequence 16), each with ``transformers``' logits on fixed tokens.
The default suite needs no torch; the ``slow`` test at the end regenerates the fixtures and checks that
``transformers`` loads what ``save_hf`` wrote.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.distributed import make_mesh, param_shardings
from jaxlab.models import config_from_hf, hf_tensor_map, load_hf, save_hf
from jaxlab.nm import default_sparsify, nm_mask, reduction_axis
from jaxlab.nn import Decoder, DecoderConfig, causal_lm_loss, lora
from jaxlab.transforms.residual_sides import ResidualSides

FIX = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ("llama", "qwen2", "gemma", "gemma2")


def _ref(fam):
    r = np.load(FIX / fam / "reference.npz")
    return jnp.asarray(r["tokens"]), r["logits"]


@jax.jit
def _max_err(logits, ref):
    return jnp.max(jnp.abs(logits - ref))


def _logits(model, params, tokens):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_logits_equal_transformers(fam, scan):
    tokens, ref = _ref(fam)
    model, params = load_hf(FIX / fam, scan_layers=scan)
    assert model.cfg.family == fam
    assert float(_max_err(_logits(model, params, tokens), ref)) <= 1e-4


# Each fixture exercises its family's switches: undoing one moves the logits >= 10x beyond the tolerance
# (Llama-3 RoPE scaling: 3.3e-3 on 16 tokens).
SWITCH_OFF = {
    "llama": dict(rope_scaling=None),                                 # Llama-3 frequency rescaling
    "qwen2": dict(qkv_bias=False),                                     # q/k/v biases (dropped below)
    "gemma": dict(norm_offset=0.0),                                    # 1 + w norms
    "gemma2": dict(sliding_window=None, layer_types=None),             # the sliding window
}
SWITCH_OFF_2 = {
    "llama": dict(rope_base=10000.0),
    "qwen2": dict(rope_base=10000.0),
    "gemma": dict(embed_scale=False),
    "gemma2": dict(attn_logit_softcap=None, final_logit_softcap=None),
}


@pytest.mark.parametrize("fam", FAMILIES)
def test_each_switch_matters(fam):
    tokens, ref = _ref(fam)
    model, params = load_hf(FIX / fam)
    for change in (SWITCH_OFF[fam], SWITCH_OFF_2[fam]):
        cfg = dataclasses.replace(model.cfg, **change)
        p = params
        if change.get("qkv_bias") is False:
            p = jax.tree_util.tree_map_with_path(lambda path, x: x, params)
            for k in ("q", "k", "v"):
                p["layers"]["layer"]["attn"][k] = {"kernel": p["layers"]["layer"]["attn"][k]["kernel"]}
        assert float(_max_err(_logits(Decoder(cfg), p, tokens), ref)) > 1e-3, change  # 10x the tolerance


def test_config_reads_transformers4_layout():
    """Checkpoints on the Hub (written by transformers 4) carry rope_theta + rope_scaling."""
    hf5 = json.loads((FIX / "llama" / "config.json").read_text())
    hf4 = {k: v for k, v in hf5.items() if k != "rope_parameters"}
    rp = hf5["rope_parameters"]
    hf4["rope_theta"] = rp["rope_theta"]
    hf4["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    assert config_from_hf(hf4) == config_from_hf(hf5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_save_load_roundtrip_is_bit_exact(fam, tmp_path):
    model, params = load_hf(FIX / fam)
    out = save_hf(tmp_path / fam, model, params, max_shard_bytes=30_000)  # several shards + index
    assert (out / "model.safetensors.index.json").exists()
    model2, params2 = load_hf(out)
    assert model2.cfg == model.cfg
    assert jax.tree.structure(params2) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # the written tensors are the source tensors, name for name (transposes undone)
    from safetensors.numpy import load_file

    src = {}
    for f in (FIX / fam).glob("*.safetensors"):
        src |= load_file(str(f))
    dst = {}
    for f in out.glob("*.safetensors"):
        dst |= load_file(str(f))
    assert sorted(src) == sorted(dst)
    assert all(np.array_equal(src[k], dst[k]) for k in src)
    # the config keeps the source's other keys (token ids) and the architecture
    c_src, c_dst = json.loads((FIX / fam / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for k in ("bos_token_id", "eos_token_id", "architectures", "model_type", "vocab_size"):
        assert c_dst.get(k) == c_src.get(k), k


def test_unrolled_and_scanned_layouts_save_the_same_checkpoint(tmp_path):
    m1, p1 = load_hf(FIX / "gemma2", scan_layers=True)
    m2, p2 = load_hf(FIX / "gemma2", scan_layers=False)
    a, b = save_hf(tmp_path / "a", m1, p1), save_hf(tmp_path / "b", m2, p2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_bf16_load_and_save(tmp_path):
    tokens, ref = _ref("llama")
    model, params = load_hf(FIX / "llama", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    err = float(_max_err(_logits(model, params, tokens), ref))
    assert 1e-4 < err < 0.1  # bf16 rounding, not a wrong model
    out = save_hf(tmp_path / "bf16", model, params)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, again = load_hf(out)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)))


# --------------------------------------------------------------------------------------- errors


def _copy(fam, tmp_path):
    d = tmp_path / fam
    shutil.copytree(FIX / fam, d)
    return d


def test_unknown_architecture_is_named(tmp_path):
    d = _copy("llama", tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["model_type"], c["architectures"] = "mixtral", ["MixtralForCausalLM"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"'mixtral' \(MixtralForCausalLM\) is not supported"):
        load_hf(d)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy("llama", tmp_path)
    t = load_file(str(d / "model.safetensors"))
    t.pop("model.layers.1.mlp.up_proj.weight")
    t["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load_hf(d)
    assert "missing (1): ['model.layers.1.mlp.up_proj.weight']" in str(e.value)
    assert "unexpected (1): ['model.layers.0.self_attn.q_norm.weight']" in str(e.value)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    d = _copy("qwen2", tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \((64, 32|32, 64)\); "
                                         r"the config implies \((48, 32|32, 48)\)"):
        load_hf(d)


def test_missing_shard_file_is_named(tmp_path):
    d = _copy("qwen2", tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_hf(d)


# --------------------------------------------------------------------------------------- sharded load


def test_mesh_load_places_each_leaf_with_its_sharding():
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = make_mesh(data=2, fsdp=2, tensor=2, devices=devices[:8])
    model, plain = load_hf(FIX / "llama")
    model_s, sharded = load_hf(FIX / "llama", mesh=mesh)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]
    want = param_shardings(abstract, mesh)
    flat_w = jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    split = 0
    for a, s, w in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), flat_w):
        assert s.sharding.is_equivalent_to(w, s.ndim)
        assert np.array_equal(np.asarray(a), np.asarray(s))
        for shard in s.addressable_shards:  # each device holds exactly its block of the tensor
            assert np.array_equal(np.asarray(shard.data), np.asarray(a)[shard.index])
        split += any(p is not None for p in s.sharding.spec)
    assert split >= 8  # q/k/v/o/gate/up/down + embeddings are actually split, not replicated
    tokens, ref = _ref("llama")
    assert float(_max_err(_logits(model_s, sharded, tokens), ref)) <= 1e-4


# --------------------------------------------------------------------------------------- the model


def _small(**kw):
    base = dict(vocab=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32)
    return DecoderConfig(**(base | kw))


def test_packed_segments_equal_separate_sequences():
    """Two sequences packed in one row (segment ids, positions restarting) give each one's own logits."""
    model = Decoder(_small(sliding_window=3, layer_types=("sliding", "full")))
    a = jnp.array([[3, 5, 7, 9, 11]], jnp.int32)
    b = jnp.array([[2, 4, 6]], jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), a)["params"]
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 3])
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
    f = jax.jit(lambda p, t, **kw: model.apply({"params": p}, t, **kw))
    lp = f(params, packed, segment_ids=seg, positions=pos)
    np.testing.assert_allclose(lp[:, :5], f(params, a), atol=1e-5)
    np.testing.assert_allclose(lp[:, 5:], f(params, b), atol=1e-5)
    assert float(jnp.max(jnp.abs(f(params, packed)[:, 5:] - lp[:, 5:]))) > 1e-3  # without ids they mix


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow), "dots"])
def test_remat_changes_nothing_but_memory(remat):
    tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % 32
    base = Decoder(_small())
    params = nn.meta.unbox(jax.jit(base.init)(jax.random.PRNGKey(0), tokens)["params"])
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: causal_lm_loss(m.apply({"params": p}, tokens), tokens)))
    l0, g0 = loss(base)(params)
    l1, g1 = loss(Decoder(_small(remat=remat)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_resid_hook_under_scan_sees_traced_layer_index():
    model = Decoder(_small())
    tokens = jnp.arange(8, dtype=jnp.int32).reshape(1, 8)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
    u = jnp.zeros(16).at[3].set(1.0)
    steer = lambda i, site, h: jnp.where((i == 1) & (site == "attn"), h + 2.0 * u, h)
    run = jax.jit(lambda p: (model.apply({"params": p}, tokens, return_residuals=True),
                             model.apply({"params": p}, tokens, resid_hook=steer, return_residuals=True)))
    (l0, r0), (l1, r1) = run(params)
    assert r0.shape == (3, 1, 8, 16)
    np.testing.assert_array_equal(r0[:2], r1[:2])  # embeddings and layer 0 untouched
    assert not np.allclose(r0[2], r1[2]) and not np.allclose(l0, l1)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouped-query attention == multi-head attention whose k/v heads are repeated per group."""
    cfg = _small(scan_layers=False, n_layers=1)
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(1, 10) % 32
    gqa = Decoder(cfg)
    p = nn.meta.unbox(jax.jit(gqa.init)(jax.random.PRNGKey(1), tokens)["params"])
    mha = Decoder(dataclasses.replace(cfg, n_kv_heads=4))
    q = jax.tree.map(lambda x: x, p)
    dh = cfg.dh
    for k in ("k", "v"):
        w = p["layer_0"]["attn"][k]["kernel"].reshape(16, 2, 1, dh)
        q["layer_0"]["attn"][k] = {"kernel": jnp.broadcast_to(w, (16, 2, 2, dh)).reshape(16, 4 * dh)}
    np.testing.assert_allclose(_logits(gqa, p, tokens), _logits(mha, q, tokens), atol=1e-5)


# --------------------------------------------------------------------------------------- methods on it


def test_grasp_sides_and_step_filters_read_the_decoder_names():
    model, params = load_hf(FIX / "llama")
    sides = ResidualSides.default()
    want = {"q": "reader", "k": "reader", "v": "reader", "o": "writer", "gate": "reader", "up": "reader",
            "down": "writer"}
    for name, side in want.items():
        group = "attn" if name in "qkvo" else "mlp"
        assert sides.side_of(f"params/layers/layer/{group}/{name}") == side
    assert sides.side_of("params/embed") == "writer"
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    chosen = {"/".join(k.key for k in p) for p, x in flat if default_sparsify(p, x, 4)}
    assert chosen == {f"layers/layer/{g}/{n}/kernel" for g, ns in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                      for n in ns} | {"unembed/kernel"}
    for p, x in flat:  # N:M groups run along each stacked kernel's input axis
        if x.ndim == 3:
            assert reduction_axis(p, x) == 1


def test_save_merges_lora(tmp_path):
    model, params = load_hf(FIX / "llama")
    p = lora.inject(params, [r"attn/(q|v)$", r"mlp/down$"], rank=2, key=jax.random.PRNGKey(0))
    p = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if path[-1].key == "lora_b" else x, p)
    out = save_hf(tmp_path / "merged", model, p, lora_alpha=4.0)
    _, back = load_hf(out)
    merged = lora.merge(p, alpha=4.0)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(back)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    q0 = params["layers"]["layer"]["attn"]["q"]["kernel"]
    assert not np.array_equal(np.asarray(back["layers"]["layer"]["attn"]["q"]["kernel"]), np.asarray(q0))


def test_nm_sidecar_round_trip_and_check(tmp_path):
    model, params = load_hf(FIX / "qwen2")
    flat, tdef = jax.tree_util.tree_flatten_with_path(params)
    pruned = []
    for p, x in flat:
        keys = [k.key for k in p]
        if keys[-1] == "kernel" and keys[-3] in ("attn", "mlp"):
            x = x * nm_mask(x, 2, 4, axis=reduction_axis(p, x))
        pruned.append(x)
    pruned = jax.tree_util.tree_unflatten(tdef, pruned)
    out = save_hf(tmp_path / "nm", model, pruned, nm=(2, 4))
    _, dense, comp = load_hf(out, nm_sidecar=True)
    assert len(comp) == 7 and all(c.n == 2 and c.m == 4 and c.axis == 1 for c in comp.values())
    for a, b in zip(jax.tree.leaves(pruned), jax.tree.leaves(dense)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert sum(c.nbytes for c in comp.values()) < 0.6 * sum(
        dense["layers"]["layer"][g][n]["kernel"].nbytes for g, n in (("attn", "q"), ("attn", "k"), ("attn", "v"),
        ("attn", "o"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")))
    with pytest.raises(ValueError, match=r"layers/layer/\w+/\w+/kernel .* is not 2:4 sparse"):
        save_hf(tmp_path / "dense", model, params, nm=(2, 4))
    _, _, none = load_hf(FIX / "qwen2", nm_sidecar=True)
    assert none == {}


def test_tensor_map_covers_the_module_exactly():
    for fam in FAMILIES:
        hf = json.loads((FIX / fam / "config.json").read_text())
        for scan in (True, False):
            cfg = config_from_hf(hf, scan_layers=scan)
            abstract = jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
            leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(abstract["params"]))[0]
            assert {tuple(k.key for k in p) for p, _ in leaves} == set(hf_tensor_map(cfg))


# --------------------------------------------------------------------------------------- against torch


@pytest.mark.slow
def test_transformers_loads_what_save_hf_writes(tmp_path):
    """Regenerate the fixtures with transformers, compare logits, and load save_hf's output in torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(FIX / "make_hf_fixtures.py"), "--out", str(tmp_path / "fix")], check=True)
    for fam in FAMILIES:
        tokens, ref = (lambda r: (jnp.asarray(r["tokens"]), r["logits"]))(np.load(tmp_path / "fix" / fam / "reference.npz"))
        model, params = load_hf(tmp_path / "fix" / fam)
        assert float(_max_err(_logits(model, params, tokens), ref)) <= 1e-4
        params = jax.tree.map(lambda x: x * 1.01, params)  # a changed model: transformers must see the change
        out = save_hf(tmp_path / "out" / fam, model, params, max_shard_bytes=40_000)
        tm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
        with torch.no_grad():
            theirs = tm(input_ids=torch.as_tensor(np.asarray(tokens)).long()).logits.numpy()
        ours = np.asarray(_logits(model, params, tokens))
        assert np.max(np.abs(theirs - ours)) <= 1e-4, fam
        assert np.max(np.abs(theirs - ref)) > 1e-3
