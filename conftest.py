"""Root pytest configuration: names every docstring example may use without importing them
(``jax``, ``jnp``, ``optax``), as in the examples of jaxlab.transforms. Imports stay inside the fixture so
tests/conftest.py can set the simulated device count before jax initialises."""

import pytest


@pytest.fixture(autouse=True)
def _doctest_globals(doctest_namespace):
    import jax
    import jax.numpy as jnp
    import optax

    doctest_namespace.update(jax=jax, jnp=jnp, optax=optax)
