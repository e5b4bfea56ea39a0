"""Orbax checkpoints of a :class:`~jaxlab.training.TrainState`.

Saves every ``every`` steps, keeps the last ``keep``, asynchronously where the backend allows. Restoring
uses an *abstract target* (``jax.eval_shape`` of the initial state, with shardings), so optax's
``NamedTuple`` states, STEP's phase fields and the exact shardings come back as they were saved.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer"]


class Checkpointer:
    """Thin wrapper over ``orbax.checkpoint.CheckpointManager`` for a TrainState.

    Example::

        ckpt = Checkpointer(run_dir / "checkpoints", every=500, keep=3)
        state = ckpt.restore_or(state)          # resumes if a checkpoint exists
        ...
        ckpt.maybe_save(step, state)
        ckpt.close()
    """

    def __init__(self, directory, *, every: int = 500, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, *, force: bool = False) -> bool:
        return self.manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

    def maybe_save(self, step: int, state) -> bool:
        if self.every > 0 and step % self.every == 0:
            return self.save(step, state)
        return False

    def restore(self, state_like, step: int | None = None):
        """Restore into the structure, dtypes and shardings of ``state_like`` (concrete or abstract)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, state_like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_or(self, state):
        """Restore the latest checkpoint if there is one, else return ``state`` unchanged."""
        return state if self.latest_step() is None else self.restore(state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
