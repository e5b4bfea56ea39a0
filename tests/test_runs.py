"""Runs that never lose work and never lie: checkpoint fallback, divergence stop, config drift on resume,
one writer per run dir, validation before anything is created, and fault tests in real subprocesses."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxlab.cli import main
from jaxlab.training import (
    Checkpointer,
    CheckpointError,
    ConfigError,
    DivergenceError,
    RunDirLocked,
    Task,
    load_config,
    read_metrics,
    register_task,
    train,
)
from jaxlab.training.checkpoint import CheckpointWarning
from jaxlab.training.loop import DivergenceMonitor
from jaxlab.training.run_dir import RunLock, config_changes

BASE = {
    "name": "r",
    "seed": 1,
    "data": {"name": "two_moons", "batch_size": 32, "eval_size": 128},
    "model": {"name": "velocity_mlp", "options": {"hidden": 32, "depth": 2, "time_dim": 8}},
    "optim": {"name": "adamw", "learning_rate": 3e-3, "schedule": "cosine", "warmup_steps": 2},
    "task": {"name": "flow_matching", "options": {"sample_steps": 2, "sw_projections": 16}},
    "train": {"steps": 12, "log_every": 2, "eval_every": 0, "ckpt_every": 4, "keep": 5, "progress": False,
              "async_checkpoint": False},
    "mesh": {"data": 1},
}


def cfg_for(tmp_path, name, **over):
    return load_config(base=BASE, sets=[f"name={name}", f"out_dir={tmp_path}"] + [f"{k}={v}" for k, v in over.items()])


def params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 12-step run every interrupted/corrupted run must end equal to."""
    state, _ = train(cfg_for(tmp_path_factory.mktemp("ref"), "ref"))
    return state


# ----------------------------------------------------------------------------- checkpoints


STATE = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((16, 16))}}


def _three_checkpoints(d):
    c = Checkpointer(d, every=1, keep=3, async_save=False)
    for i in (1, 2, 3):
        c.save(i, jax.tree.map(lambda x, i=i: x * i, STATE))
    c.close()


def _truncate_data(step_dir):
    files = [f for f in (step_dir / "default").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(10)


DAMAGE = {
    # part of the newest checkpoint -> the step that restores
    "data files truncated": (_truncate_data, 2),
    "default/ item missing": (lambda d: shutil.rmtree(d / "default"), 2),
    "manifest.ocdbt missing": (lambda d: (d / "default" / "manifest.ocdbt").unlink(), 2),
    "_METADATA truncated": (lambda d: open(d / "default" / "_METADATA", "r+b").truncate(5), 2),
    # orbax does not need these to restore: the newest checkpoint is still used, nothing is moved
    "_METADATA missing": (lambda d: (d / "default" / "_METADATA").unlink(), 3),
    "_CHECKPOINT_METADATA missing": (lambda d: (d / "_CHECKPOINT_METADATA").unlink(), 3),
    "commit_success.txt missing": (lambda d: (d / "commit_success.txt").unlink(), 3),
}


@pytest.mark.parametrize("part", list(DAMAGE))
def test_restore_falls_back_past_each_damaged_part(tmp_path, part):
    damage, expected = DAMAGE[part]
    d = tmp_path / "checkpoints"
    _three_checkpoints(d)
    damage(d / "3")
    c = Checkpointer(d, every=1, keep=3)
    if expected == 3:
        restored = c.restore_or(STATE)
        assert not c.damaged_directory.exists()
    else:
        with pytest.warns(CheckpointWarning, match=r"checkpoint step 3 .* could not be restored .* resumed from step 2"):
            restored = c.restore_or(STATE)
        # moved aside with the reason, never deleted; the manager no longer lists it
        assert (c.damaged_directory / "3").is_dir()
        assert "restore of step 3 failed" in (c.damaged_directory / "3" / "DAMAGED.txt").read_text()
        assert c.all_steps() == [1, 2]
    params_equal(restored, jax.tree.map(lambda x: x * expected, STATE))
    c.close()


def test_no_restorable_checkpoint_is_an_error_and_moves_nothing(tmp_path):
    d = tmp_path / "checkpoints"
    _three_checkpoints(d)
    for s in (1, 2, 3):
        shutil.rmtree(d / str(s) / "default")
    c = Checkpointer(d, every=1, keep=3)
    with pytest.raises(CheckpointError, match=r"none of the 3 checkpoints .*step 3: .*step 1: .*Nothing was moved"):
        c.restore_or(STATE)
    assert sorted(p.name for p in d.iterdir()) == ["1", "2", "3"]
    c.close()


def test_interrupted_write_leftovers_are_removed_with_a_warning(tmp_path):
    d = tmp_path / "checkpoints"
    _three_checkpoints(d)
    (d / "4.orbax-checkpoint-tmp-1234").mkdir()
    (d / "4.orbax-checkpoint-tmp-1234" / "partial").write_text("x")
    with pytest.warns(CheckpointWarning, match=r"removed 1 unfinished checkpoint write.*4\.orbax-checkpoint-tmp-1234"):
        c = Checkpointer(d, every=1, keep=3)
    assert sorted(p.name for p in d.iterdir()) == ["1", "2", "3"]
    assert c.latest_step() == 3
    c.close()


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path / "c", keep=0)
    with pytest.raises(ConfigError, match=r"train.keep: got 0; expected >= 1"):
        cfg_for(tmp_path, "k", **{"train.keep": 0})


# orbax's failed read of the damaged step leaves an asyncio callback that fires after its event loop has
# closed ("Event loop is closed", raised inside orbax/asyncio, ignored there); nothing of ours is unraisable
@pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")
def test_train_resumes_past_a_damaged_latest_checkpoint(tmp_path, reference):
    cfg = cfg_for(tmp_path, "damaged")
    train(cfg, stop_at=9)  # checkpoints 4 and 8
    _truncate_data(cfg.run_dir / "checkpoints" / "8")
    with pytest.warns(CheckpointWarning, match="step 8"):
        state, _ = train(cfg)
    params_equal(state.params, reference.params)
    assert (cfg.run_dir / "checkpoints.damaged" / "8").is_dir()
    assert [r["step"] for r in read_metrics(cfg.run_dir) if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]


# ----------------------------------------------------------------------------- divergence


def test_divergence_from_a_huge_learning_rate_stops_the_run(tmp_path):
    cfg = cfg_for(tmp_path, "lr10", **{"optim.learning_rate": 10.0, "train.steps": 60, "train.ckpt_every": 2,
                                       "optim.schedule": "constant", "optim.warmup_steps": 0})
    # the case: before the check, this ran to the end with an inf grad norm and a normal report
    with pytest.raises(DivergenceError, match=r"at step \d+: .*(last good checkpoint is step \d+|no checkpoint was written yet)") as e:
        train(cfg)
    step = int(e.value.args[0].split("at step ")[1].split(":")[0])
    assert step < 60
    assert not (cfg.run_dir / "report.md").exists()  # no normal-looking report
    assert (Checkpointer(cfg.run_dir / "checkpoints").latest_step() or 0) < step


def _build_spike(cfg, opts, model):
    def loss_fn(params, batch, key):  # loss = scale while w stays ~1 (a tiny learning rate)
        x, scale = batch
        return scale[0] * jnp.mean((params["w"] - x) ** 2), {}

    def batch_fn(step):  # 1 at step 1, 1e-3 after, a spike of 50 at step 30: < 100 x the first, > 100 x the median
        scale = 50.0 if step == 29 else (1.0 if step == 0 else 1e-3)
        return np.zeros((4, 2), np.float32), np.full((4,), scale, np.float32)

    return Task(init_params=lambda k: {"w": jnp.ones((2,))}, loss_fn=loss_fn, batch_fn=batch_fn)


register_task("test_spike", _build_spike)


def test_loss_spike_above_the_running_median_stops_the_run(tmp_path):
    base = {**BASE, "task": {"name": "test_spike"}, "optim": {"name": "sgd", "learning_rate": 1e-6}}
    cfg = load_config(base=base, sets=[f"out_dir={tmp_path}", "name=spike", "train.steps=40", "train.ckpt_every=10"])
    with pytest.raises(DivergenceError, match=r"at step 30: loss 49.99\d* is more than 100 x the median 0.00099\d* of the last 29 losses .* step 20"):
        train(cfg)
    # the same run with the check off finishes
    ok = load_config(base=base, sets=[f"out_dir={tmp_path}", "name=spike_off", "train.steps=40",
                                      "train.divergence_factor=null"])
    state, _ = train(ok)
    assert int(state.step) == 40


def test_monitor_never_compares_losses_around_a_nonpositive_median():
    m = DivergenceMonitor(factor=10.0, window=50)
    for i in range(30):
        m.check(i + 1, -5.0 + 0.01 * i, 1.0)
    m.check(31, 1e6, 1.0)  # the median and the first loss are negative: a factor means nothing, so no stop
    with pytest.raises(DivergenceError, match="global gradient norm is inf"):
        m.check(32, 0.0, float("inf"))
    # a blow-up from the first steps on, before any median exists, is measured against the first loss
    m = DivergenceMonitor(factor=100.0, window=200)
    m.check(1, 6.0, 1.0)
    m.check(2, 500.0, 1.0)
    with pytest.raises(DivergenceError, match=r"at step 3: loss 1e\+06 is more than 100 x the first loss of this run 6"):
        m.check(3, 1e6, 1.0)


@pytest.mark.parametrize("check_finite", ["true", "false"])  # host-side and on-device accumulation
def test_logged_train_loss_is_the_mean_since_the_previous_log_line(tmp_path, check_finite):
    base = {**BASE, "task": {"name": "test_spike"}, "optim": {"name": "sgd", "learning_rate": 1e-30}}
    cfg = load_config(base=base, sets=[f"out_dir={tmp_path}", "name=mean", "train.steps=30", "train.log_every=10",
                                       "train.divergence_factor=null", f"train.check_finite={check_finite}"])
    train(cfg)
    rows = [r for r in read_metrics(cfg.run_dir) if r["split"] == "train"]
    # lr ~0: the loss is the batch's scale: 1 at step 1, 50 at step 30, 1e-3 elsewhere
    assert [r["loss_steps"] for r in rows] == [10, 10, 10]
    np.testing.assert_allclose([r["loss"] for r in rows], [(1 + 9e-3) / 10, 1e-3, (9e-3 + 50) / 10], rtol=1e-5)


# ----------------------------------------------------------------------------- config drift


def test_resume_with_a_changed_config_fails_and_lists_the_keys(tmp_path, reference):
    cfg = cfg_for(tmp_path, "drift")
    train(cfg, stop_at=5)
    before = (cfg.run_dir / "config.yaml").read_text()
    changed = cfg_for(tmp_path, "drift", **{"optim.learning_rate": 1e-2, "train.steps": 20})
    with pytest.raises(ConfigError, match=r"optim.learning_rate: 0.003 -> 0.01; train.steps: 12 -> 20.*--allow-config-change"):
        train(changed)
    assert (cfg.run_dir / "config.yaml").read_text() == before  # not overwritten
    # the same config resumes (progress display is not a change)
    state, _ = train(cfg_for(tmp_path, "drift", **{"train.progress": True}), progress=False)
    params_equal(state.params, reference.params)


def test_allowed_config_change_is_recorded_with_its_step(tmp_path):
    cfg = cfg_for(tmp_path, "allowed")
    train(cfg, stop_at=5)  # last checkpoint: step 4
    longer = cfg_for(tmp_path, "allowed", **{"train.steps": 16})
    state, _ = train(longer, allow_config_change=True)
    assert int(state.step) == 16
    rows = [json.loads(x) for x in (cfg.run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert rows == [{"step": 4, "changes": {"train.steps": [12, 16]}}]
    assert yaml.safe_load((cfg.run_dir / "config.yaml").read_text())["train"]["steps"] == 16
    assert "from step 4: `train.steps` 12 -> 16" in (cfg.run_dir / "report.md").read_text()


def test_config_changes_ignores_location_and_display_only():
    a = {"name": "x", "out_dir": "runs", "train": {"progress": True, "steps": 3}, "optim": {"options": {}}}
    b = {"name": "y", "out_dir": "/abs/runs", "train": {"progress": False, "steps": 3}, "optim": {"options": {"n": 2}}}
    assert config_changes(a, b) == {"optim.options.n": ("<absent>", 2)}
    # a key that did not exist when the run started means its default
    old = {"train": {"steps": 3}}
    assert config_changes(old, {"train": {"steps": 3, "divergence_factor": 100.0}},
                          defaults={"train": {"divergence_factor": 100.0}}) == {}
    assert config_changes(old, {"train": {"steps": 3, "divergence_factor": 5.0}},
                          defaults={"train": {"divergence_factor": 100.0}}) == {"train.divergence_factor": (100.0, 5.0)}


# ----------------------------------------------------------------------------- one writer


def test_second_writer_fails_at_once_and_stale_lock_is_taken_over(tmp_path):
    cfg = cfg_for(tmp_path, "locked", **{"train.steps": 2})
    cfg.run_dir.mkdir(parents=True)
    with RunLock(cfg.run_dir):  # a live writer (this process)
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()} .*remove .*\.lock"):
            train(cfg)
    assert not (cfg.run_dir / ".lock").exists()  # released on exit
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (cfg.run_dir / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                   "started": "earlier"}))
    with pytest.warns(UserWarning, match="stale lock"):
        state, _ = train(cfg)
    assert int(state.step) == 2 and not (cfg.run_dir / ".lock").exists()


# ----------------------------------------------------------------------------- validation before compute


@pytest.mark.parametrize("sets, needle", [
    (["optim.learning_rate=-1"], "optim.learning_rate: got -1.0; expected > 0"),
    (["train.steps=-5"], "train.steps: got -5; expected >= 1"),
    (["data.batch_size=0"], "data.batch_size: got 0; expected >= 1"),
    (["train.keep=0"], "train.keep: got 0; expected >= 1"),
    (["data.name=moons"], "data.name: unknown dataset 'moons' for task 'flow_matching'; available: ['eight_gaussians'"),
    (["mesh.data=64"], "mesh: "),
    (["mesh.data=1", "data.batch_size=30", "mesh.fsdp=1"], None),  # fine on one device
])
def test_bad_values_fail_in_one_line_before_anything_is_created(tmp_path, capsys, sets, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "train": {**BASE["train"], "steps": 2}}))
    out = tmp_path / "out"
    rc = main(["train", str(cfg), "--set", f"out_dir={out}", *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err
    if needle is None:
        assert rc == 0
        return
    assert rc == 2, err
    assert err.startswith("config error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_broken_yaml_names_file_and_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\ntrain:\n  steps: [1, 2\nmesh: {data: 1}\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: {cfg}:") and "invalid YAML" in err and err.count("\n") == 1


def test_report_on_a_missing_dir_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: no run dir {tmp_path / 'nope'}\n"


# ----------------------------------------------------------------------------- subprocess fault tests

DRIVER = textwrap.dedent("""
    import os, signal, sys
    from jaxlab.data import TOY2D_DATASETS
    from jaxlab.training import TASKS, register_task
    from jaxlab.cli import main

    KILL_STEP = int(os.environ.get("KILL_STEP", "-1"))        # SIGKILL before this 0-based batch
    KILL_SAVE = int(os.environ.get("KILL_SAVE", "-1"))        # SIGKILL inside the write of this checkpoint
    HOLD_STEP = int(os.environ.get("HOLD_STEP", "-1"))        # wait for a file before this batch
    orig, options_cls = TASKS["flow_matching"]

    def build(cfg, opts, model):
        task = orig(cfg, opts, model)
        inner = task.batch_fn

        def batch_fn(step):
            if step == KILL_STEP:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == HOLD_STEP:
                open(os.environ["HOLD_FILE"] + ".reached", "w").close()
                while not os.path.exists(os.environ["HOLD_FILE"]):
                    import time; time.sleep(0.05)
            return inner(step)

        task.batch_fn = batch_fn
        return task

    register_task("flow_matching", build, options_cls, datasets=TOY2D_DATASETS)
    if KILL_SAVE >= 0:
        from orbax.checkpoint._src.path import atomicity
        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def killing_finalize(self, *a, **k):
            if os.path.basename(str(self._final_path)) == str(KILL_SAVE):
                os.kill(os.getpid(), signal.SIGKILL)
            return await finalize(self, *a, **k)

        atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
    sys.exit(main(sys.argv[1:]))
""")


def _driver(tmp_path, env=None, wait=True):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, "name": "sub", "out_dir": str(tmp_path / "runs")}))
    e = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    # one device like `jaxlab train` on this box, and the same XLA pipeline as the in-process reference run
    # (conftest's flags minus the simulated device count): bitwise equality needs the same compiled programs
    flags = [f for f in e.pop("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if flags:
        e["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, str(script), "train", str(cfg)]
    if not wait:
        return subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=300)


def _final_params(run: Path, reference):
    c = Checkpointer(run / "checkpoints")
    assert c.latest_step() == 12
    restored = c.restore(reference)
    c.close()
    return restored.params


def test_sigkill_during_a_step_then_resume(tmp_path, reference):
    killed = _driver(tmp_path, {"KILL_STEP": "6"})
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "sub"
    assert Checkpointer(run / "checkpoints").latest_step() == 4
    resumed = _driver(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    params_equal(_final_params(run, reference), reference.params)
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, reference):
    killed = _driver(tmp_path, {"KILL_SAVE": "8"})
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "runs" / "sub" / "checkpoints"
    assert any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())  # the write was cut
    resumed = _driver(tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "removed 1 unfinished checkpoint write" in resumed.stderr
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())
    params_equal(_final_params(tmp_path / "runs" / "sub", reference), reference.params)


def test_concurrent_runs_into_one_dir(tmp_path):
    hold = tmp_path / "go"
    first = _driver(tmp_path, {"HOLD_STEP": "3", "HOLD_FILE": str(hold)}, wait=False)
    try:
        for _ in range(1200):
            if Path(str(hold) + ".reached").exists() or first.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert first.poll() is None, first.communicate()
        second = _driver(tmp_path)
        assert second.returncode == 1
        assert f"error: run dir {tmp_path / 'runs' / 'sub'} is in use by pid {first.pid}" in second.stderr
    finally:
        hold.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = read_metrics(tmp_path / "runs" / "sub")
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 8, 10, 12]  # each line once


def test_reproduce_help_shows_the_experiments_flags_under_its_own_name(capsys):
    assert main(["reproduce", "step_digits", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].startswith("usage: jaxlab reproduce step_digits")
    for flag in ("--quick", "--seeds", "--steps", "--out", "--set", "--overlay"):
        assert flag in out
    assert main(["reproduce", "step_digits", "--bogus"]) == 1
    err = capsys.readouterr().err
    assert "jaxlab reproduce step_digits: error: unrecognized arguments: --bogus" in err and "run.py" not in err


def test_report_flags_nonfinite_and_impossible_negative_metrics(tmp_path):
    from jaxlab.training import MetricsWriter, write_report

    w = MetricsWriter(tmp_path / "metrics.jsonl")
    w.write(10, "train", {"loss": 1.0, "grad_norm": float("inf")})
    w.write(10, "eval", {"sw2": float("nan"), "energy": -2.56, "log_likelihood": -3.0})
    w.write(20, "eval", {"sw2": 0.1, "energy": -0.5, "log_likelihood": -2.0})
    report = write_report(tmp_path).read_text()
    assert "## Warnings" in report
    assert "`train/grad_norm` is not finite at 1 logged step(s): 10" in report
    assert "`eval/sw2` is not finite at 1 logged step(s): 10" in report
    assert "`eval/energy` is negative (cannot be) at 2 logged step(s): 10, 20" in report
    assert "log_likelihood" not in report.split("## Warnings")[1].split("##")[0]  # may be negative


def test_batch_must_split_over_the_data_parallel_devices(tmp_path, eight_devices):
    cfg = cfg_for(tmp_path, "split", **{"mesh.data": 4, "mesh.fsdp": 2, "data.batch_size": 36})
    with pytest.raises(ConfigError, match=r"data.batch_size: got 36; expected a multiple of .* = 8"):
        train(cfg, devices=eight_devices)
    assert not cfg.run_dir.exists()
    with pytest.raises(ConfigError, match=r"mesh: .*\(8 devices available\)"):
        train(cfg_for(tmp_path, "big", **{"mesh.data": 16}), devices=eight_devices)
