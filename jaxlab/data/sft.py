"""Supervised fine-tuning (SFT) data: chat records to packed, loss-masked token rows, sharded per host.

The pipeline, each step a public function:

1. :func:`read_jsonl` reads records, one JSON object a line, in one of two shapes::

     {"prompt": "...", "response": "..."}
     {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

   (a prompt/response record is the conversation ``[user: prompt, assistant: response]``; other keys
   are ignored).
2. :func:`render_example` writes a conversation with a plain-text :class:`ChatTemplate` and returns the
   token ids with a loss mask that is ``1`` exactly on the assistant replies and the EOS closing each,
   so the model learns to answer and to stop, never to predict the user. With the default template a
   conversation ``[system: S, user: U, assistant: A]`` is the token sequence

   .. code-block:: text

      <BOS> "<|system|>\\n" S "\\n" "<|user|>\\n" U "\\n" "<|assistant|>\\n" A <EOS>
      mask:  0 ... 0 ................................................... 1..1   1

   Each piece (role prefix, content, turn end) is encoded on its own and the ids concatenated, so the
   mask boundaries are exact token boundaries (a BPE could otherwise merge across them);
   :func:`render_prompt` renders a prompt for generation the same way.
3. :func:`pack_examples` packs examples greedily, in order, into rows of ``seq_len`` tokens with
   segment ids and per-segment positions (for an attention mask that keeps segments apart) and a
   next-token loss mask that never lets a target cross into another segment or into padding.
4. :func:`sft_batches` runs it all per epoch (a seeded shuffle of the examples), hands row ``r`` of the
   global packed stream to host ``r mod process_count`` and yields NumPy batches.

A tokenizer is duck-typed: anything with ``encode(text) -> list[int]`` that adds no special tokens,
and ``bos_id`` (may be ``None``: no BOS), ``eos_id`` and ``pad_id`` attributes, such as
``jaxlab.models.tokenizer.Tokenizer``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

__all__ = [
    "DEFAULT_TEMPLATE",
    "ChatTemplate",
    "PackStats",
    "pack_examples",
    "read_jsonl",
    "render_example",
    "render_prompt",
    "sft_batches",
]

ROLES = ("system", "user", "assistant")
_EXPECTED = ('expected {"prompt": str, "response": str} or {"messages": [{"role": "system"|"user"|'
             '"assistant", "content": str}, ...]} with at least one assistant message')


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A plain-text chat template: a prefix per role and a separator between turns.

    A turn is ``prefix(role) + content``, followed by EOS if the role is ``assistant``; consecutive
    turns are separated by ``turn_end``; the whole conversation starts with BOS. Only the assistant
    content and its EOS are loss targets.

    Attributes:
      system, user, assistant: the role prefixes.
      turn_end: text after every turn but the last (after the EOS of an assistant turn).
    """

    system: str = "<|system|>\n"
    user: str = "<|user|>\n"
    assistant: str = "<|assistant|>\n"
    turn_end: str = "\n"

    def prefix(self, role: str) -> str:
        """The prefix of ``role`` (one of ``"system"``, ``"user"``, ``"assistant"``)."""
        if role not in ROLES:
            raise ValueError(f"ChatTemplate.prefix: role {role!r}, expected one of {ROLES}")
        return getattr(self, role)


DEFAULT_TEMPLATE = ChatTemplate()


# -- records ---------------------------------------------------------------------------------------


def _record_problem(record) -> str | None:
    """What is wrong with a record, or ``None`` if it is valid."""
    if not isinstance(record, Mapping):
        return f"got a JSON {type(record).__name__}; {_EXPECTED}"
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            return f'"messages" must be a non-empty list; {_EXPECTED}'
        for k, m in enumerate(msgs):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return f"messages[{k}] = {json.dumps(m)[:120]} is not a message; {_EXPECTED}"
        if not any(m["role"] == "assistant" for m in msgs):
            return f"no assistant message, so nothing to learn; {_EXPECTED}"
        return None
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return None
    keys = sorted(record)
    return f"keys {keys} (or their types) do not fit; {_EXPECTED}"


def _messages(record) -> list[tuple[str, str]]:
    problem = _record_problem(record)
    if problem is not None:
        raise ValueError(f"invalid SFT record: {problem}")
    if "messages" in record:
        return [(m["role"], m["content"]) for m in record["messages"]]
    return [("user", record["prompt"]), ("assistant", record["response"])]


def read_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Yield the SFT records of a JSONL file (blank lines skipped), checking each one's shape.

    Args:
      path: the file; each non-blank line is ``{"prompt": str, "response": str}`` or
        ``{"messages": [{"role": ..., "content": str}, ...]}`` (see the module docstring).

    Returns:
      An iterator of the records as parsed (dicts).

    Raises:
      ValueError: a line that is not JSON or not a record, as ``"<path>:<line>: <problem>; expected ..."``.

    Example:
      >>> import json, os, tempfile
      >>> from jaxlab.data.sft import read_jsonl
      >>> with tempfile.TemporaryDirectory() as d:
      ...     f = os.path.join(d, "sft.jsonl")
      ...     with open(f, "w") as fh:
      ...         _ = fh.write(json.dumps({"prompt": "2+2?", "response": "4"}) + "\\n{oops\\n")
      ...     try:
      ...         records = list(read_jsonl(f))
      ...     except ValueError as e:
      ...         print(str(e).replace(f, "sft.jsonl").split(" (")[0])
      sft.jsonl:2: invalid JSON
    """
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}, column {e.colno}); "
                                 f"{_EXPECTED}, one object per line") from None
            problem = _record_problem(record)
            if problem is not None:
                raise ValueError(f"{path}:{lineno}: {problem}")
            yield record


# -- rendering -------------------------------------------------------------------------------------


def _check_tokenizer(tokenizer) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has no encode(text) method")
    for attr in ("bos_id", "eos_id", "pad_id"):
        if not hasattr(tokenizer, attr):
            raise TypeError(f"tokenizer {type(tokenizer).__name__} has no {attr} attribute")
    if tokenizer.eos_id is None:
        raise ValueError("tokenizer has no EOS id (eos_id is None): an assistant turn must end with one")
    if list(tokenizer.encode("")):
        raise ValueError("tokenizer.encode('') is not empty: encode must not add special tokens "
                         "(BOS/EOS are placed by the template)")


def _render(msgs, tokenizer, template: ChatTemplate, generation_prompt: bool) -> tuple[list[int], list[int]]:
    ids: list[int] = [] if tokenizer.bos_id is None else [int(tokenizer.bos_id)]
    mask: list[int] = [0] * len(ids)

    def put(toks, m):
        toks = [int(t) for t in toks]
        ids.extend(toks)
        mask.extend([m] * len(toks))

    for k, (role, content) in enumerate(msgs):
        put(tokenizer.encode(template.prefix(role)), 0)
        target = int(role == "assistant")
        put(tokenizer.encode(content), target)
        if target:
            put([tokenizer.eos_id], 1)
        if k < len(msgs) - 1 or generation_prompt:
            put(tokenizer.encode(template.turn_end), 0)
    if generation_prompt:
        put(tokenizer.encode(template.prefix("assistant")), 0)
    return ids, mask


def render_example(
    record: Mapping, tokenizer, *, template: ChatTemplate = DEFAULT_TEMPLATE
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a chat-templated record and its assistant-only loss mask.

    Args:
      record: ``{"prompt", "response"}`` or ``{"messages": [...]}`` (see :func:`read_jsonl`).
      tokenizer: duck-typed (module docstring); ``encode`` must add no special tokens.
      template: the :class:`ChatTemplate`.

    Returns:
      ``(ids, loss_mask)``: ``int32`` and ``int8`` arrays of equal length; ``loss_mask[i] == 1`` iff
      ``ids[i]`` belongs to an assistant reply or the EOS that ends it. ``ids`` starts with BOS
      (unless ``tokenizer.bos_id`` is ``None``).

    Raises:
      ValueError: an invalid record, or a tokenizer without EOS or whose ``encode`` adds tokens.

    Example:
      >>> from types import SimpleNamespace
      >>> from jaxlab.data.sft import ChatTemplate, render_example
      >>> tok = SimpleNamespace(encode=lambda s: list(s.encode()), bos_id=256, eos_id=257, pad_id=258)
      >>> ids, mask = render_example({"prompt": "hi", "response": "yo"}, tok, template=ChatTemplate(
      ...     user="U:", assistant="A:", turn_end="|"))
      >>> print(ids.tolist())
      [256, 85, 58, 104, 105, 124, 65, 58, 121, 111, 257]
      >>> print(mask.tolist())
      [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    """
    msgs = _messages(record)
    _check_tokenizer(tokenizer)
    ids, mask = _render(msgs, tokenizer, template, generation_prompt=False)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int8)


def render_prompt(
    messages: str | Sequence[Mapping], tokenizer, *, template: ChatTemplate = DEFAULT_TEMPLATE
) -> np.ndarray:
    """Token ids of a generation prompt: the conversation so far, then the assistant prefix.

    Rendered exactly as :func:`render_example` renders the same turns, so a model fine-tuned on
    :func:`render_example` output continues it with a reply and EOS.

    Args:
      messages: a user message as a string, or a list of ``{"role", "content"}`` messages.
      tokenizer: duck-typed (module docstring).
      template: the :class:`ChatTemplate`.

    Returns:
      ``int32`` ids.

    Example:
      >>> from types import SimpleNamespace
      >>> from jaxlab.data.sft import render_example, render_prompt
      >>> tok = SimpleNamespace(encode=lambda s: list(s.encode()), bos_id=256, eos_id=257, pad_id=258)
      >>> p = render_prompt("2+2?", tok)
      >>> ids, _ = render_example({"prompt": "2+2?", "response": "4"}, tok)
      >>> print(ids[: len(p)].tolist() == p.tolist(), bytes(p[1:].tolist()).decode())
      True <|user|>
      2+2?
      <|assistant|>
      <BLANKLINE>
    """
    if isinstance(messages, str):
        msgs = [("user", messages)]
    else:
        msgs = []
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ValueError(f"render_prompt: messages[{k}] = {m!r} is not a {{'role', 'content'}} message")
            msgs.append((m["role"], m["content"]))
    _check_tokenizer(tokenizer)
    ids, _ = _render(msgs, tokenizer, template, generation_prompt=True)
    return np.asarray(ids, np.int32)


# -- packing ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackStats:
    """Counters of :func:`pack_examples`, updated as rows are produced.

    Attributes:
      examples: examples read.
      truncated: examples longer than ``seq_len`` (cut to their first ``seq_len`` tokens).
      truncated_tokens: tokens cut off by truncation.
      rows: rows produced.
      tokens: real (non-padding) tokens in the rows produced.
    """

    examples: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    rows: int = 0
    tokens: int = 0


def _next_fit(items: Iterable, seq_len: int, size: Callable[[object], int]) -> Iterator[list]:
    """Greedy in-order packing: the rows, each the list of its items (every ``size(item) <= seq_len``)."""
    row: list = []
    used = 0
    for item in items:
        n = size(item)
        if row and used + n > seq_len:
            yield row
            row, used = [], 0
        row.append(item)
        used += n
    if row:
        yield row


def _pack_row(group, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    tokens = np.full(seq_len, pad_id, np.int32)
    target = np.zeros(seq_len, np.float32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    at = 0
    for s, (ids, mask) in enumerate(group, start=1):
        n = ids.size
        tokens[at : at + n] = ids
        target[at : at + n] = mask
        segment_ids[at : at + n] = s
        positions[at : at + n] = np.arange(n)
        at += n
    # loss_mask[t]: is tokens[t + 1] a target predicted from tokens[..t] of the same segment?
    same = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] > 0)
    loss_mask = np.where(same, target[1:], 0.0).astype(np.float32)
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


def pack_examples(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    *,
    pad_id: int,
    stats: PackStats | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Greedily pack ``(ids, loss_mask)`` examples, in order, into rows of ``seq_len`` tokens.

    An example goes into the current row if it fits, else it starts a new one (next-fit: order is
    kept and every token appears exactly once). An example longer than ``seq_len`` is truncated to
    its first ``seq_len`` tokens (counted in ``stats``); empty examples are skipped.

    Args:
      examples: pairs of token ids and token-aligned masks (``mask[i]``: is ``ids[i]`` a loss target),
        e.g. from :func:`render_example`.
      seq_len: row length, at least 2.
      pad_id: id of the padding after the last segment of a row.
      stats: a :class:`PackStats` to update (optional).

    Returns:
      An iterator of rows, dicts of NumPy arrays:

      * ``tokens`` ``int32 (seq_len,)``;
      * ``loss_mask`` ``float32 (seq_len - 1,)``, aligned with next-token targets: ``loss_mask[t]``
        is the example mask of ``tokens[t + 1]``, and ``0`` where ``tokens[t + 1]`` starts another
        segment or is padding;
      * ``segment_ids`` ``int32 (seq_len,)``: ``1, 2, ...`` per packed example, ``0`` on padding;
      * ``positions`` ``int32 (seq_len,)``: ``0, 1, ...`` restarting in each segment (``0`` on padding).

    Example:
      >>> from jaxlab.data.sft import pack_examples
      >>> ex = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])]
      >>> rows = list(pack_examples(ex, 6, pad_id=0))
      >>> print(len(rows), rows[0]["tokens"].tolist(), rows[0]["segment_ids"].tolist())
      2 [1, 2, 3, 4, 5, 0] [1, 1, 1, 2, 2, 0]
      >>> print(rows[0]["positions"].tolist(), rows[0]["loss_mask"].tolist())
      [0, 1, 2, 0, 1, 0] [1.0, 1.0, 0.0, 1.0, 0.0]
    """
    if seq_len < 2:
        raise ValueError(f"pack_examples: seq_len={seq_len}, need at least 2 (one input, one target)")
    return _pack(examples, seq_len, int(pad_id), stats if stats is not None else PackStats())


def _pack(examples, seq_len: int, pad_id: int, stats: PackStats) -> Iterator[dict[str, np.ndarray]]:
    def trimmed():
        for k, (ids, mask) in enumerate(examples):
            ids = np.asarray(ids, np.int32).reshape(-1)
            mask = np.asarray(mask, np.float32).reshape(-1)
            if ids.shape != mask.shape:
                raise ValueError(f"pack_examples: example {k} has {ids.size} ids but {mask.size} mask entries")
            if ids.size == 0:
                continue
            stats.examples += 1
            if ids.size > seq_len:
                stats.truncated += 1
                stats.truncated_tokens += ids.size - seq_len
                ids, mask = ids[:seq_len], mask[:seq_len]
            yield ids, mask

    for group in _next_fit(trimmed(), seq_len, lambda e: e[0].size):
        row = _pack_row(group, seq_len, pad_id)
        stats.rows += 1
        stats.tokens += sum(ids.size for ids, _ in group)
        yield row


# -- batches ---------------------------------------------------------------------------------------


def sft_batches(
    path_or_records: str | os.PathLike | Iterable[Mapping],
    tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    epochs: int | None = None,
    shuffle: bool = True,
    progress: bool = True,
    template: ChatTemplate = DEFAULT_TEMPLATE,
) -> Iterator[dict[str, np.ndarray]]:
    """Packed, loss-masked SFT batches for one host, deterministic in ``seed``.

    All records are read and rendered up front (:func:`render_example`). Epoch ``e`` visits them in
    the order ``default_rng([seed, e]).permutation(n)`` (or file order without ``shuffle``); the
    epochs are concatenated and packed (:func:`pack_examples`) into one global row stream, so a row
    may span an epoch boundary. Host ``process_index`` takes rows ``process_index,
    process_index + process_count, ...`` of it: the hosts' rows are disjoint and, batch by batch,
    their union is the one-host stream with batch size ``batch_size * process_count`` (global batch
    ``k`` is rows ``k * batch_size * process_count ...``; host ``i``'s row ``j`` of it is global row
    ``j * process_count + i``). With finite ``epochs`` the last, incomplete global batch is dropped,
    so every host yields the same number of batches.

    Args:
      path_or_records: a JSONL file (:func:`read_jsonl`) or an iterable of records.
      tokenizer: duck-typed (module docstring).
      seq_len: tokens per row; longer examples are truncated (a warning says how many).
      batch_size: rows per batch on this host.
      seed: shuffle seed (a non-negative int).
      process_index, process_count: this host and the number of hosts (``jax.process_index()``,
        ``jax.process_count()``).
      epochs: passes over the data, or ``None`` for an endless stream.
      shuffle: shuffle the examples each epoch.
      progress: show a tqdm bar of real (non-padding) tokens yielded to this host.
      template: the :class:`ChatTemplate`.

    Returns:
      An iterator of dicts with the keys of :func:`pack_examples`, each array with a leading
      ``batch_size`` axis.

    Raises:
      ValueError: no records, an invalid record, bad arguments, or (finite ``epochs``) too little
        data for one global batch.

    Example:
      >>> from types import SimpleNamespace
      >>> from jaxlab.data.sft import sft_batches
      >>> tok = SimpleNamespace(encode=lambda s: list(s.encode()), bos_id=256, eos_id=257, pad_id=258)
      >>> recs = [{"prompt": f"{a}+{a}?", "response": str(2 * a)} for a in range(20)]
      >>> b = next(sft_batches(recs, tok, seq_len=64, batch_size=2, seed=0, progress=False))
      >>> print({k: (v.shape, str(v.dtype)) for k, v in b.items()})  # doctest: +NORMALIZE_WHITESPACE
      {'tokens': ((2, 64), 'int32'), 'loss_mask': ((2, 63), 'float32'),
       'segment_ids': ((2, 64), 'int32'), 'positions': ((2, 64), 'int32')}
    """
    for name, v, lo in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("process_count", process_count, 1)):
        if not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"sft_batches: {name}={v!r}, expected an int >= {lo}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"sft_batches: process_index={process_index} not in [0, {process_count})")
    if epochs is not None and (not isinstance(epochs, int | np.integer) or epochs < 1):
        raise ValueError(f"sft_batches: epochs={epochs!r}, expected None or an int >= 1")
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"sft_batches: seed={seed!r}, expected a non-negative int")
    _check_tokenizer(tokenizer)
    if isinstance(path_or_records, str | os.PathLike):
        source = str(path_or_records)
        records = list(read_jsonl(path_or_records))
    else:
        source = "records"
        records = list(path_or_records)
    if not records:
        raise ValueError(f"sft_batches: no records in {source}")
    examples = []
    for k, r in enumerate(records):
        try:
            examples.append(render_example(r, tokenizer, template=template))
        except ValueError as e:
            raise ValueError(f"sft_batches: record {k} of {source}: {e}") from None
    lengths = np.array([ids.size for ids, _ in examples])
    n_long = int((lengths > seq_len).sum())
    if n_long:
        warnings.warn(f"sft_batches: {n_long} of {len(examples)} examples are longer than seq_len={seq_len} "
                      f"tokens (longest {lengths.max()}) and are truncated, cutting their replies", stacklevel=2)
    lengths = np.minimum(lengths, seq_len)

    def order(epoch: int) -> np.ndarray:
        if not shuffle:
            return np.arange(len(examples))
        return np.random.default_rng([int(seed), epoch]).permutation(len(examples))

    epoch_iter = range(epochs) if epochs is not None else itertools.count()
    per_global = batch_size * process_count
    n_batches = total = None
    if epochs is not None:  # plan the packing on lengths alone: the batch count and this host's tokens
        plan = list(_next_fit(itertools.chain.from_iterable(order(e) for e in epoch_iter), seq_len,
                              lambda i: lengths[i]))
        n_batches = len(plan) // per_global
        if n_batches == 0:
            raise ValueError(f"sft_batches: {len(examples)} examples x {epochs} epochs pack into {len(plan)} "
                             f"rows of {seq_len} tokens, fewer than one global batch of {per_global} rows")
        total = int(sum(lengths[plan[r]].sum() for r in range(process_index, n_batches * per_global,
                                                               process_count)))
    stream = (examples[i] for e in epoch_iter for i in order(e))
    return _batches(stream, seq_len, int(tokenizer.pad_id), batch_size, process_index, process_count,
                    n_batches, total, progress)


def _batches(stream, seq_len, pad_id, batch_size, process_index, process_count, n_batches, total, progress):
    stats = PackStats()
    bar = tqdm(total=total, unit="tok", unit_scale=True, disable=not progress,
               desc=f"sft data (host {process_index}/{process_count})")
    shown = 0
    try:
        rows = itertools.islice(pack_examples(stream, seq_len, pad_id=pad_id, stats=stats), process_index,
                                None, process_count)
        done = 0
        while n_batches is None or done < n_batches:
            batch = list(itertools.islice(rows, batch_size))
            if len(batch) < batch_size:  # only reachable for finite epochs, guarded by n_batches
                return
            out = {k: np.stack([r[k] for r in batch]) for k in batch[0]}
            bar.update(int((out["segment_ids"] > 0).sum()))
            if stats.truncated != shown:
                shown = stats.truncated
                bar.set_postfix(truncated=shown, refresh=False)
            done += 1
            yield out
    finally:
        bar.close()
