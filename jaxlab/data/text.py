"""Byte-level text corpus from the CPython standard library's own ``.py`` files (offline, real text).

Every Python installation ships its standard library as source, located with
``sysconfig.get_paths()["stdlib"]``; that is real, not-written-by-us text on every machine, so an
LM experiment needs no download. The corpus is reproducible:

* the file list is every ``*.py`` under the stdlib root (``site-packages``/``dist-packages`` and,
  by default, test suites excluded), **sorted by relative POSIX path**;
* each file goes to the validation split iff ``crc32(relative_path) % 1000 < 1000 * val_fraction``
  (a fixed split that does not depend on file order or count);
* each split is the concatenation of its files' bytes (each followed by ``\\n``), truncated to the
  requested byte budget in list order; tokens are the bytes (vocabulary 256).

The :attr:`TextCorpus.fingerprint` (SHA-256 of both splits) identifies the exact corpus in reports;
it differs between Python versions because the standard library does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import sysconfig
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["TextCorpus", "eval_windows", "load_stdlib_corpus", "random_windows", "stdlib_files"]

_EXCLUDE_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_files(root: str | os.PathLike | None = None, *, exclude_tests: bool = True) -> list[Path]:
    """Sorted ``.py`` files of the standard library (relative POSIX path order).

    Args:
      root: directory to scan (default ``sysconfig.get_paths()["stdlib"]``).
      exclude_tests: skip ``test``/``tests``/``idle_test`` directories.

    Returns:
      Absolute paths, sorted by their path relative to ``root``.

    Raises:
      FileNotFoundError: the directory does not exist or holds no ``.py`` files.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist")
    skip = _EXCLUDE_DIRS | (_TEST_DIRS if exclude_tests else set())
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    if not out:
        raise FileNotFoundError(f"no .py files under {root}")
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


@dataclasses.dataclass(frozen=True)
class TextCorpus:
    """A byte corpus with a fixed train/validation split.

    Attributes:
      train, val: ``uint8`` NumPy arrays of bytes.
      train_files, val_files: relative paths that went into each split (in order).
      root: the directory scanned.
      fingerprint: SHA-256 hex digest (first 16 chars) of ``train`` then ``val``.
      python: the interpreter version the stdlib belongs to.
    """

    train: np.ndarray
    val: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    root: str
    fingerprint: str
    python: str

    vocab: int = 256

    def summary(self) -> dict:
        """JSON-able description for reports."""
        return {
            "root": self.root,
            "python": self.python,
            "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size),
            "train_files": len(self.train_files),
            "val_files": len(self.val_files),
            "fingerprint": self.fingerprint,
        }


def load_stdlib_corpus(
    *,
    max_train_bytes: int | None = 2_000_000,
    max_val_bytes: int | None = 200_000,
    val_fraction: float = 0.1,
    exclude_tests: bool = True,
    root: str | os.PathLike | None = None,
) -> TextCorpus:
    """Load the standard-library byte corpus with a fixed, path-hashed split.

    .. math:: \\text{val} \\iff \\operatorname{crc32}(\\text{relpath}) \\bmod 1000 < 1000\\,\\text{val\\_fraction}

    Args:
      max_train_bytes, max_val_bytes: byte budgets per split (``None``: everything); files are read
        in sorted order until the budget is reached, the last one truncated.
      val_fraction: fraction of files (by hash) in the validation split, in ``(0, 1)``.
      exclude_tests: leave out test suites.
      root: directory to scan (default: this interpreter's stdlib).

    Returns:
      :class:`TextCorpus`.

    Example:
      >>> import jax
      >>> from jaxlab.data import load_stdlib_corpus, random_windows
      >>> corpus = load_stdlib_corpus(max_train_bytes=20_000, max_val_bytes=2_000)
      >>> print(corpus.train.size, corpus.val.size, corpus.vocab, len(corpus.fingerprint))
      20000 2000 256 16
      >>> x = random_windows(corpus.train, jax.random.PRNGKey(0), batch=4, seq_len=16)
      >>> print(x.shape, x.dtype)
      (4, 16) int32
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    for label, v in (("max_train_bytes", max_train_bytes), ("max_val_bytes", max_val_bytes)):
        if v is not None and v < 1:
            raise ValueError(f"{label} must be positive or None, got {v}")
    files = stdlib_files(root, exclude_tests=exclude_tests)
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    cut = int(round(1000 * val_fraction))
    budgets = {"train": max_train_bytes, "val": max_val_bytes}
    chunks: dict[str, list[bytes]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    for f in files:
        rel = f.relative_to(base).as_posix()
        split = "val" if zlib.crc32(rel.encode()) % 1000 < cut else "train"
        budget = budgets[split]
        if budget is not None and sizes[split] >= budget:
            if all(budgets[s] is not None and sizes[s] >= budgets[s] for s in budgets):
                break
            continue
        data = f.read_bytes() + b"\n"
        if budget is not None:
            data = data[: budget - sizes[split]]
        chunks[split].append(data)
        names[split].append(rel)
        sizes[split] += len(data)
    train = np.frombuffer(b"".join(chunks["train"]), np.uint8).copy()
    val = np.frombuffer(b"".join(chunks["val"]), np.uint8).copy()
    if train.size < 2 or val.size < 2:
        raise ValueError(f"corpus under {base} too small: {train.size} train / {val.size} val bytes")
    digest = hashlib.sha256(train.tobytes() + b"\x00SPLIT\x00" + val.tobytes()).hexdigest()[:16]
    return TextCorpus(
        train=train,
        val=val,
        train_files=tuple(names["train"]),
        val_files=tuple(names["val"]),
        root=str(base),
        fingerprint=digest,
        python=sys.version.split()[0],
    )


def random_windows(data, key: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """``batch`` windows of ``seq_len`` consecutive bytes at uniform random offsets, as ``int32``.

    Works under ``jit`` (``data`` may be a device array; offsets from ``key``).

    Raises:
      ValueError: the data is shorter than ``seq_len``.

    Example:
      >>> import jax, numpy as np
      >>> from jaxlab.data import random_windows
      >>> x = random_windows(np.arange(100, dtype=np.uint8), jax.random.PRNGKey(0), batch=3, seq_len=5)
      >>> print(x.shape, bool((x[:, 1:] - x[:, :-1] == 1).all()))   # consecutive bytes
      (3, 5) True
    """
    n = int(np.shape(data)[0])
    if n < seq_len:
        raise ValueError(f"data of shape {(n,)} is shorter than seq_len={seq_len}")
    data = jnp.asarray(data)
    starts = jax.random.randint(key, (batch,), 0, n - seq_len + 1)
    idx = starts[:, None] + jnp.arange(seq_len)[None, :]
    return data[idx].astype(jnp.int32)


def eval_windows(data, seq_len: int, max_windows: int | None = None, *, spread: bool = False) -> np.ndarray:
    """Deterministic non-overlapping windows ``(W, seq_len)`` of ``data`` as ``int32``.

    Args:
      data: 1-D byte array.
      seq_len: window length.
      max_windows: cap on ``W``.
      spread: take the ``W`` windows evenly spaced over the whole array (window ``i`` starts at
        ``(i * (total // W)) * seq_len``) instead of the first ``W`` consecutive ones, so a small
        evaluation set covers every file of the split.

    Example:
      >>> import numpy as np
      >>> from jaxlab.data import eval_windows
      >>> data = np.arange(20, dtype=np.uint8)
      >>> eval_windows(data, 4, max_windows=2).tolist()
      [[0, 1, 2, 3], [4, 5, 6, 7]]
      >>> eval_windows(data, 4, max_windows=2, spread=True)[:, 0].tolist()   # windows 0 and 2 of 5
      [0, 8]
    """
    total = int(np.shape(data)[0]) // seq_len
    if total < 1:
        raise ValueError(f"data of shape {np.shape(data)} holds no window of seq_len={seq_len}")
    n = total if max_windows is None else min(total, max_windows)
    blocks = np.asarray(data[: total * seq_len], np.int32).reshape(total, seq_len)
    if spread:
        return blocks[np.arange(n) * (total // n)]
    return blocks[:n]
