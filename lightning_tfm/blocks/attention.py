"""Multi-head attention (paper §3.2) and the contract every attention block keeps.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, computed by `torch.nn.functional.scaled_dot_product_attention`
so fused flash / memory-efficient kernels run where the device has them. Setting `keep_weights` on a block
switches it to the explicit path, which also stores the attention weights for inspection; the two paths
agree (tested). Grouped-query and multi-query attention (Ainslie et al. 2023; Shazeer 2019) share
`n_kv_heads` key/value heads among the `n_heads` query heads.

The efficient variants (`blocks/attention_variants/`) are siblings of `MultiHeadAttention`: they keep its
projections and replace `attend` (which keys a query sees, and how) and `new_state` (what decoding keeps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.kv_cache import DecodingState, KVCache, MemoryCache
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import apply_rotary
from lightning_tfm.blocks.sdpa import sdpa


@dataclass(frozen=True)
class LayerPlace:
    """Where an attention block sits, told to it by the model that builds it.

    Attributes:
        index: the layer's index in its stack, from 0.
        n_layers: layers in the stack.
        causal: whether the stack is causal (a decoder's self-attention).
        cross: whether the block attends to another sequence (a decoder's cross-attention).
        max_len: the longest sequence the model accepts.
    """

    index: int = 0
    n_layers: int = 1
    causal: bool = False
    cross: bool = False
    max_len: int = 4096


@dataclass(frozen=True)
class Supports:
    """What an attention block can do; a model refuses, at construction, a combination its blocks cannot do.

    Attributes:
        causal: attend only to earlier positions (decoders).
        bidirectional: attend to every position (encoders).
        cross_attention: attend to another sequence (an encoder's output).
        padding: honour a key padding mask.
        rotary: rotary position embeddings (queries and keys rotated before attending).
        position_bias: a position bias on the logits (ALiBi).
        weights: keep the attention weights for inspection (`keep_weights`).
        decoding: how it decodes incrementally: "kv_cache" (keys and values of every earlier position),
            "window" (only the last keys and values it can still see), "recurrent" (a fixed-size state), or
            "none" (it cannot decode step by step).
        shared_memory: in cross-attention, g consecutive query rows (a sentence's beams) can read one row of
            the context and of its decoding state: x (B g, T, C) against context (B, S, C) and a (B, S) key
            mask. Off unless a block says so; a model then copies the encoder side once per row.
    """

    causal: bool = True
    bidirectional: bool = True
    cross_attention: bool = True
    padding: bool = True
    rotary: bool = True
    position_bias: bool = True
    weights: bool = True
    decoding: Literal["kv_cache", "window", "recurrent", "none"] = "kv_cache"
    shared_memory: bool = False


class Attention(nn.Module):
    """Base of the attention blocks; a model builds one per layer from a factory
    `(d_model, n_heads, place) -> Attention` (a class, or a class with its other arguments set in YAML).

    The forward contract: `forward(x, context=None, mask=None, state=None, rotary=None) -> (B, T, C)`.
    Self-attention when `context` is None, cross-attention to `context` (B, S, C) otherwise (or to fewer rows,
    each serving a group of rows of x, if `supports.shared_memory`). A block also
    says what it supports (`supports`), what it keeps while decoding (`new_state`), which of its projections
    write into the residual stream (`residual_projections`, for scaled initialisation), the auxiliary losses
    it adds in training (`auxiliary_losses`) and what it updates once per optimizer step
    (`after_optimizer_step`).

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits (layer index, causal stack or not, maximum length); given by the model.
        n_kv_heads: key/value heads for grouped-query (1 < n_kv_heads < n_heads) or multi-query (1)
            attention; must divide n_heads. None means n_heads (plain multi-head attention).
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports()

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"{name}: d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"{name}: n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout={dropout}, must be in [0, 1)")
        self.d_model, self.n_heads, self.n_kv_heads, self.place = d_model, n_heads, n_kv_heads, place
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.keep_weights = False          # set True to take the explicit path and keep `weights`
        self.weights: Tensor | None = None  # (B, H, T, S) from the last forward with keep_weights

    def new_state(self, max_len: int = 0) -> DecodingState:
        """An empty decoding state: the keys and values of earlier steps (self-attention, preallocated for
        max_len positions) or the projected encoder output (cross-attention)."""
        return MemoryCache() if self.place.cross else KVCache(max_len)

    def residual_projections(self) -> list[nn.Linear]:
        """The linear layers whose output is added to the residual stream (GPT-2 scales their init)."""
        return []

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Losses this block adds to the training loss, by name (summed over the layers that share a name)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Update run once per optimizer step, after the weights change (not per micro-batch)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """softmax(q k^T / sqrt(D) + bias) v over the allowed keys; q (B, H, T, D), k and v (B, Hkv, S, D),
        keys at positions 0..S-1."""
        mask = mask or AttentionMask()
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights:
            return self._attend_explicitly(q, k, v, mask, dropout)
        attn_mask, is_causal = mask.sdpa_mask(q.shape[2], k.shape[2], q.dtype, q.device)
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal,
                    enable_gqa=self.n_kv_heads != self.n_heads)

    def _attend_explicitly(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, dropout: float,
                           key_start: int = 0, pattern: Tensor | None = None) -> Tensor:
        """The written-out computation, softmax in fp32: keys at positions key_start.., and `pattern` (T, S), if
        given, restricting the pairs further (a sparse variant's). Keeps the weights when `keep_weights` is set."""
        T, S = q.shape[2], k.shape[2]
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # (B, H, S, D)
        logits = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5              # (B, H, T, S)
        bias = mask.bias_logits(T, S, q.device, key_start)
        if bias is not None:
            logits = logits + bias.float()
        allowed = mask.allowed(T, S, q.device, key_start)
        if pattern is not None:
            allowed = pattern if allowed is None else allowed & pattern               # (B or 1, 1, T, S)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        # rows with no allowed key give zeros, as SDPA does, instead of NaN
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        if self.keep_weights:
            self.weights = weights.detach()
        return F.dropout(weights, dropout, self.training).to(v.dtype) @ v              # (B, H, T, D)


class MultiHeadAttention(Attention):
    """Multi-head attention with one fused projection for queries, keys and values.

    Self-attention projects x once into q, k and v. Cross-attention projects queries from x and keys and
    values from `context` with the two slices of the same weight, so both uses share one parameter layout.
    A context with fewer rows than x serves consecutive groups of rows (`Supports.shared_memory`): the g
    beams of a sentence become g T queries on its keys, which are projected and kept once, not g times.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(shared_memory=True)

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        self.q_width = n_heads * self.head_dim
        self.qkv = nn.Linear(d_model, self.q_width + 2 * self.n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(self.q_width, d_model, bias=bias)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.out]

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) queries' inputs.
            context: (B', S, C) keys' and values' inputs for cross-attention, B' = B or B' dividing B (each row
                then serves B / B' consecutive rows of x); None for self-attention.
            mask: which keys each query sees (a (B', S) key mask in cross-attention); None for all.
            state: this block's decoding state (`new_state`): earlier keys and values, or the projected memory.
            rotary: (cos, sin) (T, D) of the query positions, for rotary position embeddings.
        Returns:
            (B, T, C).
        """
        B, T, _ = x.shape
        if context is None:
            q, k, v = self._split(self.qkv(x), B, T)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if state is not None:
                k, v = state.append(k, v)                                     # (B, Hkv, L + T, D)
        else:
            q, k, v = self._cross(x, context, state)                           # q (B', H, B / B' T, D)
        y = self.attend(q, k, v, mask)                                            # (B or B', H, T or B / B' T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

    def _cross(self, x: Tensor, context: Tensor, state: DecodingState | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from x (B, T, C), keys and values from context (B', S, C) or from the state that kept them.
        Cross-attention sees no positions or causality, so the B / B' rows sharing a context row can be one
        longer query sequence: x (B, T, C) -> (B', B / B' T, C), a free view."""
        B, T, C = x.shape
        rows = context.shape[0]
        if B % rows:
            raise ValueError(f"{type(self).__name__}: {B} query rows cannot share a context of {rows} rows; "
                             f"the context needs one row per query row or per group of rows")
        x = x.reshape(rows, B // rows * T, C)                                     # (B', g T, C)
        q = self._heads(project_rows(self.qkv, x, 0, self.q_width), rows, x.shape[1], self.n_heads)
        if state is not None and state.k is not None:
            return q, state.k, state.v
        kv = project_rows(self.qkv, context, self.q_width, None)
        k, v = self._heads(kv, rows, context.shape[1], 2 * self.n_kv_heads).chunk(2, dim=1)   # (B', Hkv, S, D)
        if state is not None:
            state.store(k, v)
        return q, k, v

    def _split(self, qkv: Tensor, B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
        heads = self._heads(qkv, B, T, self.n_heads + 2 * self.n_kv_heads)       # (B, H + 2Hkv, T, D)
        return heads.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)

    def _heads(self, x: Tensor, B: int, T: int, n: int) -> Tensor:
        return x.view(B, T, n, self.head_dim).transpose(1, 2)                    # (B, T, n D) -> (B, n, T, D)


def project_rows(layer: nn.Linear, x: Tensor, start: int, end: int | None) -> Tensor:
    """Output features start:end of a linear layer, without computing the others. A layer that adapts its
    weight (`LoRALinear`) provides `rows` itself."""
    rows = getattr(layer, "rows", None)
    if rows is not None:
        return rows(x, start, end)
    return F.linear(x, layer.weight[start:end], None if layer.bias is None else layer.bias[start:end])
