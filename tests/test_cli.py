"""CLI: list, train (+ resume), report, and config errors with exit code 2."""

import json

import yaml

from jaxlab.cli import list_experiments, main

CFG = {
    "name": "cli",
    "data": {"name": "eight_gaussians", "batch_size": 32, "eval_size": 128},
    "model": {"name": "velocity_mlp", "options": {"hidden": 32, "depth": 2, "time_dim": 8}},
    "task": {"name": "flow_matching", "options": {"sample_steps": 3, "sw_projections": 32}},
    "train": {"steps": 6, "log_every": 2, "eval_every": 3, "ckpt_every": 3, "progress": False},
    "mesh": {"data": 1},
}


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "flow_matching_2d" in out and "velocity_mlp" in out and "checkerboard" in out
    assert list_experiments()[0] == "flow_matching_2d"


def test_train_resume_and_report(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    args = ["train", str(cfg), "--set", f"out_dir={tmp_path}"]
    assert main(args) == 0
    run = tmp_path / "cli"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6]
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 6 and resolved["optim"]["name"] == "adam"  # defaults filled in
    # same command again: resumes at the end, trains nothing more, metrics unchanged
    assert main(args) == 0
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == rows
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Evaluations" in report and "sw2" in report and "plots/train_metrics.png" in report


def test_config_error_exit_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    assert main(["train", str(cfg), "--set", "train.stepz=3"]) == 2
    assert "unknown key train.'stepz'" in capsys.readouterr().err
