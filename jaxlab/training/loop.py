"""The training loop: progress bar, periodic eval, JSONL metrics, orbax checkpoints, resume, NaN stop.

:func:`train` is what ``jaxlab train CONFIG`` runs: it builds the mesh, the task, the sharded state and
the step from a :class:`~jaxlab.training.RunConfig`, resumes from the run directory's latest checkpoint
if there is one, and calls :func:`fit`. Because batches and step keys are pure functions of the step
index, a run interrupted and resumed ends with exactly the params of an uninterrupted run.
"""

from __future__ import annotations

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
from jaxlab.training.config import RunConfig, dump_config
from jaxlab.training.metrics import MetricsWriter
from jaxlab.training.registry import build_task, build_task_optimizer, validate_config
from jaxlab.training.report import write_report
from jaxlab.training.state import TrainState
from jaxlab.training.train_step import leaf_paths, make_train_step, raise_if_nonfinite, state_shardings

__all__ = ["fit", "train", "global_batch", "init_state"]


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

    def make(k):
        return TrainState.create(
            params=unbox(task.init_params(k)),
            tx=tx,
            rng=rng,
            ema_decay=ema_decay,
            loss_state=task.init_loss_state,
        )

    if mesh is None:
        return jax.jit(make)(init_key), None
    boxed = jax.eval_shape(task.init_params, init_key)
    abstract = jax.eval_shape(make, init_key)
    shardings = state_shardings(abstract, tx, mesh, boxed_params=boxed)
    return jax.jit(make, out_shardings=shardings)(init_key), shardings


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
    progress: bool = True,
    stop_at: int | None = None,
    use_ema_for_eval: bool = True,
    desc: str = "train",
):
    """Run ``step_fn`` from ``state.step`` to ``num_steps``.

    Every step: assemble the global batch, step, and (``check_finite``) stop with
    :class:`~jaxlab.training.NonFiniteError` naming the step and first non-finite leaf; the state of that
    step is never checkpointed, so the last good checkpoint stays intact. Every ``log_every`` steps the
    train metrics (and steps/s) go to ``writer``; every ``eval_every`` steps and at the end ``eval_fn``.
    ``stop_at`` stops early after that step (as a preemption would), without a final checkpoint.

    Returns:
      ``(state, last_metrics)``.
    """
    start = int(state.step)
    paths = leaf_paths(state.params)
    last: dict = {}
    # In a log file (no TTY) redraw rarely; in a terminal redraw smoothly.
    interval = 0.2 if sys.stderr.isatty() else 10.0
    bar = tqdm(total=num_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True, leave=False,
               mininterval=interval)
    t0, s0 = time.perf_counter(), start
    try:
        for s in range(start, num_steps):
            batch = global_batch(batch_fn(s), mesh)
            state, m = step_fn(state, batch)
            if check_finite:
                raise_if_nonfinite(m["nonfinite"], s, paths)
            done = s + 1
            if done % log_every == 0 or done == num_steps:
                m = {k: float(np.asarray(v)) for k, v in m.items() if np.ndim(v) == 0 and k != "nonfinite"}
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


def train(cfg: RunConfig, *, stop_at: int | None = None, progress: bool | None = None, devices=None):
    """Run (or resume) a whole training run described by ``cfg``; returns ``(state, summary)``.

    Writes ``cfg.run_dir/{config.yaml, metrics.jsonl, checkpoints/, report.md, plots/}``.
    """
    validate_config(cfg)
    maybe_initialize_distributed(cfg.mesh.distributed)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    mesh = mesh_from_config(cfg.mesh, devices=devices)
    single = mesh.size == 1
    task = build_task(cfg)
    tx, forward_params_fn = build_task_optimizer(cfg, task)
    key = jax.random.PRNGKey(cfg.seed)
    state, shardings = init_state(task, tx, key, ema_decay=cfg.train.ema_decay, mesh=None if single else mesh)
    ckpt = Checkpointer(
        run_dir / "checkpoints", every=cfg.train.ckpt_every, keep=cfg.train.keep, async_save=cfg.train.async_checkpoint
    )
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    try:
        state = ckpt.restore_or(state)
        start = int(state.step)
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
            progress=cfg.train.progress if progress is None else progress,
            stop_at=stop_at,
            desc=cfg.name,
        )
    finally:
        ckpt.close()
    if int(state.step) >= cfg.train.steps:
        extra = []
        if task.report_fn is not None and jax.process_index() == 0:
            params = state.ema_params if state.ema_params is not None else state.params
            extra = task.report_fn(params, Path(run_dir))
        write_report(run_dir, extra_lines=extra)
    return state, last
