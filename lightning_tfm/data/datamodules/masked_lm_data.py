"""Masked-LM examples as a model sees them: `cls tokens sep` ids held in memory (`MaskedLMDataset`) or read
from prepared rows (`PreparedMaskedLMDataset`), the batch sampler that gives every batch the seed of its masks,
and the collate functions that pad and corrupt (BERT, Devlin et al. 2019, §3.1).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, Sampler

from lightning_tfm.data.batching import BucketBatchSampler, derive_seed
from lightning_tfm.data.masking import mask_tokens
from lightning_tfm.data.padding import pad_batch
from lightning_tfm.data.prepare import PreparedSplit
from lightning_tfm.data.shards import RowLengths


@dataclass
class MaskedLMDataset(Dataset):
    """Encoded texts. `dataset[i]` is {"index", "ids", "text", "mask_seed": None}; `dataset[(mask_seed, i)]`,
    what `MaskSeedBatchSampler` asks for, carries that seed instead.

    Args:
        ids: token ids per example, `cls ... sep` included.
        texts: the raw text of each example (kept for prediction), or None.
    """

    ids: list[list[int]]
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        mask_seed, i = key if isinstance(key, tuple) else (None, key)
        return {"index": i, "ids": self.ids[i], "text": None if self.texts is None else self.texts[i],
                "mask_seed": mask_seed}

    def lengths(self) -> np.ndarray:
        """Each example's length in tokens, cls and sep included."""
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """(vocab_size,) how often each id occurs in the split."""
        flat = np.fromiter(itertools.chain.from_iterable(self.ids), dtype=np.int64)
        return np.bincount(flat, minlength=vocab_size)[:vocab_size]


class PreparedMaskedLMDataset(Dataset):
    """The items of `MaskedLMDataset` read from prepared rows (`lightning_tfm prepare`): ids are int64 arrays
    of the memory-mapped "text" rows (`cls ... sep`, already cut to max_len), and "text" is None.

    Args:
        split: the split's rows (`open_split`).
    """

    def __init__(self, split: PreparedSplit) -> None:
        self.rows = split.tokens["text"]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        mask_seed, i = key if isinstance(key, tuple) else (None, key)
        return {"index": i, "ids": self.rows[i].astype(np.int64), "text": None, "mask_seed": mask_seed}

    def lengths(self) -> RowLengths:
        """Each example's length in tokens, read from the row index a pool at a time (never one array)."""
        return RowLengths(self.rows)

    def token_counts(self, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
        """(vocab_size,) how often each id occurs, counted a chunk of the mapped ids at a time (np.bincount of
        the whole file would hold a 64-bit copy of it)."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        values = self.rows.values
        for start in range(0, len(values), chunk):
            counts += np.bincount(values[start:start + chunk], minlength=vocab_size)[:vocab_size]
        return counts


class MaskSeedBatchSampler(Sampler[list[tuple[int, int]]]):
    """A `BucketBatchSampler` whose batches carry the seed of their masks: batch k of this rank becomes
    `[(mask_seed, i), ...]` with `mask_seed = derive_seed(seed, stream, epoch, rank + k * num_replicas)`, the
    batch's number in the global list, so DDP ranks never share a mask stream.

    The seed travels with the indices because the collate function runs in the DataLoader's worker processes,
    which never see `set_epoch` (persistent workers keep the copy of the sampler they started with). Lightning
    calls `set_epoch` on `self.sampler` before training and evaluation epochs alike; with `per_epoch=False` the
    epoch is ignored, so every evaluation masks the same positions the same way.

    Args:
        batches: the bucketed batch sampler to wrap.
        seed: base seed.
        stream: a number per split, so that train and validation batch k are masked differently.
        per_epoch: new masks every epoch (training), or the same masks every time (evaluation).
    """

    def __init__(self, batches: BucketBatchSampler, seed: int, stream: int, per_epoch: bool) -> None:
        self.batches, self.seed, self.stream, self.per_epoch = batches, seed, stream, per_epoch
        self.sampler = batches.sampler  # where Lightning calls set_epoch; it forwards to `batches`

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.batches.epoch if self.per_epoch else 0
        first, step = self.batches.rank, self.batches.num_replicas
        for k, batch in enumerate(self.batches):
            mask_seed = derive_seed(self.seed, self.stream, epoch, first + k * step)
            yield [(mask_seed, i) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


def collate_masked_lm(items: list[dict[str, Any]], pad_id: int, mask_id: int, special_ids: Sequence[int],
                      vocab_size: int, mask_prob: float = 0.15, replace_prob: float = 0.8, random_prob: float = 0.1,
                      pad_to_multiple: int = 8) -> dict[str, Any]:
    """Pad, then corrupt with `mask_tokens` using a generator seeded by the items' "mask_seed" (torch's global
    RNG when it is None).

    Returns:
        "ids" (B, T) int64, the corrupted inputs; "mask" (B, T) bool, True at real tokens; "labels" (B, T)
        int64, the original id at chosen positions and -100 elsewhere; "index" (B,) int64, positions in the split.
    """
    ids, mask = pad_batch([it["ids"] for it in items], pad_id, pad_to_multiple)
    seed = items[0]["mask_seed"]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    inputs, labels = mask_tokens(ids, special_ids, mask_id, vocab_size, generator, mask_prob, replace_prob,
                                 random_prob)
    return {"ids": inputs, "mask": mask, "labels": labels, "index": torch.tensor([it["index"] for it in items])}


def collate_fill_mask(items: list[dict[str, Any]], pad_id: int, pad_to_multiple: int = 8) -> dict[str, Any]:
    """Predict batches: "ids"/"mask" (B, T) with the user's mask tokens in place, "index" (B,), "texts"."""
    ids, mask = pad_batch([it["ids"] for it in items], pad_id, pad_to_multiple)
    return {"ids": ids, "mask": mask, "index": torch.tensor([it["index"] for it in items]),
            "texts": [it["text"] for it in items]}


def encode_with_masks(tokenizer: Tokenizer, text: str, mask_id: int) -> list[int]:
    """Token ids of a text in which the mask token stands for one token each time it occurs.

    Subword tokenizers attach a word's space to the word ("▁film", "Ġfilm"), so a masked word in training
    takes its space with it: "a good film" becomes `▁a <mask> ▁film`. The spaces a person types around a mask
    ("a <mask> film") would become tokens of their own, which training never shows next to a mask; they are
    dropped, unless the tokenizer has a token for " " itself (character-level), where they are real tokens.
    """
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if tokenizer.token_to_id(" ") is not None:
        return ids
    spaces = {i for i in set(ids) if i != mask_id and not tokenizer.decode([i], skip_special_tokens=False).strip()}
    return [t for k, t in enumerate(ids)
            if t not in spaces or mask_id not in ids[max(k - 1, 0): k] + ids[k + 1: k + 2]]
