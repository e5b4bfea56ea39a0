"""jaxlab.data.sft (chat rendering, loss masks, packing, per-host batches) and jaxlab.models.tokenizer."""

import itertools
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from jaxlab.data.sft import (
    ChatTemplate,
    PackStats,
    pack_examples,
    read_jsonl,
    render_example,
    render_prompt,
    sft_batches,
)
from jaxlab.models.tokenizer import Tokenizer, load_tokenizer, train_byte_level_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "What is two plus two? Two plus two is four.",
    "<|user|>\nhello there\n<|assistant|>\nhello, how can I help?",
    "the the the then there their they them",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_byte_level_bpe(CORPUS, vocab_size=400)


def byte_tok():
    return SimpleNamespace(encode=lambda s: list(s.encode()), bos_id=256, eos_id=257, pad_id=258)


def runs(mask):
    """Index ranges [a, b) of the maximal runs of ones in a 0/1 mask."""
    m = np.concatenate([[0], np.asarray(mask, int), [0]])
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


# -- tokenizer -------------------------------------------------------------------------------------


def test_bpe_round_trip_and_determinism(bpe):
    for s in CORPUS + ["", " leading and  double  spaces ", "unseen wörds, émoji 🙂\t\n\r", "<bos> literal"]:
        ids = bpe.encode(s)
        assert all(isinstance(i, int) for i in ids)
        assert bpe.decode(ids) == s
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0].encode())  # merges were learned
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2)
    assert bpe.encode("the fox", add_special_tokens=True) == [bpe.bos_id] + bpe.encode("the fox")
    assert bpe.decode([bpe.bos_id] + bpe.encode("hi") + [bpe.eos_id]) == "<bos>hi<eos>"
    assert bpe.decode([bpe.bos_id] + bpe.encode("hi"), skip_special_tokens=True) == "hi"
    again = train_byte_level_bpe(CORPUS, vocab_size=400)
    assert again.backend.to_str() == bpe.backend.to_str()
    assert 256 + 3 < bpe.vocab_size <= 400
    with pytest.raises(ValueError, match="vocab_size"):
        train_byte_level_bpe(CORPUS, vocab_size=200)


def test_load_tokenizer_special_ids(bpe, tmp_path):
    d = bpe.save(tmp_path / "tok")
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 2, bpe.vocab_size)
    assert tok.encode("the lazy fox") == bpe.encode("the lazy fox")
    assert load_tokenizer(d / "tokenizer.json").eos_id == 1  # the json file itself works too

    # ids come from tokenizer_config.json (strings or AddedToken dicts), looked up in the vocabulary
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"__type": "AddedToken", "content": "<pad>"}, "eos_token": "<bos>", "pad_token": None}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 0, 0)  # no pad anywhere: falls back to eos
    # special_tokens_map.json fills what tokenizer_config.json leaves out; config.json ids come last
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>", "pad_token": "<eos>"}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [9, 10], "pad_token_id": 7}))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 0, 1)
    (d / "tokenizer_config.json").unlink()
    (d / "special_tokens_map.json").unlink()
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 9, 7)  # config.json fallback, first of an EOS list
    (d / "config.json").unlink()
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, 0)
    # an unknown token string is ignored with a warning
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        assert load_tokenizer(d).eos_id is None


def test_load_tokenizer_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer_config.json.*SentencePiece") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)


# -- records and rendering -------------------------------------------------------------------------


def test_prompt_response_mask_is_exactly_the_response(bpe):
    prompt, response = "What is two plus two?", "Two plus two is four."
    ids, mask = render_example({"prompt": prompt, "response": response}, bpe)
    assert ids.dtype == np.int32 and mask.shape == ids.shape and set(mask.tolist()) <= {0, 1}
    assert ids[0] == bpe.bos_id
    # the targets are the response encoded alone, then EOS; nothing else
    assert ids[mask == 1].tolist() == bpe.encode(response) + [bpe.eos_id]
    assert len(runs(mask)) == 1 and mask[-1] == 1
    # and the whole sequence is the documented template text
    assert bpe.decode(ids) == f"<bos><|user|>\n{prompt}\n<|assistant|>\n{response}<eos>"


def test_chat_mask_covers_every_assistant_turn_and_only_them(bpe):
    msgs = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello, how can I help?"},
        {"role": "user", "content": "two plus two?"},
        {"role": "assistant", "content": "four"},
    ]
    tmpl = ChatTemplate(system="[S] ", user="[U] ", assistant="[A] ", turn_end=" ;\n")
    ids, mask = render_example({"messages": msgs}, bpe, template=tmpl)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    spans = runs(mask)
    assert len(spans) == len(answers)
    for (a, b), ans in zip(spans, answers):
        assert ids[a:b].tolist() == bpe.encode(ans) + [bpe.eos_id]
    assert bpe.decode(ids) == ("<bos>[S] You are terse. ;\n[U] hello there ;\n[A] hello, how can I help?<eos> ;\n"
                               "[U] two plus two? ;\n[A] four<eos>")
    # no BOS when the tokenizer has none; an empty reply still teaches to stop
    tok = SimpleNamespace(encode=bpe.encode, bos_id=None, eos_id=bpe.eos_id, pad_id=bpe.pad_id)
    ids, mask = render_example({"prompt": "hi", "response": ""}, tok)
    assert ids[0] != bpe.bos_id and ids[mask == 1].tolist() == [bpe.eos_id]


def test_render_prompt_is_the_prefix_of_the_training_example(bpe):
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello there"}]
    p = render_prompt(conv, bpe)
    ids, mask = render_example({"messages": conv + [{"role": "assistant", "content": "hi!"}]}, bpe)
    assert ids[: p.size].tolist() == p.tolist() and not mask[: p.size].any() and mask[p.size:].all()
    assert render_prompt("hello there", bpe).tolist() == render_prompt(conv[1:], bpe).tolist()


@pytest.mark.parametrize("record", [
    {"prompt": "x"},
    {"prompt": "x", "response": 3},
    {"messages": []},
    {"messages": [{"role": "user", "content": "only a question"}]},
    {"messages": [{"role": "bot", "content": "x"}]},
    ["prompt", "response"],
])
def test_invalid_records_rejected(record):
    with pytest.raises(ValueError, match="expected"):
        render_example(record, byte_tok())


def test_tokenizer_that_adds_special_tokens_is_rejected(bpe):
    tok = SimpleNamespace(encode=lambda s: bpe.encode(s, add_special_tokens=True), bos_id=0, eos_id=1, pad_id=2)
    with pytest.raises(ValueError, match="special tokens"):
        render_example({"prompt": "a", "response": "b"}, tok)


def test_read_jsonl(tmp_path):
    good = [{"prompt": "p", "response": "r", "id": 3},
            {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}]
    f = tmp_path / "ok.jsonl"
    f.write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\n")
    assert list(read_jsonl(f)) == good

    cases = {
        "badjson": (json.dumps(good[0]) + "\n" + '{"prompt": "p", "response": \n', 2, "invalid JSON"),
        "missing": (json.dumps(good[0]) + "\n\n" + '{"prompt": "p"}\n', 3, r"keys \['prompt'\]"),
        "role": ('{"messages": [{"role": "robot", "content": "x"}]}\n', 1, r"messages\[0\]"),
        "array": ("[1, 2]\n", 1, "got a JSON list"),
    }
    for name, (text, line, what) in cases.items():
        f = tmp_path / f"{name}.jsonl"
        f.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{f}:{line}: ") + f".*{what}.*expected"):
            list(read_jsonl(f))


# -- packing ---------------------------------------------------------------------------------------


def random_examples(rng, n, max_len):
    """Examples with globally unique token ids (so each token's origin is known) and random masks."""
    lens = rng.integers(1, max_len + 1, n)
    starts = np.concatenate([[1000], 1000 + np.cumsum(lens)[:-1]])
    return [(np.arange(s, s + k), rng.integers(0, 2, k)) for s, k in zip(starts, lens)]


@pytest.mark.parametrize("seq_len,max_len", [(2, 3), (8, 12), (16, 9), (33, 40)])
def test_packing_invariants(seq_len, max_len):
    rng = np.random.default_rng(seq_len)
    ex = random_examples(rng, 60, max_len)
    stats = PackStats()
    rows = list(pack_examples(ex, seq_len, pad_id=-1, stats=stats))
    kept = [(ids[:seq_len], m[:seq_len]) for ids, m in ex]
    starts = [ids[0] for ids, _ in ex]
    placed = []  # (row, offset, example index) in reading order
    for r, row in enumerate(rows):
        assert {k: (v.shape, v.dtype) for k, v in row.items()} == {
            "tokens": ((seq_len,), np.int32), "loss_mask": ((seq_len - 1,), np.float32),
            "segment_ids": ((seq_len,), np.int32), "positions": ((seq_len,), np.int32)}
        seg, tok, pos = row["segment_ids"], row["tokens"], row["positions"]
        n_real = int((seg > 0).sum())
        assert n_real > 0 and (seg[:n_real] > 0).all() and (seg[n_real:] == 0).all()  # padding at the end only
        assert (tok[n_real:] == -1).all() and (pos[n_real:] == 0).all()
        expect_mask = np.zeros(seq_len - 1, np.float32)
        at = 0
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert where.size and (where == at + np.arange(where.size)).all()  # contiguous, in order
            np.testing.assert_array_equal(pos[where], np.arange(where.size))  # positions restart
            k = int(np.searchsorted(starts, tok[at], side="right") - 1)  # which example (ids are unique)
            ids, m = kept[k]
            np.testing.assert_array_equal(tok[where], ids)
            expect_mask[at : at + ids.size - 1] = m[1:]  # targets inside the segment only
            placed.append((r, at, k))
            at += where.size
        np.testing.assert_array_equal(row["loss_mask"], expect_mask)
        # no target straddles segments or lands on padding
        boundary = (seg[1:] != seg[:-1]) | (seg[1:] == 0)
        assert not row["loss_mask"][boundary].any()
    # every example appears exactly once, in input order (tokens too: once each, in order)
    assert [k for _, _, k in placed] == list(range(len(ex)))
    all_real = np.concatenate([row["tokens"][row["segment_ids"] > 0] for row in rows])
    np.testing.assert_array_equal(all_real, np.concatenate([ids for ids, _ in kept]))
    # greedy: a row is closed only when the next example does not fit
    for r in range(len(rows) - 1):
        used = int((rows[r]["segment_ids"] > 0).sum())
        nxt = next(k for rr, _, k in placed if rr == r + 1)
        assert used + kept[nxt][0].size > seq_len
    n_long = sum(ids.size > seq_len for ids, _ in ex)
    assert (stats.examples, stats.truncated, stats.rows) == (len(ex), n_long, len(rows))
    assert stats.truncated_tokens == sum(max(ids.size - seq_len, 0) for ids, _ in ex)
    assert stats.tokens == all_real.size


def test_pack_validates():
    with pytest.raises(ValueError, match="seq_len"):
        pack_examples([], 1, pad_id=0)
    with pytest.raises(ValueError, match="mask entries"):
        list(pack_examples([([1, 2], [1])], 4, pad_id=0))


# -- batches ---------------------------------------------------------------------------------------


def records(n=37):
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words, rng.integers(1, 6)))
        a = " ".join(rng.choice(words, rng.integers(1, 9)))
        out.append({"prompt": f"#{i} {q}?", "response": a} if i % 3 else
                   {"messages": [{"role": "user", "content": f"#{i} {q}"}, {"role": "assistant", "content": a}]})
    return out


def segments(batches):
    """The packed examples of a batch stream, as token tuples, in order."""
    out = []
    for b in batches:
        for tok, seg in zip(b["tokens"], b["segment_ids"]):
            out += [tuple(tok[seg == s].tolist()) for s in range(1, seg.max() + 1)]
    return out


@pytest.mark.parametrize("epochs", [2, None])
def test_hosts_shard_the_global_stream(epochs):
    recs, tok, B, P = records(), byte_tok(), 2, 3
    kw = dict(seq_len=128, seed=5, epochs=epochs, progress=False)
    take = (lambda it: list(it)) if epochs else (lambda it: list(itertools.islice(it, 7)))
    single = take(sft_batches(recs, tok, batch_size=B * P, **kw))
    hosts = [take(sft_batches(recs, tok, batch_size=B, process_index=i, process_count=P, **kw)) for i in range(P)]
    assert len(single) > 1 and all(len(h) == len(single) for h in hosts)
    for k, g in enumerate(single):
        for i in range(P):
            for key, v in hosts[i][k].items():
                assert v.shape[0] == B
                # host i's row j is global row j * P + i: disjoint across hosts, union = global batch
                np.testing.assert_array_equal(v, g[key][i::P])
    if epochs:
        # the global stream drops only the incomplete last global batch
        rows = list(pack_examples(
            (render_example(recs[j], tok) for e in range(epochs) for j in np.random.default_rng([5, e]).permutation(len(recs))),
            128, pad_id=tok.pad_id))
        assert len(single) == len(rows) // (B * P)
        np.testing.assert_array_equal(np.concatenate([b["tokens"] for b in single]),
                                      np.stack([r["tokens"] for r in rows[: len(single) * B * P]]))


def test_shuffle_is_seeded_and_epochs_are_permutations():
    recs, tok = records(), byte_tok()
    kw = dict(seq_len=128, batch_size=1, epochs=1, progress=False)
    a = list(sft_batches(recs, tok, seed=1, **kw))
    b = list(sft_batches(recs, tok, seed=1, **kw))
    c = list(sft_batches(recs, tok, seed=2, **kw))
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    expected = sorted(tuple(render_example(r, tok)[0].tolist()) for r in recs)
    assert sorted(segments(a)) == expected == sorted(segments(c))  # each epoch: every example once
    assert segments(a) != segments(c)
    plain = segments(sft_batches(recs, tok, seed=1, shuffle=False, **kw))
    assert plain == [tuple(render_example(r, tok)[0].tolist()) for r in recs]
    assert plain != segments(a)
    # an endless stream continues past the epoch with fresh orders
    endless = sft_batches(recs, tok, seed=1, seq_len=128, batch_size=1, progress=False)
    first_two = segments(itertools.islice(endless, 2 * len(a) + 2))
    assert first_two[: len(segments(a))] == segments(a) and len(first_two) > len(recs) + 5


def test_file_source_progress_and_truncation(tmp_path, capsys):
    recs, tok = records(12), byte_tok()
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    from_file = list(sft_batches(f, tok, seq_len=128, batch_size=2, seed=0, epochs=1, progress=True))
    err = capsys.readouterr().err
    assert "tok" in err and "100%" in err  # the bar's total is this host's token count
    from_list = list(sft_batches(recs, tok, seq_len=128, batch_size=2, seed=0, epochs=1, progress=False))
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(from_file[0]["tokens"], from_list[0]["tokens"])
    with pytest.warns(UserWarning, match="truncated"):
        short = list(sft_batches(recs, tok, seq_len=24, batch_size=2, seed=0, epochs=1, progress=False))
    assert all(b["tokens"].shape == (2, 24) for b in short)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        sft_batches(recs[:2], tok, seq_len=128, batch_size=4, seed=0, epochs=1)
    with pytest.raises(ValueError, match="process_index"):
        sft_batches(recs, tok, seq_len=128, batch_size=2, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="record 1 of records"):
        sft_batches([recs[0], {"prompt": "x"}], tok, seq_len=128, batch_size=1, seed=0)
