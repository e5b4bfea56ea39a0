"""The experiment harness every ``experiments/*/run.py`` uses.

An experiment is a folder with ``config.yaml`` (free-form, with an optional ``quick:`` section
deep-merged over it by ``--quick``), a ``run.py`` that keeps only its science, and a README with the
tables. This module gives them one shape:

* :func:`setup` parses the one argument set (``--quick``, ``--seeds``, ``--steps``, ``--out``,
  ``--set``, ``--overlay``; ``jaxlab reproduce NAME --help`` shows it), loads the config through
  :mod:`jaxlab.training.config` (``deep_merge``/``apply_set``) and makes the output folder;
* :func:`run_training` trains one model per seed (vmapped or looped) with the same step as
  ``jaxlab train`` (:func:`jaxlab.make_train_step`), scanned in compiled chunks under a progress bar;
* :func:`mean_std`, :func:`paired_difference` and :func:`std_note` are the one statistics
  convention: mean ± sample std (``ddof=1``), paired differences with 95 % t-intervals, named in every
  table header;
* :meth:`Experiment.write` writes ``report.md`` and ``results.json`` (with the config and command).

Seeds are paired: run ``s`` of every method starts from the same init (``init_fn(seed_key(s))``) and
sees the same batches (``batch_fn(fold_in(data_key(s), step))``), so differences between methods at
one seed are paired differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxlab.training.config import ConfigError, apply_set, deep_merge, load_yaml
from jaxlab.training.report import markdown_table
from jaxlab.training.state import TrainState
from jaxlab.training.train_step import NonFiniteError, leaf_paths, make_train_step, nonfinite_message

__all__ = [
    "Experiment",
    "RunResult",
    "data_key",
    "experiment_parser",
    "markdown_table",
    "mean_std",
    "paired_difference",
    "run_training",
    "seed_key",
    "setup",
    "std_note",
]


# --------------------------------------------------------------------------------------------- statistics


def std_note(n: int | None = None) -> str:
    """The convention line every table header carries: ``mean ± sample std (ddof=1) over n seeds``."""
    return "mean ± sample std (ddof=1)" + (f" over {n} seeds" if n is not None else "")


def mean_std(xs, scale: float = 1.0, digits: int = 2) -> str:
    """``"m ± s"`` with the sample std (``ddof=1``) of ``xs * scale``; ``"m"`` alone for one value.

    Example:
      >>> mean_std([1.0, 2.0, 3.0])
      '2.00 ± 1.00'
      >>> mean_std([0.5], scale=100, digits=1)
      '50.0'
    """
    x = np.asarray(xs, np.float64).ravel() * scale
    if x.size == 0:
        return "—"
    if x.size == 1:
        return f"{x[0]:.{digits}f}"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}"


# two-sided 97.5 % quantiles of Student's t for df = 1..30 (beyond: the normal 1.96 is within 2 %)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def paired_difference(a, b, scale: float = 1.0, digits: int = 3) -> dict[str, Any]:
    """Paired difference ``a - b`` over seeds: mean, 95 % t-interval and its text.

    ``d_i = a_i - b_i``; interval ``mean(d) ± t_{0.975, n-1} * std(d, ddof=1) / sqrt(n)``.

    Example:
      >>> r = paired_difference([1.0, 2.0, 3.0, 4.0, 5.0], [0.9, 1.8, 2.9, 3.7, 4.9])
      >>> round(r["mean"], 3), r["text"]
      (0.16, '+0.160 [+0.049, +0.271]')
    """
    a, b = (np.asarray(v, np.float64).ravel() * scale for v in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: a and b need one value per seed each, got {a.shape} and {b.shape}")
    d = a - b
    n = d.size
    mean = float(d.mean())
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "n": n, "text": f"{mean:+.{digits}f}"}
    half = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * float(d.std(ddof=1)) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"mean": mean, "lo": lo, "hi": hi, "n": n,
            "text": f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"}


# --------------------------------------------------------------------------------------------- config + CLI


def experiment_parser(description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """The one argument set of every experiment (what ``jaxlab reproduce NAME --help`` prints)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CPU-minutes version (the config's quick: section)")
    p.add_argument("--seeds", type=int, default=None, help="number of paired seeds (overrides the config's seeds)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (overrides the config)")
    p.add_argument("--out", default=None, help="output folder (default runs/NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--overlay", action="append", default=[], metavar="FILE",
                   help="YAML deep-merged over the config (repeatable, in order)")
    return p


_MISSING = object()


def _get(tree: dict, dotted: str, default=None):
    cur = tree
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


@dataclasses.dataclass
class Experiment:
    """A parsed experiment invocation: its resolved config, output folder and the command that reproduces it."""

    name: str
    folder: Path
    cfg: dict
    out: Path
    quick: bool
    seeds: int | None
    command: str
    args: argparse.Namespace
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def write(self, report: str, results: dict, *, echo: bool = True) -> dict:
        """Write ``report.md`` and ``results.json`` (``results`` plus config, command and wall time)."""
        payload = {"command": self.command, "config": self.cfg, "seconds": time.perf_counter() - self.started}
        payload.update(results)
        (self.out / "report.md").write_text(report.rstrip() + "\n")
        (self.out / "results.json").write_text(json.dumps(_jsonable(payload), indent=1))
        if echo:
            print(report)
        return payload

    def header(self, title: str) -> list[str]:
        """The first lines of every report: title, the command, and the statistics convention."""
        return [f"# {title}", "", f"Command: `{self.command}`", "",
                f"Tables: {std_note(self.seeds)} unless a column says otherwise.", ""]


def setup(file: str, argv: Sequence[str] | None = None, *, description: str | None = None,
          steps_key: str | Sequence[str] = "train.steps", seeds_key: str = "seeds") -> Experiment:
    """Parse the experiment CLI and load ``config.yaml`` beside ``file`` (an experiment's ``run.py``).

    Order: ``config.yaml`` -> its ``quick:`` section (``--quick``) -> each ``--overlay`` -> each ``--set``
    -> ``--steps`` (written to ``steps_key``, every one of them when a list) -> ``--seeds`` (to ``seeds_key``).
    """
    folder = Path(file).resolve().parent
    name = folder.name
    doc = description if description is not None else ""
    args = experiment_parser(doc, prog=f"jaxlab reproduce {name}").parse_args(argv)
    path = folder / "config.yaml"
    try:
        cfg = load_yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"experiment {name}: no config.yaml in {folder}") from None
    quick = cfg.pop("quick", {}) or {}
    if args.quick:
        cfg = deep_merge(cfg, quick)
    for ov in args.overlay:
        cfg = deep_merge(cfg, load_yaml(Path(ov).read_text()) or {})
    for s in args.set:
        before = cfg
        cfg = apply_set(cfg, s)
        key = s.split("=", 1)[0].strip()
        if _get(before, key, _MISSING) is _MISSING:
            raise ConfigError(f"--set {s!r}: {key} is not a key of {path} (top-level keys: {sorted(before)})")
    if args.steps is not None:
        for k in [steps_key] if isinstance(steps_key, str) else steps_key:
            cfg = apply_set(cfg, f"{k}={args.steps}")
    if args.seeds is not None:
        cfg = apply_set(cfg, f"{seeds_key}={args.seeds}")
    seeds = _get(cfg, seeds_key)
    out = Path(args.out) if args.out else Path("runs") / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = _drop_out(["jaxlab", "reproduce", name, *(argv if argv is not None else sys.argv[1:])])
    return Experiment(name, folder, cfg, out, args.quick, seeds, " ".join(shlex.quote(c) for c in cmd), args)


def _drop_out(cmd: list[str]) -> list[str]:
    out, skip = [], False
    for c in cmd:
        if skip:
            skip = False
            continue
        if c == "--out":
            skip = True
            continue
        if c.startswith("--out="):
            continue
        out.append(c)
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


# --------------------------------------------------------------------------------------------- training


def seed_key(seed: int) -> jax.Array:
    """The init key of paired seed ``seed`` (the same for every method)."""
    return jax.random.PRNGKey(seed)


def data_key(seed: int) -> jax.Array:
    """The data key of paired seed ``seed``: step ``t``'s batch is drawn from ``fold_in(data_key, t)``."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), 0xDA7A)


class RunResult(dict):
    """``{"state": TrainState stacked over runs, "trace": {name: array [runs, steps, ...]}, "seconds": float,
    "probe_state": the probe's final state (``()`` without a probe)}``."""

    @property
    def state(self) -> TrainState:
        return self["state"]

    @property
    def trace(self) -> dict[str, np.ndarray]:
        return self["trace"]


def run_training(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    init_fn: Callable[[jax.Array], Any],
    batch_fn: Callable[..., Any],
    *,
    steps: int,
    seeds: Sequence[int] | int,
    run_inputs: Any = None,
    forward_params_fn: Callable | None = None,
    has_loss_state: bool = False,
    init_loss_state: Any = None,
    ema_decay: float | None = None,
    record_fn: Callable[[TrainState], dict] | None = None,
    probe: Any = None,
    vmap: bool = True,
    chunk: int | None = None,
    desc: str | None = None,
    progress: bool = True,
    on_nonfinite: str = "warn",
) -> RunResult:
    """Train one run per seed with :func:`jaxlab.make_train_step`'s step, scanned in compiled chunks.

    Run ``i`` starts from ``params = init_fn(seed_key(seeds[i]))`` and ``TrainState.create(..., rng=...)``;
    step ``t`` trains on ``batch_fn(fold_in(data_key(seeds[i]), t))`` (or ``batch_fn(key, run_inputs[i])``
    when ``run_inputs`` is given: a pytree with one leading entry per run, e.g. a swept coefficient that
    the batch carries into the loss). The per-step loss key is the train step's own
    ``fold_in(state.rng, step)``. Runs are ``jax.vmap``-ed (``vmap=True``) or looped; steps run
    ``chunk`` at a time inside one ``lax.scan`` (one compilation), with a progress bar between chunks.

    Args:
      loss_fn, tx, forward_params_fn, has_loss_state, ema_decay: as for :func:`jaxlab.make_train_step`.
      init_fn: ``key -> params``.
      batch_fn: ``key -> batch`` (or ``(key, run_input) -> batch``); traced, so use ``jax.random``.
      steps: steps per run. seeds: seed list, or a count ``k`` for ``range(k)``.
      init_loss_state: the loss state of a fresh run (e.g. :func:`jaxlab.meanflow_init_state`).
      record_fn: ``state -> {name: scalar}`` logged after every step besides the step metrics.
      probe: a :class:`jaxlab.training.nm_premise.Probe` (``init(state)``, ``update(probe_state,
        state_before, state_after, batch) -> (probe_state, metrics)``) carried beside the train state;
        its metrics join the trace and its final state is ``result["probe_state"]``. A probe with an
        ``at_chunk_end(probe_state, state) -> (probe_state, metrics)`` is also called once after every
        chunk (for measurements too costly per step); those metrics join the trace as ``[runs, chunks,
        ...]`` with ``trace["chunk_end_step"]`` (the step each was taken after).
      chunk: steps per compiled chunk (default: ``steps`` when no progress bar, else about 1/20 of them).
      on_nonfinite: what to do when a run met a NaN/Inf loss or gradient (the step's ``nonfinite``
        metric): ``"warn"`` (default: one ``RuntimeWarning`` naming each such run's seed, first step and
        first non-finite value; the other runs of a vmapped grid are unaffected), ``"raise"``
        (:class:`jaxlab.training.NonFiniteError` with the same text, after the whole run) or ``"ignore"``.
    Returns:
      :class:`RunResult`: final states stacked over runs, per-step traces ``[runs, steps]`` of the
      metrics (``loss``, ``grad_norm``, ``nonfinite``, the loss's own, ``record_fn``'s, ``probe``'s) and
      wall seconds.
    """
    if on_nonfinite not in ("warn", "raise", "ignore"):
        raise ValueError(f"run_training: on_nonfinite must be 'warn', 'raise' or 'ignore', got {on_nonfinite!r}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    n_runs = len(seed_list)
    if n_runs < 1 or steps < 1:
        raise ValueError(f"run_training: need >= 1 seed and >= 1 step, got seeds={seeds!r}, steps={steps}")
    if run_inputs is not None:
        lead = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(run_inputs)}
        if lead != {n_runs}:
            raise ValueError(f"run_training: run_inputs leaves need a leading axis of {n_runs} (one per seed), "
                             f"got leading sizes {sorted(lead, key=str)}")
    step = make_train_step(loss_fn, tx, forward_params_fn=forward_params_fn, has_loss_state=has_loss_state,
                           ema_decay=ema_decay, jit=False)
    chunk = steps if chunk is None and not progress else (chunk or max(1, -(-steps // 20)))
    chunk = min(chunk, steps)

    def init(seed, run_input):
        params = init_fn(seed_key(seed))
        state = TrainState.create(params=params, tx=tx, rng=jax.random.fold_in(seed_key(seed), 1),
                                  ema_decay=ema_decay, loss_state=init_loss_state)
        return state, (probe.init(state) if probe is not None else ())

    def run_chunk(state, seed, run_input, start, n):
        dkey = data_key(seed)

        def body(carry, t):
            st, ps = carry
            key = jax.random.fold_in(dkey, t)
            batch = batch_fn(key) if run_inputs is None else batch_fn(key, run_input)
            new, metrics = step(st, batch)
            if record_fn is not None:
                metrics = {**metrics, **record_fn(new)}
            if probe is not None:
                ps, probed = probe.update(ps, st, new, batch)
                metrics = {**metrics, **probed}
            return (new, ps), metrics

        (st, ps), metrics = jax.lax.scan(body, state, start + jnp.arange(n))
        ends = {}
        if probe is not None and getattr(probe, "at_chunk_end", None) is not None:
            ps, ends = probe.at_chunk_end(ps, st)
        return (st, ps), (metrics, ends)

    seeds_arr = jnp.asarray(seed_list, jnp.uint32)
    inputs = run_inputs if run_inputs is not None else jnp.zeros((n_runs,), jnp.int32)
    if vmap:
        init_all = jax.jit(jax.vmap(init))
        chunk_all = jax.jit(jax.vmap(run_chunk, in_axes=(0, 0, 0, None, None)), static_argnums=4)
    else:
        init_one, chunk_one = jax.jit(init), jax.jit(run_chunk, static_argnums=4)

        def init_all(s, r):
            return _stack([init_one(s[i], _index(r, i)) for i in range(n_runs)])

        def chunk_all(st, s, r, start, n):
            outs = [chunk_one(_index(st, i), s[i], _index(r, i), start, n) for i in range(n_runs)]
            return _stack([o[0] for o in outs]), _stack([o[1] for o in outs])

    t0 = time.perf_counter()
    state = init_all(seeds_arr, inputs)
    traces, ends, end_steps = [], [], []
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
        done = 0
        while done < steps:
            n = min(chunk, steps - done)
            state, (tr, end) = chunk_all(state, seeds_arr, inputs, jnp.asarray(done, jnp.int32), n)
            traces.append(jax.device_get(tr))
            done += n
            if end:
                ends.append(jax.device_get(end))
                end_steps.append(done)
            bar.update(n)
            if "loss" in tr:
                bar.set_postfix_str(f"loss {float(np.mean(traces[-1]['loss'][:, -1])):.4g}", refresh=False)
    jax.block_until_ready(state)
    trace = {k: np.concatenate([t[k] for t in traces], axis=1) for k in traces[0]}
    if ends:  # the probe's chunk-end metrics: [runs, chunks, ...] and the step each was taken after
        trace.update({k: np.stack([e[k] for e in ends], axis=1) for k in ends[0]})
        trace["chunk_end_step"] = np.broadcast_to(np.asarray(end_steps, np.int32), (n_runs, len(end_steps))).copy()
    state, probe_state = state
    if on_nonfinite != "ignore" and "nonfinite" in trace:
        _report_nonfinite(trace["nonfinite"], seed_list, leaf_paths(_index(state.params, 0)), desc, on_nonfinite)
    return RunResult(state=state, trace=trace, seconds=time.perf_counter() - t0, probe_state=probe_state)


def _report_nonfinite(codes, seeds: list[int], paths: list[str], desc: str | None, action: str) -> None:
    """Warn about (or raise for) the runs whose ``nonfinite`` trace ``[runs, steps]`` ever left ``-1``."""
    lines = []
    for i, row in enumerate(np.asarray(codes)):
        bad = np.flatnonzero(row >= 0)
        if bad.size:
            t = int(bad[0])
            lines.append(f"seed {seeds[i]}: " + nonfinite_message(row[t], t + 1, paths, f" ({bad.size} steps in all)"))
    if not lines:
        return
    text = f"run_training{f' ({desc})' if desc else ''}: {len(lines)} of {len(seeds)} runs met NaN/Inf:\n  " + \
        "\n  ".join(lines)
    if action == "raise":
        raise NonFiniteError(text)
    warnings.warn(text, RuntimeWarning, stacklevel=3)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
