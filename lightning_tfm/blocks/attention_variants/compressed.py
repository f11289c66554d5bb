"""Memory-compressed attention (Liu et al. 2018, "Generating Wikipedia by Summarizing Long Sequences", §4.2.2):
keys and values are shortened along the sequence by a strided convolution, so each query attends over S / r
summaries instead of S keys.

Padding is handled so that it changes nothing: each row's real tokens are compacted to the front (in order)
before the blocks are cut, so block boundaries count from the first real token, and pads' keys and values are
zeroed. Left padding (batched prompts) then gives the same outputs as no padding, which implementations that
cut blocks at absolute positions do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.attention_variants.compressed_weights import token_weights, visible_real
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import apply_rotary
from lightning_tfm.blocks.sdpa import sdpa


class CompressedCache:
    """Decoding state of `MemoryCompressedAttention`, O(S / r + r) per row: the compressed blocks completed so far
    and the raw keys and values of the block still filling, both over the row's real tokens only.

    Attributes:
        k, v: (B, Hkv, M, D) compressed blocks; row b's first count[b] // r are complete, later slots are stale.
        tail_k, tail_v: (B, Hkv, r - 1, D) keys and values of the incomplete block; row b's first count[b] % r
            are real.
        count: (B,) real tokens seen so far; None before the first step.
        positions: positions seen so far, real or padding (bounds the number of blocks without a host sync).
    """

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.tail_k: Tensor | None = None
        self.tail_v: Tensor | None = None
        self.count: Tensor | None = None
        self.positions = 0

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam reordering, expanding sentences to beams)."""
        if self.count is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)
            self.tail_k, self.tail_v = self.tail_k.index_select(0, index), self.tail_v.index_select(0, index)
            self.count = self.count.index_select(0, index)


@dataclass
class _Compacted:
    """One step's keys and values over real tokens only, cut into blocks of r.

    Attributes:
        raw_k, raw_v: (B, Hkv, L, D) the incomplete block left by earlier steps, then this step's keys, real ones
            first in order, pads zeroed; entry 0 has compacted index `base`.
        base: (B,) compacted index of raw entry 0 (a multiple of r).
        comp_k, comp_v: (B, Hkv, M, D) compressed blocks; slot m summarises compacted positions m r .. m r + r - 1.
        count: (B,) real tokens up to and including this step.
        query_index: (B, T) compacted index of each query: its own for a real token, the last real one before it
            for a pad (-1 if none).
    """

    raw_k: Tensor
    raw_v: Tensor
    base: Tensor
    comp_k: Tensor
    comp_v: Tensor
    count: Tensor
    query_index: Tensor


class MemoryCompressedAttention(MultiHeadAttention):
    """Attention over keys and values compressed by a strided convolution of kernel = stride = r (paper §4.2.2,
    where r = 3), applied to the projected keys (values) of all key/value heads together.

    The convolutions start as mean pooling over each block (weight identity / r, bias 0), so compression 1 is
    full attention exactly (tested). A sequence whose length is not a multiple of r has a last, partial block
    padded with zeros (the convolution of the zero-padded sequence).

    Bidirectional: every query attends over the compressed blocks that hold at least one real token. Causal (the
    paper's decoder, made exact): a query at i sees block b only once every position it summarises is in its
    past, (b + 1) r - 1 <= i, and, in the same softmax, the raw keys of its own incomplete block, positions
    r floor((i + 1) / r) .. i. With r = 1 this is full causal attention. Indices count real tokens only (see the
    module docstring), so padding on either side changes no real token's output.

    Rotary positions rotate the keys before they are compressed. Decoding keeps the completed blocks and the raw
    keys of the incomplete one (`CompressedCache`) and equals the full forward. Logits and softmax are in fp32
    on the causal path; the bidirectional one runs `scaled_dot_product_attention` with a boolean mask. No
    cross-attention or position bias (ALiBi).

    `keep_weights` keeps (B, H, T, S) weights over token positions (a decoding step: every position so far): a
    slot's softmax weight is shared evenly by the real tokens it summarises, a raw key's (causal form) goes to its
    token, pads get 0; rows sum to 1. At the mean-pooling initialisation out = A V exactly where every slot seen is
    full (always in the causal form); a last, partial slot of n < r tokens holds their sum / r, yet shares its
    weight as w / n, so that rows sum to 1.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        compression: r, the kernel and stride of the convolutions, >= 1 (3 in the paper).
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections and the convolutions.
    """

    supports: ClassVar[Supports] = Supports(cross_attention=False, position_bias=False)

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), compression: int = 3,
                 n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if compression < 1:
            raise ValueError(f"MemoryCompressedAttention: compression={compression}, must be >= 1")
        self.compression = compression
        width = self.n_kv_heads * self.head_dim
        self.compress_k = _mean_pooling(nn.Conv1d(width, width, compression, stride=compression, bias=bias))
        self.compress_v = _mean_pooling(nn.Conv1d(width, width, compression, stride=compression, bias=bias))

    def new_state(self, max_len: int = 0) -> CompressedCache:
        """Completed blocks and the incomplete one's raw keys; max_len is not needed."""
        return CompressedCache()

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: CompressedCache | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) inputs.
            context: must be None (no cross-attention).
            mask: causal or not, padding, and the position of the first query; None for all.
            state: this block's `CompressedCache` while decoding.
            rotary: (cos, sin) (T, D) of the query positions, for rotary position embeddings.
        Returns:
            (B, T, C).
        """
        if context is not None:
            raise ValueError("MemoryCompressedAttention cannot attend to another sequence "
                             "(supports.cross_attention is False)")
        B, T, _ = x.shape
        q, k, v = self._split(self.qkv(x), B, T)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = self._attend_compressed(q, k, v, mask or AttentionMask(), state)             # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """Compressed attention of q (B, H, T, D) over k, v (B, Hkv, S, D), all keys given (no state); the keys
        end at the newest position, so the queries are the last T of them."""
        return self._attend_compressed(q, k, v, mask or AttentionMask(), None)

    def _attend_compressed(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                           state: CompressedCache | None) -> Tensor:
        """q (B, H, T, D) over this step's k, v (B, Hkv, S, D) and what `state` kept -> (B, H, T, D)."""
        S = k.shape[2]
        start = mask.offset + q.shape[2] - S                      # position of k's first key
        first = start - (state.positions if state is not None and state.count is not None else 0)   # first visible
        real = None if mask.key_mask is None else mask.key_mask[:, start:start + S].to(k.device)
        c = self._compact(k, v, real, state, start + S)
        if mask.causal:     # no slot past positions // r can be complete
            y = self._causal(q, c, (start + S) // self.compression)
            if self.keep_weights:      # slots, then the own block's r - 1 raw keys
                slots, near = self.weights.split([self.weights.shape[-1] - (self.compression - 1),
                                                  self.compression - 1], -1)
                self._keep_token_weights(slots, near, mask, first, start + S, c)
            return y
        seen = torch.arange(c.comp_k.shape[2], device=q.device) * self.compression < c.count[:, None]   # (B, M)
        if real is None:
            seen = None
        else:   # a row of padding only sees its first block rather than nothing (NaN in some SDPA kernels)
            seen[:, 0] = True
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights:
            y = self._attend_explicitly(q, c.comp_k, c.comp_v, AttentionMask(key_mask=seen), dropout)
            self._keep_token_weights(self.weights, None, mask, first, start + S, c)
            return y
        attn_mask = None if seen is None else seen[:, None, None]
        return sdpa(q, c.comp_k, c.comp_v, attn_mask=attn_mask, dropout_p=dropout,
                    enable_gqa=self.n_kv_heads != self.n_heads)

    def _keep_token_weights(self, slots: Tensor, near: Tensor | None, mask: AttentionMask, first: int, end: int,
                            c: _Compacted) -> None:
        """Keep the (B, H, T, end - first) token weights of slot weights (B, H, T, M) and raw-key weights
        (B, H, T, r - 1) (causal form; None otherwise), over the visible positions first..end-1."""
        real = visible_real(mask, first, end, slots.shape[0], slots.device)
        self.weights = token_weights(slots, near, real, c.query_index, c.count, self.compression)

    def _compact(self, k: Tensor, v: Tensor, real: Tensor | None, state: CompressedCache | None,
                 positions: int) -> _Compacted:
        """Append this step's keys and values (real: (B, S) or None) to the state's, compact and compress them;
        update the state."""
        r = self.compression
        B, Hkv, S, D = k.shape
        fresh = state is None or state.count is None
        padded = real is not None
        if real is None:
            real = torch.ones(B, S, dtype=torch.bool, device=k.device)
        if fresh:
            count = torch.zeros(B, dtype=torch.long, device=k.device)
            valid = real
        else:
            count = state.count
            tail = torch.arange(state.tail_k.shape[2], device=k.device) < (count % r)[:, None]
            k, v = torch.cat([state.tail_k, k], 2), torch.cat([state.tail_v, v], 2)
            valid = torch.cat([tail, real], 1)                                              # (B, L)
        base = count - count % r
        query_index = (base[:, None] + valid.cumsum(1) - 1)[:, -S:]
        if padded or not fresh:
            # stable sort by "is padding": real tokens first, in order; then zero the pads
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
            valid = valid.gather(1, order)
            index = order[:, None, :, None].expand(-1, Hkv, -1, D)
            keep = valid[:, None, :, None]
            k = k.gather(2, index).masked_fill(~keep, 0.0)
            v = v.gather(2, index).masked_fill(~keep, 0.0)
        blocks_k, blocks_v = self._compress(self.compress_k, k), self._compress(self.compress_v, v)
        new_count = base + valid.sum(1)
        if fresh:
            comp_k, comp_v = blocks_k, blocks_v
        else:   # block j of this step goes to slot base / r + j; earlier slots keep completed blocks
            slot = (base // r)[:, None] + torch.arange(blocks_k.shape[2], device=k.device)         # (B, nb)
            comp_k, comp_v = (_place(old, new, slot) for old, new in ((state.k, blocks_k), (state.v, blocks_v)))
        c = _Compacted(k, v, base, comp_k, comp_v, new_count, query_index)
        if state is not None:
            self._store(state, c, positions)
        return c

    def _compress(self, conv: nn.Conv1d, x: Tensor) -> Tensor:
        """(B, Hkv, L, D) -> (B, Hkv, ceil(L / r), D): the convolution over all heads' channels, the last
        block zero-padded."""
        B, Hkv, L, D = x.shape
        x = F.pad(x, (0, 0, 0, -L % self.compression))
        y = conv(x.transpose(2, 3).reshape(B, Hkv * D, -1))                            # (B, Hkv D, nb)
        return y.view(B, Hkv, D, -1).transpose(2, 3)

    def _store(self, state: CompressedCache, c: _Compacted, positions: int) -> None:
        """Keep the completed blocks (at most positions // r slots: the most any row can have) and the raw keys
        of each row's incomplete block."""
        r = self.compression
        keep = positions // r
        state.k, state.v = c.comp_k[:, :, :keep], c.comp_v[:, :, :keep]
        first = c.count - c.count % r - c.base                                       # (B,) raw index of the tail
        index = (first[:, None] + torch.arange(r - 1, device=first.device)).clamp(max=c.raw_k.shape[2] - 1)
        index = index[:, None, :, None].expand(-1, c.raw_k.shape[1], -1, c.raw_k.shape[3])
        state.tail_k, state.tail_v = c.raw_k.gather(2, index), c.raw_v.gather(2, index)
        state.count, state.positions = c.count, positions

    def _causal(self, q: Tensor, c: _Compacted, n_slots: int) -> Tensor:
        """One softmax (fp32) over the completed blocks in the query's past (among the first n_slots) and its own
        block's raw keys."""
        r, W = self.compression, self.compression - 1
        B, H, T, D = q.shape
        Hkv = self.n_kv_heads
        comp_k, comp_v = c.comp_k[:, :, :n_slots], c.comp_v[:, :, :n_slots]
        i = c.query_index                                                               # (B, T)
        slots = torch.arange(comp_k.shape[2], device=q.device)
        seen = ((slots + 1) * r - 1 <= i[..., None])[:, None, None]                      # (B, 1, 1, T, M)
        # raw keys of the own block: compacted i - W + 1 .. i, from the block's start r floor((i + 1) / r)
        near = i[..., None] - (W - 1) + torch.arange(W, device=q.device)                 # (B, T, W)
        near_seen = (near >= r * ((i + 1) // r)[..., None])[:, None, None]               # (B, 1, 1, T, W)
        index = (near - c.base[:, None, None]).clamp(0, c.raw_k.shape[2] - 1).view(B, 1, T * W, 1)
        index = index.expand(-1, Hkv, -1, D)
        near_k = c.raw_k.gather(2, index).view(B, Hkv, T, W, D)
        near_v = c.raw_v.gather(2, index).view(B, Hkv, T, W, D)
        qg = q.view(B, Hkv, H // Hkv, T, D)
        scale = D ** -0.5
        far_logits = torch.einsum("bkgtd,bkmd->bkgtm", qg, comp_k).float() * scale
        near_logits = torch.einsum("bkgtd,bktwd->bkgtw", qg, near_k).float() * scale
        logits = torch.cat([far_logits.masked_fill(~seen, float("-inf")),
                            near_logits.masked_fill(~near_seen, float("-inf"))], -1)
        # a query with nothing to see (a pad before any real token) gives zeros instead of NaN
        weights = torch.softmax(logits, -1).nan_to_num(0.0)
        if self.keep_weights:
            self.weights = weights.detach().reshape(B, H, T, -1)
        weights = F.dropout(weights, self.dropout, self.training).to(c.raw_v.dtype)
        far, near = weights.split([comp_k.shape[2], W], -1)
        y = torch.einsum("bkgtm,bkmd->bkgtd", far, comp_v) + torch.einsum("bkgtw,bktwd->bkgtd", near, near_v)
        return y.reshape(B, H, T, D)


def _mean_pooling(conv: nn.Conv1d) -> nn.Conv1d:
    """Initialise a convolution (C -> C channels) as the mean over its kernel, channel by channel."""
    with torch.no_grad():
        C, _, r = conv.weight.shape
        conv.weight.zero_()
        conv.weight[torch.arange(C), torch.arange(C)] = 1.0 / r
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


def _place(old: Tensor, new: Tensor, slot: Tensor) -> Tensor:
    """old (B, Hkv, M, D) with new (B, Hkv, nb, D) written at slots (B, nb), growing to M + nb slots."""
    grown = torch.cat([old, old.new_zeros(*old.shape[:2], new.shape[2], old.shape[3])], 2)
    return grown.scatter(2, slot[:, None, :, None].expand(-1, old.shape[1], -1, old.shape[3]), new.to(old.dtype))
