"""The three pretrained-checkpoint workflows from configs (configs/hf/*.yaml) on the tiny Llama fixture:
LoRA SFT, the GRASP pipeline (naive LoRA -> identification -> GRASP -> merged export), and 2:4
sparsification with STEP / SR-STE, each ending in a Hugging Face directory that load_hf reads back."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.models import load_hf
from jaxlab.nm import decompress, nm_mask, reduction_axis
from jaxlab.nn import lora
from jaxlab.paths import path_keys
from jaxlab.training import load_config, tasks_hf, train
from jaxlab.training.registry import build_task
from jaxlab.transforms.grasp import subspace_leakage

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs" / "hf"
FIX = ROOT / "tests" / "fixtures" / "hf" / "llama"
STEPS = 12


def _cfg(name, tmp, *sets):
    base = [f"out_dir={tmp}", f"train.steps={STEPS}", "train.log_every=4", "train.eval_every=12",
            "train.ckpt_every=12", f"model.options.path={FIX}",
            f"task.options.data={ROOT}/tests/fixtures/hf/sft/train.jsonl",
            f"task.options.val_data={ROOT}/tests/fixtures/hf/sft/val.jsonl"]
    return load_config(CFG / f"{name}.yaml", sets=base + list(sets))


def _flat(tree):
    return {path_keys(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def naive_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_runs")
    cfg = _cfg("lora_sft", tmp, "name=naive")
    state, _ = train(cfg, progress=False)
    return cfg.run_dir, state


def test_lora_sft_exports_the_merged_model(naive_run):
    run_dir, state = naive_run
    _, base = load_hf(FIX)
    _, exported = load_hf(run_dir / "hf")
    merged = lora.merge(state.params, alpha=8.0)
    fb, fe, fm = _flat(base), _flat(exported), _flat(merged)
    assert fe.keys() == fb.keys()
    for k in fe:
        assert np.array_equal(np.asarray(fe[k]), np.asarray(fm[k])), k
        adapted = len(k) >= 3 and k[-3] in ("attn", "mlp")
        # LoRA moved exactly the adapted kernels; embeddings and norms are the pretrained ones, bit for bit
        assert np.array_equal(np.asarray(fe[k]), np.asarray(fb[k])) != adapted, k
    assert (run_dir / "hf" / "tokenizer.json").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]  # the response loss went down


def test_grasp_pipeline_identifies_then_keeps_updates_off_U(naive_run, tmp_path):
    naive_dir, _ = naive_run
    cfg = _cfg("grasp_sft", tmp_path, f"task.options.grasp_subspace=identify:{naive_dir}", "task.options.identify_k=2")
    state, _ = train(cfg, progress=False)
    U = np.load(cfg.run_dir / "grasp_U.npy")
    assert U.shape == (32, 2)
    np.testing.assert_allclose(U.T @ U, np.eye(2), atol=1e-5)
    report = (cfg.run_dir / "report.md").read_text()
    assert "eigengap" in report and "trustworthy" in report
    _, base = load_hf(FIX)
    _, exported = load_hf(cfg.run_dir / "hf")
    delta = jax.tree.map(lambda a, b: a - b, exported, base)
    leak = subspace_leakage(delta, U)
    moved = {k: v for k, v in leak.items() if "attn" in k or "mlp" in k}
    assert len(moved) == 7 and max(moved.values()) < 1e-4, moved
    # the naive run's update does have a component along the identified U
    _, naive = load_hf(naive_dir / "hf")
    naive_leak = subspace_leakage(jax.tree.map(lambda a, b: a - b, naive, base), U)
    assert max(v for k, v in naive_leak.items() if "attn" in k or "mlp" in k) > 0.05


# STEP's step compiles ~2x longer than SR-STE's; both share the export path, so the default suite runs SR-STE
@pytest.mark.parametrize("method", [pytest.param("step", marks=pytest.mark.slow), "sr_ste"])
def test_sparsify_exports_exact_2of4(method, tmp_path):
    cfg = _cfg("step_sparsify", tmp_path, f"optim.name={method}", f"name={method}",
               *(["optim.options={n: 2, m: 4, t_min: 4, t_max: 8}"] if method == "step" else ["optim.options={n: 2, m: 4}"]))
    train(cfg, progress=False)
    _, dense, comp = load_hf(cfg.run_dir / "hf", nm_sidecar=True)
    fd = _flat(dense)
    kernels = [k for k in fd if len(k) >= 3 and k[-3] in ("attn", "mlp") and k[-1] == "kernel"]
    assert len(kernels) == 7 and set(comp) == set(kernels)
    for k in kernels:
        w = fd[k]
        ax = reduction_axis(k, w)
        assert ax == 1
        assert np.array_equal(np.asarray(w), np.asarray(w * nm_mask(w, 2, 4, axis=ax)))  # exactly 2:4
        assert int(jnp.count_nonzero(w)) == w.size // 2
        assert np.array_equal(np.asarray(decompress(comp[k])), np.asarray(w))
    assert int(jnp.count_nonzero(fd[("unembed", "kernel")])) == fd[("unembed", "kernel")].size  # kept dense


def test_batches_are_a_function_of_the_step(tmp_path):
    """A resumed run (batch_fn called from step k) sees what an uninterrupted one saw."""
    cfg = _cfg("lora_sft", tmp_path)
    task = build_task(cfg)
    seq = [task.batch_fn(i) for i in range(6)]
    again = build_task(cfg)
    for i in (4, 5, 2):
        b = again.batch_fn(i)
        assert all(np.array_equal(b[k], seq[i][k]) for k in b)


def test_dry_run_reads_no_weights(monkeypatch, eight_devices):
    from jaxlab.training.dry_run import dry_run_report

    def boom(*a, **k):
        raise AssertionError("a dry run must not read the checkpoint")

    monkeypatch.setattr(tasks_hf, "load_hf", boom)
    cfg = load_config(CFG / "lora_sft.yaml", sets=[f"model.options.path={FIX}", "mesh.data=2", "mesh.fsdp=2",
                                                   "mesh.tensor=2"])
    rep = dry_run_report(cfg)
    _, params = load_hf(FIX)
    n_base = sum(x.size for x in jax.tree.leaves(params))
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert n_base < rep["params"] < 1.5 * n_base  # the pretrained base + the LoRA factors
    assert rep["memory_per_device_bytes"]["arguments"] > 0


@pytest.mark.slow  # the sharded read itself is in the default suite (test_hf_models.py)
def test_sharded_training_equals_single_device(tmp_path, eight_devices):
    one = _cfg("lora_sft", tmp_path / "one", "train.steps=3", "train.eval_every=0", "train.ckpt_every=3")
    eight = _cfg("lora_sft", tmp_path / "eight", "train.steps=3", "train.eval_every=0", "train.ckpt_every=3",
                 "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    s1, _ = train(one, progress=False, devices=eight_devices[:1])
    s8, _ = train(eight, progress=False, devices=eight_devices)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
    q = s8.params["layers"]["layer"]["attn"]["q"]["kernel"]
    assert any(s is not None for s in q.sharding.spec)  # the pretrained base was placed sharded
