"""jaxlab.data.text: reproducible stdlib byte corpus and window samplers."""

import sysconfig
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlab.data.text import eval_windows, load_stdlib_corpus, random_windows, stdlib_files


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus(max_train_bytes=60_000, max_val_bytes=20_000)


def test_file_list_sorted_and_from_stdlib():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(rel) > 100
    assert "os.py" in rel and not any("/test/" in f"/{r}" or "site-packages" in r for r in rel)


def test_split_is_fixed_and_reproducible(corpus):
    again = load_stdlib_corpus(max_train_bytes=60_000, max_val_bytes=20_000)
    assert again.fingerprint == corpus.fingerprint
    np.testing.assert_array_equal(again.train, corpus.train)
    assert corpus.train.size == 60_000 and corpus.val.size == 20_000
    assert corpus.train.dtype == np.uint8
    assert not set(corpus.train_files) & set(corpus.val_files)
    for rel in corpus.val_files:
        assert zlib.crc32(rel.encode()) % 1000 < 100
    for rel in corpus.train_files:
        assert zlib.crc32(rel.encode()) % 1000 >= 100
    # the split bytes are exactly the files' bytes in list order (+ newline), truncated
    root = Path(corpus.root)
    first = (root / corpus.train_files[0]).read_bytes() + b"\n"
    assert corpus.train[: min(len(first), 60_000)].tobytes() == first[:60_000]
    # a larger budget extends, not reshuffles, the smaller corpus
    bigger = load_stdlib_corpus(max_train_bytes=90_000, max_val_bytes=20_000)
    np.testing.assert_array_equal(bigger.train[:60_000], corpus.train)


def test_windows(corpus):
    x = random_windows(corpus.train, jax.random.PRNGKey(0), batch=4, seq_len=32)
    assert x.shape == (4, 32) and x.dtype == np.int32
    data = corpus.train.tobytes()
    for row in np.asarray(x):
        assert bytes(row.astype(np.uint8)) in data
    y = random_windows(corpus.train, jax.random.PRNGKey(0), batch=4, seq_len=32)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ev = eval_windows(corpus.val, 64, max_windows=5)
    assert ev.shape == (5, 64)
    np.testing.assert_array_equal(ev.reshape(-1), corpus.val[:320])
    sp = eval_windows(corpus.val, 64, max_windows=5, spread=True)
    stride = (20_000 // 64) // 5
    for i in range(5):
        np.testing.assert_array_equal(sp[i], corpus.val[i * stride * 64 : (i * stride + 1) * 64])


def test_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        load_stdlib_corpus(val_fraction=1.5)
    with pytest.raises(ValueError, match="shorter than seq_len=10"):
        random_windows(np.zeros(5, np.uint8), jax.random.PRNGKey(0), 1, 10)
    with pytest.raises(FileNotFoundError):
        stdlib_files("/nonexistent/dir")
