"""Minibatch OT coupling (jaxlab.losses.ot_couple) against brute-force assignment and its invariants."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlab.losses import flow_matching_loss, meanflow_loss, ot_couple


def _brute_force_cost(x, e):
    """The minimum total squared distance over all permutations (float64, B! candidates)."""
    x, e = np.asarray(x).astype(np.float64), np.asarray(e).astype(np.float64)
    C = ((x[:, None] - e[None]) ** 2).reshape(len(x), len(e), -1).sum(-1)
    return min(C[np.arange(len(x)), list(p)].sum() for p in itertools.permutations(range(len(x))))


def _cost(x, e):
    d = np.asarray(x).astype(np.float64) - np.asarray(e).astype(np.float64)
    return float((d.reshape(len(d), -1) ** 2).sum())


@pytest.mark.parametrize("shape", [(7, 2), (6, 3, 2), (5,)])
def test_exact_is_the_optimal_permutation(shape):
    kx, ke = jax.random.split(jax.random.PRNGKey(0))
    x, e = jax.random.normal(kx, shape), jax.random.normal(ke, shape)
    out = ot_couple(x, e)
    assert out.shape == e.shape and out.dtype == e.dtype
    # a permutation of the noise rows (both marginals kept) ...
    flat = lambda a: sorted(map(tuple, np.asarray(a).reshape(shape[0], -1).tolist()))
    assert flat(out) == flat(e)
    # ... with the brute-force minimum cost, below the independent pairing's
    np.testing.assert_allclose(_cost(x, out), _brute_force_cost(x, e), rtol=1e-6)
    assert _cost(x, out) <= _cost(x, e) + 1e-9


def test_exact_under_jit_and_nested_vmap_solves_each_problem():
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    xs = jax.vmap(lambda k: jax.random.normal(k, (6, 2)))(keys).reshape(2, 3, 6, 2)
    es = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (6, 2)))(keys).reshape(2, 3, 6, 2)
    es = es.at[1, 2].set(es[0, 0])  # a repeated noise with a different x: must not reuse (0, 0)'s solution
    xs = xs.at[0, 1].set(xs[0, 0]).at[0, 1].set(xs[0, 0])
    es = es.at[0, 1].set(es[0, 0])  # an exact duplicate problem (paired runs): same answer
    out = jax.jit(jax.vmap(jax.vmap(ot_couple)))(xs, es)
    for i, j in itertools.product(range(2), range(3)):
        np.testing.assert_array_equal(out[i, j], ot_couple(xs[i, j], es[i, j]))
        np.testing.assert_allclose(_cost(xs[i, j], out[i, j]), _brute_force_cost(xs[i, j], es[i, j]), rtol=1e-6)


def test_exact_with_unbatched_noise_under_vmap():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 2))
    e = jax.random.normal(jax.random.PRNGKey(3), (5, 2))
    out = jax.vmap(ot_couple, in_axes=(0, None))(x, e)
    for i in range(3):
        np.testing.assert_array_equal(out[i], ot_couple(x[i], e))


def test_sinkhorn_recovers_a_clear_assignment_and_is_keyed():
    # noise = a shuffled copy of x (a unit grid) plus tiny jitter: the OT partner of x_i is its own copy
    x = jnp.stack(jnp.meshgrid(jnp.arange(8.0), jnp.arange(4.0)), -1).reshape(32, 2)
    perm = jax.random.permutation(jax.random.PRNGKey(5), 32)
    e = x[perm] + 1e-3
    out = ot_couple(x, e, method="sinkhorn", key=jax.random.PRNGKey(6), epsilon=1e-3, iters=200)
    np.testing.assert_allclose(out, x + 1e-3, atol=1e-5)
    a = ot_couple(x, e, method="sinkhorn", key=jax.random.PRNGKey(7), epsilon=1.0)
    b = ot_couple(x, e, method="sinkhorn", key=jax.random.PRNGKey(7), epsilon=1.0)
    np.testing.assert_array_equal(a, b)


def test_sinkhorn_lowers_the_pairing_cost_toward_exact():
    kx, ke, kk = jax.random.split(jax.random.PRNGKey(8), 3)
    x, e = jax.random.normal(kx, (128, 2)) + 2.0, jax.random.normal(ke, (128, 2))
    indep, exact = _cost(x, e), _cost(x, ot_couple(x, e))
    sk = _cost(x, ot_couple(x, e, method="sinkhorn", key=kk, epsilon=0.01, iters=200))
    # drawn with replacement, the entropic pairing is not a permutation and may even undercut the exact cost
    assert abs(sk - exact) < 0.05 * (indep - exact)


def test_coupled_noise_feeds_the_losses():
    """The coupled noise goes in as ``noise=``; a loss with it equals the loss built from the same rows by hand."""
    apply = lambda p, z, r, t: p * z + t[:, None]
    x = jax.random.normal(jax.random.PRNGKey(9), (8, 2))
    e = ot_couple(x, jax.random.normal(jax.random.PRNGKey(10), (8, 2)))
    t = jnp.linspace(0.1, 0.9, 8)
    loss, _ = flow_matching_loss(apply, 0.5, x, jax.random.PRNGKey(0), t=t, noise=e)
    z = (1 - t)[:, None] * x + t[:, None] * e
    ref = jnp.mean(jnp.sum((0.5 * z + t[:, None] - (e - x)) ** 2, -1))
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    val, _ = meanflow_loss(apply, 0.5, x, jax.random.PRNGKey(0), noise=e)
    assert np.isfinite(float(val))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="hungarian"), "method must be one of"),
        (dict(method="sinkhorn"), "needs key="),
        (dict(method="sinkhorn", key=jax.random.PRNGKey(0), epsilon=0.0), "epsilon > 0"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match=match):
        ot_couple(x, x, **kwargs)


def test_rejects_shape_mismatch_naming_both():
    with pytest.raises(ValueError, match=r"x \(4, 2\) and noise \(4, 3\)"):
        ot_couple(jnp.zeros((4, 2)), jnp.zeros((4, 3)))
