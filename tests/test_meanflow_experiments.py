"""Smoke runs of the MeanFlow experiments and benchmark (slow: they train small models)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses (flax modules) resolve string annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_meanflow_2d_writes_report(tmp_path):
    run = _load(ROOT / "experiments/meanflow_2d/run.py", "mf2d_run")
    assert run.main(["--quick", "--steps", "30", "--set", "datasets=[eight_gaussians, two_moons]",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["results"]) == {"eight_gaussians", "two_moons"}
    assert set(res["results"]["two_moons"]) == {"0", "0.25", "0.5", "0.75", "0.9", "0.94", "1", "auto"}
    o = res["oracle"]
    # The exact target MSE is a quadratic in lam minimised at the reported lam*.
    i = min(range(len(o["lams"])), key=lambda k: o["target_mse"][k])
    assert abs(o["lams"][i] - min(max(o["lam_star"], 0.0), 1.0)) <= 0.05 + 1e-9
    for f in ("report.md", "metric_vs_coefficient.png", "samples_1step.png", "auto_coefficient.png", "oracle.png"):
        assert (tmp_path / f).exists(), f


@pytest.mark.slow
def test_meanflow_digits_writes_report(tmp_path):
    run = _load(ROOT / "experiments/meanflow_digits/run.py", "mfdigits_run")
    assert run.main(["--quick", "--steps", "20", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["classifier_accuracy"] > 0.9
    assert "MeanFlow lam=auto @ 1 NFE" in res["fd"] and (tmp_path / "samples.png").exists()


@pytest.mark.slow
def test_meanflow_benchmark_quick(tmp_path):
    bench = _load(ROOT / "benchmarks/meanflow_step.py", "mf_bench")
    res = bench.main(["--quick", "--inner", "1", "--reps", "1", "--out", str(tmp_path / "b.json")])
    assert res["rows"][0]["ratio_vs_flow_matching"] == 1.0 and len(res["rows"]) == 7
