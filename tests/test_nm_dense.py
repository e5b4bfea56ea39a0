"""NMDense: a Dense layer on a compressed N:M kernel computes what nn.Dense does with the pruned kernel."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _nm_format import np_compress

import jaxlab
from jaxlab.kernels import BlockSizes
from jaxlab.nn import NMDense

HAS_NM = hasattr(jaxlab.nm, "compress") and hasattr(jaxlab.nm, "compress_params")
needs_nm = pytest.mark.skipif(not HAS_NM, reason="jaxlab.nm.compress/compress_params not available yet")


class MLP(nn.Module):
    """Two Dense layers with the layer class injected (nn.Dense for training, NMDense to deploy)."""

    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        h = nn.relu(self.dense(128, name="fc1")(x))
        return self.dense(64, name="fc2")(h)


@pytest.fixture(scope="module")
def trained():
    """Dense params (stand-in for a trained model) and inputs."""
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 96))
    params = MLP().init(jax.random.PRNGKey(1), x)["params"]
    params = jax.tree.map(lambda p: p + 0.01 * jnp.arange(p.size).reshape(p.shape) % 0.07, params)
    return x, params


def _pruned_and_compressed(params, n, m):
    """(dense tree with w * mask kernels, tree with compressed kernels) via the test's own format."""
    pruned, compressed = {}, {}
    for layer, leaves in params.items():
        c, wp = np_compress(np.asarray(leaves["kernel"]), n, m)
        pruned[layer] = {"kernel": jnp.asarray(wp), "bias": leaves["bias"]}
        compressed[layer] = {"kernel": c, "bias": leaves["bias"]}
    return pruned, compressed


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("nm", [(2, 4), (1, 8)], ids=["2of4", "1of8"])
def test_nmdense_equals_dense_with_pruned_kernel(trained, nm, impl):
    x, params = trained
    n, m = nm
    pruned, compressed = _pruned_and_compressed(params, n, m)
    y_dense = MLP().apply({"params": pruned}, x)
    layer = functools.partial(NMDense, n=n, m=m, implementation=impl, block_sizes=BlockSizes(8, 64, 128))
    y_sparse = jax.jit(MLP(dense=layer).apply)({"params": compressed}, x)
    np.testing.assert_allclose(np.asarray(y_sparse), np.asarray(y_dense), rtol=2e-5, atol=2e-5)


def test_nmdense_bf16_compute_dtype(trained):
    x, params = trained
    pruned, compressed = _pruned_and_compressed(params, 2, 4)
    y_dense = MLP().apply({"params": pruned}, x)
    layer = functools.partial(NMDense, n=2, m=4, dtype=jnp.bfloat16)
    y = MLP(dense=layer).apply({"params": compressed}, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_dense), rtol=3e-2, atol=3e-2)


def test_nmdense_errors_name_the_layer_and_expected_shape(trained):
    x, params = trained
    _, compressed = _pruned_and_compressed(params, 2, 4)
    with pytest.raises(ValueError, match=r"fc1/kernel: compressed weight is 2:4 .*expected 1:4"):
        MLP(dense=functools.partial(NMDense, n=1, m=4)).apply({"params": compressed}, x)
    with pytest.raises(ValueError, match=r"fc1/kernel: .*\(96, 128\); expected .*\(92, 128\)"):
        MLP(dense=functools.partial(NMDense, n=2, m=4)).apply({"params": compressed}, x[:, :92])
    with pytest.raises(ValueError, match=r"K=90, not a multiple of M=4"):
        NMDense(8, n=2, m=4).init(jax.random.PRNGKey(0), jnp.ones((1, 90)))
    with pytest.raises(ValueError, match=r"unsupported N:M group size M=6"):
        NMDense(8, n=2, m=6).init(jax.random.PRNGKey(0), jnp.ones((1, 96)))


@needs_nm
def test_nmdense_init_from_scratch_is_magnitude_pruned():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 64))
    variables = NMDense(32, n=1, m=4, use_bias=False).init(jax.random.PRNGKey(3), x)
    c = variables["params"]["kernel"]
    assert isinstance(c, jaxlab.nm.NMCompressed) and (c.n, c.m, tuple(c.shape)) == (1, 4, (64, 32))
    w = np.asarray(jaxlab.nm.decompress(c))
    assert np.all((w.reshape(16, 4, 32) != 0).sum(axis=1) <= 1)
    y = NMDense(32, n=1, m=4, use_bias=False).apply(variables, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ w, rtol=2e-5, atol=2e-5)


@needs_nm
def test_nmdense_consumes_compress_params_tree(trained):
    x, params = trained
    compressed = jaxlab.nm.compress_params(params, 2, 4)
    pruned = jax.tree.map(
        lambda leaf: jaxlab.nm.decompress(leaf) if isinstance(leaf, jaxlab.nm.NMCompressed) else leaf,
        compressed,
        is_leaf=lambda leaf: isinstance(leaf, jaxlab.nm.NMCompressed),
    )
    y_dense = MLP().apply({"params": pruned}, x)
    y_sparse = MLP(dense=functools.partial(NMDense, n=2, m=4)).apply({"params": compressed}, x)
    np.testing.assert_allclose(np.asarray(y_sparse), np.asarray(y_dense), rtol=2e-5, atol=2e-5)
