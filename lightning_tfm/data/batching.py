"""Batching variable-length examples: length-bucketed batch sampling under a token budget (padding is in
`padding.py`).

`BucketBatchSampler` follows fairseq's `--max-tokens` batching (Ott et al. 2019) and the paper's "batched
together by approximate sequence length ... approximately 25000 source tokens and 25000 target tokens"
(Vaswani et al. 2017, §5.1): examples are shuffled (by a keyed permutation evaluated a pool at a time, never
stored), sorted by length inside large pools (so similar lengths share a batch and padding stays small), packed
up to a padded-token budget, and the batch order is shuffled inside each pool. Everything depends only on (seed,
epoch), so every DDP rank walks the same global stream of batches, evened out to a multiple of the number of ranks
by splitting batches (never by repeating them), and takes its own share: each example once per epoch, on one rank.
Besides the lengths it is given, the sampler holds O(pool_size + n / pool_size) memory, so corpora of tens of
millions of examples cost no more than small ones. `pad_batch` right-pads token lists into `(B, T)` tensors.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from lightning_tfm.data.padding import padded_length
from lightning_tfm.data.permutation import IndexPermutation, derive_seed

__all__ = ["BucketBatchSampler", "ResumableBatches", "derive_seed"]

_MIN_POOL = 4096     # examples packed and shuffled together at least: pool_size=1 still packs across 4096 examples
_SCAN = 2**16        # lengths read at a time when looking for the longest example: 1 MB of temporaries


def _as_lengths(lengths: Any, size: int | None) -> Any:
    """`lengths` as something `len()` and numpy fancy indexing work on, never copying an array or a lazy view."""
    if lengths is None:
        if size is None or size < 0:
            raise ValueError(f"BucketBatchSampler: lengths=None needs size >= 0 (every example of length 1), "
                             f"got size={size}")
        return np.broadcast_to(np.int64(1), (size,))   # a read-only view of one int: no array of ones
    if isinstance(lengths, (list, tuple)):
        return np.asarray(lengths, dtype=np.int64)   # already in memory, and an array takes 8 bytes an example
    return lengths


def _longest(lengths: Any) -> tuple[int, int]:
    """(index, length) of the first longest example, reading `lengths` a chunk at a time (it may be lazy)."""
    best, n = (-1, 0), len(lengths)
    for start in range(0, n, _SCAN):
        chunk = np.asarray(lengths[np.arange(start, min(start + _SCAN, n))])
        index = int(chunk.argmax())
        best = max(best, (int(chunk[index]), -(start + index)))   # the longest, then the first of them
    return -best[1], best[0]


def _check_arguments(max_tokens: int | None, batch_size: int | None, pool_size: int, pad_to_multiple: int,
                     num_replicas: int, rank: int) -> None:
    """Raise on `BucketBatchSampler` arguments no epoch can be built from, naming them."""
    if max_tokens is None and batch_size is None:
        raise ValueError("BucketBatchSampler: set max_tokens, batch_size or both; both are None")
    if max_tokens is not None and max_tokens < 1 or batch_size is not None and batch_size < 1:
        raise ValueError(f"BucketBatchSampler: max_tokens={max_tokens}, batch_size={batch_size}; "
                         "each must be >= 1 or None")
    if pool_size < 1 or pad_to_multiple < 1:
        raise ValueError(f"BucketBatchSampler: pool_size={pool_size}, pad_to_multiple={pad_to_multiple}; "
                         "both must be >= 1")
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"BucketBatchSampler: rank={rank}, num_replicas={num_replicas}; "
                         "need num_replicas >= 1 and 0 <= rank < num_replicas")


class _EpochHandle:
    """Forwards `set_epoch` to its batch sampler (a `BucketBatchSampler` or `ResumableBatches`).

    Lightning (2.6, `lightning.fabric.utilities.data._set_sampler_epoch`) calls `set_epoch` on a DataLoader's
    `sampler` and on `batch_sampler.sampler`, never on the batch sampler itself; without this handle every
    epoch would repeat the first epoch's order (tested with a Trainer in tests/data/datamodules).
    """

    def __init__(self, owner: "BucketBatchSampler | ResumableBatches") -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Yields lists of example indices: length-bucketed batches under a token budget and/or a size cap.

    Per epoch: order the indices by a permutation keyed by (seed, epoch), cut that order into pools of whole
    `pool_size` runs, at least 4096 positions each (the last pool takes the remainder, so it is never small), sort
    each run by length (stable; a pool's last run takes its remainder), pack each pool greedily into batches and
    shuffle the pool's batches (seeded by seed, epoch and pool). Pools are random samples of the corpus, so this
    mixes batches as a global shuffle would, with one pool's batches in memory at a time. A batch closes before
    an example that would push its padded size, `len(batch) * padded(longest)`, over `max_tokens`, or its size
    over `batch_size`. With `max_tokens=None` every batch but the last of each pool has exactly `batch_size`
    examples (the fixed-size option). `pool_size=1` turns bucketing off.

    Under DDP (`num_replicas > 1`) rank r takes batches r, r + R, r + 2R, ... of the global stream, after the
    last pool's batches are evened out so that the total divides by R, by splitting: while it does not, the last
    pool's batch with the most examples (the last of them on a tie) is cut in two, in its length order; the first
    half, one example larger on an odd size, keeps its place and the second goes to the end of the epoch. So every
    rank gets the same number of batches (no rank waits forever in a collective), an epoch holds each example
    exactly once across ranks (nothing is repeated, so evaluation needs no de-duplication), and every batch but
    the split ones keeps the place it has for one process: DDP steps see the batches one process would
    accumulate, and masked LM draws the same masks for them. When the last pool has too few examples to split
    that far (e.g. `batch_size=1` and 5 examples on 4 ranks), its batches with the fewest padded tokens are
    merged instead, with a warning: those may exceed `max_tokens`/`batch_size`. A split with fewer examples than
    R raises, since a rank cannot get an empty batch.

    Args:
        lengths: one length per example (for a translation pair, the longer of source and target): a list, a
            numpy array, or any object with `len()` whose `lengths[np.ndarray of int64]` gives a numpy array
            (e.g. a lazy view over memory-mapped offsets); it is read a pool at a time, never copied whole.
            None means every example has length 1 and needs `size`.
        max_tokens: budget of padded tokens per batch; None for fixed-size batches.
        batch_size: most examples per batch; None for no cap (then `max_tokens` is required).
        shuffle: shuffle within and across pools and shuffle the batch order; False keeps index order
            (sorted by length within each pool; with `pool_size=1`, plain consecutive batches).
        seed: base seed; epoch e shuffles with `derive_seed(seed, e)`.
        pool_size: examples sorted together; larger pools pad less but mix less.
        pad_to_multiple: the collate function's padding multiple, so the budget counts what is allocated.
        num_replicas: number of DDP processes.
        rank: this process, in [0, num_replicas).
        size: the number of examples when `lengths` is None.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray | None, max_tokens: int | None = None,
                 batch_size: int | None = None, shuffle: bool = True, seed: int = 0, pool_size: int = 16384,
                 pad_to_multiple: int = 8, num_replicas: int = 1, rank: int = 0, size: int | None = None) -> None:
        _check_arguments(max_tokens, batch_size, pool_size, pad_to_multiple, num_replicas, rank)
        self.lengths = _as_lengths(lengths, size)
        if len(self.lengths) == 0:
            raise ValueError("BucketBatchSampler: lengths is empty; the split has no examples")
        if len(self.lengths) < num_replicas:
            raise ValueError(f"BucketBatchSampler: the split has {len(self.lengths)} examples, fewer than the "
                             f"{num_replicas} DDP processes (num_replicas); every process needs at least one "
                             "batch: run on fewer devices or add examples")
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.shuffle, self.seed, self.pool_size = shuffle, seed, pool_size
        self.pad_to_multiple = pad_to_multiple
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.sampler = _EpochHandle(self)
        self._pool = pool_size * -(-_MIN_POOL // pool_size)       # whole sort runs, at least _MIN_POOL examples
        self._counts: tuple[int, np.ndarray] | None = None        # (epoch, batches per pool): n / pool ints
        if max_tokens is not None:
            longest, length = _longest(self.lengths)
            need = padded_length(length, pad_to_multiple)
            if need > max_tokens:
                raise ValueError(f"BucketBatchSampler: example {longest} has {length} tokens "
                                 f"({need} padded to a multiple of {pad_to_multiple}), more than "
                                 f"max_tokens={max_tokens}; raise max_tokens or lower max_len")

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order to produce; Lightning calls it (through `self.sampler`) every epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return int(self._pool_counts().sum()) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        return self.iter_from(0)

    def iter_from(self, batches_done: int) -> Iterator[list[int]]:
        """This rank's batches of the current epoch after its first `batches_done`, without building the
        pools before them (`ResumableBatches` resumes a mid-epoch checkpoint with it)."""
        first = self.rank + batches_done * self.num_replicas
        stream = self.iter_global_batches(first)
        return (batch.tolist() for batch in itertools.islice(stream, 0, None, self.num_replicas))

    def iter_global_batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """All ranks' batches of the current epoch from global batch `start` on (batch i is rank i % R's), one
        pool in memory at a time; the pools before `start`'s are skipped using their cached batch counts."""
        counts = self._pool_counts()
        ends = np.cumsum(counts)
        pool = int(np.searchsorted(ends, start, side="right"))
        skip = start - (int(ends[pool - 1]) if pool else 0)
        return self._stream(self.epoch, counts, pool, skip)     # the epoch is fixed now, not at the first next()

    def _stream(self, epoch: int, counts: np.ndarray, pool: int, skip: int) -> Iterator[np.ndarray]:
        for p in range(pool, len(counts)):
            batches = self._pool_batches(epoch, p)
            if p == len(counts) - 1:
                batches = self._even_out(batches, int(counts[p]))
            yield from batches[skip:]
            skip = 0

    def _pool_counts(self) -> np.ndarray:
        """Batches per pool this epoch, the last pool's after evening out: one pass over the pools, cached."""
        if self._counts is None or self._counts[0] != self.epoch:
            n_pools = max(1, len(self.lengths) // self._pool)
            counts = np.array([len(self._batch_starts(self._pool_order(self.epoch, p)[1])) for p in range(n_pools)])
            self._counts = (self.epoch, self._even_counts(counts))
        return self._counts[1]

    def _pool_order(self, epoch: int, pool: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices of pool `pool`, each `pool_size` run sorted by length (stable), and their lengths."""
        n = len(self.lengths)
        start = pool * self._pool
        stop = n if start + 2 * self._pool > n else start + self._pool   # the last pool takes the remainder
        index = np.arange(start, stop)
        if self.shuffle:
            index = IndexPermutation(n, derive_seed(self.seed, epoch))(index)
        lengths = np.asarray(self.lengths[index], dtype=np.int64)
        runs = np.minimum(np.arange(len(index)) // self.pool_size, max(0, len(index) // self.pool_size - 1))
        order = np.lexsort((lengths, runs))       # by run, then by length; lexsort is stable
        return index[order], lengths[order]

    def _pool_batches(self, epoch: int, pool: int) -> list[np.ndarray]:
        index, lengths = self._pool_order(epoch, pool)
        batches = np.split(index, self._batch_starts(lengths)[1:])
        if self.shuffle:
            order = np.random.default_rng(derive_seed(self.seed, epoch, pool)).permutation(len(batches))
            batches = [batches[i] for i in order]
        return batches

    def _batch_starts(self, lengths: np.ndarray) -> np.ndarray:
        """Where each batch starts in a pool with these lengths (in the pool's order), packing greedily.

        Example j holds at most cap_j = min(batch_size, max_tokens // padded(length_j)) examples in its batch, so
        a batch from s ends at the least max(j, s + cap_j) over j >= s. Walking runs of equal cap (a few dozen in
        a sorted pool) instead of single examples keeps the Python loop short.
        """
        cap = np.full(len(lengths), self.batch_size or len(lengths), dtype=np.int64)
        if self.max_tokens is not None:
            padded = -(-lengths // self.pad_to_multiple) * self.pad_to_multiple
            cap = np.minimum(cap, self.max_tokens // np.maximum(padded, 1))
        bounds = [0, *(np.flatnonzero(np.diff(cap)) + 1).tolist(), len(cap)]
        starts, start, end = [np.zeros(1, dtype=np.int64)], 0, int(cap[0])   # end: where the open batch must close
        for first, stop, c in zip(bounds[:-1], bounds[1:], cap[bounds[:-1]].tolist()):
            end = min(end, max(first, start + c))
            if end < stop:                       # the open batch closes inside this run; the run's rest packs by c
                new = np.arange(end, stop, c)
                starts.append(new)
                start = int(new[-1])
                end = start + c
        return np.concatenate(starts)

    def _even_counts(self, counts: np.ndarray) -> np.ndarray:
        """`counts` with the last pool's count raised (splits) or, when it has too few examples, lowered
        (merges) until the total divides by `num_replicas`."""
        R, total, last = self.num_replicas, int(counts.sum()), int(counts[-1])
        target = -(-total // R) * R
        examples = len(self.lengths) - (len(counts) - 1) * self._pool
        if last + target - total > examples:   # not enough examples to split that far: merge down instead
            target = total // R * R
            if last + target - total < 1:
                raise ValueError(f"BucketBatchSampler: the last pool's {last} batches cannot absorb the "
                                 f"{total - target} merges that {total} batches on {R} processes need; "
                                 "raise pool_size or run on fewer devices")
            warnings.warn(f"BucketBatchSampler: splitting the last pool's {last} batches of {examples} examples "
                          f"cannot make {total} batches a multiple of num_replicas={R}; merging its smallest "
                          f"batches, which may then exceed max_tokens={self.max_tokens}/batch_size={self.batch_size}",
                          stacklevel=3)
        counts = counts.copy()
        counts[-1] += target - total
        return counts

    def _even_out(self, batches: list[np.ndarray], target: int) -> list[np.ndarray]:
        """The last pool's `batches` split (or merged) to `target` of them; see the class docstring."""
        batches = list(batches)
        while len(batches) < target:
            k = max(reversed(range(len(batches))), key=lambda i: len(batches[i]))   # the last of the largest
            half = (len(batches[k]) + 1) // 2
            batches[k], second = batches[k][:half], batches[k][half:]
            batches.append(second)        # the others keep their places, so their DDP steps and masks
        while len(batches) > target:
            first, second = sorted(range(len(batches)), key=lambda i: (self._padded_tokens(batches[i]), i))[:2]
            first, second = min(first, second), max(first, second)
            batches[first] = np.concatenate([batches[first], batches.pop(second)])
        return batches

    def _padded_tokens(self, batch: np.ndarray) -> int:
        return len(batch) * padded_length(int(np.max(self.lengths[batch])), self.pad_to_multiple)


class ResumableBatches(Sampler[list[int]]):
    """A training batch sampler that can start an epoch part-way, so a run resumed from a mid-epoch checkpoint
    continues with the batch after the last one it trained on: no batch seen twice, none skipped.

    The wrapped sampler must give the same batches for the same epoch (ours are seeded by seed and epoch).

    Args:
        batches: the batch sampler to wrap (`BucketBatchSampler`, or a `BatchSampler` over a seeded sampler).
    """

    def __init__(self, batches: Sampler[list[int]]) -> None:
        self.batches = batches
        self.epoch = 0
        self.sampler = _EpochHandle(self)
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        inner = self.batches if hasattr(self.batches, "set_epoch") else getattr(self.batches, "sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Skip the first `batches_done` batches the next time epoch `epoch` is iterated."""
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        if hasattr(self.batches, "iter_from"):    # a BucketBatchSampler skips whole pools without building them
            return self.batches.iter_from(start)
        return itertools.islice(iter(self.batches), start, None)

    def __len__(self) -> int:
        return len(self.batches)
