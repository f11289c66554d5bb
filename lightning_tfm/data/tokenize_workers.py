"""Tokenizing a stream of examples in chunks, in worker processes, into flat id arrays ready to write.

Each field of an example becomes `prefix + ids + suffix` (`Framing`: the special tokens a datamodule adds, and
its max_len rule, per field or shared by a text pair), done in the workers with the tokenizer, so the writing
process only appends arrays. Chunks come back in order, with at most two per worker in flight: memory stays
bounded whatever the corpus size.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
from tokenizers import Tokenizer

CHUNK = 4096            # examples a worker tokenizes at a time


@dataclass(frozen=True)
class Framing:
    """How one field's token ids become a row.

    Args:
        prefix: ids before the text's (bos, cls).
        suffix: ids after it (eos, sep).
        max_len: most ids in a row, prefix and suffix included; None for no limit.
        truncate: cut longer rows to max_len (keeping prefix and suffix); False makes them an error.
        joint: max_len bounds this field and the example's other joint field together (a text pair, BERT's
            `cls a sep b sep`), the longer text losing ids first (`frame_pair`); both framings of the pair
            give the same max_len and truncate.
    """

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    max_len: int | None = None
    truncate: bool = False
    joint: bool = False


@dataclass
class FramedIds:
    """One field of a chunk: `flat` ids of every row end to end, each row's `lengths`; `cut`, the positions in
    the chunk of rows truncated; `too_long` (position, length) of the first row over max_len when not
    truncating (nothing else is filled then)."""

    flat: np.ndarray
    lengths: np.ndarray
    cut: list[int]
    too_long: tuple[int, int] | None = None

    def rows(self) -> list[list[int]]:
        """The framed rows as id lists (what the raw path's datasets hold)."""
        ends = np.cumsum(self.lengths)
        return [self.flat[end - n:end].tolist() for end, n in zip(ends, self.lengths)]


def frame(rows: Sequence[Sequence[int]], framing: Framing, dtype: str) -> FramedIds:
    """`rows` (ids without special tokens) framed by `framing`, flattened into `dtype`."""
    extra = len(framing.prefix) + len(framing.suffix)
    lengths = _lengths(rows)
    if framing.max_len is None:
        return _framed(rows, framing, lengths, [], dtype)
    room = framing.max_len - extra
    cut = np.flatnonzero(lengths > room).tolist()
    if cut and not framing.truncate:
        return _too_long(dtype, (cut[0], int(lengths[cut[0]]) + extra))
    return _framed(rows, framing, np.minimum(lengths, room), cut, dtype)


def frame_pair(first: Sequence[Sequence[int]], second: Sequence[Sequence[int]], framings: Sequence[Framing],
               dtype: str) -> list[FramedIds]:
    """Two joint fields framed so that each example's pair holds at most max_len ids in all, dropping ids from
    the end of the longer text first, ties from the second (BERT's `_truncate_seq_pair`, Devlin et al. 2019,
    run_classifier.py). The first field's result carries the pair's `cut` and `too_long` (with the pair's
    length, special tokens included); the second's has neither."""
    a, b = framings
    if (a.max_len, a.truncate) != (b.max_len, b.truncate):
        raise ValueError(f"joint framings disagree: max_len {a.max_len} and {b.max_len}, truncate {a.truncate} "
                         f"and {b.truncate}")
    extra = sum(len(f.prefix) + len(f.suffix) for f in framings)
    la, lb = _lengths(first), _lengths(second)
    if a.max_len is None:
        return [_framed(first, a, la, [], dtype), _framed(second, b, lb, [], dtype)]
    room = a.max_len - extra
    cut = np.flatnonzero(la + lb > room).tolist()
    if cut and not a.truncate:
        return [_too_long(dtype, (cut[0], int(la[cut[0]] + lb[cut[0]]) + extra)), _too_long(dtype, None)]
    # popping one id at a time from the longer text ends in closed form: a shorter text that fits in half the
    # room is kept whole and the longer one gets the rest; otherwise both end at half, the first the ceiling
    fits, half, a_longer = la + lb <= room, 2 * np.minimum(la, lb) <= room, la > lb
    keep_a = np.where(fits | (half & ~a_longer), la, np.where(half, room - lb, room - room // 2))
    keep_b = np.where(fits | (half & a_longer), lb, np.where(half, room - la, room // 2))
    return [_framed(first, a, keep_a, cut, dtype), _framed(second, b, keep_b, [], dtype)]


def frame_fields(rows: Sequence[Sequence[Sequence[int]]], framings: Sequence[Framing], dtype: str) -> list[FramedIds]:
    """Per field, its rows framed: alone (`frame`), or as a pair with the other joint field (`frame_pair`)."""
    joint = [k for k, framing in enumerate(framings) if framing.joint]
    if joint and len(joint) != 2:
        raise ValueError(f"{len(joint)} joint framings; joint fields come in pairs (a text and its pair)")
    framed = [None if f.joint else frame(r, f, dtype) for r, f in zip(rows, framings)]
    if joint:
        framed[joint[0]], framed[joint[1]] = frame_pair(rows[joint[0]], rows[joint[1]],
                                                        [framings[k] for k in joint], dtype)
    return framed      # type: ignore[return-value]


def _lengths(rows: Sequence[Sequence[int]]) -> np.ndarray:
    return np.fromiter((len(row) for row in rows), np.int64, count=len(rows))


def _too_long(dtype: str, first: tuple[int, int] | None) -> FramedIds:
    """No rows: the chunk is refused at `first` (position, length), or by the other field of its pair (None)."""
    return FramedIds(np.zeros(0, dtype), np.zeros(0, np.int64), [], first)


def _framed(rows: Sequence[Sequence[int]], framing: Framing, keep: np.ndarray, cut: list[int],
            dtype: str) -> FramedIds:
    """Row i cut to its first keep[i] ids, between the framing's prefix and suffix."""
    extra = len(framing.prefix) + len(framing.suffix)
    whole = not extra and np.array_equal(keep, _lengths(rows))      # a stream: the rows as they are
    pieces = rows if whole else (
        itertools.chain(framing.prefix, row[:n], framing.suffix) for row, n in zip(rows, keep.tolist()))
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64)
    return FramedIds(flat.astype(dtype), keep + extra, cut)


def encode_chunk(tokenizer: Tokenizer, texts: Sequence[tuple[str, ...]], framings: Sequence[Framing],
                 dtype: str) -> list[FramedIds]:
    """Per field, the chunk's texts tokenized (no special tokens of the tokenizer's own) and framed."""
    rows = [[e.ids for e in tokenizer.encode_batch([t[k] for t in texts], add_special_tokens=False)]
            for k in range(len(framings))]
    return frame_fields(rows, framings, dtype)


def chunks(examples: Iterator[Any], size: int = CHUNK) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for example in examples:
        chunk.append(example)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenized_chunks(tokenizer: Tokenizer, examples: Iterator[Any], framings: Sequence[Framing], dtype: str,
                     workers: int) -> Iterator[tuple[list[Any], list[FramedIds]]]:
    """(chunk of examples, framed ids per field) in order; `examples` have `.texts`, one string per field. With
    workers > 1 the chunks are tokenized in a process pool."""
    if workers <= 1:
        for chunk in chunks(examples):
            yield chunk, encode_chunk(tokenizer, [e.texts for e in chunk], framings, dtype)
        return
    # fork where the OS has it: the workers need only the tokenizer, and a spawned one would import torch first
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"     # one thread per worker; also keeps tokenizers from warning
    try:
        with multiprocessing.get_context(method).Pool(workers, _init_worker, (tokenizer.to_str(),)) as pool:
            window: list[Any] = []
            for chunk in chunks(examples):
                window.append((chunk, pool.apply_async(_encode_in_worker, ([e.texts for e in chunk], framings,
                                                                           dtype))))
                if len(window) >= 2 * workers:
                    done, result = window.pop(0)
                    yield done, result.get()
            for done, result in window:
                yield done, result.get()
    finally:
        if parallel is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _encode_in_worker(texts: list[tuple[str, ...]], framings: Sequence[Framing], dtype: str) -> list[FramedIds]:
    assert _WORKER_TOKENIZER is not None, "the pool's initializer loads the tokenizer"
    return encode_chunk(_WORKER_TOKENIZER, texts, framings, dtype)
