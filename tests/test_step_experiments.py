"""Slow end-to-end checks: the STEP experiments' quick variants run and produce sane, complete outputs."""

import json
import runpy
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _main(name):
    return runpy.run_path(str(ROOT / "experiments" / name / "run.py"), run_name=f"{name}_test")["main"]


@pytest.mark.slow
def test_step_digits_quick(tmp_path):
    payload = _main("step_digits")(["--quick", "--seeds", "2", "--out", str(tmp_path)])
    for f in ("report.md", "results.json", "digits.png"):
        assert (tmp_path / f).exists()
    res = {(r["method"], r["n"], r["m"]): r for r in payload["results"]}
    assert len(res) == 13
    assert np.mean(res[("dense", 2, 4)]["test_acc"]) > 0.9
    for (meth, _n, _m), r in res.items():
        if meth == "step":
            t = payload["config"]["train"]["steps"]
            assert all(1 <= s <= int(payload["config"]["step"]["t_max_frac"] * t) + 1 for s in r["switch_step"])
        if meth in ("ste", "sr_ste", "step"):  # trained with the sparse forward: deployment is the same model
            np.testing.assert_allclose(r["deployed_acc"], r["test_acc"])
    assert json.loads((tmp_path / "results.json").read_text())["command"].startswith("jaxlab reproduce step_digits")
    report = (tmp_path / "report.md").read_text()  # the statistics convention is named; the paired table exists
    assert "sample std (ddof=1)" in report and "step − sr_ste (paired 95 % CI)" in report


@pytest.mark.slow
def test_step_lm_quick(tmp_path):
    # the dense shadow on as well (config default: off), so both of the probe's references are checked
    payload = _main("step_lm")(["--quick", "--seeds", "2", "--out", str(tmp_path), "--set", "premise.shadow=true"])
    for f in ("report.md", "results.json", "z_trace.png", "bpb_vs_sparsity.png"):
        assert (tmp_path / f).exists()
    res = {(r["method"], r["n"], r["m"]): r for r in payload["results"]}
    dense = np.mean(res[("dense", 2, 4)]["val_bpb"])
    assert dense < 8.0  # better than uniform over bytes
    for (meth, _, _), r in res.items():
        if meth in ("ste", "sr_ste", "step"):
            np.testing.assert_allclose(r["deployed_bpb"], r["val_bpb"], rtol=1e-5)
    report = (tmp_path / "report.md").read_text()
    assert "sample std (ddof=1)" in report and "step − sr_ste (paired 95 % CI)" in report
    # the premise probe: STEP's v is the dense shadow in every window that ends before its switch
    assert (tmp_path / "premise.png").exists() and "STEP's premise" in report
    for ratio in ((2, 4), (1, 4), (1, 8)):
        r = res[("step", *ratio)]
        ends, err = np.asarray(r["premise"]["step"]), np.asarray(r["premise"]["v_rel_err"])
        for i, t0 in enumerate(r["switch_step"]):
            assert np.all(err[i][ends <= t0] < 1e-4), (ratio, i, t0, err[i])
        assert np.all(np.asarray(res[("sr_ste", *ratio)]["premise"]["v_rel_err"]) > 1e-4)
        assert np.all(np.isfinite(res[("sr_ste", *ratio)]["premise"]["local_rel_err_kept"]))
    # local reference: STEP's phase 1 is dense AdamW on the same init and batches, so at 2:4 (dense's masks)
    # its error against r equals dense's at every chunk end before the switch
    st, de = res[("step", 2, 4)]["premise"], res[("dense", 2, 4)]["premise"]
    ends = np.asarray(st["local_step"])
    for i, t0 in enumerate(res[("step", 2, 4)]["switch_step"]):
        before = ends < t0
        assert before.any()
        np.testing.assert_allclose(np.asarray(st["local_rel_err_kept"])[i][before],
                                   np.asarray(de["local_rel_err_kept"])[i][before], rtol=1e-3)
