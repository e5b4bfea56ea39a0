"""Command line: ``jaxlab train | reproduce | report | list``.

    jaxlab train CONFIG [--overlay FILE ...] [--set key=value ...]
    jaxlab reproduce NAME|all [--quick] [--seeds K] [--steps N] [--out DIR] [--set KEY=VALUE ...]
    jaxlab report RUN_DIR
    jaxlab list
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

__all__ = ["main", "experiments_dir", "list_experiments"]

# Experiments that `reproduce all` runs first, in this order; the rest follow alphabetically.
_FIRST = ("flow_matching_2d",)


def experiments_dir() -> Path:
    """Where experiment folders live: ``$JAXLAB_EXPERIMENTS``, else ``./experiments``, else the source checkout's."""
    env = os.environ.get("JAXLAB_EXPERIMENTS")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / "experiments", Path(__file__).resolve().parents[1] / "experiments"]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "no experiments/ folder found (looked at: " + ", ".join(str(c) for c in candidates) + "); "
        "run from the jaxlab checkout or set JAXLAB_EXPERIMENTS"
    )


def list_experiments() -> list[str]:
    root = experiments_dir()
    names = sorted(p.parent.name for p in root.glob("*/run.py"))
    return [n for n in _FIRST if n in names] + [n for n in names if n not in _FIRST]


def _summary(readme: Path) -> str:
    if not readme.exists():
        return ""
    for line in readme.read_text().splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line
    return ""


def _cmd_train(args) -> int:
    from jaxlab.training import load_config, train

    cfg = load_config(args.config, overlays=args.overlay or (), sets=args.set or ())
    if args.dry_run:
        from jaxlab.training.dry_run import dry_run

        return dry_run(cfg, args)
    state, last = train(cfg, allow_config_change=args.allow_config_change)
    print(f"run dir: {cfg.run_dir}")
    for k, v in sorted(last.items()):
        print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _split_out(rest: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--out DIR`` / ``--out=DIR`` out of the arguments forwarded to an experiment."""
    out, kept, i = None, [], 0
    while i < len(rest):
        a = rest[i]
        if a == "--out" and i + 1 < len(rest):
            out, i = rest[i + 1], i + 2
            continue
        if a.startswith("--out="):
            out = a.split("=", 1)[1]
        else:
            kept.append(a)
        i += 1
    return out, kept


def _cmd_reproduce(args, rest: list[str]) -> int:
    """Run ``experiments/NAME/run.py`` with the remaining arguments (its flags: ``--help`` lists them)."""
    names = list_experiments() if args.name == "all" else [args.name]
    root = experiments_dir()
    out, rest = _split_out(rest)
    failed = []
    for name in names:
        script = root / name / "run.py"
        if not script.exists():
            raise SystemExit(f"unknown experiment {name!r}; available: {', '.join(list_experiments())}")
        argv = list(rest)
        if out:
            argv += ["--out", str(Path(out) / name) if args.name == "all" else out]
        print(f"=== reproduce {name} {' '.join(rest)}".rstrip(), flush=True)
        old_argv, old_path = sys.argv, list(sys.path)
        sys.argv = [f"jaxlab reproduce {name}", *argv]
        sys.path.insert(0, str(script.parent))
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                failed.append(name)
        except Exception as e:  # keep going with the other experiments, report at the end
            if len(names) == 1:
                raise
            print(f"!!! {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            failed.append(name)
        finally:
            sys.argv, sys.path[:] = old_argv, old_path
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args) -> int:
    from jaxlab.training.report import write_report

    try:
        path = write_report(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"written: {path}")
    return 0


def _cmd_list(args) -> int:
    from jaxlab.data import TOY2D_DATASETS
    from jaxlab.training import METHODS, MODELS, TASKS

    print("experiments (jaxlab reproduce NAME [--quick]):")
    try:
        root = experiments_dir()
        for n in list_experiments():
            print(f"  {n:22s} {_summary(root / n / 'README.md')}")
    except FileNotFoundError as e:
        print(f"  ({e})")
    print("tasks (task.name):   " + ", ".join(sorted(TASKS)))
    print("models (model.name): " + ", ".join(sorted(MODELS)))
    print("methods (optim.name): " + ", ".join(sorted(METHODS)))
    print("toy 2D datasets:     " + ", ".join(TOY2D_DATASETS))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from a YAML config (resumes from the run dir's last checkpoint)")
    t.add_argument("config")
    t.add_argument("--overlay", action="append", help="YAML deep-merged over the config (repeatable, in order)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key, e.g. train.steps=100")
    t.add_argument("--dry-run", action="store_true", help="lower and compile one step on simulated devices; print memory/shardings")
    t.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the run's config.yaml (recorded in config_changes.jsonl)")
    r = sub.add_parser(
        "reproduce", add_help=False,
        help="run an experiment's sweep and write its report (NAME or 'all'); "
             "`jaxlab reproduce NAME --help` lists its flags (--quick, --seeds, --steps, --out, --set, --overlay)",
    )
    r.add_argument("name")
    rp = sub.add_parser("report", help="write report.md + plots from a run dir's metrics.jsonl")
    rp.add_argument("run_dir")
    sub.add_parser("list", help="experiments, tasks, models, datasets")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.cmd != "reproduce":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from jaxlab.training.config import ConfigError

    try:
        if args.cmd == "train":
            return _train_with_clean_errors(args)
        if args.cmd == "reproduce":
            return _cmd_reproduce(args, rest)
        if args.cmd == "report":
            return _cmd_report(args)
        return _cmd_list(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


def _train_with_clean_errors(args) -> int:
    """``jaxlab train``: a run that stops for a reason the user can act on prints one line, exit code 1."""
    from jaxlab.training import CheckpointError, DivergenceError, RunDirLocked

    try:
        return _cmd_train(args)
    except DivergenceError as e:
        print(f"training stopped: {e}", file=sys.stderr)
    except RunDirLocked as e:
        print(f"error: {e}", file=sys.stderr)
    except CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
