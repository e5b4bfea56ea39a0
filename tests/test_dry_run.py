"""--dry-run: compile one step for a 64-device multislice config on simulated CPU devices."""

import json
from pathlib import Path

import pytest

from jaxlab.cli import main
from jaxlab.training import load_config
from jaxlab.training.dry_run import dry_run, mesh_device_count

ROOT = Path(__file__).resolve().parents[1]
CFG = str(ROOT / "experiments/flow_matching_2d/config.yaml")


def test_dry_run_64_devices_multislice(capfd):
    cfg = load_config(
        CFG,
        overlays=[ROOT / "tpu_configs/v5p-64x2-multislice.yaml"],
        sets=["mesh.distributed=false", "out_dir=/tmp/jaxlab-dry-run"],
    )
    assert mesh_device_count(cfg.mesh) == 64
    assert dry_run(cfg, as_json=True) == 0
    rep = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert rep["devices"] == 64
    assert rep["mesh"] == {"data": 8, "fsdp": 8, "tensor": 1}
    assert rep["memory_per_device_bytes"]["arguments"] > 0
    assert rep["flops_per_device"] > 0
    # FSDP: kernels are sharded over fsdp, so the step must all-gather them and reduce gradients
    specs = {path: spec for path, _, spec in rep["param_shardings"]}
    assert specs["['hidden_0']['kernel']"] == "(None, 'fsdp')"
    assert rep["collectives"]["all-gather"] > 0 and rep["collectives"]["all-reduce"] > 0


def test_cli_dry_run_prints_table(capfd):
    code = main(["train", CFG, "--overlay", str(ROOT / "tpu_configs/v5e-8.yaml"),
                 "--set", "out_dir=/tmp/jaxlab-dry-run", "--dry-run"])
    assert code == 0
    out = capfd.readouterr().out
    assert "on 8 devices" in out and "memory per device" in out and "collectives" in out


def test_data_parallel_traffic_is_one_gradient_allreduce(eight_devices):
    from jaxlab.training.dry_run import dry_run_report

    cfg = load_config(CFG, sets=["mesh.data=8", "out_dir=/tmp/jaxlab-dry-run"])
    rep = dry_run_report(cfg)
    grad_bytes = 4 * rep["params"]
    # ring all-reduce of every f32 gradient: 2 (n - 1) / n bytes per gradient byte, nothing else big
    assert rep["comm_bytes_per_device"]["all-reduce"] == pytest.approx(2 * 7 / 8 * grad_bytes, rel=0.01)
    assert set(rep["comm_bytes_per_device"]) == {"all-reduce"}


@pytest.mark.parametrize("config", ["meanflow_2d", "step_lm", "grasp_lora_lm"])
def test_dry_run_compiles_each_method_on_a_v5e8_mesh(config, eight_devices):
    """One train step per method (MeanFlow loss state, STEP's two-phase state, LoRA + GRASP) compiles
    for the v5e-8 overlay's FSDP mesh; moments of sharded params are sharded like them."""
    from collections import Counter

    from jaxlab.training.dry_run import dry_run_report

    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overlays=[ROOT / "tpu_configs/v5e-8.yaml"],
                      sets=["out_dir=/tmp/jaxlab-dry-run"])
    rep = dry_run_report(cfg)
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert rep["flops_per_device"] > 0 and rep["memory_per_device_bytes"]["arguments"] > 0
    assert rep["collectives"]["all-reduce"] + rep["collectives"]["reduce-scatter"] > 0
    param_specs = Counter(spec for _, _, spec in rep["param_shardings"] if spec != "replicated")
    assert param_specs, "FSDP sharded no parameter"
    trained = {p for p, _, _ in rep["param_shardings"]}
    if config == "grasp_lora_lm":
        assert any(p.endswith("['lora_a']") for p in trained)  # LoRA injected; base frozen (no moments)
    else:
        # Adam-style mu and nu mirror every param, so every sharded spec appears at least twice as often
        for spec, count in param_specs.items():
            assert rep["opt_state_shardings"].get(spec, 0) >= 2 * count, (spec, rep["opt_state_shardings"])


@pytest.mark.slow
@pytest.mark.parametrize("workflow", ["grasp_sft", "step_sparsify"])
def test_llama8b_workflows_compile_on_64_devices_within_v5p_hbm(workflow, capfd):
    """Llama-3.1-8B shapes (no weights) with scanned layers: LoRA+GRASP and STEP full fine-tune compile for
    a v5p-128 mesh, and the compiled step's per-device memory fits v5p's 95 GiB."""
    cfg = load_config(
        ROOT / f"configs/hf/{workflow}.yaml",
        overlays=[ROOT / "tpu_configs/pretrained/llama3.1-8b.yaml", ROOT / "tpu_configs/pretrained/v5p-128.yaml"],
        sets=["task.options.grasp_subspace=random:4"] if workflow == "grasp_sft" else [],
    )
    assert dry_run(cfg, as_json=True) == 0
    rep = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert rep["devices"] == 64 and rep["params"] > 8.0e9
    mem = rep["memory_per_device_bytes"]
    assert 0 < mem["arguments"] + mem["temporaries"] < 95 * 2**30
    specs = {path: spec for path, _, spec in rep["param_shardings"]}
    assert specs["['layers']['layer']['mlp']['up']['kernel']"] == "(None, None, 'fsdp')"
