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


# ---------------------------------------------------------------- energy distance: numerics and flags


def _energy_distance_f64(a, b):
    """Independent float64 V-statistic on the float32-rounded inputs the metric sees."""
    a, b = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b))
    d = lambda p, q: np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).mean()
    return 2 * d(a, b) - d(a, a) - d(b, b), 2 * d(a, b) + d(a, a) + d(b, b)


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (0.5, 1.0), (1e4, 1.0), (0.0, 1e6), (0.0, 1e20)])
def test_energy_distance_is_the_v_statistic_at_every_scale(offset, scale):
    """Unchanged value for ordinary clouds; far-away (old Gram cancellation) and huge clouds stay accurate."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(512, 2)) * scale + offset
    b = rng.normal(size=(384, 2)) * scale + offset + 0.1 * scale
    ref, terms = _energy_distance_f64(a, b)
    got = float(energy_distance(a, b))
    assert got >= 0 and ref > 0
    assert abs(got - ref) <= 1e-6 * terms, (got, ref)
    assert float(jax.jit(energy_distance)(a, b)) == got


def test_energy_distance_of_a_cloud_far_from_the_origin_is_not_negative():
    # |x|^2 + |y|^2 - 2 x.y at |x| ~ 1e4 in float32 gave -9.5e-4 here; the exact value is +1.3e-3.
    rng = np.random.default_rng(0)
    rng.normal(size=(10, 2048, 2))  # skip to the draw the numbers above were seen at
    a, b = rng.normal(size=(2048, 2)) + 1e4, rng.normal(size=(2048, 2)) + 1e4
    ref, terms = _energy_distance_f64(a, b)
    assert float(energy_distance(a, b)) == pytest.approx(ref, abs=1e-6 * terms)


def test_energy_distance_same_points_in_another_order_is_rounding_close_to_zero(x):
    """The exact value is 0; summation order leaves rounding only, never a negative number."""
    perm = np.random.default_rng(0).permutation(x.shape[0])
    for a in (x, x * 1e6 + 3e5):
        b = a[perm]
        _, terms = _energy_distance_f64(a, b)
        assert 0.0 <= float(energy_distance(a, b)) <= 1e-7 * terms
        assert float(energy_distance(a, a)) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_energy_distance_of_non_finite_samples_is_nan(x, bad):
    y = x.at[17, 1].set(bad)
    assert np.isnan(float(energy_distance(x, y)))
    assert np.isnan(float(energy_distance(y, x)))
    assert np.isnan(float(jax.jit(energy_distance)(y, y)))


def test_energy_distance_clamps_rounding_and_flags_impossible_negatives(monkeypatch):
    import jaxlab.metrics as metrics

    pts = jnp.zeros((3, 2))  # with pts + 0.75 the power-of-two scale is 1, so the terms come back as is
    for terms, expected in (((1.0, 1.0 + 1e-6, 1.0), 0.0), ((1.0, 1.5, 1.0), "nan"), ((1.0, 0.5, 0.5), 1.0)):
        it = iter(terms)  # A, B, C in the order energy_distance asks for them
        monkeypatch.setattr(metrics, "_mean_dist", lambda a, b, it=it: jnp.float32(next(it)))
        got = float(metrics.energy_distance(pts, pts + 0.75))
        assert (np.isnan(got) if expected == "nan" else got == expected), (terms, got)


def test_energy_distance_blocked_rows_match_one_block(monkeypatch):
    import jaxlab.metrics as metrics

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 5)), rng.normal(size=(257, 5)) + 0.1
    whole = float(energy_distance(a, b))
    monkeypatch.setattr(metrics, "_DIST_BLOCK_ELEMENTS", 257 * 5 * 7)  # 7-row blocks, last one padded
    ref, terms = _energy_distance_f64(a, b)
    assert float(metrics.energy_distance(a, b)) == pytest.approx(ref, abs=1e-6 * terms)
    assert whole == pytest.approx(ref, abs=1e-6 * terms)


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_rbf_matches_a_float64_pair_sum(unbiased):
    # Independent reference: explicit float64 sums over index pairs (the U-statistic skips i == i').
    xa = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (37, 2)), np.float64)
    ya = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (23, 2)), np.float64) + 0.3
    s = 0.7
    kern = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * s * s))

    def mean_k(a, b, same):
        vals = [kern(a[i], b[j]) for i in range(len(a)) for j in range(len(b)) if not (same and unbiased and i == j)]
        return np.mean(vals)

    ref = mean_k(xa, xa, True) + mean_k(ya, ya, True) - 2 * mean_k(xa, ya, False)
    got = float(mmd_rbf(jnp.asarray(xa, jnp.float32), jnp.asarray(ya, jnp.float32), bandwidth=s, unbiased=unbiased))
    assert got == pytest.approx(ref, abs=2e-6)


def test_mmd_rbf_unbiased_removes_the_same_distribution_bias():
    # Two independent draws of one distribution: the V-statistic sits near 1/n + 1/m at a small bandwidth,
    # the U-statistic averages to 0 (over draws it is centred; any one draw is within a few 1e-4 here).
    v, u = [], []
    for i in range(8):
        a = jax.random.normal(jax.random.PRNGKey(10 + i), (256, 2))
        b = jax.random.normal(jax.random.PRNGKey(100 + i), (256, 2))
        v.append(float(mmd_rbf(a, b, 0.1)))
        u.append(float(mmd_rbf(a, b, 0.1, unbiased=True)))
    assert np.mean(v) > 0.5 * (2 / 256)
    assert abs(np.mean(u)) < 0.1 * np.mean(v)
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd_rbf(jnp.zeros((1, 2)), jnp.zeros((5, 2)), 0.1, unbiased=True)
