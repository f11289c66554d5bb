"""Batching variable-length examples: length-bucketed batch sampling under a token budget, and padding.

`BucketBatchSampler` follows fairseq's `--max-tokens` batching (Ott et al. 2019) and the paper's "batched
together by approximate sequence length ... approximately 25000 source tokens and 25000 target tokens"
(Vaswani et al. 2017, §5.1): examples are shuffled, sorted by length inside large pools (so similar lengths
share a batch and padding stays small), packed up to a padded-token budget, and the batch order is shuffled.
Everything depends only on (seed, epoch), so every DDP rank builds the same global list of batches and
takes its own share of it. `pad_batch` right-pads token lists into `(B, T)` tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from typing import Iterator, Sequence

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

    Under DDP (`num_replicas > 1`) the global batch list is padded by repeating its first batches until its
    length divides by `num_replicas`, and rank r takes batches r, r + R, r + 2R, ...: every rank gets the same
    number of batches, so no rank waits forever in a collective. The repeats are the last
    `len(self) - num_real_batches` batches of a rank. Training does not mind them; **evaluation should not
    count them twice**: skip a rank's batches after `num_real_batches`, de-duplicate by the example indices
    the datamodules put in each batch ("index"), or evaluate on one device.

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
        self.lengths = [int(n) for n in lengths]
        self.max_tokens, self.batch_size = max_tokens, batch_size
        self.shuffle, self.seed, self.pool_size = shuffle, seed, pool_size
        self.pad_to_multiple = pad_to_multiple
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.sampler = _EpochHandle(self)
        self._cache: tuple[int, list[list[int]]] | None = None
        if max_tokens is not None:
            longest = max(range(len(self.lengths)), key=self.lengths.__getitem__)
            need = padded_length(self.lengths[longest], pad_to_multiple)
            if need > max_tokens:
                raise ValueError(f"BucketBatchSampler: example {longest} has {self.lengths[longest]} tokens "
                                 f"({need} padded to a multiple of {pad_to_multiple}), more than "
                                 f"max_tokens={max_tokens}; raise max_tokens or lower max_len")

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose order to produce; Lightning calls it (through `self.sampler`) every epoch."""
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        """All ranks' batches for the current epoch, before DDP padding (each index exactly once)."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._build(self.epoch))
        return self._cache[1]

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches for the current epoch, repeats included."""
        batches = self.global_batches()
        total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
        return [batches[i % len(batches)] for i in range(self.rank, total, self.num_replicas)]

    @property
    def num_real_batches(self) -> int:
        """How many of this rank's batches (its first ones) are not repeats added for DDP."""
        return len(range(self.rank, len(self.global_batches()), self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rank_batches())

    def __len__(self) -> int:
        return math.ceil(len(self.global_batches()) / self.num_replicas)

    def _build(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        n = len(self.lengths)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        bucketed: list[int] = []
        for start in range(0, n, self.pool_size):
            bucketed.extend(sorted(order[start:start + self.pool_size], key=self.lengths.__getitem__))
        batches = self._pack(bucketed)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches

    def _pack(self, indices: list[int]) -> list[list[int]]:
        batches, batch, longest = [], [], 0
        for i in indices:
            grown = max(longest, self.lengths[i])
            over_budget = (self.max_tokens is not None
                           and (len(batch) + 1) * padded_length(grown, self.pad_to_multiple) > self.max_tokens)
            full = self.batch_size is not None and len(batch) == self.batch_size
            if batch and (over_budget or full):
                batches.append(batch)
                batch, grown = [], self.lengths[i]
            batch.append(i)
            longest = grown
        batches.append(batch)
        return batches


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

    @property
    def num_real_batches(self) -> int:
        return getattr(self.batches, "num_real_batches", len(self))

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start, self._resume = self._resume[1], None
        return itertools.islice(iter(self.batches), start, None)

    def __len__(self) -> int:
        return len(self.batches)
