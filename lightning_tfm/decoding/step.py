"""What every search needs from a model: a `Step` closure that owns the model's incremental state (the KV
cache, the encoder output) and a `Reorder` closure that rearranges that state's rows. The searches import
nothing else, so any model, or a table of log-probabilities in a test, can be searched."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Step(Protocol):
    """Feed tokens to the model and return the scores of the next token.

    The first call gets the whole prefix (B, t), one row per sentence; each later call gets the one token
    (R, 1) chosen for every row, in the rows `Reorder` arranged, so the closure appends to its cache instead
    of recomputing the prefix.
    """

    def __call__(self, tokens: Tensor) -> Tensor:
        """(R, t) new token ids -> (R, V) next-token log-probabilities (`sample` also accepts logits)."""
        ...


class Reorder(Protocol):
    """Rearrange the rows of the model state: afterwards row i continues the old row index[i].

    The searches keep the rows grouped by sentence: `beams` consecutive rows per sentence, sentences in their
    first order, and a row's parent always a row of the same sentence. Beam search feeds the first step one
    row per sentence, then calls this with each sentence's k beams (beams = k), and leaves out the rows of
    sentences that have settled; greedy search drops rows that have stopped (beams = 1). A state that keeps
    something once per sentence (the encoder side all beams share) finds the sentences kept, as rows of its
    own, at index[::beams] // (the beams of the previous call, 1 before any).
    """

    def __call__(self, index: Tensor, beams: int) -> None:
        """index: (R,) long, rows of the current state; R may differ from the current row count.
        beams: rows per sentence after the call; R is a multiple of it."""
        ...


def _prefix_2d(prefix: Tensor) -> Tensor:
    """(B,) start tokens or (B, t) prefixes -> (B, t) long, rejecting anything else."""
    if prefix.dim() == 1:
        prefix = prefix[:, None]
    if prefix.dim() != 2 or prefix.shape[0] == 0 or prefix.shape[1] == 0:
        raise ValueError(f"prefix has shape {tuple(prefix.shape)}; expected (B,) start tokens or a (B, t) prefix "
                         f"with B, t >= 1")
    if prefix.dtype.is_floating_point or prefix.dtype == torch.bool:
        raise ValueError(f"prefix has dtype {prefix.dtype}; expected integer token ids")
    return prefix.long()


def _row_limits(max_len: Tensor | int, batch_size: int, device: torch.device, name: str = "max_len") -> Tensor:
    """An int or a (B,) tensor of per-row limits on generated tokens -> (B,) long, all >= 1."""
    limits = torch.as_tensor(max_len, device=device)
    if limits.dtype.is_floating_point or limits.dtype == torch.bool:
        raise ValueError(f"{name} has dtype {limits.dtype}; expected an int or an integer tensor")
    if limits.dim() == 0:
        limits = limits.expand(batch_size)
    if limits.shape != (batch_size,):
        raise ValueError(f"{name} has shape {tuple(limits.shape)}; expected an int or ({batch_size},), "
                         f"one limit per row")
    if (limits < 1).any():
        raise ValueError(f"{name}={limits.tolist()}; every row must allow at least 1 generated token")
    return limits.long()
