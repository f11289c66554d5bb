"""Padding token lists into batch tensors, to a length the hardware likes."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


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
