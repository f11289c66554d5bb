"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers"): each head
learns how far back it looks through a soft ramp mask, and keys beyond the longest current span are neither
computed nor cached. The span computation gathers, per block of queries, only the keys the longest span can
reach (a sliding window of key blocks); decoding keeps only those keys (`WindowCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.kv_cache import WindowCache
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.sdpa import sdpa


@dataclass(frozen=True)
class SpanPlan:
    """How a forward groups its work: T queries in `n_blocks` blocks of `query_block`; each block gathers
    `keys_per_block` consecutive keys, ending at its last query's own key.

    Attributes:
        window: distances a query can see, 0..window-1: the longest span plus its ramp, capped at max_span.
        reach: keys before a block's first query that the block gathers: window - 1 rounded up to the block
            size, or fewer where the sequence has fewer.
        query_block: queries per block.
        n_blocks: blocks covering the queries.
    """

    window: int
    reach: int
    query_block: int
    n_blocks: int

    @property
    def keys_per_block(self) -> int:
        return self.reach + self.query_block


class AdaptiveSpanAttention(MultiHeadAttention):
    """Causal attention where head h sees a learned span z_h (Sukhbaatar et al. 2019, §3).

    The soft mask m(x) = clamp((R + z_h - x) / R, 0, 1) of the distance x = i - j (query minus key position)
    weights the attention as the paper does, a_ij = m(i-j) exp(s_ij) / sum_k m(i-k) exp(s_ik). We add log m
    to the logits instead (log 0 = -inf, stored as the dtype's most negative finite value, as `sdpa_mask` does):
    exp(s + log m) = m exp(s), so the softmax of the shifted logits is exactly the paper's renormalised form,
    and SDPA computes it. Keys at distance >= max_span are never seen (the paper's memory holds max_span keys).

    z_h = max_span * `span`[h], with `span` in [0, 1] (clamped after each optimizer step, as the paper does),
    initialised to `init_span` (0 in the paper's code: a span of only the ramp). The penalty is the paper's
    lambda / M * sum_h z_h per layer (§3.1; M heads), in training only. Keys further than the longest current
    span and its ramp, rounded up to `block` (the paper's code trims in steps of 64), are neither computed nor
    cached. Position biases (ALiBi) are evaluated on the gathered blocks only. The block is always causal (the
    paper's form); bidirectional attention and cross-attention are not supported.

    `keep_weights` takes a dense explicit path and keeps the exact span-masked weights a_ij above, (B, H, T, S)
    over the keys of the forward (a decoding step: the keys its `WindowCache` kept): zero beyond each head's span.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model. Each head learns its own span.
        place: where the block sits; given by the model.
        max_span: longest span S a head may learn, >= 1 (8192 in the paper's enwik8 models).
        ramp: length R of the soft ramp, >= 1 (32 in the paper).
        init_span: initial span as a fraction of max_span, in [0, 1].
        span_penalty: coefficient lambda of the span penalty, >= 0 (2e-6 in the paper's small models).
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(bidirectional=False, cross_attention=False, decoding="window")
    block: ClassVar[int] = 64        # queries per block and rounding step of the key window

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), max_span: int = 1024,
                 ramp: int = 32, init_span: float = 0.0, span_penalty: float = 2e-6, n_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if max_span < 1 or ramp < 1:
            raise ValueError(f"AdaptiveSpanAttention: max_span={max_span} and ramp={ramp} must be >= 1")
        if not 0.0 <= init_span <= 1.0:
            raise ValueError(f"AdaptiveSpanAttention: init_span={init_span}, must be in [0, 1]")
        if span_penalty < 0:
            raise ValueError(f"AdaptiveSpanAttention: span_penalty={span_penalty}, must be >= 0")
        self.max_span, self.ramp, self.span_penalty = max_span, ramp, span_penalty
        self.span = nn.Parameter(torch.full((n_heads,), float(init_span)))      # (H,) z_h / max_span

    def auxiliary_losses(self) -> dict[str, Tensor]:
        if not self.training or self.span_penalty == 0:
            return {}
        return {"span_penalty": self.span_penalty * self.max_span * self.span.mean()}

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.span.clamp_(0.0, 1.0)

    def new_state(self, max_len: int = 0) -> WindowCache:
        """Keeps the keys the current spans can reach; exact while the spans stay as they are (inference)."""
        return WindowCache(self.window() - 1)

    def window(self) -> int:
        """Distances any head can see now, 0..window-1: ceil(max_h R + z_h), capped at max_span. One host
        sync per forward, as in the paper's code: the shapes of the computation depend on it."""
        return min(max(1, math.ceil(float(self._reach().detach().max()))), self.max_span)

    def plan(self, n_queries: int, n_keys: int) -> SpanPlan:
        """The blocks a forward of T queries over S keys (the last key is the last query's own) computes."""
        window = self.window()
        # every key visible: one block over exactly the S keys, the dense computation
        query_block = n_queries if window >= n_keys else min(self.block, n_queries)
        n_blocks = -(-n_queries // query_block)
        # block b's first query is key b * query_block + (S - T); it needs at most window - 1 keys before it
        reach = min(-(-(window - 1) // self.block) * self.block, n_keys - n_queries + (n_blocks - 1) * query_block)
        return SpanPlan(window, reach, query_block, n_blocks)

    def _reach(self) -> Tensor:
        """(H,) R + z_h: a key at distance x gets a nonzero mask iff x < R + z_h."""
        return self.span * self.max_span + self.ramp

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """Causal span-masked attention; q (B, H, T, D), k and v (B, Hkv, S, D) whose last key is the last
        query's own (earlier keys: a `WindowCache`'s)."""
        mask = mask or AttentionMask(causal=True)
        if self.keep_weights:
            return self._attend_keeping_weights(q, k, v, mask)
        B, H, T, D = q.shape
        S = k.shape[2]
        plan = self.plan(T, S)
        Bq, n, K = plan.query_block, plan.n_blocks, plan.keys_per_block
        right = n * Bq - T                                     # query slots that fill the last block
        k_blocks, v_blocks = (_key_blocks(x, plan, S - T, right) for x in (k, v))   # (B n, Hkv, K, D) each
        q_blocks = F.pad(q, (0, 0, 0, right)).view(B, H, n, Bq, D).transpose(1, 2)   # (B, n, H, Bq, D)
        bias = self._block_bias(mask, plan, T, S, q.dtype, q.device)                 # (B or 1, n, H, Bq, K)
        # blocks fold into the batch: 4-D inputs take SDPA's fused kernels where the device has them
        out = sdpa(q_blocks.reshape(B * n, H, Bq, D), k_blocks, v_blocks,
                   attn_mask=bias.expand(B, -1, -1, -1, -1).reshape(B * n, H, Bq, K),
                   dropout_p=self.dropout if self.training else 0.0,
                   enable_gqa=self.n_kv_heads != self.n_heads)  # (B n, H, Bq, D)
        return out.view(B, n, H, Bq, D).transpose(1, 2).reshape(B, H, n * Bq, D)[:, :, :T]

    def _attend_keeping_weights(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
        """The dense form of `attend` (O(T S) memory), which keeps the weights: log m joins the position bias and
        the pairs with m = 0 or beyond max_span are masked out, so their weights are exactly 0."""
        T, S = q.shape[2], k.shape[2]
        key_start = mask.offset + T - S
        k_pos = torch.arange(key_start, key_start + S, device=q.device)
        distance = mask.query_positions(T, q.device)[:, None] - k_pos[None, :]                     # (T, S)
        ramp = ((self._reach()[:, None, None] - distance) / self.ramp).clamp(0.0, 1.0)          # (H, T, S)
        seen = (ramp > 0) & (distance >= 0) & (distance < self.max_span)
        # clamp_min keeps the gradient finite where m = 0 (those pairs are masked)
        log_m = ramp.clamp_min(torch.finfo(ramp.dtype).tiny).log()

        def bias(q_pos: Tensor, k_pos: Tensor) -> Tensor:
            return log_m if mask.bias is None else log_m + mask.bias(q_pos, k_pos).float()

        span_mask = AttentionMask(mask.causal, mask.key_mask, mask.offset, bias)
        dropout = self.dropout if self.training else 0.0
        return self._attend_explicitly(q, k, v, span_mask, dropout, key_start, seen)

    def _block_bias(self, mask: AttentionMask, plan: SpanPlan, T: int, S: int, dtype: torch.dtype,
                    device: torch.device) -> Tensor:
        """(B or 1, n, H, Bq, K) logits added in each block: log m plus the position bias, and the dtype's most
        negative value where a pair is not allowed (later key, m = 0, beyond max_span, padding, outside 0..S-1).
        Built at the smallest shape each term needs; only the last step has the full shape."""
        Bq, n, K, reach = plan.query_block, plan.n_blocks, plan.keys_per_block, plan.reach
        q_slot = torch.arange(Bq, device=device)
        k_slot = torch.arange(K, device=device)
        distance = q_slot[:, None] + reach - k_slot[None, :]           # (Bq, K), the same in every block
        ramp = ((self._reach()[:, None, None] - distance) / self.ramp).clamp(0.0, 1.0)          # (H, Bq, K)
        seen = (ramp > 0) & (distance >= 0) & (distance < self.max_span)                        # (H, Bq, K)
        # clamp_min keeps the gradient finite where m = 0 (those logits are replaced)
        logits = ramp.clamp_min(torch.finfo(ramp.dtype).tiny).log().masked_fill(~seen, torch.finfo(ramp.dtype).min)
        key_index = (S - T) + torch.arange(n, device=device)[:, None] * Bq + k_slot[None, :] - reach   # (n, K)
        k_start = mask.offset + T - S                                  # position of key 0
        if mask.bias is not None:
            # adding a bias to the most negative value leaves it there: biases are small next to it
            q_pos = mask.offset + torch.arange(n, device=device)[:, None] * Bq + q_slot            # (n, Bq)
            logits = logits + torch.vmap(mask.bias)(q_pos, k_start + key_index).float()     # (n, H, Bq, K)
        real = (key_index >= 0) & (key_index < S)                                                  # (n, K)
        if mask.key_mask is not None:
            padded = mask.key_mask.new_zeros(mask.key_mask.shape[0], reach + S + n * Bq - T)
            padded[:, reach:reach + S] = mask.key_mask[:, k_start:k_start + S]
            real = real & padded[:, S - T:].unfold(1, K, Bq).to(device)                         # (B, n, K)
        lowest = torch.finfo(dtype).min
        logits = logits.to(dtype).clamp_min(lowest)    # fp32's lowest overflows to -inf in half precision
        return torch.where(real[..., None, None, :], logits, lowest)


def _key_blocks(x: Tensor, plan: SpanPlan, first: int, right: int) -> Tensor:
    """(B, Hkv, S, D) keys or values -> (B n, Hkv, K, D): block b holds keys b * Bq + first - reach onwards
    (zeros where that runs off either end); `first` is the key index of the first query's own key."""
    padded = F.pad(x, (0, 0, plan.reach, right))[:, :, first:]          # (B, Hkv, reach + n Bq, D)
    blocks = padded.unfold(2, plan.keys_per_block, plan.query_block)   # (B, Hkv, n, D, K), a view
    return blocks.permute(0, 2, 1, 4, 3).flatten(0, 1)                 # (B n, Hkv, K, D)
