"""Orbax checkpoints of a :class:`~jaxlab.training.TrainState`, with fallback past damaged ones.

Saves every ``every`` steps, keeps the last ``keep`` (``keep >= 1``), asynchronously where the backend
allows. Restoring uses an *abstract target* (``jax.eval_shape`` of the initial state, with shardings), so
optax's ``NamedTuple`` states, STEP's phase fields and the exact shardings come back as they were saved.

What a user can rely on:

- **Fallback.** :meth:`Checkpointer.restore_or` tries the newest checkpoint first; if it cannot be read
  (a truncated file, a missing ``default/`` item or manifest, ...), it tries the next older one, and so
  on. When an older one restores, every newer one that failed is *moved* (never deleted) to
  ``<directory>.damaged/<step>`` and a :class:`CheckpointWarning` names the step and the reason.
- **No silent restart.** If no checkpoint restores, nothing is moved and :class:`CheckpointError` lists
  each step with its reason: then the checkpoints are damaged or do not match the state (a changed model
  or optimizer); move the directory away to start over.
- **Interrupted writes.** Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames when done; a
  kill during a write leaves that directory behind. Opening a :class:`Checkpointer` removes such
  leftovers (they never were checkpoints) and says which.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "CheckpointError", "CheckpointWarning"]

_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored (the message lists each step and why)."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped (and moved aside) or an interrupted write was cleaned up."""


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for a TrainState.

    Example::

        ckpt = Checkpointer(run_dir / "checkpoints", every=500, keep=3)
        state = ckpt.restore_or(state)          # resumes from the newest intact checkpoint, if any
        ...
        ckpt.maybe_save(step, state)
        ckpt.close()
    """

    def __init__(self, directory, *, every: int = 500, keep: int = 3, async_save: bool = True):
        if int(keep) < 1:
            raise ValueError(f"Checkpointer: keep must be >= 1 (the newest checkpoint is always kept), got {keep}")
        if int(every) < 0:
            raise ValueError(f"Checkpointer: every must be >= 0 (0: only the final checkpoint), got {every}")
        self.directory = Path(directory).absolute()
        self.every = every
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        if jax.process_index() == 0:
            self._remove_interrupted_writes()
        self.manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # one item, declared: orbax otherwise infers single- vs multi-item from the newest step's layout,
        # and a damaged newest step would then make every older one unreadable too
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_handlers=ocp.StandardCheckpointHandler())

    # ------------------------------------------------------------------ housekeeping

    @property
    def damaged_directory(self) -> Path:
        """Where damaged checkpoints are moved: ``<directory>.damaged``."""
        return self.directory.with_name(self.directory.name + ".damaged")

    def _remove_interrupted_writes(self) -> None:
        if not self.directory.is_dir():
            return
        leftovers = sorted(p for p in self.directory.iterdir() if _TMP_MARK in p.name)
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if leftovers:
            warnings.warn(
                f"removed {len(leftovers)} unfinished checkpoint write(s) in {self.directory} left by an "
                f"interrupted run: {', '.join(p.name for p in leftovers)}",
                CheckpointWarning,
                stacklevel=3,
            )

    def _quarantine(self, step: int, reason: str) -> Path:
        dest_root = self.damaged_directory
        dest_root.mkdir(parents=True, exist_ok=True)
        dest = dest_root / str(step)
        i = 1
        while dest.exists():
            dest, i = dest_root / f"{step}.{i}", i + 1
        shutil.move(str(self.directory / str(step)), str(dest))
        (dest / "DAMAGED.txt").write_text(f"restore of step {step} failed: {reason}\n")
        return dest

    # ------------------------------------------------------------------ API

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, *, force: bool = False) -> bool:
        return self.manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def maybe_save(self, step: int, state) -> bool:
        if self.every > 0 and step % self.every == 0:
            return self.save(step, state)
        return False

    def restore(self, state_like, step: int | None = None):
        """Restore ``step`` (default: the latest) into the structure, dtypes and shardings of ``state_like``
        (concrete or abstract). No fallback: see :meth:`restore_or`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, state_like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_or(self, state):
        """Restore the newest checkpoint that can be read, else return ``state`` if there is none.

        Newer checkpoints that failed while an older one restored are moved to :attr:`damaged_directory`
        with a :class:`CheckpointWarning` each.

        Raises:
          CheckpointError: checkpoints exist but none restores (each step and its reason are listed).
        """
        steps = self.all_steps()
        if not steps:
            return state
        failed: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                restored = self.restore(state, step)
            except Exception as e:  # orbax/TensorStore raise ValueError, OSError, JSONDecodeError, ...
                failed.append((step, _reason(e)))
                continue
            for bad, reason in failed:
                dest = self._quarantine(bad, reason) if jax.process_index() == 0 else self.damaged_directory
                warnings.warn(
                    f"checkpoint step {bad} in {self.directory} could not be restored ({reason}); resumed from "
                    f"step {step} instead. The damaged checkpoint was moved to {dest}, not deleted.",
                    CheckpointWarning,
                    stacklevel=2,
                )
            if failed:
                self.manager.reload()
            return restored
        lines = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise CheckpointError(
            f"none of the {len(steps)} checkpoints in {self.directory} could be restored ({lines}). Either they "
            "are damaged or they hold a different state than this config builds (changed model, optimizer or "
            f"method). Nothing was moved; to start over, move {self.directory} away."
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reason(e: Exception) -> str:
    """One line of an orbax/TensorStore exception: its type and the first line, shortened."""
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
