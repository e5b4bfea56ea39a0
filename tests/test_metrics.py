"""Sample-quality metrics: identities, monotonicity, and agreement with closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.metrics import energy_distance, mmd_rbf, sliced_wasserstein2

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.PRNGKey(1), (1024, 2))


def test_self_distance_is_zero(x):
    assert float(sliced_wasserstein2(x, x, KEY, 512)) < 1e-6
    assert abs(float(energy_distance(x, x))) < 1e-5
    assert abs(float(mmd_rbf(x, x))) < 1e-6


def test_sw2_of_a_shift_equals_its_length(x):
    # W2 between a distribution and its translate by s is ||s||; sliced: ||s|| / sqrt(d) on average,
    # exactly (for the same samples) sqrt(mean_theta (theta.s)^2) -> ||s|| / sqrt(2) in 2D.
    s = jnp.array([0.6, -0.8])
    got = float(sliced_wasserstein2(x, x + s, KEY, 4096))
    assert got == pytest.approx(1.0 / np.sqrt(2.0), rel=0.03)


def test_monotone_in_shift(x):
    vals = [float(sliced_wasserstein2(x, x + jnp.array([d, 0.0]), KEY, 512)) for d in (0.0, 0.1, 0.3, 1.0, 2.0)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    ed = [float(energy_distance(x, x + jnp.array([d, 0.0]))) for d in (0.0, 0.1, 0.3, 1.0)]
    assert all(a < b for a, b in zip(ed, ed[1:]))


def test_unequal_sizes_and_shape_errors(x):
    y = jax.random.normal(jax.random.PRNGKey(2), (700, 2))
    v = float(sliced_wasserstein2(x, y, KEY, 512))
    assert 0 <= v < 0.15  # two samples of the same law
    with pytest.raises(ValueError, match=r"expected two \(n, d\) arrays"):
        sliced_wasserstein2(x, jnp.zeros((10, 3)), KEY)


def test_energy_distance_matches_numpy_reference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 2)), rng.normal(size=(40, 2)) + 0.5
    d = lambda p, q: np.linalg.norm(p[:, None] - q[None], axis=-1).mean()
    ref = 2 * d(a, b) - d(a, a) - d(b, b)
    assert float(energy_distance(a, b)) == pytest.approx(ref, rel=1e-4)
