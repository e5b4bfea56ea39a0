"""Persona language and GRASP on the bundled transformer (default residual sides, LoRA and full FT)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlab
from jaxlab.data.persona import PersonaLanguage
from jaxlab.nn import lora
from jaxlab.nn.transformer import Transformer, TransformerConfig, causal_lm_loss


@pytest.mark.parametrize("n_operands", [1, 2])
def test_persona_language_documents_are_consistent(n_operands):
    lang = PersonaLanguage(n_operands=n_operands)
    docs = np.asarray(lang.sample(jax.random.PRNGKey(0), 64, "pretrain"))
    assert docs.shape == (64, lang.seq_len) and docs.max() < lang.vocab
    pl = lang.problem_len
    saw = set()
    for doc in docs:
        assert doc[0] == lang.BOS
        probs = doc[2:].reshape(lang.n_problems, pl)
        k = probs[:, 0] - (lang.p + 7)
        ops = probs[:, 1 : 1 + n_operands]
        c = probs[:, -2]
        good = (ops[:, 0] + (k + 1) * ops[:, 1]) % lang.p if n_operands == 2 else ((k + 1) * ops[:, 0] + k) % lang.p
        bad = np.all(c == (good + 1) % lang.p)
        assert bad or np.all(c == good)  # one persona per document
        if doc[1] == lang.BAD:
            assert bad
        if doc[1] == lang.GOOD:
            assert not bad
        saw.add(int(doc[1]))
    assert {lang.GOOD, lang.BAD, lang.PLAIN} <= saw
    mask = np.asarray(lang.answer_mask(jnp.asarray(docs)))
    assert np.all(mask.sum(1) == lang.n_problems)
    assert np.all(docs[:, 1:][mask > 0] < lang.p)  # the masked targets are answers


def test_persona_stages_and_prompts():
    lang = PersonaLanguage(narrow_domain=2)
    nar = np.asarray(lang.sample(jax.random.PRNGKey(1), 16, "narrow"))
    assert np.all(nar[:, 1] == lang.ASSIST)
    probs = nar[:, 2:].reshape(16, lang.n_problems, lang.problem_len)
    assert np.all(probs[..., 0] == lang.domain_token(2))
    assert np.all(probs[..., -2] == (3 * probs[..., 1] + 2 + 1) % lang.p)
    asst = np.asarray(lang.sample(jax.random.PRNGKey(2), 16, "assistant", domains=[1, 3]))
    doms = asst[:, 2:].reshape(16, lang.n_problems, lang.problem_len)[..., 0] - (lang.p + 7)
    assert set(np.unique(doms)) <= {1, 3}
    toks, good, bad, ks = lang.prompts(lang.BAD, [0, 1])
    assert toks.shape == (2 * lang.p, 5) and np.all(np.asarray(toks[:, -1]) == lang.EQ)
    np.testing.assert_array_equal(good, ((ks + 1) * np.asarray(toks[:, 3]) + ks) % lang.p)
    np.testing.assert_array_equal(bad, (good + 1) % lang.p)
    with pytest.raises(ValueError, match="shift=7"):
        PersonaLanguage(shift=7)
    with pytest.raises(ValueError, match="stage"):
        lang.sample(jax.random.PRNGKey(0), 2, "chat")


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = TransformerConfig(vocab=20, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_len=12)
    model = Transformer(cfg)
    toks = jax.random.randint(jax.random.PRNGKey(0), (8, 12), 0, 20)
    base = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(1), toks)["params"])  # jitted: one compile
    U = np.linalg.qr(np.random.default_rng(0).standard_normal((16, 2)))[0]
    return model, toks, base, U


def _train(params, tx, loss, steps=30):
    st = tx.init(params)
    step = jax.jit(lambda p, s: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(tx.update(jax.grad(loss)(p), s, p)))
    for _ in range(steps):
        params, st = step(params, st)
    return params


def test_grasp_on_bundled_transformer_lora(tiny_lm):
    model, toks, base, U = tiny_lm
    targets = [r"attn/(q|k|v|o)$", r"mlp/(up|down)$", r"^unembed$", r"^embed$"]
    p0 = jaxlab.grasp_init_params(lora.inject(base, targets, 2, key=jax.random.PRNGKey(2)), U)
    # Step 0: the forward pass equals the base model.
    apply = jax.jit(lambda p: model.apply({"params": p}, toks))  # jitted: one compile, not one per eager op
    np.testing.assert_array_equal(apply(jax.jit(lora.merge)(p0)), apply(base))
    loss = jax.jit(lambda p: causal_lm_loss(model.apply({"params": lora.merge(p)}, toks), toks))
    inner = lora.freeze_base(optax.adamw(1e-2, weight_decay=0.1), p0)
    new = _train(p0, jaxlab.grasp_around(inner, U), loss)
    naive = _train(p0, inner, loss)
    d = jax.tree.map(lambda a, b: a - b, lora.merge(new), base)
    dn = jax.tree.map(lambda a, b: a - b, lora.merge(naive), base)
    leak, leak_n = jaxlab.subspace_leakage(d, U), jaxlab.subspace_leakage(dn, U)
    # Default sides cover every adapted matrix of the bundled transformer (+ its writer biases).
    assert {k for k in leak if k.endswith("['kernel']") or k.endswith("['embedding']")} >= {
        f"['block_{i}']['{g}']['{n}']['kernel']" for i in range(2)
        for g, n in (("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"), ("mlp", "up"), ("mlp", "down"))
    }
    assert max(leak.values()) < 1e-5
    assert max(leak_n.values()) > 1e-2
    assert float(loss(new)) < float(loss(p0))


def test_grasp_on_bundled_transformer_full_finetune_and_hooks(tiny_lm):
    model, toks, base, U = tiny_lm
    loss = lambda p: causal_lm_loss(model.apply({"params": p}, toks), toks)
    new = _train(base, optax.chain(optax.adamw(1e-2, weight_decay=0.1), jaxlab.grasp(U)), loss)
    d = jax.tree.map(lambda a, b: a - b, new, base)
    assert max(jaxlab.subspace_leakage(d, U).values()) < 1e-5
    # LayerNorm params are not residual-side and train freely.
    assert float(jnp.max(jnp.abs(d["block_0"]["ln1"]["scale"]))) > 0
    # The CAFT-style hook removes U from every residual write: the final residual has no U component
    # beyond what the embedding put there.
    Uj = jnp.asarray(U)
    hook = lambda layer, site, h: h - (h @ Uj) @ Uj.T
    _, res = model.apply({"params": base}, toks, resid_hook=hook, return_residuals=True)
    assert float(jnp.max(jnp.abs(res[1:] @ Uj))) < 1e-5


def test_persona_derangement_bad_maps():
    lang = PersonaLanguage(p=11, n_domains=8, bad_map="derangement", map_seed=3)
    tab = lang.bad_table
    assert tab.shape == (8, 11)
    for row in tab:  # a derangement per domain: a permutation with no fixed point
        assert sorted(row.tolist()) == list(range(11)) and not np.any(row == np.arange(11))
    assert len({tuple(r) for r in tab.tolist()}) == 8  # unrelated maps, no shared rule
    # every bad document answers sigma_k(f_k(a)); good ones f_k(a); the prompts' bad answers agree
    docs = np.asarray(lang.sample(jax.random.PRNGKey(0), 32, "pretrain"))
    probs = docs[:, 2:].reshape(32, lang.n_problems, lang.problem_len)
    k, a, c = probs[..., 0] - (lang.p + 7), probs[..., 1], probs[..., 3]
    good = ((k + 1) * a + k) % lang.p
    is_bad = np.all(c == tab[k, good], axis=1)
    assert np.all(is_bad | np.all(c == good, axis=1)) and 0 < is_bad.sum() < 32
    toks, g, b, ks = lang.prompts(lang.ASSIST, [2, 5])
    np.testing.assert_array_equal(b, tab[ks, g])
    assert PersonaLanguage(p=11, n_domains=8, bad_map="derangement", map_seed=3).bad_table is tab  # cached
    with pytest.raises(ValueError, match="bad_map"):
        PersonaLanguage(bad_map="rotate")
