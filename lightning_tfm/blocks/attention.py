"""Multi-head attention (paper §3.2) and the contract every attention block keeps.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, computed by `torch.nn.functional.scaled_dot_product_attention`
so fused flash / memory-efficient kernels run where the device has them. Setting `keep_weights` on a block
switches it to the explicit path, which also stores the attention weights for inspection; the two paths
agree (tested). Grouped-query and multi-query attention (Ainslie et al. 2023; Shazeer 2019) share
`n_kv_heads` key/value heads among the `n_heads` query heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.kv_cache import KVCache
from lightning_tfm.blocks.positions import apply_rotary


@dataclass
class AttentionMask:
    """Which keys each query may see, built once per forward by the model and shared by its layers.

    Attributes:
        allowed: bool, broadcastable to (B, H, T, S); True = may attend. None: every key.
        is_causal: query i sees keys 0..i only, with T == S and `allowed` None (the fused kernels' fast path).
        bias: (H, T, S) float logits added before the softmax (ALiBi); None: no bias.
    """

    allowed: Tensor | None = None
    is_causal: bool = False
    bias: Tensor | None = None


def make_mask(key_mask: Tensor | None, n_queries: int, n_keys: int, causal: bool,
              bias: Tensor | None = None) -> AttentionMask:
    """Build the mask for queries at the last `n_queries` of `n_keys` positions.

    Args:
        key_mask: (B, S) bool, True for real tokens and False for padding; None if nothing is padded.
        n_queries: T.
        n_keys: S (T plus the cached positions).
        causal: whether a query may not see later keys.
        bias: (H, T, S) additive logits (ALiBi), or None.
    """
    device = key_mask.device if key_mask is not None else None
    if key_mask is not None and bool(key_mask[:, :n_keys].all()):
        key_mask = None       # nothing padded: no mask, so SDPA may take its causal (flash) kernels
    if causal and key_mask is None and bias is None and n_queries == n_keys and n_queries > 1:
        return AttentionMask(is_causal=True)
    allowed = None
    if causal and n_queries > 1:
        # bottom-right aligned: with S - T cached positions, query i sees keys 0 .. S - T + i
        allowed = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(n_keys - n_queries)  # (T, S)
        if bias is not None:
            allowed = allowed.to(bias.device)
    if key_mask is not None:
        keys = key_mask[:, None, None, :n_keys].bool()                                 # (B, 1, 1, S)
        allowed = keys if allowed is None else keys & allowed                        # (B, 1, T, S)
    return AttentionMask(allowed=allowed, bias=bias)


class Attention(nn.Module):
    """Base of the attention blocks; a model builds one per layer from a factory `(d_model, n_heads) -> Attention`.

    The forward contract: `forward(x, context=None, mask=None, cache=None, rotary=None) -> (B, T, C)`.
    Self-attention when `context` is None, cross-attention to `context` (B, S, C) otherwise.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        n_kv_heads: key/value heads for grouped-query (1 < n_kv_heads < n_heads) or multi-query (1)
            attention; must divide n_heads. None means n_heads (plain multi-head attention).
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__()
        name = type(self).__name__
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"{name}: d_model={d_model} is not divisible by n_heads={n_heads}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"{name}: n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{name}: dropout={dropout}, must be in [0, 1)")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.keep_weights = False          # set True to take the explicit path and keep `weights`
        self.weights: Tensor | None = None  # (B, H, T, S) from the last forward with keep_weights

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """softmax(q k^T / sqrt(D) + bias) v over the allowed keys; q (B, H, T, D), k and v (B, Hkv, S, D)."""
        mask = mask or AttentionMask()
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights:
            return self._attend_explicitly(q, k, v, mask, dropout)
        attn_mask = mask.allowed
        if mask.bias is not None:
            attn_mask = _with_bias(mask, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                              is_causal=mask.is_causal,
                                              enable_gqa=self.n_kv_heads != self.n_heads)

    def _attend_explicitly(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask,
                           dropout: float) -> Tensor:
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)   # (B, H, S, D)
        logits = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5                      # (B, H, T, S)
        if mask.bias is not None:
            logits = logits + mask.bias.to(logits.dtype)
        allowed = mask.allowed
        if mask.is_causal:
            allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        # rows with no allowed key give zeros, as SDPA does, instead of NaN
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        self.weights = weights.detach()
        return F.dropout(weights, dropout, self.training) @ v                           # (B, H, T, D)


def _with_bias(mask: AttentionMask, dtype: torch.dtype) -> Tensor:
    """Fold the boolean mask into the additive bias with the dtype's most negative finite value, so a row
    with no allowed key stays finite in half precision."""
    bias = mask.bias.to(dtype)
    if mask.is_causal:
        T, S = bias.shape[-2:]
        allowed = torch.ones(T, S, dtype=torch.bool, device=bias.device).tril(S - T)
    else:
        allowed = mask.allowed
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class MultiHeadAttention(Attention):
    """Multi-head attention with one fused projection for queries, keys and values.

    Self-attention projects x once into q, k and v. Cross-attention projects queries from x and keys and
    values from `context` with the two slices of the same weight, so both uses share one parameter layout.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__(d_model, n_heads, n_kv_heads, dropout, bias)
        self.q_width = n_heads * self.head_dim
        self.qkv = nn.Linear(d_model, self.q_width + 2 * self.n_kv_heads * self.head_dim, bias=bias)
        self.out = nn.Linear(self.q_width, d_model, bias=bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                cache: KVCache | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) queries' inputs.
            context: (B, S, C) keys' and values' inputs for cross-attention; None for self-attention.
            mask: which keys each query sees; None for all.
            cache: keys and values of earlier steps (self-attention) or of the encoder output (cross).
            rotary: (cos, sin) (T, D) of the query positions, for rotary position embeddings.
        Returns:
            (B, T, C).
        """
        B, T, _ = x.shape
        if context is None:
            q, k, v = self._split(self.qkv(x), B, T)
            if rotary is not None:
                q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
            if cache is not None:
                k, v = cache.append(k, v)                                     # (B, Hkv, L + T, D)
        else:
            q = self._heads(project_rows(self.qkv, x, 0, self.q_width), B, T, self.n_heads)
            if cache is not None and cache.filled:
                k, v = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
            else:
                kv = project_rows(self.qkv, context, self.q_width, None)
                k, v = self._heads(kv, B, context.shape[1], 2 * self.n_kv_heads).chunk(2, dim=1)
                if cache is not None:
                    k, v = cache.append(k, v)
        y = self.attend(q, k, v, mask)                                            # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

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
