"""jaxlab.nm: N:M masks (tie rule), compressed format (packing, exact round trip), leaf selection."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlab import nm
from jaxlab.nm.masks import nm_pruned_bits, unpack_pruned

RATIOS = [(1, 2), (2, 4), (1, 4), (3, 4), (1, 8), (2, 8), (4, 8), (1, 16), (5, 16)]

# The checks run nm's functions under jit: eagerly, each of nm_mask's m (m - 1) compares and per-slot slices
# is dispatched (and compiled) on its own for every shape, which dominated this file's time.
_static_nm = functools.partial(jax.jit, static_argnums=(1, 2, 3))  # (w, n, m, axis)
_mask_jit = _static_nm(nm.nm_mask)


@_static_nm
def _mask_and_roundtrip_jit(w, n, m, axis):
    """The mask and, for a packable ``m``, ``decompress(compress(w))``, in one compile."""
    back = nm.decompress(nm.compress(w, n, m, axis)) if m in (2, 4, 8, 16) else None
    return nm.nm_mask(w, n, m, axis), back


@_static_nm
def _pruned_bits_jit(w, n, m, axis):
    """The packed pruned bits, their unpacking and the mask, in one compile."""
    bits = nm_pruned_bits(w, n, m, axis)
    return bits, unpack_pruned(bits, m, axis, w.shape), nm.nm_mask(w, n, m, axis)


@_static_nm
def _compress_checks_jit(x, n, m, axis):
    """The mask, the compressed weight, its decompression and unpacked positions, and the unpacked
    pruned bits, in one compile."""
    c = nm.compress(x, n, m, axis)
    unpacked = unpack_pruned(nm_pruned_bits(x, n, m, axis), m, axis, x.shape)
    return nm.nm_mask(x, n, m, axis), c, nm.decompress(c), nm.unpack_indices(c), unpacked


def np_mask(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Independent reference: stable sort by descending |w| inside each group (lower index first);
    a NaN counts as magnitude +inf."""
    wt = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    g = np.abs(wt).reshape(*wt.shape[:-1], -1, m)
    g = np.where(np.isnan(g), np.inf, g)
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
    mask, back = _mask_and_roundtrip_jit(jnp.asarray(w), n, m, axis)
    mask = np.asarray(mask)
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
    K = jax.tree_util.DictKey
    assert nm.reduction_axis((), jnp.zeros((16, 8))) == 0
    assert nm.reduction_axis((K("conv"), K("kernel")), jnp.zeros((3, 3, 16, 8))) == 2  # HWIO: input channels
    assert nm.reduction_axis((), jnp.zeros((3, 3, 16, 8))) == 2  # ndim >= 4, no name: a conv
    assert nm.reduction_axis((K("DenseGeneral_0"), K("kernel")), jnp.zeros((16, 2, 4, 8))) == 0
    # ndim 3 is a DenseGeneral (d_in, heads, head_dim) unless the module is named as a conv
    assert nm.reduction_axis((), jnp.zeros((5, 16, 8))) == 0
    assert nm.reduction_axis((K("attn"), K("q"), K("kernel")), jnp.zeros((16, 4, 8))) == 0
    assert nm.reduction_axis((K("Conv_1"), K("kernel")), jnp.zeros((5, 16, 8))) == 1
    assert nm.reduction_axis(("stem_conv1d", "kernel"), jnp.zeros((5, 16, 8))) == 1  # tuple-of-names paths too
    with pytest.raises(ValueError, match=r"shape \(4,\) has no reduction axis"):
        nm.reduction_axis((K("bias"),), jnp.zeros(4))


class _FlaxLayers(nn.Module):
    """Real Flax layers with kernels of ndim >= 3 (auto-named and user-named modules)."""

    @nn.compact
    def __call__(self, img, seq):
        h = nn.Conv(16, (3, 3))(img)  # Conv_0 kernel (3, 3, 8, 16): kh, kw, in contracted
        s = nn.Conv(16, (3,))(seq)  # Conv_1 kernel (3, 8, 16): 1-D conv, k and in contracted
        q = nn.DenseGeneral(features=(4, 8))(s)  # DenseGeneral_0 kernel (16, 4, 8): (in, heads, head_dim)
        k = nn.DenseGeneral(features=(4, 8), name="k")(s)  # the same layout under a user name
        o = nn.DenseGeneral(16, axis=(-2, -1))(q + k)  # DenseGeneral_1 kernel (4, 8, 16): (heads, head_dim, out)
        a = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, out_features=16)(s)
        return h, o, a


#: For each ndim >= 3 kernel of _FlaxLayers, the axes that the layer contracts (Flax: DenseGeneral kernels
#: are (*in_axes, *out_axes); Conv kernels are (*kernel_size, in, out)) and the one the default groups along.
_CONTRACTED = {
    "Conv_0/kernel": ({0, 1, 2}, 2),
    "Conv_1/kernel": ({0, 1}, 1),
    "DenseGeneral_0/kernel": ({0}, 0),
    "k/kernel": ({0}, 0),
    "DenseGeneral_1/kernel": ({0, 1}, 0),
    "MultiHeadDotProductAttention_0/query/kernel": ({0}, 0),
    "MultiHeadDotProductAttention_0/key/kernel": ({0}, 0),
    "MultiHeadDotProductAttention_0/value/kernel": ({0}, 0),
    "MultiHeadDotProductAttention_0/out/kernel": ({0, 1}, 0),
}


def _groups_hold(x: np.ndarray, axis: int, m: int, n: int) -> bool:
    """Every run of m consecutive entries along ``axis`` holds exactly n nonzeros."""
    xt = np.moveaxis(x, axis, -1)
    return bool(((xt.reshape(*xt.shape[:-1], -1, m) != 0).sum(-1) == n).all())


def test_default_axis_of_real_flax_dense_general_and_conv_kernels():
    from jaxlab.paths import slash_path
    from jaxlab.transforms import prune, ste_adamw

    # init, prune and compress jitted (eagerly, every op of the conv/attention layers compiles on its own)
    params = jax.jit(_FlaxLayers().init)(jax.random.PRNGKey(0), jnp.ones((1, 6, 6, 8)), jnp.ones((1, 5, 8)))["params"]
    flat = {slash_path(p): (p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernels = {k: v for k, v in flat.items() if k.endswith("kernel")}
    assert set(kernels) == set(_CONTRACTED)
    axes = {slash_path(p): a for p, a in jax.tree_util.tree_flatten_with_path(
        nm.nm_leaf_axes(params, 4, n=1), is_leaf=lambda a: a is None)[0]}
    deployed = jax.jit(lambda p: prune(p, ste_adamw(1e-3, n=1, m=4).init(p)))(params)
    pruned = {slash_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(deployed)[0]}
    packed = {slash_path(p): c for p, c in jax.tree_util.tree_flatten_with_path(
        jax.jit(lambda p: nm.compress_params(p, 1, 4))(params), is_leaf=lambda c: isinstance(c, nm.NMCompressed))[0]}
    for name, (path, w) in kernels.items():
        contracted, want = _CONTRACTED[name]
        assert want in contracted
        assert nm.reduction_axis(path, w) == want, name
        assert axes[name] == want, name  # never an output axis (the old rule took heads for (in, heads, dh))
        # the deployed mask: every group of 4 consecutive entries along the contracted axis keeps exactly 1
        assert _groups_hold(np.asarray(pruned[name]), want, 4, 1), name
        assert packed[name].axis == want, name
    # biases (even the 2-D (heads, head_dim) ones of DenseGeneral) stay dense
    assert all(axes[k] is None for k in flat if k.endswith("bias"))
    # an explicit nm_axis always wins: an int for every leaf, or a callable of (path, leaf)
    by_fn = nm.nm_leaf_axes(params, 4, n=1, nm_axis=lambda p, x: x.ndim - 2)
    assert by_fn["DenseGeneral_0"]["kernel"] == 1 and by_fn["MultiHeadDotProductAttention_0"]["out"]["kernel"] == 1
    by_int = nm.nm_leaf_axes(params, 4, n=1, nm_axis=1)
    assert by_int["k"]["kernel"] == 1 and by_int["Conv_0"]["kernel"] is None  # 3 along axis 1: stays dense


# a pool rich in NaN, +-inf and exact ties (incl. +-0)
_SPECIAL = np.array([np.nan, np.inf, -np.inf, 1.0, -1.0, 0.0, -0.0, 2.5, 2.5], np.float32)


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 16)])
def test_nan_inf_and_ties_keep_exactly_n_and_compress_keeps_the_mask(n, m):
    rng = np.random.default_rng(n * 100 + m)
    groups = 40
    w = rng.choice(_SPECIAL, size=(groups * m, 3)).astype(np.float32)
    w[:m, 0] = np.nan  # an all-NaN group
    w[m : 2 * m, 0] = 7.0  # an all-equal group
    w[2 * m : 3 * m, 0] = np.inf  # an all-inf group
    w[3 * m : 4 * m, 0] = np.arange(m, dtype=np.float32)
    w[3 * m, 0] = np.nan  # one NaN among finite values: kept, together with the n - 1 largest
    for axis, ww in ((0, w), (1, np.ascontiguousarray(w.T))):
        x = jnp.asarray(ww)
        mask, c, back, pos, pruned = _compress_checks_jit(x, n, m, axis)
        mask = np.asarray(mask)
        assert _groups_hold(mask.astype(np.float32), axis, m, n)
        np.testing.assert_array_equal(mask, np_mask(ww, n, m, axis))
        # the packed format keeps exactly the mask's entries: values, positions and round trip
        np.testing.assert_array_equal(np.asarray(back), np.where(mask, ww, 0.0))  # NaN == NaN here
        pos = np.moveaxis(np.asarray(pos), axis, -1)
        mt = np.moveaxis(mask, axis, -1)
        want_pos = np.nonzero(mt.reshape(*mt.shape[:-1], -1, m))[-1].reshape(*mt.shape[:-1], -1)
        np.testing.assert_array_equal(pos, want_pos)
        np.testing.assert_array_equal(np.asarray(pruned), ~mask)
    # golden: a NaN ranks as +inf (tied with inf: the lower index wins)
    g = jnp.array([[np.nan, 1.0, 2.0, 3.0], [1.0, np.inf, np.nan, 0.0], [np.nan, np.nan, np.nan, 9.0]])
    np.testing.assert_array_equal(np.asarray(nm.nm_mask(g, 2, 4, axis=1)),
                                  [[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(nm.nm_mask(g, 1, 4, axis=1)),
                                  [[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])


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
        mask, c, back, _, _ = _compress_checks_jit(w, n, m, axis)
        e = w.shape[axis] // m * n
        assert c.bits == bits and nm.index_bits(m) == bits
        assert c.values.shape[axis] == e and c.indices.shape[axis] == -(-e // (8 // bits))
        np.testing.assert_array_equal(np.asarray(back), np.asarray(w * mask))
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
    cp = jax.jit(lambda p: nm.compress_params(p, 2, 4))(params)  # jitted: one compile for all leaves
    assert isinstance(cp["dense"]["kernel"], nm.NMCompressed) and isinstance(cp["conv"]["kernel"], nm.NMCompressed)
    assert cp["conv"]["kernel"].axis == 2
    assert not isinstance(cp["odd"]["kernel"], nm.NMCompressed)
    back = jax.jit(nm.decompress_params)(cp)
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
    for shape, axis in (((2 * m, 5), 0), ((3, 2 * m, 4), 1), ((3, 3, 2 * m, 6), 2)):
        w = jnp.round(jax.random.normal(jax.random.PRNGKey(m + axis), shape), 1)  # rounding creates ties
        bits, pruned, mask = _pruned_bits_jit(w, n, m, axis)
        assert bits.shape[axis] == shape[axis] // m and bits.dtype.itemsize * 8 >= m
        np.testing.assert_array_equal(np.asarray(pruned), ~np.asarray(mask))
