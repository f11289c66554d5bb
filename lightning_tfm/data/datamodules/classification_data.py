"""Classification examples as a model sees them: BERT-style inputs `cls a sep [b sep]` with segment ids and
label indices (Devlin et al. 2019, §3), held in memory (`ClassificationDataset`) or read from prepared rows
(`PreparedClassificationDataset`), and the collate that pads them into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tfm.data.padding import pad_batch
from lightning_tfm.data.prepare import PreparedSplit
from lightning_tfm.data.shards import RowLengths


@dataclass
class ClassificationDataset(Dataset):
    """Encoded examples; item i is {"index", "ids", "segments", "label"} with label None when unlabelled.

    Args:
        ids: token ids per example, special tokens included.
        segments: segment id (0 first text, 1 second) per token.
        labels: class index (single-label) or sorted class indices (multi-label) per example; None if absent.
    """

    ids: list[list[int]]
    segments: list[list[int]]
    labels: list[int | list[int]] | None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "ids": self.ids[i], "segments": self.segments[i],
                "label": None if self.labels is None else self.labels[i]}

    def lengths(self) -> np.ndarray:
        """Each input's length in tokens (what a batch's budget counts)."""
        return np.array([len(x) for x in self.ids], dtype=np.int64)


class PreparedClassificationDataset(Dataset):
    """Examples read from prepared rows (`lightning_tfm prepare`): the items of `ClassificationDataset`, with
    ids and segments as int64 arrays.

    A pair is stored as two fields, "text" (`cls a sep`) and "text_pair" (`b sep`), already truncated together,
    so an input is the two rows end to end and its segments follow from where the first ends; labels are the
    "labels" value rows (one index, or the sorted indices of a multi-label example).

    Args:
        split: the split's rows (`open_split`).
        multi_label: items carry a list of class indices rather than one.
    """

    def __init__(self, split: PreparedSplit, multi_label: bool) -> None:
        self.text, self.pair = split.tokens["text"], split.tokens.get("text_pair")
        self.labels, self.multi_label = split.values["labels"], multi_label

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict[str, Any]:
        first = self.text[i].astype(np.int64)
        ids = first if self.pair is None else np.concatenate([first, self.pair[i].astype(np.int64)])
        segments = np.zeros(len(ids), dtype=np.int64)
        segments[len(first):] = 1
        labels = self.labels[i].tolist()
        return {"index": i, "ids": ids, "segments": segments, "label": labels if self.multi_label else labels[0]}

    def lengths(self) -> RowLengths:
        """Each input's length in tokens, read from the row indexes a pool at a time (never one array)."""
        return RowLengths(self.text) if self.pair is None else RowLengths(self.text, self.pair, combine=np.add)


def collate_classification(items: list[dict[str, Any]], pad_id: int, n_classes: int, multi_label: bool,
                           pairs: bool, pad_to_multiple: int = 8) -> dict[str, Any]:
    """ids/mask (B, T), segments (B, T) for pairs, labels (B,) int64 or (B, n_classes) float multi-hot."""
    ids, mask = pad_batch([it["ids"] for it in items], pad_id, pad_to_multiple)
    batch: dict[str, Any] = {"ids": ids, "mask": mask, "index": torch.tensor([it["index"] for it in items])}
    if pairs:
        batch["segments"] = pad_batch([it["segments"] for it in items], 0, pad_to_multiple)[0]
    if items[0]["label"] is not None:
        if multi_label:
            labels = torch.zeros(len(items), n_classes)
            for row, it in enumerate(items):
                labels[row, it["label"]] = 1.0
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([it["label"] for it in items])
    return batch
