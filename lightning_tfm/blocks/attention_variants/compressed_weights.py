"""The attention weights `MemoryCompressedAttention` keeps, mapped from what it attends over (compressed slots
of r real tokens, and in the causal form the raw keys of a query's own incomplete block) back to the token
positions they stand for."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_tfm.blocks.masks import AttentionMask


def visible_real(mask: AttentionMask, first: int, end: int, batch: int, device: torch.device) -> Tensor:
    """(B, end - first) True for the real tokens at positions first..end-1 (all of them if nothing is padded)."""
    if mask.key_mask is None:
        return torch.ones(batch, end - first, dtype=torch.bool, device=device)
    return mask.key_mask[:, first:end].to(device)


def token_weights(slots: Tensor, near: Tensor | None, real: Tensor, query_index: Tensor, count: Tensor,
                  r: int) -> Tensor:
    """Weights over token positions from weights over slots and raw keys.

    A slot's weight is shared evenly by the real tokens it summarises (r, or fewer in a last, partial block);
    a raw key's weight goes to its own token; pads get 0. Positions are the visible ones whose real tokens are
    compacted indices 0, 1, ... in order.

    Args:
        slots: (B, H, T, M) weights of compressed slots 0..M-1 (slot m: compacted indices m r .. m r + r - 1).
        near: (B, H, T, W) weights of the raw keys at compacted indices i - W + 1 .. i of query index i, or None.
        real: (B, L) which visible positions hold real tokens.
        query_index: (B, T) compacted index of each query (`_Compacted.query_index`).
        count: (B,) real tokens in all, which sizes the last, partial slot.
        r: the compression, tokens per slot.
    Returns:
        (B, H, T, L).
    """
    B, H, T, M = slots.shape
    L = real.shape[1]
    index = real.long().cumsum(1) - 1                                   # (B, L) compacted index where real
    weights = slots.new_zeros(B, H, T, L)
    if M > 0:
        size = (count[:, None] - torch.arange(M, device=slots.device) * r).clamp(0, r)          # (B, M)
        per_token = slots / size[:, None, None].clamp_min(1)
        block = index.clamp_min(0) // r                                                         # (B, L)
        in_slot = (real & (block < M))[:, None, None]                                           # (B, 1, 1, L)
        picked = per_token.gather(-1, block.clamp_max(M - 1)[:, None, None].expand(B, H, T, L))
        weights = weights + picked * in_slot
    if near is not None and near.shape[-1] > 0:
        W = near.shape[-1]
        offset = index[:, None, :] - query_index[:, :, None] + W - 1                            # (B, T, L)
        in_near = ((offset >= 0) & (offset < W) & real[:, None, :])[:, None]                    # (B, 1, T, L)
        picked = near.gather(-1, offset.clamp(0, W - 1)[:, None].expand(B, H, T, L))
        weights = weights + picked * in_near
    return weights
