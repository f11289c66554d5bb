"""Poolingformer (Zhang et al. 2021, "Poolingformer: Long Document Modeling with Pooling Attention"): a two-level
attention. The first level is a sliding window; the second attends, from the first level's output, to keys and
values pooled over a larger window. Both levels gather key blocks per block of queries (as adaptive_span.py
does), so memory grows as T (window + block) and T (pool_window / pool + block), never T^2."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.kv_cache import DecodingState
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import apply_rotary

Pooling = Literal["mean", "max"]


class PoolingformerAttention(MultiHeadAttention):
    """Sliding-window attention followed by pooling attention over a wider window, added: out = y + z.

    Level 1 (the inherited projections): y = Attn(x W_q, x W_k, x W_v) W_o where query i sees the real keys j
    with |i - j| <= `window`. Level 2 (its own projections `pool_qkv`, `pool_out`) reads y: the keys and values
    y W_k2, y W_v2 are pooled over consecutive, non-overlapping slots of `pool` positions (slot p holds
    positions p*pool .. p*pool + pool - 1, counted from the first position of the input), and
    z = Attn(y W_q2, pooled keys, pooled values) W_o2 where query i sees the slots holding a position within
    `pool_window` of it. The model's layer adds the residual x around y + z.

    Padding: pads are no key at level 1, count in no pooled slot (mean or max over the slot's real positions),
    and a slot of pads only is no key at level 2. Right padding therefore leaves the real outputs unchanged.
    Left padding does not: slots start at absolute positions, so shifting the tokens regroups them.

    What is ours, not the paper's (reconstructed from its description, not its code): slots with kernel =
    stride (the paper studies kernels and strides that differ, overlapping pools, and convolutional pooling);
    the level-2 window includes level 1's; the levels combine as y + z with y already through W_o (the paper
    adds its two levels' outputs; where exactly its output projections sit is our choice). Rotary positions
    rotate level 1's queries and keys only (a pooled slot has no single position; level 2 is located by its
    window). No ALiBi, no causal form, no cross-attention, no incremental decoding.

    `keep_weights` keeps (A1 + A2')/2, (B, H, T, S): A1 the level-1 window weights, A2' the level-2 weights of
    each pooled slot spread evenly over its real positions (for max pooling too). Equal shares of the two levels
    (out = y + z adds them): a picture of where each query reads, not an exact decomposition of the output
    (level 2 reads y, not x). Rows sum to 1; zero outside what the two windows reach, and at pads.

    Limits (tested): with window >= T - 1, y is `MultiHeadAttention` with the same qkv/out weights; with also
    pool = 1 and pool_window >= T - 1, z is full attention over y with the level-2 weights.

    Cost: O(T (2 window + block) D) for level 1 and O(T (2 pool_window / pool + block) D) for level 2.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        window: level-1 keys on each side of a query, >= 0.
        pool_window: level-2 reach on each side of a query, in positions, >= 0.
        pool: positions per pooled slot (kernel and stride), >= 1.
        pooling: "mean" or "max" over a slot's real positions.
        n_kv_heads: key/value heads (grouped- or multi-query attention) of both levels; None means n_heads.
        dropout: dropout on both levels' attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(causal=False, cross_attention=False, position_bias=False, decoding="none")
    block: ClassVar[int] = 64        # queries per block (level 2: rounded to a multiple of `pool`)

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), window: int = 128,
                 pool_window: int = 512, pool: int = 4, pooling: Pooling = "mean", n_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if window < 0 or pool_window < 0:
            raise ValueError(f"PoolingformerAttention: window={window} and pool_window={pool_window} must be >= 0")
        if pool < 1:
            raise ValueError(f"PoolingformerAttention: pool={pool}, must be >= 1")
        if pooling not in ("mean", "max"):
            raise ValueError(f"PoolingformerAttention: pooling={pooling!r}, must be 'mean' or 'max'")
        self.window, self.pool_window, self.pool, self.pooling = window, pool_window, pool, pooling
        self.pool_qkv = nn.Linear(d_model, self.qkv.out_features, bias=bias)
        self.pool_out = nn.Linear(self.q_width, d_model, bias=bias)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out, self.pool_out]

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) the sequence.
            context: must be None (no cross-attention).
            mask: which tokens are real (`key_mask`); not causal, no position bias.
            state: must be None (no incremental decoding).
            rotary: (cos, sin) (T, D) for level 1's queries and keys, or None.
        Returns:
            (B, T, C).
        """
        mask = mask or AttentionMask()
        self._check(context, mask, state)
        B, T, _ = x.shape
        q, k, v = self._split(self.qkv(x), B, T)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = self.out(self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, self.q_width))     # level 1
        level_1 = self.weights                                                                 # if kept
        q, k, v = self._split(self.pool_qkv(y), B, T)
        real = mask.key_mask if mask.key_mask is not None else x.new_ones(B, T, dtype=torch.bool)
        z = self.pooled_attention(q, k, v, real)                                               # level 2
        if self.keep_weights:
            self.weights = (level_1 + self.weights) / 2
        return y + self.pool_out(z.transpose(1, 2).reshape(B, T, self.q_width))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """Level 1: query i sees the real keys j with |i - j| <= window; q (B, H, T, D), k, v (B, Hkv, T, D)."""
        mask = mask or AttentionMask()
        B, T = q.shape[0], q.shape[2]
        reach = min(self.window, T - 1)
        query_block = min(self.block, T)
        t = torch.arange(query_block, device=q.device)[:, None]
        r = torch.arange(query_block + 2 * reach, device=q.device)[None, :]      # key b*Bq - reach + r
        pattern = (r >= t) & (r <= t + 2 * reach)                                  # (Bq, K): |i - j| <= reach
        real = mask.key_mask if mask.key_mask is not None else q.new_ones(B, T, dtype=torch.bool)
        return self._banded(q, k, v, real, pattern, query_block, query_block, reach)   # kept weights: (B, H, T, T)

    def pooled_attention(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor) -> Tensor:
        """Level 2: query i sees the pooled slots p with (i - pool_window) // pool <= p <= (i + pool_window) //
        pool that hold a real position; q (B, H, T, D), k, v (B, Hkv, T, D), real (B, T) -> (B, H, T, D)."""
        T, s = q.shape[2], self.pool
        k, slot_real = _pool(k, real, s, self.pooling)                             # (B, Hkv, P, D), (B, P)
        v, _ = _pool(v, real, s, self.pooling)
        reach = min(self.pool_window, T - 1)
        query_block = s * min(max(1, self.block // s), -(-T // s))                 # slot-aligned blocks
        left = -(-reach // s)                                                      # slots before a block's own
        t = torch.arange(query_block, device=q.device)[:, None]
        r = torch.arange(left + (query_block - 1 + reach) // s + 1, device=q.device)[None, :] - left
        pattern = ((t - reach) // s <= r) & (r <= (t + reach) // s)               # (Bq, K), r relative to block
        out = self._banded(q, k, v, slot_real, pattern, query_block, query_block // s, left)
        if self.keep_weights:     # (B, H, T, P) -> (B, H, T, T): each slot's weight shared by its real positions
            members = F.pad(real.float(), (0, -T % s)).view(real.shape[0], -1, s)                 # (B, P, s)
            share = members / members.sum(-1, keepdim=True).clamp_min(1)
            self.weights = (self.weights[..., None] * share[:, None, None]).flatten(-2)[..., :T]
        return out

    def _banded(self, q: Tensor, k: Tensor, v: Tensor, key_real: Tensor, pattern: Tensor, query_block: int,
                key_step: int, left: int) -> Tensor:
        """Attention where query block b (queries b Bq ..) sees keys b key_step - left + r for r < K as `pattern`
        (Bq, K) allows, and only real keys; q (B, H, T, D), k, v (B, Hkv, N, D), key_real (B, N) -> (B, H, T, D).
        The block's key slices are views (unfold); softmax in fp32."""
        B, H, T, D = q.shape
        N, K = k.shape[2], pattern.shape[1]
        n = -(-T // query_block)
        right = max(0, (n - 1) * key_step + K - left - N)

        def blocks(x: Tensor) -> Tensor:                                         # (B, Hkv, N, D) -> (B n, Hkv, K, D)
            x = F.pad(x, (0, 0, left, right)).unfold(2, K, key_step)[:, :, :n]  # (B, Hkv, n, D, K)
            return x.permute(0, 2, 1, 4, 3).flatten(0, 1)

        valid = F.pad(key_real.to(torch.uint8), (left, right)).unfold(1, K, key_step)[:, :n].bool()  # (B, n, K)
        allowed = pattern & valid.flatten(0, 1)[:, None, :]                       # (B n, Bq, K)
        q = F.pad(q, (0, 0, 0, n * query_block - T)).view(B, H, n, query_block, D).transpose(1, 2).flatten(0, 1)
        dropout = self.dropout if self.training else 0.0
        out = self._attend_explicitly(q, blocks(k), blocks(v), AttentionMask(), dropout, pattern=allowed[:, None])
        if self.keep_weights:
            self.weights = _unbanded(self.weights, B, key_step, left, T, N)
        return out.view(B, n, H, query_block, D).transpose(1, 2).reshape(B, H, n * query_block, D)[:, :, :T]

    def _check(self, context: Tensor | None, mask: AttentionMask, state: DecodingState | None) -> None:
        name = type(self).__name__
        if context is not None or state is not None:
            raise ValueError(f"{name} is self-attention over a whole sequence: no cross-attention, no decoding")
        if mask.causal or mask.bias is not None:
            raise ValueError(f"{name} is bidirectional and takes no position bias (supports.causal and "
                             "supports.position_bias are False)")


def _unbanded(weights: Tensor, B: int, key_step: int, left: int, T: int, N: int) -> Tensor:
    """The weights of `_banded`'s blocks (B n, H, Bq, K), block b's key r being key b key_step - left + r, as
    (B, H, T, N) over all keys (zeros where a block gathered nothing)."""
    _, H, Bq, K = weights.shape
    n = weights.shape[0] // B
    weights = weights.view(B, n, H, Bq, K)
    key = torch.arange(n, device=weights.device)[:, None] * key_step + torch.arange(K, device=weights.device)  # (n, K)
    full = weights.new_zeros(B, n, H, Bq, max((n - 1) * key_step + K, left + N))    # keys from -left on
    full.scatter_(-1, key[None, :, None, None].expand_as(weights), weights)
    full = full.transpose(1, 2).reshape(B, H, n * Bq, -1)                  # (B, H, n Bq, keys from -left)
    return full[:, :, :T, left:left + N]


def _pool(x: Tensor, real: Tensor, pool: int, pooling: Pooling) -> tuple[Tensor, Tensor]:
    """(B, Hkv, T, D) -> (B, Hkv, P, D) mean or max over each slot's real positions (zeros in a slot of pads
    only), and (B, P) whether a slot holds a real position; P = ceil(T / pool), the last slot maybe shorter."""
    B, Hkv, T, D = x.shape
    P = -(-T // pool)
    slots = F.pad(x, (0, 0, 0, P * pool - T)).view(B, Hkv, P, pool, D)
    members = F.pad(real.to(torch.uint8), (0, P * pool - T)).view(B, 1, P, pool, 1).bool()
    count = members.sum(3)                                                       # (B, 1, P, 1)
    if pooling == "mean":     # sums in fp32
        pooled = (slots.float() * members).sum(3) / count.clamp_min(1)
    else:
        pooled = slots.masked_fill(~members, float("-inf")).amax(3).masked_fill(count == 0, 0.0)
    return pooled.to(x.dtype), count[:, 0, :, 0] > 0
