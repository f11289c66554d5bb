"""Tokenizing a stream of examples in chunks, in worker processes, into flat id arrays ready to write.

Each field of an example becomes `prefix + ids + suffix` (`Framing`: the special tokens a datamodule adds, and
its max_len rule), done in the workers with the tokenizer, so the writing process only appends arrays. Chunks
come back in order, with at most two per worker in flight: memory stays bounded whatever the corpus size.
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
    """

    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    max_len: int | None = None
    truncate: bool = False


@dataclass
class FramedIds:
    """One field of a chunk: `flat` ids of every row end to end, each row's `lengths`; `cut`, the positions in
    the chunk of rows truncated; `too_long` (position, length) of the first row over max_len when not
    truncating (nothing else is filled then)."""

    flat: np.ndarray
    lengths: np.ndarray
    cut: list[int]
    too_long: tuple[int, int] | None = None


def frame(rows: Sequence[Sequence[int]], framing: Framing, dtype: str) -> FramedIds:
    """`rows` (ids without special tokens) framed by `framing`, flattened into `dtype`."""
    extra = len(framing.prefix) + len(framing.suffix)
    room = None if framing.max_len is None else framing.max_len - extra
    cut = [i for i, row in enumerate(rows) if room is not None and len(row) > room]
    if cut and not framing.truncate:
        return FramedIds(np.zeros(0, dtype), np.zeros(0, np.int64), [], (cut[0], len(rows[cut[0]]) + extra))
    pieces = rows if not extra and not cut else (
        itertools.chain(framing.prefix, row[:room] if room is not None else row, framing.suffix) for row in rows)
    flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64)
    lengths = np.fromiter((min(len(row), room) if room is not None else len(row) for row in rows), np.int64,
                          count=len(rows)) + extra
    return FramedIds(flat.astype(dtype), lengths, cut)


def encode_chunk(tokenizer: Tokenizer, texts: Sequence[tuple[str, ...]], framings: Sequence[Framing],
                 dtype: str) -> list[FramedIds]:
    """Per field, the chunk's texts tokenized (no special tokens of the tokenizer's own) and framed."""
    return [frame([e.ids for e in tokenizer.encode_batch([t[k] for t in texts], add_special_tokens=False)],
                  framing, dtype) for k, framing in enumerate(framings)]


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
