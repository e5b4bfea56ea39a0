"""The training loop: progress bar, periodic eval, JSONL metrics, orbax checkpoints, resume, NaN stop.

:func:`train` is what ``jaxlab train CONFIG`` runs: it builds the mesh, the task, the sharded state and
the step from a :class:`~jaxlab.training.RunConfig`, resumes from the run directory's latest checkpoint
if there is one, and calls :func:`fit`. Because batches and step keys are pure functions of the step
index, a run interrupted and resumed ends with exactly the params of an uninterrupted run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxlab.distributed.mesh import maybe_initialize_distributed, mesh_from_config
from jaxlab.distributed.sharding import batch_sharding, unbox
from jaxlab.training.checkpoint import Checkpointer
from jaxlab.training.config import ConfigError, RunConfig, dump_config, to_dict
from jaxlab.training.metrics import MetricsWriter
from jaxlab.training.registry import build_task, build_task_optimizer, validate_config
from jaxlab.training.report import write_report
from jaxlab.training.run_dir import RunLock, check_resume_config, record_changes
from jaxlab.training.state import TrainState
from jaxlab.training.train_step import (
    DivergenceError,
    leaf_paths,
    make_train_step,
    raise_if_nonfinite,
    state_shardings,
)

__all__ = ["DivergenceMonitor", "fit", "train", "global_batch", "init_state"]


def global_batch(local_batch, mesh):
    """Assemble this process's batch share into a global ``jax.Array`` sharded over the data axes."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), np.asarray(x)),
        local_batch,
    )


def init_state(task, tx, key, *, ema_decay=None, mesh=None):
    """Create the TrainState directly in its shardings (no host round trip of the params)."""
    init_key, rng = jax.random.split(key)
    base = None if task.load_base is None else task.load_base(mesh)

    def params_of(k, b):
        return task.init_params(k) if b is None else task.init_params(k, b)

    def make(k, b):
        return TrainState.create(
            params=unbox(params_of(k, b)),
            tx=tx,
            rng=rng,
            ema_decay=ema_decay,
            loss_state=task.init_loss_state,
        )

    if mesh is None:
        return jax.jit(make)(init_key, base), None
    boxed = jax.eval_shape(params_of, init_key, base)
    abstract = jax.eval_shape(make, init_key, base)
    shardings = state_shardings(abstract, tx, mesh, boxed_params=boxed)
    return jax.jit(make, out_shardings=shardings)(init_key, base), shardings


class DivergenceMonitor:
    """Host-side divergence checks on each step's ``loss`` and ``grad_norm`` (1-based step numbers).

    Stops (raises :class:`~jaxlab.training.DivergenceError`) when the global gradient norm is not finite
    while every gradient leaf is (the squared sum overflowed), or when the loss exceeds ``factor`` times

    * the first loss this monitor saw (the loss at initialisation, or at the resume point): a blow-up that
      starts in the first steps, before any history exists, or grows too gradually for the median; or
    * the median of the last ``window`` losses, once ``min_history`` of them are seen: a sudden spike.

    A reference that is not positive is never compared (losses that may go negative). ``factor=None``
    disables the loss checks.
    """

    def __init__(self, factor: float | None = 100.0, window: int = 200, min_history: int = 20):
        self.factor, self.window, self.min_history = factor, int(window), int(min_history)
        self.history: list[float] = []
        self.first: float | None = None

    def check(self, step: int, loss: float, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):
            raise DivergenceError(
                f"diverged at step {step}: the global gradient norm is {grad_norm} while every gradient leaf is "
                "finite (their squared sum overflowed); lower the learning rate or clip gradients"
            )
        if self.factor is not None and self.first is not None and self.first > 0 and loss > self.factor * self.first:
            raise DivergenceError(
                f"diverged at step {step}: loss {loss:.6g} is more than {self.factor:g} x the first loss of this "
                f"run {self.first:.6g} (train.divergence_factor)"
            )
        if self.factor is not None and len(self.history) >= min(self.min_history, self.window):
            med = float(np.median(self.history[-self.window:]))
            if med > 0 and loss > self.factor * med:
                raise DivergenceError(
                    f"diverged at step {step}: loss {loss:.6g} is more than {self.factor:g} x the median "
                    f"{med:.6g} of the last {min(len(self.history), self.window)} losses "
                    "(train.divergence_factor)"
                )
        if self.first is None and math.isfinite(loss):
            self.first = loss
        self.history.append(loss)
        if len(self.history) > 2 * self.window:
            del self.history[: -self.window]


def fit(
    state: TrainState,
    step_fn: Callable,
    batch_fn: Callable[[int], object],
    *,
    num_steps: int,
    mesh=None,
    writer: MetricsWriter | None = None,
    ckpt: Checkpointer | None = None,
    eval_fn: Callable | None = None,
    eval_every: int = 0,
    log_every: int = 50,
    check_finite: bool = True,
    divergence_factor: float | None = 100.0,
    divergence_window: int = 200,
    progress: bool = True,
    stop_at: int | None = None,
    use_ema_for_eval: bool = True,
    desc: str = "train",
):
    """Run ``step_fn`` from ``state.step`` to ``num_steps``.

    Steps are numbered from 1 wherever a user sees them (metrics rows, checkpoints, errors): step ``k`` is
    the ``k``-th update, made on ``batch_fn(k - 1)``.

    Every step: assemble the global batch, step, and (``check_finite``) stop with
    :class:`~jaxlab.training.NonFiniteError` naming the step and first non-finite leaf, or with
    :class:`~jaxlab.training.DivergenceError` when the global gradient norm overflows or the loss jumps
    above ``divergence_factor`` x its running median (:class:`DivergenceMonitor`); the state of that step
    is never checkpointed, so the last good checkpoint stays intact (the error names it). Every
    ``log_every`` steps the train metrics go to ``writer``: ``loss`` is the mean over the steps since
    the previous log line (``loss_steps`` of them), the other metrics are those of the logged step, plus
    steps/s. Every ``eval_every`` steps and at the end ``eval_fn``. ``stop_at`` stops early after that
    step (as a preemption would), without a final checkpoint.

    Returns:
      ``(state, last_metrics)``.
    """
    start = int(state.step)
    paths = leaf_paths(state.params)
    monitor = DivergenceMonitor(divergence_factor, divergence_window) if check_finite else None
    last: dict = {}
    loss_sum, loss_n = 0.0, 0
    # In a log file (no TTY) redraw rarely; in a terminal redraw smoothly.
    interval = 0.2 if sys.stderr.isatty() else 10.0
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, leave=False,
               mininterval=interval)
    t0, s0 = time.perf_counter(), start

    def note():
        good = None if ckpt is None else ckpt.latest_step()
        return "; no checkpoint was written yet" if good is None else f"; the last good checkpoint is step {good}"

    try:
        for s in range(start, num_steps):
            batch = global_batch(batch_fn(s), mesh)
            state, m = step_fn(state, batch)
            done = s + 1
            loss = m["loss"]  # stays on device (no per-step sync) unless the checks need it on the host
            if check_finite:
                loss = float(np.asarray(loss))
                try:
                    raise_if_nonfinite(m["nonfinite"], done, paths)
                    monitor.check(done, loss, float(np.asarray(m["grad_norm"])))
                except DivergenceError as e:
                    if ckpt is not None:
                        ckpt.wait()
                    raise type(e)(f"{e}{note()}") from None
            loss_sum, loss_n = loss_sum + loss, loss_n + 1
            if done % log_every == 0 or done == num_steps:
                m = {k: float(np.asarray(v)) for k, v in m.items() if np.ndim(v) == 0 and k != "nonfinite"}
                m["loss"], m["loss_steps"] = float(np.asarray(loss_sum)) / loss_n, loss_n
                loss_sum, loss_n = 0.0, 0
                now = time.perf_counter()
                m["steps_per_s"] = (done - s0) / max(now - t0, 1e-9)
                t0, s0 = now, done
                last = m
                bar.set_postfix(loss=f"{m['loss']:.4g}", it_s=f"{m['steps_per_s']:.1f}", refresh=False)
                if writer is not None:
                    writer.write(done, "train", m)
            if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == num_steps):
                params = state.ema_params if (use_ema_for_eval and state.ema_params is not None) else state.params
                ev = eval_fn(params, jax.random.fold_in(jax.random.PRNGKey(0xE7A1), done))
                if writer is not None:
                    writer.write(done, "eval", ev)
                last = {**last, **{f"eval/{k}": v for k, v in ev.items()}}
            if ckpt is not None and done < num_steps:
                ckpt.maybe_save(done, state)
            bar.update(1)
            if stop_at is not None and done >= stop_at:
                break
        else:
            if ckpt is not None and ckpt.latest_step() != num_steps:
                ckpt.save(num_steps, state, force=True)
    finally:
        bar.close()
        if ckpt is not None:
            ckpt.wait()
    return state, last


def train(cfg: RunConfig, *, stop_at: int | None = None, progress: bool | None = None, devices=None,
          allow_config_change: bool = False):
    """Run (or resume) a whole training run described by ``cfg``; returns ``(state, summary)``.

    Writes ``cfg.run_dir/{config.yaml, metrics.jsonl, checkpoints/, report.md, plots/}``.

    Before anything is created on disk the config is validated (registry names, ranges, the mesh against
    the devices, the batch against the data axes): errors are :class:`~jaxlab.training.ConfigError`. Then
    the run dir is locked (:class:`~jaxlab.training.run_dir.RunLock`; a second writer gets
    :class:`~jaxlab.training.RunDirLocked`), and a resume compares ``cfg`` with the run's ``config.yaml``:
    a changed key fails unless ``allow_config_change`` (then ``config_changes.jsonl`` records it with the
    step it applies from). Restore falls back past damaged checkpoints
    (:meth:`~jaxlab.training.Checkpointer.restore_or`).
    """
    validate_config(cfg)
    maybe_initialize_distributed(cfg.mesh.distributed)
    try:
        mesh = mesh_from_config(cfg.mesh, devices=devices)
    except ValueError as e:
        n = len(jax.devices() if devices is None else list(devices))
        raise ConfigError(f"mesh: {e} ({n} devices available)") from None
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % data_ways:
        raise ConfigError(f"data.batch_size: got {cfg.data.batch_size}; expected a multiple of the data-parallel "
                          f"devices mesh.data x mesh.fsdp = {data_ways}")
    single = mesh.size == 1
    run_dir = cfg.run_dir
    resolved = to_dict(cfg)
    leader = jax.process_index() == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir) if leader else None
    if lock is not None:
        lock.acquire()
    try:
        changes = check_resume_config(run_dir, resolved, allow_change=allow_config_change)
        task = build_task(cfg)
        tx, forward_params_fn = build_task_optimizer(cfg, task)
        key = jax.random.PRNGKey(cfg.seed)
        state, shardings = init_state(task, tx, key, ema_decay=cfg.train.ema_decay, mesh=None if single else mesh)
        ckpt = Checkpointer(
            run_dir / "checkpoints", every=cfg.train.ckpt_every, keep=cfg.train.keep,
            async_save=cfg.train.async_checkpoint,
        )
        writer = MetricsWriter(run_dir / "metrics.jsonl")
        try:
            state = ckpt.restore_or(state)
            start = int(state.step)
            if leader:
                record_changes(run_dir, start, changes)
                dump_config(cfg, run_dir / "config.yaml")
            writer.truncate_after(start)
            step_fn = make_train_step(
                task.loss_fn,
                tx,
                forward_params_fn=forward_params_fn,
                has_loss_state=task.has_loss_state, trainable=task.trainable,
                ema_decay=cfg.train.ema_decay,
                mesh=None if single else mesh,
                state_sharding=shardings,
            )
            state, last = fit(
                state,
                step_fn,
                task.batch_fn,
                num_steps=cfg.train.steps,
                mesh=None if single else mesh,
                writer=writer,
                ckpt=ckpt,
                eval_fn=task.eval_fn,
                eval_every=cfg.train.eval_every,
                log_every=cfg.train.log_every,
                check_finite=cfg.train.check_finite,
                divergence_factor=cfg.train.divergence_factor,
                divergence_window=cfg.train.divergence_window,
                progress=cfg.train.progress if progress is None else progress,
                stop_at=stop_at,
                desc=cfg.name,
            )
        finally:
            ckpt.close()
        if int(state.step) >= cfg.train.steps:
            extra = []
            if task.report_fn is not None and leader:
                params = state.ema_params if state.ema_params is not None else state.params
                extra = task.report_fn(params, Path(run_dir))
            if task.export_fn is not None and leader:
                extra = list(extra) + list(task.export_fn(state, Path(run_dir)))
            write_report(run_dir, extra_lines=extra)
    finally:
        if lock is not None:
            lock.release()
    return state, last
