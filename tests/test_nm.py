"""jaxlab.nm: N:M masks (tie rule), compressed format (packing, exact round trip), leaf selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab import nm

RATIOS = [(1, 2), (2, 4), (1, 4), (3, 4), (1, 8), (2, 8), (4, 8), (1, 16), (5, 16)]

_mask_jit = jax.jit(nm.nm_mask, static_argnums=(1, 2, 3))
_roundtrip_jit = jax.jit(lambda w, n, m, a: nm.decompress(nm.compress(w, n, m, a)), static_argnums=(1, 2, 3))


def np_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Independent reference: stable sort by descending |w| inside each group (lower index first)."""
    wt = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    g = np.abs(wt).reshape(*wt.shape[:-1], -1, m)
    order = np.argsort(-g, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep.reshape(wt.shape), -1, axis)


@settings(max_examples=25, deadline=None)
@given(
    ratio=st.sampled_from(RATIOS),
    lead=st.lists(st.integers(1, 2), min_size=0, max_size=1),
    groups=st.integers(1, 3),
    trail=st.integers(1, 2),
    seed=st.integers(0, 2**16),
    quantise=st.booleans(),
)
def test_mask_n_per_group_random_shapes(ratio, lead, groups, trail, seed, quantise):
    n, m = ratio
    axis = len(lead)
    shape = (*lead, groups * m, trail)
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if quantise:  # many exact ties (incl. +-0): the tie rule decides
        w = np.round(w) * 0.5
    mask = np.asarray(_mask_jit(jnp.asarray(w), n, m, axis))
    per_group = np.moveaxis(mask, axis, -1).reshape(*lead, trail, groups, m).sum(-1)
    assert (per_group == n).all()
    np.testing.assert_array_equal(mask, np_mask(w, n, m, axis))
    # the kept entries dominate the dropped ones in each group
    a = np.abs(np.moveaxis(w, axis, -1)).reshape(*lead, trail, groups, m)
    k = np.moveaxis(mask, axis, -1).reshape(a.shape)
    kept_min = np.where(k, a, np.inf).min(-1)
    drop_max = np.where(~k, a, -np.inf).max(-1)
    assert (kept_min >= drop_max).all()
    # exact round trip of the compressed format
    if m in (2, 4, 8, 16):
        back = _roundtrip_jit(jnp.asarray(w), n, m, axis)
        np.testing.assert_array_equal(np.asarray(back), np.where(mask, w, 0))


def test_golden_tie_break_lower_index_wins():
    w = jnp.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # all tie -> first two
            [0.0, 2.0, -2.0, 2.0],  # |.|=2 three times -> indices 1, 2
            [-0.0, 0.0, 0.0, -0.0],  # signed zeros tie -> 0, 1
            [3.0, -1.0, 1.0, 0.5],  # 3 then the first of the tied 1s (index 1)
        ]
    )
    got = nm.nm_mask(w, 2, 4, axis=1)
    want = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(np.asarray(got), want)
    # same rule along axis 0 (the transpose) and for 1:8
    np.testing.assert_array_equal(np.asarray(nm.nm_mask(w.T, 2, 4, axis=0)), want.T)
    w8 = jnp.array([0.5, 0.7, -0.7, 0.7, 0.1, 0.0, -0.7, 0.2])
    np.testing.assert_array_equal(np.asarray(nm.nm_mask(w8, 1, 8, axis=0)), np.eye(8, dtype=bool)[1])


def test_mask_axis_default_reduction_axis():
    assert nm.reduction_axis((), jnp.zeros((16, 8))) == 0
    assert nm.reduction_axis((), jnp.zeros((3, 3, 16, 8))) == 2
    assert nm.reduction_axis((), jnp.zeros((5, 16, 8))) == 1
    with pytest.raises(ValueError, match=r"shape \(4,\) has no reduction axis"):
        nm.reduction_axis((jax.tree_util.DictKey("bias"),), jnp.zeros(4))


def test_packing_layout_golden():
    # 2:4 on one column: kept positions per group: (1, 3), (0, 2), (2, 3), (0, 1), (1, 2)
    col = np.array(
        [0, 5, 0, 7, 9, 0, 8, 0, 0, 0, 4, 6, 3, 3, 1, 1, 0, -2, 2, 0], np.float32
    )[:, None]
    c = nm.compress(jnp.asarray(col), 2, 4, axis=0)
    assert c.bits == 2 and c.values.shape == (10, 1) and c.indices.shape == (3, 1)
    assert c.indices.dtype == jnp.uint8
    pos = [1, 3, 0, 2, 2, 3, 0, 1, 1, 2]
    np.testing.assert_array_equal(np.asarray(nm.unpack_indices(c))[:, 0], pos)
    np.testing.assert_array_equal(np.asarray(c.values)[:, 0], [5, 7, 9, 8, 4, 6, 3, 3, -2, 2])
    # 4 two-bit indices per byte, first in the lowest bits, zero padded
    b0 = 1 | 3 << 2 | 0 << 4 | 2 << 6
    b1 = 2 | 3 << 2 | 0 << 4 | 1 << 6
    b2 = 1 | 2 << 2
    np.testing.assert_array_equal(np.asarray(c.indices)[:, 0], [b0, b1, b2])


@pytest.mark.parametrize("n,m,bits", [(1, 2, 1), (2, 4, 2), (1, 8, 4), (3, 16, 4)])
def test_compress_shapes_bits_and_roundtrip(n, m, bits):
    w = jax.random.normal(jax.random.PRNGKey(n * m), (2 * m * 3, 5, 3), jnp.float32)
    for axis in (0, 1) if 5 % m == 0 else (0,):
        c = nm.compress(w, n, m, axis)
        e = w.shape[axis] // m * n
        assert c.bits == bits and nm.index_bits(m) == bits
        assert c.values.shape[axis] == e and c.indices.shape[axis] == -(-e // (8 // bits))
        np.testing.assert_array_equal(
            np.asarray(nm.decompress(c)), np.asarray(w * nm.nm_mask(w, n, m, axis))
        )
        assert c.nbytes < w.size * 4


def test_compress_bf16_and_jit_and_pytree():
    w = jax.random.normal(jax.random.PRNGKey(0), (32, 8)).astype(jnp.bfloat16)
    c = jax.jit(nm.compress, static_argnums=(1, 2, 3))(w, 2, 4, 0)
    assert c.values.dtype == jnp.bfloat16 and c.dtype == jnp.bfloat16
    leaves, treedef = jax.tree.flatten(c)
    assert len(leaves) == 2  # values, indices; the rest is static
    d = jax.jit(nm.decompress)(jax.tree.unflatten(treedef, leaves))
    assert d.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(d, np.float32), np.asarray(w * nm.nm_mask(w, 2, 4, 0), np.float32))


def test_compress_params_selection_and_errors():
    params = {
        "dense": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)},
        "odd": {"kernel": jnp.ones((6, 4))},  # reduction axis 6: not divisible -> stays dense
        "conv": {"kernel": jnp.ones((3, 3, 8, 2))},
        "embed": {"embedding": jnp.ones((16, 8))},
    }
    axes = nm.nm_leaf_axes(params, 4)
    assert axes["dense"]["kernel"] == 0 and axes["conv"]["kernel"] == 2
    assert axes["odd"]["kernel"] is None and axes["dense"]["bias"] is None and axes["embed"]["embedding"] is None
    cp = nm.compress_params(params, 2, 4)
    assert isinstance(cp["dense"]["kernel"], nm.NMCompressed) and isinstance(cp["conv"]["kernel"], nm.NMCompressed)
    assert cp["conv"]["kernel"].axis == 2
    assert not isinstance(cp["odd"]["kernel"], nm.NMCompressed)
    back = nm.decompress_params(cp)
    np.testing.assert_array_equal(np.asarray(back["dense"]["kernel"]).sum(0), [4.0, 4.0, 4.0])
    # forcing N:M on an incompatible leaf names the leaf path and its shape
    with pytest.raises(ValueError, match=r"\['odd'\]\['kernel'\].*\(6, 4\).*M=4"):
        nm.compress_params(params, 2, 4, sparsify=lambda p, x: x.ndim >= 2 and nm.leaf_name(p) == "kernel")
    # a pytree of bools works as the filter; an explicit axis overrides the rule
    flags = jax.tree.map(lambda _: False, params)
    flags["embed"]["embedding"] = True
    ax = nm.nm_leaf_axes(params, 4, sparsify=flags, nm_axis=-1)
    assert ax["embed"]["embedding"] == 1 and ax["dense"]["kernel"] is None


@pytest.mark.parametrize(
    "args,err,match",
    [
        ((jnp.ones((8, 2)), 5, 4, 0), ValueError, "1 <= n <= m"),
        ((jnp.ones((8, 2)), 0, 4, 0), ValueError, "1 <= n <= m"),
        ((jnp.ones((6, 2)), 2, 4, 0), ValueError, r"shape \(6, 2\) has length 6 on axis 0"),
        ((jnp.ones((8, 2)), 2, 4, 2), ValueError, "out of range"),
        ((jnp.ones((8, 2)), 2.0, 4, 0), TypeError, "integer n"),
    ],
)
def test_bad_arguments(args, err, match):
    with pytest.raises(err, match=match):
        nm.nm_mask(*args)


def test_compress_unsupported_m_and_bad_container():
    with pytest.raises(ValueError, match="M=3"):
        nm.compress(jnp.ones((6, 2)), 1, 3, 0)
    nm.nm_mask(jnp.ones((6, 2)), 1, 3, 0)  # masks work for any M
    c = nm.compress(jnp.ones((8, 2)), 2, 4, 0)
    with pytest.raises(ValueError, match=r"needs values \(4, 2\)"):
        nm.decompress(c.replace(values=jnp.ones((3, 2))))
    with pytest.raises(TypeError, match="NMCompressed"):
        nm.decompress(jnp.ones((8, 2)))


def test_straight_through_forward_and_gradient():
    w = jax.random.normal(jax.random.PRNGKey(1), (8, 4))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8))
    mask = nm.nm_mask(w, 2, 4, 0)
    f = lambda w: jnp.sum((x @ nm.straight_through(w, nm.nm_mask(w, 2, 4, 0))) ** 2)
    f_masked = lambda wt: jnp.sum((x @ wt) ** 2)
    np.testing.assert_array_equal(np.asarray(nm.straight_through(w, mask)), np.asarray(jnp.where(mask, w, 0)))
    # dL/dw == dL/dw_tilde evaluated at w_tilde = w * mask (dense gradient, not masked)
    g = jax.grad(f)(w)
    g_ref = jax.grad(f_masked)(w * mask)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6)
    assert np.count_nonzero(np.asarray(g)) == g.size


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 16), (3, 32)])
def test_packed_pruned_bits_are_the_complement_of_the_mask(n, m):
    from jaxlab.nm.masks import nm_pruned_bits, unpack_pruned

    for shape, axis in (((2 * m, 5), 0), ((3, 2 * m, 4), 1), ((3, 3, 2 * m, 6), 2)):
        w = jnp.round(jax.random.normal(jax.random.PRNGKey(m + axis), shape), 1)  # rounding creates ties
        bits = nm_pruned_bits(w, n, m, axis)
        assert bits.shape[axis] == shape[axis] // m and bits.dtype.itemsize * 8 >= m
        np.testing.assert_array_equal(np.asarray(unpack_pruned(bits, m, axis, shape)),
                                      ~np.asarray(nm.nm_mask(w, n, m, axis)))
