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


@pytest.mark.slow
def test_step_digits_z_sampling_quick(tmp_path, monkeypatch):
    """z_sampling.py: phase 1 does not depend on the ratio (the reference switches at the same step at every
    N:M), and a sampled-Z run that switches when the reference does is the reference run (same accuracy)."""
    import sys

    folder = ROOT / "experiments" / "step_digits"
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "run", raising=False)  # the script imports step_digits' run.py as `run`
    main = runpy.run_path(str(folder / "z_sampling.py"), run_name="z_sampling_test")["main"]
    # switch_eps above Zbar at t ~ 100 (config comment: 4.5e-8 at t = 101): the Z test decides, not t_max
    payload = main(["--quick", "--seeds", "2", "--out", str(tmp_path), "--set", "step.switch_eps=3e-8"])
    monkeypatch.delitem(sys.modules, "run", raising=False)
    assert (tmp_path / "z_sampling.md").exists() and "same switch" in (tmp_path / "z_sampling.md").read_text()
    res = {(r["variant"], r["n"], r["m"]): r for r in payload["results"]}
    assert len(res) == 12
    ratios = [(2, 4), (1, 4), (1, 8)]
    ref = {nm: res[("reference", *nm)] for nm in ratios}
    assert all(ref[nm]["switch_step"] == ref[(2, 4)]["switch_step"] for nm in ratios)
    assert all(s <= 200 for s in ref[(2, 4)]["switch_step"])  # before t_max + 1 = 201: by the test
    matched = 0
    for (variant, n, m), r in res.items():
        for s, s_ref, acc, acc_ref in zip(r["switch_step"], ref[(n, m)]["switch_step"], r["deployed_acc"],
                                          ref[(n, m)]["deployed_acc"]):
            if variant != "reference" and s == s_ref:
                assert acc == acc_ref, (variant, n, m, s)
                matched += 1
    assert matched > 0
