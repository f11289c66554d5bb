"""Batching variable-length examples: length-bucketed batch sampling under a token budget, and padding.

`BucketBatchSampler` follows fairseq's `--max-tokens` batching (Ott et al. 2019) and the paper's "batched
together by approximate sequence length ... approximately 25000 source tokens and 25000 target tokens"
(Vaswani et al. 2017, §5.1): examples are shuffled, sorted by length inside large pools (so similar lengths
share a batch and padding stays small), packed up to a padded-token budget, and the batch order is shuffled.
Everything depends only on (seed, epoch), so every DDP rank builds the same global list of batches, evened
out to a multiple of the number of ranks by splitting batches (never by repeating them), and takes its own
share: each example once per epoch, on one rank. `pad_batch` right-pads token lists into `(B, T)` tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, e.g. (seed, epoch, rank).

    Hashing instead of adding (torch's DistributedSampler uses seed + epoch) keeps runs with seeds 1 and 2
    from replaying each other's epochs one epoch apart.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def padded_length(length: int, pad_to_multiple: int) -> int:
    """`length` rounded up to a multiple of `pad_to_multiple` (tensor cores like multiples of 8)."""
    return -(-length // pad_to_multiple) * pad_to_multiple


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, pad_to_multiple: int = 8) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists to a common length.

    Args:
        sequences: B lists of token ids, each non-empty.
        pad_id: id written into padding positions.
        pad_to_multiple: T is the longest length rounded up to a multiple of this (1 = no rounding).

    Returns:
        ids (B, T) int64 and mask (B, T) bool, True at real tokens and False at padding.
    """
    if pad_to_multiple < 1:
        raise ValueError(f"pad_batch: pad_to_multiple={pad_to_multiple}, must be >= 1")
    lengths = torch.tensor([len(s) for s in sequences])                              # (B,)
    width = padded_length(int(lengths.max()), pad_to_multiple)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)             # (B, T)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    mask = torch.arange(width)[None, :] < lengths[:, None]                          # (B, T)
    return ids, mask


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

    Per epoch: permute the indices (seeded by seed and epoch), cut the permutation into pools of `pool_size`, sort each
    pool by length (stable), pack the concatenated pools into batches in order, then permute the batches.
    A batch closes before an example that would push its padded size, `len(batch) * padded(longest)`, over
    `max_tokens`, or its size over `batch_size`. With `max_tokens=None` every batch but the last has exactly
    `batch_size` examples (the fixed-size option). `pool_size=1` turns bucketing off.

    Under DDP (`num_replicas > 1`) rank r takes batches r, r + R, r + 2R, ... of the global list, after that
    list is evened out to a multiple of R by splitting: while the count does not divide by R, the batch with
    the most examples (the last of them on a tie) is cut in two, in its length order; the first half, one
    example larger on an odd size, keeps its place and the second goes to the end of the list. So every rank
    gets the same number of batches (no rank waits forever in a collective), an epoch holds each example
    exactly once across ranks (nothing is repeated, so evaluation needs no de-duplication), and every batch
    but the split ones keeps the place it has for one process: DDP steps see the batches one process would
    accumulate, and masked LM draws the same masks for them. When the examples are too few to split into a
    multiple of R batches (e.g. `batch_size=1` and 5 examples on 4 ranks), the batches with the fewest padded
    tokens are merged instead, with a warning: those may exceed `max_tokens`/`batch_size`. A split with fewer
    examples than R raises, since a rank cannot get an empty batch.

    Args:
        lengths: one length per example (for a translation pair, the longer of source and target).
        max_tokens: budget of padded tokens per batch; None for fixed-size batches.
        batch_size: most examples per batch; None for no cap (then `max_tokens` is required).
        shuffle: shuffle within and across pools and shuffle the batch order; False keeps index order
            (sorted by length within each pool; with `pool_size=1`, plain consecutive batches).
        seed: base seed; epoch e shuffles with `derive_seed(seed, e)`.
        pool_size: examples sorted together; larger pools pad less but mix less.
        pad_to_multiple: the collate function's padding multiple, so the budget counts what is allocated.
        num_replicas: number of DDP processes.
        rank: this process, in [0, num_replicas).
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int | None = None, batch_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, pool_size: int = 16384, pad_to_multiple: int = 8,
                 num_replicas: int = 1, rank: int = 0) -> None:
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
        if len(lengths) == 0:
            raise ValueError("BucketBatchSampler: lengths is empty; the split has no examples")
        if len(lengths) < num_replicas:
            raise ValueError(f"BucketBatchSampler: the split has {len(lengths)} examples, fewer than the "
                             f"{num_replicas} DDP processes (num_replicas); every process needs at least one "
                             "batch: run on fewer devices or add examples")
        self.lengths = np.asarray(lengths, dtype=np.int64)   # an array, not a list: 8 bytes an example
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.shuffle, self.seed, self.pool_size = shuffle, seed, pool_size
        self.pad_to_multiple = pad_to_multiple
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.sampler = _EpochHandle(self)
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if max_tokens is not None:
            longest = int(self.lengths.argmax())
            need = padded_length(int(self.lengths[longest]), pad_to_multiple)
            if need > max_tokens:
                raise ValueError(f"BucketBatchSampler: example {longest} has {self.lengths[longest]} tokens "
                                 f"({need} padded to a multiple of {pad_to_multiple}), more than "
                                 f"max_tokens={max_tokens}; raise max_tokens or lower max_len")

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order to produce; Lightning calls it (through `self.sampler`) every epoch."""
        self.epoch = epoch

    def global_batches(self) -> list[np.ndarray]:
        """All ranks' batches for the current epoch, a multiple of `num_replicas` of them (each index once)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._even_out(self._build(self.epoch)))
        return self._cache[1]

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch: global batches rank, rank + R, rank + 2R, ..."""
        return self.global_batches()[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return (batch.tolist() for batch in self.rank_batches())

    def __len__(self) -> int:
        return len(self.global_batches()) // self.num_replicas

    def _build(self, epoch: int) -> list[np.ndarray]:
        # the epoch's order is one int64 array and its batches views of it: 8-16 bytes an example, where lists
        # of Python ints took about 70
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        n = len(self.lengths)
        order = torch.randperm(n, generator=generator).numpy() if self.shuffle else np.arange(n)
        for start in range(0, n, self.pool_size):
            pool = order[start:start + self.pool_size]
            pool[:] = pool[np.argsort(self.lengths[pool], kind="stable")]
        batches = np.split(order, self._batch_starts(self.lengths[order]))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _batch_starts(self, lengths: np.ndarray) -> list[int]:
        """Positions in the bucketed order where a batch other than the first starts (greedy packing)."""
        starts, size, longest = [], 0, 0
        for position, length in enumerate(lengths.tolist()):
            grown = max(longest, length)
            over_budget = (self.max_tokens is not None
                           and (size + 1) * padded_length(grown, self.pad_to_multiple) > self.max_tokens)
            full = self.batch_size is not None and size == self.batch_size
            if size and (over_budget or full):
                starts.append(position)
                size, grown = 0, length
            size, longest = size + 1, grown
        return starts

    def _even_out(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """`batches` split (or, when too few examples allow no split, merged) until their count divides by
        `num_replicas`, so the ranks get equal shares without any batch repeated; see the class docstring."""
        R, n = self.num_replicas, len(self.lengths)
        target = -(-len(batches) // R) * R
        if target > n:                       # not enough examples to split that far: merge down instead
            target = n // R * R
            warnings.warn(f"BucketBatchSampler: {n} examples in {len(batches)} batches cannot be split into a "
                          f"multiple of num_replicas={R}; merging the smallest batches, which may then exceed "
                          f"max_tokens={self.max_tokens}/batch_size={self.batch_size}", stacklevel=2)
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
        return len(batch) * padded_length(int(self.lengths[batch].max()), self.pad_to_multiple)


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
        return itertools.islice(iter(self.batches), start, None)

    def __len__(self) -> int:
        return len(self.batches)
