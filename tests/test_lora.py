"""LoRA: the Linen module, functional inject/merge, scaling rules, freezing the base."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlab.nn import LoRADense, lora


def _tree():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "block_0": {"attn": {"q": {"kernel": jax.random.normal(k[0], (6, 4)), "bias": jnp.ones((4,))}}},
        "stack": {"kernel": jax.random.normal(k[1], (3, 6, 5))},
        "embed": {"embedding": jax.random.normal(k[2], (10, 6))},
        "norm": {"scale": jnp.ones((6,))},
    }


def test_lora_scale_rules():
    assert lora.lora_scale(8) == 1.0
    assert lora.lora_scale(8, alpha=16) == 2.0
    assert lora.lora_scale(4, alpha=8, rslora=True) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="rank"):
        lora.lora_scale(0)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_dense_matches_formula_and_base_at_init(rslora):
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 6))
    layer = LoRADense(4, rank=3, alpha=6.0, rslora=rslora)
    p = layer.init(jax.random.PRNGKey(2), x)["params"]
    assert p["lora_a"].shape == (6, 3) and p["lora_b"].shape == (3, 4)
    assert np.all(np.asarray(p["lora_b"]) == 0)
    bound = 1 / np.sqrt(6)
    assert np.all(np.abs(np.asarray(p["lora_a"])) <= bound)
    base = nn.Dense(4).apply({"params": {"kernel": p["kernel"], "bias": p["bias"]}}, x)
    np.testing.assert_allclose(layer.apply({"params": p}, x), base, rtol=1e-6, atol=1e-6)
    p = dict(p, lora_b=jax.random.normal(jax.random.PRNGKey(3), (3, 4)), bias=jnp.arange(4.0))
    s = 6.0 / (np.sqrt(3) if rslora else 3)
    xn, pn = np.asarray(x, np.float64), {k: np.asarray(v, np.float64) for k, v in p.items()}
    want = xn @ (pn["kernel"] + s * pn["lora_a"] @ pn["lora_b"]) + pn["bias"]
    np.testing.assert_allclose(layer.apply({"params": p}, x), want, rtol=1e-5, atol=1e-5)
    # merge() gives the same function through a plain Dense.
    merged = lora.merge(p, alpha=6.0, rslora=rslora)
    assert set(merged) == {"kernel", "bias"}
    np.testing.assert_allclose(nn.Dense(4).apply({"params": merged}, x), want, rtol=1e-5, atol=1e-5)


def test_lora_dense_kernel_frozen():
    x = jnp.ones((2, 3))
    layer = LoRADense(2, rank=1)
    p = layer.init(jax.random.PRNGKey(0), x)["params"]
    g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(p)
    assert np.all(np.asarray(g["kernel"]) == 0) and np.all(np.asarray(g["bias"]) == 0)
    assert np.any(np.asarray(g["lora_b"]) != 0)


def test_inject_merge_roundtrip_and_formula():
    p = _tree()
    q = lora.inject(p, [r"attn/q$", r"^stack$", r"^embed$"], rank=2, key=jax.random.PRNGKey(0))
    assert lora.lora_modules(q) == ["block_0/attn/q", "embed", "stack"]
    assert q["stack"]["lora_a"].shape == (3, 6, 2) and q["stack"]["lora_b"].shape == (3, 2, 5)
    assert q["embed"]["lora_a"].shape == (10, 2) and q["embed"]["lora_b"].shape == (2, 6)
    # B = 0: merge is exactly the base tree.
    m0 = lora.merge(q)
    assert jax.tree.structure(m0) == jax.tree.structure(p)
    for a, b in zip(jax.tree.leaves(m0), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
    # Non-zero B: merge = K + s A B per stacked slice (independent loop in numpy).
    q["stack"]["lora_b"] = jax.random.normal(jax.random.PRNGKey(5), (3, 2, 5))
    m = lora.merge(q, alpha=4.0)
    A, B, K = (np.asarray(q["stack"][n], np.float64) for n in ("lora_a", "lora_b", "kernel"))
    for i in range(3):
        np.testing.assert_allclose(m["stack"]["kernel"][i], K[i] + 2.0 * A[i] @ B[i], rtol=1e-5, atol=1e-5)


def test_inject_errors_name_the_problem():
    p = _tree()
    with pytest.raises(ValueError, match="no module matched.*block_0/attn/q"):
        lora.inject(p, r"mlp/up$", rank=2, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"rank=7.*block_0/attn/q/kernel.*\(6, 4\)"):
        lora.inject(p, r"attn/q$", rank=7, key=jax.random.PRNGKey(0))
    q = lora.inject(p, r"attn/q$", rank=2, key=jax.random.PRNGKey(0))
    del q["block_0"]["attn"]["q"]["lora_b"]
    with pytest.raises(ValueError, match="block_0/attn/q has lora_a but no lora_b"):
        lora.merge(q)


def test_freeze_base_trains_only_lora_with_weight_decay():
    p = lora.inject(_tree(), r"attn/q$", rank=2, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6))

    def loss(p):
        m = lora.merge(p)
        return jnp.mean((x @ m["block_0"]["attn"]["q"]["kernel"] - 1.0) ** 2)

    tx = lora.freeze_base(optax.adamw(1e-2, weight_decay=0.5), p)
    st = tx.init(p)
    p0 = p
    for _ in range(5):
        u, st = tx.update(jax.grad(loss)(p), st, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_array_equal(p["block_0"]["attn"]["q"]["kernel"], p0["block_0"]["attn"]["q"]["kernel"])
    np.testing.assert_array_equal(p["norm"]["scale"], p0["norm"]["scale"])
    assert np.any(np.asarray(p["block_0"]["attn"]["q"]["lora_b"]) != 0)
    assert float(loss(p)) < float(loss(p0))
