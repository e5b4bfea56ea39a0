"""Owning a run directory: one writer at a time, and the config it was started with.

A run directory (``cfg.run_dir``) holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the
report. Two guarantees live here:

- **One writer.** :class:`RunLock` creates ``.lock`` (pid, host, start time) with ``O_EXCL``; a second
  run into the same directory fails at once with :class:`RunDirLocked`. The lock is released on exit and
  on every Python exception; after a hard kill (SIGKILL, power loss) the file stays, and the next run on
  the same host sees that its pid is gone and takes the lock over (a lock written on another host is
  never taken over: remove it by hand once that run is gone).
- **No silent config drift.** Resuming compares the resolved config with the run's ``config.yaml``
  (:func:`config_changes`). A difference fails with the list of changed keys unless the user allows it,
  in which case ``config_changes.jsonl`` records each change with the step from which it applies.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path

from jaxlab.training.config import ConfigError, RunConfig, load_yaml, to_dict

__all__ = [
    "RunDirLocked",
    "RunLock",
    "check_resume_config",
    "config_changes",
    "format_changes",
    "record_changes",
    "IGNORED_KEYS",
]

# Keys that do not change what is computed (where the run lives, how it is displayed).
IGNORED_KEYS = ("name", "out_dir", "train.progress")


class RunDirLocked(RuntimeError):
    """Another live process is writing this run directory."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory (a context manager).

    Example::

        with RunLock(run_dir):
            ...  # train; a second process entering here raises RunDirLocked
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / ".lock"
        self._held = False

    def _owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                    warnings.warn(f"{self.path}: taking over a stale lock of pid {pid} (no longer running)",
                                  stacklevel=2)
                    self.path.unlink(missing_ok=True)
                    continue
                if not owner:  # being written right now, or garbage: treat as held
                    pid, host = "?", "?"
                raise RunDirLocked(
                    f"run dir {self.path.parent} is in use by pid {pid} on host {host} (since "
                    f"{owner.get('started', '?')}); wait for that run to finish, or, if it is gone, remove "
                    f"{self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = True
            return self
        raise RunDirLocked(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self._held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out  # an empty mapping adds no key: same as absent
    out[prefix[:-1]] = tree
    return out


def config_changes(old: dict, new: dict, ignore=IGNORED_KEYS, defaults: dict | None = None) -> dict[str, tuple]:
    """``{dotted key: (old value, new value)}`` for every key that differs (``<absent>`` where missing).

    A key missing on one side counts as its value in ``defaults`` (a config written before the key existed
    meant its default), so adding a config field never makes old runs unresumable.
    """
    a, b = _flatten(old), _flatten(new)
    d = _flatten(defaults or {})
    out = {}
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k, d.get(k, "<absent>")), b.get(k, d.get(k, "<absent>"))
        if isinstance(va, list | tuple) and isinstance(vb, list | tuple):
            va, vb = list(va), list(vb)
        if va != vb:
            out[k] = (va, vb)
    return out


def format_changes(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))


def check_resume_config(run_dir, resolved: dict, *, allow_change: bool) -> dict[str, tuple]:
    """Compare ``resolved`` with ``run_dir/config.yaml`` when the run has checkpoints to resume from.

    Returns the changes (empty when there is nothing to resume or nothing changed).

    Raises:
      ConfigError: the config changed and ``allow_change`` is False (the message lists every changed key).
    """
    run_dir = Path(run_dir)
    stored_path = run_dir / "config.yaml"
    ckpts = run_dir / "checkpoints"
    resuming = ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
    if not (resuming and stored_path.is_file()):
        return {}
    stored = load_yaml(stored_path.read_text()) or {}
    changes = config_changes(stored, resolved, defaults=to_dict(RunConfig()))
    if changes and not allow_change:
        raise ConfigError(
            f"{run_dir} holds a run started with a different config; changed keys: {format_changes(changes)}. "
            "Resume with the original config, use another run name, or accept the change with "
            "--allow-config-change (jaxlab train) / allow_config_change=True (train())"
        )
    return changes


def record_changes(run_dir, step: int, changes: dict[str, tuple]) -> None:
    """Append ``{"step", "changes"}`` to ``run_dir/config_changes.jsonl`` (the step the change applies from)."""
    if not changes:
        return
    row = {"step": int(step), "changes": {k: [a, b] for k, (a, b) in changes.items()}}
    with (Path(run_dir) / "config_changes.jsonl").open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
