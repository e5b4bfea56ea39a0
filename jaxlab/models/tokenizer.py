"""Tokenizers of pretrained checkpoints (Hugging Face ``tokenizer.json``) and tiny trained ones for tests.

A Hugging Face checkpoint directory holds its tokenizer as ``tokenizer.json`` (the serialised
``tokenizers`` pipeline: normaliser, pre-tokeniser, model, decoder, added tokens). Which of its tokens
are BOS / EOS / PAD is recorded elsewhere, and :func:`load_tokenizer` reads it in this order, the first
source that names a token winning:

1. ``tokenizer_config.json``: ``"bos_token"``, ``"eos_token"``, ``"pad_token"`` as token strings (or
   ``{"content": ...}`` objects), looked up with ``token_to_id``;
2. ``special_tokens_map.json``: the same keys;
3. ``config.json``: ``"bos_token_id"``, ``"eos_token_id"``, ``"pad_token_id"`` as ids (a list of EOS ids,
   as some chat models have, gives its first).

The PAD id falls back to the EOS id, then to ``0`` (padding positions are masked out of any loss, so
only its being a valid id matters). Encoding never truncates or pads (any such setting stored in the
file is switched off) and adds no special tokens unless asked.

:func:`train_byte_level_bpe` trains a small byte-level BPE (GPT-2 style: every string is encodable and
``decode(encode(s)) == s``) for test fixtures; :meth:`Tokenizer.save` writes it in the same layout.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import tokenizers

__all__ = ["Tokenizer", "load_tokenizer", "train_byte_level_bpe"]

_SPECIAL = ("bos", "eos", "pad")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with its BOS / EOS / PAD ids.

    Args:
      backend: the ``tokenizers.Tokenizer`` (its truncation and padding are switched off).
      bos_id, eos_id, pad_id: special token ids (``None``: the checkpoint has none). ``pad_id`` falls
        back to ``eos_id``, then ``0`` (see :attr:`pad_id`).

    Example:
      >>> from jaxlab.models.tokenizer import train_byte_level_bpe
      >>> tok = train_byte_level_bpe(["the cat sat on the mat", "the dog sat"], vocab_size=300)
      >>> ids = tok.encode("the cat")
      >>> print(tok.decode(ids), tok.bos_id, tok.eos_id, tok.pad_id)
      the cat 0 1 2
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        n = backend.get_vocab_size(with_added_tokens=True)
        for name, v in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if v is not None and not 0 <= int(v) < n:
                raise ValueError(f"Tokenizer: {name}={v} is outside the vocabulary [0, {n})")
        self._bos = None if bos_id is None else int(bos_id)
        self._eos = None if eos_id is None else int(eos_id)
        self._pad = None if pad_id is None else int(pad_id)

    # -- ids ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (a model's embedding may be larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or ``None`` when the checkpoint names none."""
        return self._bos

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or ``None`` when the checkpoint names none."""
        return self._eos

    @property
    def pad_id(self) -> int:
        """Padding id: the named PAD token, else the EOS id, else ``0``."""
        if self._pad is not None:
            return self._pad
        return self._eos if self._eos is not None else 0

    # -- text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
          text: the string.
          add_special_tokens: apply the checkpoint's post-processor (e.g. prepend BOS); off by default
            so that pieces of a chat template can be encoded separately.

        Returns:
          The ids, as a list of ``int``.
        """
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, ``None`` if it is not in the vocabulary."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, ``None`` if out of range."""
        return self.backend.id_to_token(int(i))

    # -- files -------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (BOS/EOS/PAD token strings) to ``directory``.

        Only explicitly set special tokens are written (a PAD that falls back to EOS is not), so
        :func:`load_tokenizer` gives back the same ids.

        Returns:
          The directory (created if needed).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        cfg: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for name, v in zip(_SPECIAL, (self._bos, self._eos, self._pad)):
            if v is not None:
                cfg[f"{name}_token"] = self.backend.id_to_token(v)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return d

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id})")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_string(value) -> str | None:
    """A special token as written in tokenizer_config / special_tokens_map: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a Hugging Face ``tokenizer.json`` and the checkpoint's BOS / EOS / PAD ids.

    Args:
      path: a checkpoint directory holding ``tokenizer.json``, or the ``tokenizer.json`` file itself
        (its directory is searched for the config files).

    Returns:
      :class:`Tokenizer`, special ids resolved as in the module docstring.

    Raises:
      FileNotFoundError: no ``tokenizer.json`` (the message names the path and the files looked for;
        SentencePiece-only checkpoints, ``tokenizer.model``, must be converted first).
      ValueError: a config file that is not a JSON object.

    Example:
      >>> import tempfile
      >>> from jaxlab.models.tokenizer import load_tokenizer, train_byte_level_bpe
      >>> tok = train_byte_level_bpe(["a small corpus", "of two lines"], vocab_size=280)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     again = load_tokenizer(tok.save(d))
      >>> print(again.encode("a small line") == tok.encode("a small line"), again.eos_id == tok.eos_id)
      True True
    """
    p = Path(path)
    if p.is_file():
        tok_file, d = p, p.parent
    else:
        d = p
        tok_file = p / "tokenizer.json"
    if not tok_file.is_file():
        hint = ""
        if (d / "tokenizer.model").is_file():
            hint = (" (found tokenizer.model, a SentencePiece model, which is not supported: convert it "
                    "to tokenizer.json, e.g. with transformers' AutoTokenizer(...).save_pretrained)")
        what = "is not a directory or file" if not p.exists() else "holds no tokenizer.json"
        raise FileNotFoundError(
            f"load_tokenizer: {p} {what}; looked for {tok_file} (plus tokenizer_config.json, "
            f"special_tokens_map.json and config.json beside it for the special token ids){hint}")
    backend = tokenizers.Tokenizer.from_file(str(tok_file))

    ids: dict[str, int | None] = {k: None for k in _SPECIAL}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = d / fname
        if not f.is_file():
            continue
        cfg = _read_json(f)
        for k in _SPECIAL:
            if ids[k] is not None:
                continue
            tok = _token_string(cfg.get(f"{k}_token"))
            if tok is None:
                continue
            i = backend.token_to_id(tok)
            if i is None:
                warnings.warn(f"load_tokenizer: {f} names {k}_token={tok!r}, which is not in the vocabulary "
                              f"of {tok_file}; ignoring it", stacklevel=2)
                continue
            ids[k] = i
    f = d / "config.json"
    if f.is_file():
        cfg = _read_json(f)
        for k in _SPECIAL:
            v = cfg.get(f"{k}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            if ids[k] is None and isinstance(v, int) and not isinstance(v, bool):
                ids[k] = v
    return Tokenizer(backend, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["pad"])


def train_byte_level_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    special_tokens: tuple[str, ...] = ("<bos>", "<eos>", "<pad>"),
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) on ``texts``; deterministic, for small test fixtures.

    The vocabulary is the special tokens (ids ``0, 1, ...`` in order), the 256 byte symbols, then the
    learned merges; it may end up smaller than ``vocab_size`` when the texts have few distinct pairs.
    No prefix space is added, so ``decode(encode(s)) == s`` for every string.

    Args:
      texts: training strings.
      vocab_size: target vocabulary size, at least ``256 + len(special_tokens)``.
      special_tokens: the BOS, EOS and PAD token strings, in this order (fewer: the missing ones are
        ``None``; more: extra special tokens).

    Returns:
      :class:`Tokenizer`; ``encode(..., add_special_tokens=True)`` prepends BOS when there is one.

    Example:
      >>> from jaxlab.models.tokenizer import train_byte_level_bpe
      >>> tok = train_byte_level_bpe(["hello world", "hello there"], vocab_size=270)
      >>> s = "hello, wörld 🙂"
      >>> print(tok.decode(tok.encode(s)) == s, len(tok.encode("hello")) < len(b"hello"))
      True True
    """
    special = list(special_tokens)
    if len(set(special)) != len(special):
        raise ValueError(f"train_byte_level_bpe: duplicate special tokens {special}")
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special):
        raise ValueError(f"train_byte_level_bpe: vocab_size={vocab_size} is below the {len(alphabet)} byte "
                         f"symbols + {len(special)} special tokens")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=alphabet, show_progress=False)
    backend.train_from_iterator(list(texts), trainer=trainer)
    sid = [backend.token_to_id(t) for t in special[:3]] + [None] * (3 - min(len(special), 3))
    if sid[0] is not None:
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{special[0]} $A", pair=f"{special[0]} $A {special[0]} $B:1",
            special_tokens=[(special[0], sid[0])])
    return Tokenizer(backend, bos_id=sid[0], eos_id=sid[1], pad_id=sid[2])
