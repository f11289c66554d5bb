"""Sparse attention through FlexAttention (`torch.nn.attention.flex_attention`), the path on CUDA.

A pattern, causality and padding become one `mask_mod`; `create_block_mask` turns it into the block-sparse
layout FlexAttention's compiled kernel skips over, so the GPU does work only where the pattern allows pairs.
FlexAttention has no backward on CPU (torch 2.13) and no dropout, and a generic position bias is not an
elementwise `score_mod`, so `SparseAttention` takes this path only for CUDA inputs without dropout or bias; the
blocked kernel serves everything else. The mask it builds is tested against the dense mask on CPU (FlexAttention
runs eagerly there, forward only); its speed on a GPU has not been measured here.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_tfm.blocks.attention_variants.patterns import Pattern


def flex_available(q: Tensor, dropout: float, has_bias: bool) -> bool:
    """Whether `flex_sparse_attention` can serve this call."""
    if not q.is_cuda or dropout or has_bias:
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, *, causal: bool, q_offset: int = 0,
                          k_start: int = 0, key_mask: Tensor | None = None, compiled: bool = True) -> Tensor:
    """The same result as `blocked.sparse_attention` (without bias or dropout), by FlexAttention.

    Args:
        q: (B, H, T, D) queries at positions q_offset ..; k, v: (B, Hkv, S, D) keys at positions k_start ...
        pattern: which query and key positions may meet.
        causal: whether a query may not see later keys.
        key_mask: (B, S) bool over the given keys, True for real tokens; None if nothing is padded.
        compiled: run the compiled kernel (False: FlexAttention's eager reference, for checking masks on CPU).
    Returns:
        (B, H, T, D); a query that may see no key gets 0.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, _ = q.shape
    S = k.shape[2]

    def allowed(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_pos, k_pos = q_idx + q_offset, kv_idx + k_start
        keep = pattern.allows(q_pos, k_pos)
        if causal:
            keep = keep & (k_pos <= q_pos)
        if key_mask is not None:
            keep = keep & key_mask[b, kv_idx]
        return keep

    block_mask = create_block_mask(allowed, B if key_mask is not None else None, None, T, S, device=q.device)
    attend = _compiled() if compiled else flex_attention
    out, lse = attend(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H, return_lse=True)
    return out.masked_fill(torch.isinf(lse)[..., None], 0.0)     # rows with no allowed key: 0, as SDPA gives
