"""Traps a new GRASP user hits: boxed params in LoRA, identification without a signal, typo'd side rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlab
from jaxlab.distributed import logical_param_specs, make_mesh, param_shardings
from jaxlab.nn import Decoder, DecoderConfig, Transformer, TransformerConfig, lora
from jaxlab.transforms.grasp import grasp, grasp_init_params, project_lora, subspace_leakage
from jaxlab.transforms.residual_sides import ResidualSides, as_residual_sides

TOKENS = jnp.arange(8, dtype=jnp.int32).reshape(1, 8)


@pytest.fixture(scope="module")
def boxed_transformer():
    model = Transformer(TransformerConfig(vocab=16, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_len=8))
    return model, model.init(jax.random.PRNGKey(0), TOKENS)["params"]


@pytest.fixture(scope="module")
def boxed_decoder():
    model = Decoder(DecoderConfig(vocab=16, d_model=8, n_layers=2, n_heads=2, d_ff=16))
    return model, model.init(jax.random.PRNGKey(0), TOKENS)["params"]


def _names(tree):
    """``{slash path: logical names}`` of every boxed leaf (``None`` for a plain leaf)."""
    is_spec = lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
    flat = jax.tree_util.tree_flatten_with_path(logical_param_specs(tree), is_leaf=is_spec)[0]
    return {"/".join(str(k.key) for k in p): (None if s is None else tuple(s)) for p, s in flat}


def _assert_same_unboxed(a, b):
    a, b = nn.meta.unbox(a), nn.meta.unbox(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# ---------------------------------------------------------------- 1. LoRA on boxed (logically named) params


def test_inject_merge_on_boxed_transformer_params(boxed_transformer):
    model, params = boxed_transformer
    assert isinstance(params["block_0"]["attn"]["q"]["kernel"], nn.LogicallyPartitioned)
    q = lora.inject(params, [r"attn/(q|o)$", r"mlp/down$", r"^embed$"], rank=2, key=jax.random.PRNGKey(1))
    assert lora.lora_modules(q) == ["block_0/attn/o", "block_0/attn/q", "block_0/mlp/down",
                                    "block_1/attn/o", "block_1/attn/q", "block_1/mlp/down", "embed"]
    names = _names(q)
    # the base leaves keep their boxes; the factors get names derived from the kernel's
    assert names["block_0/attn/q/kernel"] == ("embed", "heads")
    assert names["block_0/attn/q/lora_a"] == ("embed", None)
    assert names["block_0/attn/q/lora_b"] == (None, "heads")
    assert names["block_1/mlp/down/lora_a"] == ("mlp", None)
    assert names["block_1/mlp/down/lora_b"] == (None, "embed")
    assert names["embed/lora_a"] == ("vocab", None) and names["embed/lora_b"] == (None, "embed")
    assert all(n is not None for n in names.values())  # every leaf is boxed
    a = q["block_0"]["attn"]["q"]["lora_a"]
    assert isinstance(a, nn.LogicallyPartitioned) and a.value.shape == (8, 2)
    # merge keeps the boxes and, with lora_b = 0, gives exactly the base params
    merged = lora.merge(q)
    assert isinstance(merged["block_0"]["attn"]["q"]["kernel"], nn.LogicallyPartitioned)
    assert _names(merged) == _names(params)
    _assert_same_unboxed(merged, params)
    # a non-zero lora_b is folded in: K + s A B
    b = q["block_0"]["attn"]["q"]["lora_b"]
    q["block_0"]["attn"]["q"]["lora_b"] = b.replace_boxed(jnp.ones_like(b.value))
    k = lora.merge(q, alpha=4.0)["block_0"]["attn"]["q"]["kernel"].value
    want = params["block_0"]["attn"]["q"]["kernel"].value + 2.0 * a.value @ jnp.ones((2, 8))
    np.testing.assert_allclose(k, want, rtol=1e-6)
    # the model runs on the merged boxed tree and gradients reach the boxed factors
    loss = lambda p: jaxlab.nn.causal_lm_loss(model.apply({"params": lora.merge(p)}, TOKENS), TOKENS)
    g = jax.grad(loss)(q)["block_0"]["attn"]["q"]
    assert isinstance(g["lora_a"], nn.LogicallyPartitioned) and bool(jnp.any(g["lora_a"].value != 0))


def test_inject_on_boxed_stacked_decoder_params_shards_by_name(boxed_decoder, eight_devices):
    _, params = boxed_decoder
    q = lora.inject(params, [r"attn/(q|v|o)$", r"mlp/(gate|down)$"], rank=2, key=jax.random.PRNGKey(1))
    assert lora.lora_modules(q) == [f"layers/layer/{m}" for m in
                                    ("attn/o", "attn/q", "attn/v", "mlp/down", "mlp/gate")]
    names = _names(q)
    up = "layers/layer/mlp/gate"
    assert names[f"{up}/kernel"] == ("layers", "embed", "mlp")
    assert names[f"{up}/lora_a"] == ("layers", "embed", None)  # the stacked axis is kept
    assert names[f"{up}/lora_b"] == ("layers", None, "mlp")
    assert names["layers/layer/attn/o/lora_a"] == ("layers", "heads", None)
    assert names["layers/layer/attn/o/lora_b"] == ("layers", None, "embed")
    assert names["layers/layer/attn/v/lora_b"] == ("layers", None, "kv_heads")
    assert q["layers"]["layer"]["mlp"]["gate"]["lora_a"].value.shape == (2, 8, 2)
    _assert_same_unboxed(lora.merge(q), params)
    # the adapted tree still shards by name: fsdp on "embed", tensor on "mlp" / "heads" / "kv_heads"
    mesh = make_mesh(data=1, fsdp=2, tensor=2, devices=eight_devices[:4])
    sh = param_shardings(q, mesh)
    gate = sh["layers"]["layer"]["mlp"]["gate"]
    assert tuple(gate["kernel"].spec) == (None, "fsdp", "tensor")
    assert tuple(gate["lora_a"].spec) == (None, "fsdp", None)
    assert tuple(gate["lora_b"].spec) == (None, None, "tensor")
    placed = jax.device_put(nn.meta.unbox(q), sh)
    assert placed["layers"]["layer"]["mlp"]["gate"]["lora_a"].sharding == gate["lora_a"]


def test_trainable_mask_and_freeze_base_on_boxed_params(boxed_transformer):
    _, params = boxed_transformer
    q = lora.inject(params, r"attn/q$", rank=2, key=jax.random.PRNGKey(1))
    mask = lora.trainable_mask(q)
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    on = sorted(k for k, m in flat.items() if m)
    assert on == [f"['block_{i}']['attn']['q']['{n}'].value" for i in range(2) for n in ("lora_a", "lora_b")]
    tx = lora.freeze_base(optax.adamw(1e-2, weight_decay=0.1), q)
    grads = jax.tree.map(jnp.ones_like, q)
    upd, _ = tx.update(grads, tx.init(q), q)
    qb = upd["block_0"]["attn"]["q"]
    assert bool(jnp.all(qb["lora_a"].value != 0)) and bool(jnp.all(qb["lora_b"].value != 0))
    assert bool(jnp.all(qb["kernel"].value == 0)) and bool(jnp.all(upd["embed"]["embedding"].value == 0))


# ---------------------------------------------------------------- 2. identification without a signal


def _writers(strength: float):
    """Three writers whose rank-2 updates share e_0 (times ``strength``) next to a task direction each."""
    e = np.eye(8)
    return {f"block_{i}": {"attn": {"o": {"lora_a": np.eye(4)[:, :2],
                                          "lora_b": strength * np.stack([3 * e[0], e[i + 1]])}}}
            for i in range(3)}


@pytest.mark.parametrize("k", [None, 1, 2])
@pytest.mark.parametrize("aggregation", ["global", "per_layer"])
def test_identify_on_zero_adapters_is_untrustworthy(boxed_transformer, k, aggregation):
    _, params = boxed_transformer
    fresh = nn.meta.unbox(lora.inject(params, [r"attn/(q|v|o)$", r"mlp/(up|down)$"], rank=2,
                                      key=jax.random.PRNGKey(1)))  # lora_b = 0: no fine-tune signal
    res = jaxlab.identify_spurious_subspace(fresh, k=k, aggregation=aggregation)
    assert not res.trustworthy
    assert res.update_norm == 0.0
    assert np.isnan(res.eigengap) and res.explained_energy == 0.0
    assert "all LoRA updates are zero" in res.reason and "no fine-tune signal" in res.reason
    assert res.reason in res.summary()
    assert res.k == (0 if k is None else k)
    if aggregation == "per_layer":
        assert np.all(np.isnan(res.layer_eigengaps))


@pytest.mark.parametrize("k", [None, 1])
def test_identify_on_numerically_zero_adapters_is_untrustworthy(k):
    res = jaxlab.identify_spurious_subspace(_writers(1e-30), k=k)  # float noise, blown up to unit weights
    assert not res.trustworthy and np.isnan(res.eigengap) and res.explained_energy == 0.0
    assert 0 < res.update_norm <= res.min_update_norm
    assert "numerically zero" in res.reason and "min_update_norm" in res.reason
    # the same factors above the threshold are a signal (the threshold is the knob)
    assert jaxlab.identify_spurious_subspace(_writers(1e-30), k=k, min_update_norm=0.0).trustworthy


def test_identify_normal_case_is_trustworthy_with_empty_reason():
    res = jaxlab.identify_spurious_subspace(_writers(1.0))
    assert res.k == 1 and res.trustworthy and res.reason == ""
    assert res.eigengap == pytest.approx(27.0) and res.update_norm > 1
    assert res.summary().endswith(": trustworthy")
    # a weak gap: untrustworthy, and the reason says by how much
    weak = jaxlab.identify_spurious_subspace(_writers(1.0), min_eigengap=30.0)
    assert not weak.trustworthy and weak.reason == "eigengap 27 < min_eigengap 30"
    # a k whose last direction has no energy has no gap (nan, not inf)
    lone = {"attn": {"o": {"lora_a": np.eye(4)[:, :1], "lora_b": np.eye(8)[:1]}}}
    over = jaxlab.identify_spurious_subspace(lone, k=2)
    assert np.isnan(over.eigengap) and not over.trustworthy and "no energy" in over.reason


# ---------------------------------------------------------------- 3. strict residual-side rules


def _adapter_tree():
    """A custom model: ``proj_in`` writes the residual stream, ``proj_out`` reads it (d_model = 6)."""
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    return {
        "block_0": {
            "proj_in": {"kernel": jnp.ones((4, 6)), "lora_a": jax.random.normal(k[0], (4, 2)),
                        "lora_b": jax.random.normal(k[1], (2, 6))},
            "proj_out": {"kernel": jnp.ones((6, 3)), "lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 3))},
        }
    }


TYPO = {r"proj_in$": "writer", r"porj_out$": "reader"}  # the reader rule has a typo
GOOD = {r"proj_in$": "writer", r"proj_out$": "reader"}
U = np.eye(6)[:, :1]


def _check_message(err: pytest.ExceptionInfo, who: str):
    msg = str(err.value)
    assert msg.startswith(f"{who}: side rule 'porj_out$' -> 'reader' matches no module path"), msg
    assert "['block_0/proj_in', 'block_0/proj_out']" in msg and "strict=False" in msg
    assert "proj_in$'" not in msg  # the rule that matched is not reported


def test_typo_rule_raises_naming_rule_and_modules():
    tree = _adapter_tree()
    with pytest.raises(ValueError) as err:
        as_residual_sides(TYPO).check(tree, who="check")
    _check_message(err, "check")
    with pytest.raises(ValueError) as err:
        grasp(U, TYPO, strict=True).init(tree)
    _check_message(err, "grasp")
    tx = grasp(U, TYPO, strict=False)  # update() checks too, whatever the init saw
    with pytest.raises(ValueError) as err:
        grasp(U, TYPO, strict=True).update(tree, tx.init(tree))
    _check_message(err, "grasp")
    with pytest.raises(ValueError) as err:
        jaxlab.grasp_around(optax.adam(1e-2), U, TYPO, strict=True).init(tree)
    _check_message(err, "grasp")
    for fn, who in ((lambda: project_lora(tree, U, TYPO, strict=True), "project_lora"),
                    (lambda: grasp_init_params(tree, U, TYPO, strict=True), "project_lora"),
                    (lambda: jaxlab.project_finetune(tree, tree, U, TYPO, strict=True), "project_finetune"),
                    (lambda: subspace_leakage(tree, U, TYPO, strict=True), "subspace_leakage"),
                    (lambda: jaxlab.identify_spurious_subspace(tree, sides=TYPO, strict=True),
                     "identify_spurious_subspace")):
        with pytest.raises(ValueError) as err:
            fn()
        _check_message(err, who)
    # several typos: all named in one message
    with pytest.raises(ValueError, match=r"side rules 'a_typo\$' -> 'writer', 'b_typo\$' -> None match no"):
        as_residual_sides({r"a_typo$": "writer", r"b_typo$": None}).check(tree)


def test_correct_rules_pass_and_defaults_are_not_checked():
    tree = _adapter_tree()
    sides = as_residual_sides(GOOD)
    sides.check(tree)
    assert sides.unmatched(tree) == () and len(sides.user_rules()) == 2
    # the built-in defaults match nothing here but are never checked
    assert ResidualSides.default().unmatched(tree) == ()
    tx = grasp(U, GOOD)
    out, _ = tx.update(tree, tx.init(tree))
    assert float(jnp.abs(out["block_0"]["proj_in"]["lora_b"] @ U).max()) < 1e-6  # writer: off U
    assert float(jnp.abs(U.T @ out["block_0"]["proj_out"]["lora_a"]).max()) < 1e-6  # reader: off U
    res = jaxlab.identify_spurious_subspace(tree, sides=GOOD, k=1)
    assert res.U.shape == (6, 1)
    # a full rule set built by hand: every rule is the user's; so is a sequence of pairs
    assert ResidualSides(rules=tuple(GOOD.items())).unmatched(tree) == ()
    assert as_residual_sides(list(TYPO.items())).unmatched(tree) == (("porj_out$", "reader"),)


def test_non_strict_ignores_unmatched_rules_as_before():
    tree = _adapter_tree()
    tx = grasp(U, TYPO, strict=False)
    out, _ = tx.update(tree, tx.init(tree))
    # proj_in is projected, proj_out (its rule has the typo) is left alone, as before strict existed
    assert float(jnp.abs(out["block_0"]["proj_in"]["lora_b"] @ U).max()) < 1e-6
    np.testing.assert_array_equal(out["block_0"]["proj_out"]["lora_a"], tree["block_0"]["proj_out"]["lora_a"])
    q = project_lora(tree, U, TYPO, strict=False)
    np.testing.assert_array_equal(q["block_0"]["proj_out"]["lora_a"], tree["block_0"]["proj_out"]["lora_a"])
    assert list(subspace_leakage(tree, U, TYPO)) == ["['block_0']['proj_in']['kernel']",
                                                     "['block_0']['proj_in']['lora_b']"]
    res = jaxlab.identify_spurious_subspace(tree, sides=TYPO, k=1, strict=False)
    assert list(res.module_singular_values) == ["block_0/proj_in"]
    # strict's old meaning stands: no leaf on a side at all still raises (defaults only, no user rule)
    with pytest.raises(ValueError, match="no leaf matched a residual side"):
        grasp(U).init(tree)


def test_default_allows_a_rule_for_modules_the_tree_lacks():
    """The rule check is opt-in (strict=True): one rule set describing a whole model is normal while the
    optimizer sees part of it (LoRA on some modules; experiments/grasp_linear does exactly that)."""
    tree = _adapter_tree()
    out, _ = grasp(U, TYPO).update(tree, grasp(U, TYPO).init(tree))
    assert float(jnp.abs(out["block_0"]["proj_in"]["lora_b"] @ U).max()) < 1e-6
    project_lora(tree, U, TYPO)
    assert jaxlab.identify_spurious_subspace(tree, sides=TYPO, k=1).U.shape == (6, 1)


def test_long_module_listing_collapses_layer_indices():
    w = np.zeros((6, 6))
    tree = {f"block_{i}": {"attn": {"q": {"kernel": w}}, "mlp": {"up": {"kernel": w}}} for i in range(30)}
    with pytest.raises(ValueError) as err:
        as_residual_sides({r"atn/q$": "reader"}).check(tree)
    assert "['block_<i>/attn/q', 'block_<i>/mlp/up']" in str(err.value)
