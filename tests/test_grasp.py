"""GRASP projection transform: sides on Flax layout, invariants after AdamW, stacking, devices, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlab
from jaxlab.nn import lora
from jaxlab.transforms.residual_sides import ResidualSides

D, V, H, F = 8, 12, 6, 10


def _apply(tx, g):
    return tx.update(g, tx.init(g))


def _ortho(key, d, k):
    return np.linalg.qr(np.asarray(jax.random.normal(key, (d, k)), np.float64))[0]


def _model_params(key):
    k = jax.random.split(key, 8)
    n = lambda i, s: 0.5 * jax.random.normal(k[i], s)
    return {
        "embed": {"embedding": n(0, (V, D))},
        "block_0": {
            "attn": {"q": {"kernel": n(1, (D, H))}, "o": {"kernel": n(2, (H, D)), "bias": n(3, (D,))}},
            "mlp": {"up": {"kernel": n(4, (D, F))}, "down": {"kernel": n(5, (F, D))}},
        },
        "unembed": {"kernel": n(6, (D, V))},
    }


def _forward(p, tokens):
    h = p["embed"]["embedding"][tokens]
    b = p["block_0"]
    h = h + jnp.tanh(h @ b["attn"]["q"]["kernel"]) @ b["attn"]["o"]["kernel"] + b["attn"]["o"]["bias"]
    h = h + jax.nn.relu(h @ b["mlp"]["up"]["kernel"]) @ b["mlp"]["down"]["kernel"]
    return h @ p["unembed"]["kernel"]


def _xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


@pytest.fixture(scope="module")
def setup():
    base = _model_params(jax.random.PRNGKey(0))
    U = _ortho(jax.random.PRNGKey(1), D, 2)
    toks = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, V)
    ys = jax.random.randint(jax.random.PRNGKey(3), (64,), 0, V)
    return base, U, toks, ys


# ---------------------------------------------------------------- hand-computed sides (Flax layout)


def test_sides_hand_computed_example():
    # U = (e0 + e1)/sqrt2 in d_model = 3: P x = x - ((x0 + x1)/2) (1, 1, 0).
    U = np.array([[1.0], [1.0], [0.0]]) / np.sqrt(2)
    writer_k = jnp.array([[1.0, 3.0, 5.0], [2.0, 0.0, 1.0]])  # (d_in=2, d_model=3): rows are written vectors
    reader_k = jnp.array([[1.0, 2.0], [3.0, 0.0], [5.0, 1.0]])  # (d_model=3, d_out=2): columns are read vectors
    upd = {
        "block_0": {
            "attn": {
                "o": {"kernel": writer_k, "bias": jnp.array([2.0, 4.0, 7.0])},
                "q": {"kernel": reader_k, "bias": jnp.array([9.0, 9.0])},
            },
            "mlp": {"up": {"lora_a": reader_k, "lora_b": jnp.ones((2, 4))},
                    "down": {"lora_a": jnp.ones((4, 2)), "lora_b": writer_k}},
        },
        "embed": {"embedding": writer_k},
    }
    tx = jaxlab.grasp(U)
    out, _ = tx.update(upd, tx.init(upd))
    writer_want = np.array([[-1.0, 1.0, 5.0], [1.0, -1.0, 1.0]])
    reader_want = np.array([[-1.0, 1.0], [1.0, -1.0], [5.0, 1.0]])
    b = out["block_0"]
    np.testing.assert_allclose(b["attn"]["o"]["kernel"], writer_want, atol=1e-6)
    np.testing.assert_allclose(b["attn"]["o"]["bias"], [-1.0, 1.0, 7.0], atol=1e-6)
    np.testing.assert_allclose(b["attn"]["q"]["kernel"], reader_want, atol=1e-6)
    np.testing.assert_array_equal(b["attn"]["q"]["bias"], [9.0, 9.0])  # reader bias is not residual-side
    np.testing.assert_allclose(b["mlp"]["up"]["lora_a"], reader_want, atol=1e-6)
    np.testing.assert_array_equal(b["mlp"]["up"]["lora_b"], np.ones((2, 4)))
    np.testing.assert_array_equal(b["mlp"]["down"]["lora_a"], np.ones((4, 2)))
    np.testing.assert_allclose(b["mlp"]["down"]["lora_b"], writer_want, atol=1e-6)
    np.testing.assert_allclose(out["embed"]["embedding"], writer_want, atol=1e-6)


def test_pytorch_layout_corresponds_to_flax_transpose():
    """A PyTorch weight W (d_out, d_in) is K^T: reader's P K equals (W P)^T, writer's K P equals (P W)^T."""
    U = _ortho(jax.random.PRNGKey(4), 5, 2)
    Pm = np.eye(5) - U @ U.T  # materialised only in the test, as the independent reference
    w_reader_torch = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (3, 5)))  # (d_out, d_model)
    w_writer_torch = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (5, 4)))  # (d_model, d_in)
    upd = {"attn": {"q": {"kernel": jnp.asarray(w_reader_torch.T)}, "o": {"kernel": jnp.asarray(w_writer_torch.T)}}}
    tx = jaxlab.grasp(U)
    out, _ = tx.update(upd, tx.init(upd))
    np.testing.assert_allclose(out["attn"]["q"]["kernel"].T, w_reader_torch @ Pm, atol=1e-5)
    np.testing.assert_allclose(out["attn"]["o"]["kernel"].T, Pm @ w_writer_torch, atol=1e-5)


# ---------------------------------------------------------------- algebraic properties


def test_idempotent_identity_at_k0_and_beta(setup):
    base, U, _, _ = setup
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(7), x.shape), base)
    tx = jaxlab.grasp(U)
    st = tx.init(g)
    once, st = tx.update(g, st)
    twice, _ = tx.update(once, st)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(twice)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(once["block_0"]["attn"]["o"]["kernel"], g["block_0"]["attn"]["o"]["kernel"])
    tx0 = jaxlab.grasp(np.zeros((D, 0)))
    same, _ = tx0.update(g, tx0.init(g))
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(g)):
        np.testing.assert_array_equal(a, b)
    half, _ = jaxlab.grasp(U, beta=0.5).update(g, tx.init(g))
    wk = np.asarray(g["block_0"]["mlp"]["down"]["kernel"], np.float64)
    np.testing.assert_allclose(half["block_0"]["mlp"]["down"]["kernel"], wk - 0.5 * wk @ U @ U.T, atol=1e-5)


def test_basis_is_orthonormalised():
    raw = np.array([[2.0, 1.0], [0.0, 1.0], [0.0, 0.0]])  # not orthonormal; spans e0, e1
    upd = {"attn": {"o": {"kernel": jnp.ones((2, 3))}}}
    out, _ = _apply(jaxlab.grasp(raw), upd)
    np.testing.assert_allclose(out["attn"]["o"]["kernel"], [[0, 0, 1], [0, 0, 1]], atol=1e-6)


# ---------------------------------------------------------------- invariants after training


def _train(params, tx, loss, steps):
    st = tx.init(params)

    @jax.jit
    def step(p, st):
        u, st = tx.update(jax.grad(loss)(p), st, p)
        return optax.apply_updates(p, u), st

    for _ in range(steps):
        params, st = step(params, st)
    return params


def _invariant_ratios(delta, base, new, U):
    """max over leaves of ||Pi_U dW|| / ||dW|| and of the change of W0 U / U^T W0."""
    leak = jaxlab.subspace_leakage(delta, U)
    moved = []
    for path, w0 in jax.tree_util.tree_flatten_with_path(base)[0]:
        ls = ResidualSides().leaf_side(path, w0)
        if ls is None:
            continue
        w1 = functools.reduce(lambda t, k: t[k.key], path, new)
        if ls.axis == -1:
            a, b = np.asarray(w0) @ U, np.asarray(w1) @ U
        else:
            a, b = U.T @ np.asarray(w0), U.T @ np.asarray(w1)
        moved.append(np.max(np.abs(a - b)))
    return max(leak.values()), max(moved), len(leak)


def test_full_finetune_invariants_after_adamw(setup):
    base, U, toks, ys = setup
    loss = lambda p: _xent(_forward(p, toks), ys)
    tx_naive = optax.adamw(1e-2, weight_decay=0.1)
    tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), jaxlab.grasp(U))
    naive = _train(base, tx_naive, loss, 100)
    new = _train(base, tx, loss, 100)
    d = jax.tree.map(lambda a, b: a - b, new, base)
    dn = jax.tree.map(lambda a, b: a - b, naive, base)
    leak, moved, n = _invariant_ratios(d, base, new, U)
    leak_naive, moved_naive, _ = _invariant_ratios(dn, base, naive, U)
    assert n == 7  # embedding, o kernel + bias, q, up, down, unembed
    assert leak < 1e-5, leak
    assert moved < 1e-5, moved
    assert leak_naive > 0.1 and moved_naive > 1e-2  # without GRASP the subspace does move
    assert float(loss(new)) < 0.8 * float(loss(base))  # and it still learns


def test_lora_invariants_step0_forward_and_training(setup):
    base, U, toks, ys = setup
    targets = [r"attn/(q|o)$", r"mlp/(up|down)$", r"^unembed$", r"^embed$"]
    p0 = lora.inject(base, targets, rank=2, key=jax.random.PRNGKey(9))
    p0 = jaxlab.grasp_init_params(p0, U)
    # Step 0: B = 0 so the forward pass is the base model's; reader A0 are already projected.
    np.testing.assert_array_equal(_forward(lora.merge(p0), toks), _forward(base, toks))
    for name in ("q", ):
        a = np.asarray(p0["block_0"]["attn"][name]["lora_a"])
        assert np.max(np.abs(U.T @ a)) < 1e-6
    loss = lambda p: _xent(_forward(lora.merge(p, alpha=4.0), toks), ys)
    inner = optax.adamw(2e-2, weight_decay=0.1)
    new = _train(p0, optax.chain(lora.freeze_base(inner, p0), jaxlab.grasp(U)), loss, 100)
    naive = _train(p0, lora.freeze_base(inner, p0), loss, 100)
    merged, merged_naive = lora.merge(new, alpha=4.0), lora.merge(naive, alpha=4.0)
    d = jax.tree.map(lambda a, b: a - b, merged, base)
    dn = jax.tree.map(lambda a, b: a - b, merged_naive, base)
    leak, moved, _ = _invariant_ratios(d, base, merged, U)
    leak_naive, _, _ = _invariant_ratios(dn, base, merged_naive, U)
    assert leak < 1e-5 and moved < 1e-5, (leak, moved)
    assert leak_naive > 0.05
    assert float(loss(new)) < 0.9 * float(loss(p0))
    # Base kernels untouched by the frozen LoRA run.
    np.testing.assert_array_equal(new["block_0"]["attn"]["q"]["kernel"], base["block_0"]["attn"]["q"]["kernel"])


def test_post_hoc_projection_and_project_finetune(setup):
    base, U, _, _ = setup
    p = lora.inject(base, [r"attn/(q|o)$"], rank=2, key=jax.random.PRNGKey(3))
    p["block_0"]["attn"]["o"]["lora_b"] = jax.random.normal(jax.random.PRNGKey(4), (2, D))
    p["block_0"]["attn"]["q"]["lora_b"] = jax.random.normal(jax.random.PRNGKey(5), (2, H))
    proj = jaxlab.project_lora(p, U)
    d = jax.tree.map(lambda a, b: a - b, lora.merge(proj), base)
    assert max(jaxlab.subspace_leakage(d, U).values()) < 1e-6
    # Same result through the dense route: W0 + P(W - W0).
    dense = jaxlab.project_finetune(lora.merge(p), base, U)
    for a, b in zip(jax.tree.leaves(dense), jax.tree.leaves(lora.merge(proj))):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ---------------------------------------------------------------- stacked / per-layer


def test_per_layer_bases_stacked_vmap_and_named_blocks():
    L = 3
    Us = np.stack([_ortho(jax.random.PRNGKey(20 + i), D, 1) for i in range(L)])
    g_stack = {"blocks": {"attn": {"o": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (L, H, D))},
                                   "q": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (L, D, H))}}}}
    out, _ = _apply(jaxlab.grasp(Us), g_stack)
    g_named = {f"block_{i}": {"attn": {"o": {"kernel": g_stack["blocks"]["attn"]["o"]["kernel"][i]},
                                       "q": {"kernel": g_stack["blocks"]["attn"]["q"]["kernel"][i]}}}
               for i in range(L)}
    out_named, _ = _apply(jaxlab.grasp({i: Us[i] for i in range(L)}), g_named)
    for i in range(L):
        wo = np.asarray(g_stack["blocks"]["attn"]["o"]["kernel"][i], np.float64)
        wq = np.asarray(g_stack["blocks"]["attn"]["q"]["kernel"][i], np.float64)
        want_o = wo - wo @ Us[i] @ Us[i].T
        want_q = wq - Us[i] @ (Us[i].T @ wq)
        np.testing.assert_allclose(out["blocks"]["attn"]["o"]["kernel"][i], want_o, atol=1e-5)
        np.testing.assert_allclose(out["blocks"]["attn"]["q"]["kernel"][i], want_q, atol=1e-5)
        np.testing.assert_allclose(out_named[f"block_{i}"]["attn"]["o"]["kernel"], want_o, atol=1e-5)
        np.testing.assert_allclose(out_named[f"block_{i}"]["attn"]["q"]["kernel"], want_q, atol=1e-5)



def test_per_layer_result_falls_back_to_global_basis_off_the_blocks():
    """A SpuriousSubspace with U_layers: block leaves use their block's basis, embed/unembed the global U;
    per-layer bases without a global one cannot serve a leaf outside the blocks."""
    g = _ortho(jax.random.PRNGKey(30), D, 1)
    layers = np.stack([_ortho(jax.random.PRNGKey(31 + i), D, 1) for i in range(2)])
    sub = jaxlab.SpuriousSubspace(U=jnp.asarray(g), eigenvalues=np.ones(1), k=1, eigengap=3.0, explained_energy=1.0,
                                  aggregation="per_layer", layer_ids=(0, 1), U_layers=jnp.asarray(layers))
    key = jax.random.PRNGKey(40)
    upd = {"embed": {"embedding": jax.random.normal(key, (V, D))},
           "block_1": {"mlp": {"down": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (F, D))},
                               "up": {"kernel": jax.random.normal(jax.random.fold_in(key, 2), (D, F))}}},
           "unembed": {"kernel": jax.random.normal(jax.random.fold_in(key, 3), (D, V))}}
    out, _ = _apply(jaxlab.grasp(sub), upd)
    x = jax.tree.map(lambda a: np.asarray(a, np.float64), upd)
    u1 = layers[1]
    np.testing.assert_allclose(out["embed"]["embedding"], x["embed"]["embedding"] @ (np.eye(D) - g @ g.T), atol=1e-5)
    np.testing.assert_allclose(out["unembed"]["kernel"], (np.eye(D) - g @ g.T) @ x["unembed"]["kernel"], atol=1e-5)
    np.testing.assert_allclose(out["block_1"]["mlp"]["down"]["kernel"],
                               x["block_1"]["mlp"]["down"]["kernel"] @ (np.eye(D) - u1 @ u1.T), atol=1e-5)
    np.testing.assert_allclose(out["block_1"]["mlp"]["up"]["kernel"],
                               (np.eye(D) - u1 @ u1.T) @ x["block_1"]["mlp"]["up"]["kernel"], atol=1e-5)
    with pytest.raises(ValueError, match=r"leaf \['embed'\]\['embedding'\] \(layer None\) has no per-layer basis"):
        _apply(jaxlab.grasp({0: layers[0], 1: layers[1]}), upd)


# ---------------------------------------------------------------- jit / pmap / mesh


def test_jit_pmap_and_mesh_agree(setup, eight_devices):
    base, U, _, _ = setup
    tx = optax.chain(optax.adamw(1e-3, weight_decay=0.1), jaxlab.grasp(U))
    st = tx.init(base)
    grads = [jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.PRNGKey(100 + i), x.shape), base)
             for i in range(8)]
    eager = [tx.update(g, st, base)[0] for g in grads]
    jitted = jax.jit(lambda g: tx.update(g, st, base)[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    pm = jax.pmap(lambda g: tx.update(g, st, base)[0], devices=eight_devices)(stacked)
    mesh = Mesh(np.array(eight_devices), ("x",))
    # Shard the last axis of every >=2-D leaf over 8 devices where it divides, replicate the rest.
    def shard(x):
        spec = P(*([None] * (x.ndim - 1) + ["x"])) if x.ndim >= 1 and x.shape[-1] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    g_sh = jax.tree.map(shard, grads[0])
    meshed = jax.jit(lambda g: tx.update(g, st, base)[0])(g_sh)
    for i in range(8):
        for a, b in zip(jax.tree.leaves(eager[i]), jax.tree.leaves(jitted(grads[i]))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
        for a, b in zip(jax.tree.leaves(eager[i]), jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], pm))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(eager[0]), jax.tree.leaves(meshed)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- errors


def test_errors_name_the_leaf():
    U = np.eye(D)[:, :1]
    bad_writer = {"block_0": {"attn": {"o": {"kernel": jnp.ones((4, 5))}}}}
    with pytest.raises(ValueError, match=r"writer leaf \['block_0'\]\['attn'\]\['o'\]\['kernel'\].*\(4, 5\).*d_model=8"):
        jaxlab.grasp(U).init(bad_writer)
    bad_reader = {"unembed": {"kernel": jnp.ones((5, D))}}
    with pytest.raises(ValueError, match=r"reader leaf \['unembed'\]\['kernel'\].*\(5, 8\).*length 5"):
        _apply(jaxlab.grasp(U), bad_reader)
    with pytest.raises(ValueError, match="no leaf matched"):
        jaxlab.grasp(U).init({"foo": {"kernel": jnp.ones((D, D))}})
    # Declaring the side by pattern fixes it.
    out, _ = _apply(jaxlab.grasp(U, {r"^foo$": "writer"}), {"foo": {"kernel": jnp.ones((2, D))}})
    assert np.all(np.asarray(out["foo"]["kernel"][:, 0]) == 0)
    with pytest.raises(ValueError, match="side 'input'"):
        jaxlab.grasp(U, {r"foo": "input"})
    with pytest.raises(ValueError, match="beta=1.5"):
        jaxlab.grasp(U, beta=1.5)
    with pytest.raises(ValueError, match="expected .d_model, k. or .L, d_model, k."):
        jaxlab.grasp(np.ones((2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"stacked leaf \['blocks'\]\['attn'\]\['o'\]\['kernel'\].*\(2, 3, 8\)"):
        _apply(jaxlab.grasp(np.stack([U, U, U])), {"blocks": {"attn": {"o": {"kernel": jnp.ones((2, 3, D))}}}})
    with pytest.raises(TypeError, match="sides"):
        jaxlab.grasp(U, sides=3)


def test_side_rules_override_and_default():
    s = ResidualSides.default()
    assert s.side_of("params/block_3/attn/q") == "reader"
    assert s.side_of("params/block_3/attn/o") == "writer"
    assert s.side_of("params/block_3/mlp/down") == "writer"
    assert s.side_of("params/unembed") == "reader" and s.side_of("params/embed") == "writer"
    assert s.side_of("params/block_3/ln1") is None
    assert s.layer_of("params/block_3/attn/q") == 3
    o = s.override({r"attn/q$": None, r"adapter$": "writer"})
    assert o.side_of("block_0/attn/q") is None and o.side_of("x/adapter") == "writer"
    assert o.side_of("block_0/attn/k") == "reader"


def test_only_restricts_projected_leaf_names():
    U = np.eye(3)[:, :1]
    upd = {"attn": {"o": {"kernel": jnp.ones((2, 3)), "lora_b": jnp.ones((1, 3))}}}
    out, _ = _apply(jaxlab.grasp(U, only=("lora_a", "lora_b")), upd)
    np.testing.assert_array_equal(out["attn"]["o"]["kernel"], np.ones((2, 3)))
    np.testing.assert_allclose(out["attn"]["o"]["lora_b"], [[0.0, 1.0, 1.0]])
