"""Greedy search, and the token-by-token loop it shares with sampling: pick one token per row, stop a row at
EOS or at its length limit (and drop it from the batch, given a `Reorder`), stop the loop when every row has
stopped."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_tfm.decoding.step import Reorder, Step, _prefix_2d, _row_limits

Choose = Callable[[Tensor], Tensor]     # (B, V) next-token scores -> (B,) chosen token ids


def greedy_search(step: Step, prefix: Tensor, eos_id: int, max_len: Tensor | int, pad_id: int = 0,
                  reorder: Reorder | None = None) -> Tensor:
    """Append the most probable next token until EOS or the row's length limit.

    Args:
        step: feeds tokens, returns (B, V) next-token log-probabilities (see `Step`).
        prefix: (B,) start tokens (BOS) or (B, t) prefixes, fed to `step` in the first call.
        eos_id: the end-of-sequence id; a row stops after emitting it.
        max_len: most tokens to generate, EOS included: an int, or (B,) per row (e.g. source length + 50).
        pad_id: written after a row has stopped.
        reorder: drops the rows that have stopped from the model state (see `Reorder`), so later steps run
            on fewer rows; None feeds every row until all have stopped.

    Returns:
        (B, L) long, the generated tokens without the prefix, EOS included, `pad_id` after it. L is the longest
        row; a row that reaches its limit without EOS ends there (no EOS is added).
    """
    return _generate(step, prefix, lambda scores: scores.argmax(-1), max_len, eos_id, pad_id, reorder)


def _generate(step: Step, prefix: Tensor, choose: Choose, max_len: Tensor | int, eos_id: int | None,
              pad_id: int, reorder: Reorder | None = None) -> Tensor:
    """The loop of `greedy_search` and `sample`. Without `reorder`, rows that have stopped are still fed (the
    token `choose` picked for them, always a valid id) so the batch keeps its shape; their output is `pad_id`.
    With it, they leave the batch."""
    prefix = _prefix_2d(prefix)
    B = prefix.shape[0]
    limits = _row_limits(max_len, B, prefix.device)
    tokens = prefix.new_full((B, int(limits.max())), pad_id)                 # (B, L)
    rows = torch.arange(B, device=prefix.device)                              # (R,) the output row of each fed row
    stopped = torch.zeros(B, dtype=torch.bool, device=prefix.device)          # (R,)
    scores = step(prefix)                                                     # (R, V)
    for n in range(1, tokens.shape[1] + 1):
        chosen = choose(scores)                                               # (R,)
        tokens[rows, n - 1] = chosen.masked_fill(stopped, pad_id)
        stopped = stopped | (n >= limits[rows])
        if eos_id is not None:
            stopped |= chosen == eos_id
        n_stopped = int(stopped.sum())
        if n_stopped == len(rows):
            return tokens[:, :n]
        if reorder is not None and n_stopped:
            keep = (~stopped).nonzero().squeeze(1)                            # (R',)
            reorder(keep, 1)
            rows, chosen, stopped = rows[keep], chosen[keep], stopped[keep]
        scores = step(chosen[:, None])
    return tokens
