"""Persistent memory (Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory"): learned key
and value vectors per head that every query attends to besides the sequence. With no feed-forward block in the
model (`feedforward: null`) the layers are the paper's all-attention layers (§4), whose memory vectors take
the feed-forward's role."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.kv_cache import DecodingState
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import apply_rotary
from lightning_tfm.blocks.sdpa import sdpa


class PersistentMemoryAttention(MultiHeadAttention):
    """Multi-head attention whose keys and values are, per key/value head, `n_memory` learned vectors followed
    by the sequence's own (paper §4.1): softmax over [memory; sequence] jointly.

    Memory slots have no position: their logits add no position bias (ALiBi adds 0) and, with rotary positions,
    take the query before its rotation (rotating only the query would tie them to its position; this costs
    query-key products twice as wide, [rotated q, q] against [rotated k, 0] and [0, memory key]). Every query
    sees them, whether causal, padded, or the first position, so a query with no visible key still attends to
    the memory. They are not cached: decoding caches the sequence's keys only and prepends the memory at every
    step. Cross-attention gets memory slots too. With n_memory = 0 this is `MultiHeadAttention` exactly.

    Initialisation: keys N(0, 1/D) and values N(0, 1/n_memory), as the paper's code draws its parameters; that
    code then multiplies them by sqrt(D) and sqrt(n_memory) at every use (unit-variance vectors with larger
    effective learning rates), a reparametrisation we leave out. With grouped-query attention the query heads
    that share a key/value head share its memory.

    `keep_weights` stores (B, H, T, n_memory + S) weights, memory slots first.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        n_memory: persistent vectors per key/value head, >= 0 (1024 in the paper's small enwik8 model,
            2048 in the large ones).
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights (memory slots included), in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports()

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_memory: int = 1024,
                 n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if n_memory < 0:
            raise ValueError(f"PersistentMemoryAttention: n_memory={n_memory}, must be >= 0")
        self.n_memory = n_memory
        shape = (self.n_kv_heads, n_memory, self.head_dim)
        self.memory_keys = nn.Parameter(torch.randn(shape) * self.head_dim ** -0.5)         # (Hkv, N, D)
        self.memory_values = nn.Parameter(torch.randn(shape) * max(n_memory, 1) ** -0.5)   # (Hkv, N, D)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As `MultiHeadAttention.forward`; with rotary positions the memory logits take the unrotated query,
        so that they do not depend on the query's position either.

        Args:
            x: (B, T, C) queries' inputs.
            context: (B, S, C) keys' and values' inputs for cross-attention; None for self-attention.
            mask: which of the sequence's keys each query sees; None for all.
            state: this block's decoding state: the sequence's earlier keys and values, or the projected memory.
            rotary: (cos, sin) (T, D) of the query positions, for rotary position embeddings.
        Returns:
            (B, T, C).
        """
        if rotary is None or context is not None or self.n_memory == 0:
            return super().forward(x, context, mask, state, rotary)
        B, T, _ = x.shape
        q, k, v = self._split(self.qkv(x), B, T)
        k = apply_rotary(k, *rotary)
        if state is not None:
            k, v = state.append(k, v)                                             # (B, Hkv, L + T, D)
        # [rotated q, q] . [rotated k, 0] is the usual logit; [rotated q, q] . [0, memory key] = q . memory key
        q = torch.cat([apply_rotary(q, *rotary), q], -1)                          # (B, H, T, 2D)
        k = torch.cat([k, torch.zeros_like(k)], -1)                               # (B, Hkv, S, 2D)
        memory_keys = torch.cat([torch.zeros_like(self.memory_keys), self.memory_keys], -1)    # (Hkv, N, 2D)
        y = self._attend_with_memory(q, k, v, mask, memory_keys)                   # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """softmax over the memory slots and the allowed keys; q (B, H, T, D), k and v (B, Hkv, S, D) at
        positions 0..S-1."""
        if self.n_memory == 0:
            return super().attend(q, k, v, mask)
        return self._attend_with_memory(q, k, v, mask, self.memory_keys)

    def _attend_with_memory(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None,
                            memory_keys: Tensor) -> Tensor:
        """q (B, H, T, E), k (B, Hkv, S, E), v (B, Hkv, S, D), memory_keys (Hkv, N, E) -> (B, H, T, D)."""
        mask = mask or AttentionMask()
        B, T, S = q.shape[0], q.shape[2], k.shape[2]
        k = torch.cat([memory_keys.to(k.dtype).expand(B, -1, -1, -1), k], 2)             # (B, Hkv, N + S, E)
        v = torch.cat([self.memory_values.to(v.dtype).expand(B, -1, -1, -1), v], 2)      # (B, Hkv, N + S, D)
        attn_mask = self._memory_mask(mask, T, S, q.dtype, q.device)
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights:
            return self._attend_keeping_weights(q, k, v, attn_mask, dropout)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                    scale=self.head_dim ** -0.5, enable_gqa=self.n_kv_heads != self.n_heads)

    def _memory_mask(self, mask: AttentionMask, T: int, S: int, dtype: torch.dtype,
                     device: torch.device) -> Tensor | None:
        """The mask of the sequence's keys with n_memory always-allowed, unbiased columns in front:
        (..., T, N + S), bool or additive as `sdpa_mask` gives it; None if every pair is allowed."""
        attn_mask, is_causal = mask.sdpa_mask(T, S, dtype, device)
        if is_causal:                        # SDPA's own causal kernel would hide the memory from early queries
            attn_mask = mask.allowed(T, S, device)                                          # (T, S)
        if attn_mask is None:
            return None
        memory = torch.zeros(*attn_mask.shape[:-1], self.n_memory, dtype=attn_mask.dtype, device=device)
        if attn_mask.dtype == torch.bool:
            memory = memory.logical_not()    # True: may attend
        return torch.cat([memory, attn_mask], -1)                                           # (..., T, N + S)

    def _attend_keeping_weights(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                                dropout: float) -> Tensor:
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)      # (B, H, N + S, E or D)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5                       # (B, H, T, N + S)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            logits = logits + attn_mask
        weights = torch.softmax(logits, dim=-1)         # never an empty row: the memory is always allowed
        self.weights = weights.detach()
        return F.dropout(weights, dropout, self.training) @ v                             # (B, H, T, D)
