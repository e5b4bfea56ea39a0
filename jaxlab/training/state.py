"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState"]


@flax.struct.dataclass
class TrainState:
    """Params, optimizer state, step counter, base PRNG key, optional EMA params and loss state.

    The per-step key is ``fold_in(rng, step)``, so a run resumed from a checkpoint draws exactly the
    randomness an uninterrupted run would. ``rng`` is stored as raw ``uint32`` key data (checkpointable).
    ``loss_state`` is a small pytree a loss may carry from step to step (e.g. MeanFlow's ``"auto"``
    coefficient EMA); it is ``{}`` for stateless losses.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any = None
    loss_state: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        params,
        tx: optax.GradientTransformation,
        rng: jax.Array | int,
        ema_decay: float | None = None,
        loss_state=None,
    ) -> TrainState:
        """Initialise: ``opt_state = tx.init(params)``, ``step = 0``; EMA starts as a copy of ``params``."""
        if isinstance(rng, int):
            rng = jax.random.PRNGKey(rng)
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jnp.asarray(rng, jnp.uint32),
            ema_params=jax.tree.map(jnp.copy, params) if ema_decay is not None else None,
            loss_state={} if loss_state is None else loss_state,
        )

    def step_key(self) -> jax.Array:
        """The PRNG key of the current step: ``fold_in(rng, step)``."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)
