"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"): keys and values are
projected along the sequence to a fixed length k by learned matrices, so attention costs O(T k) instead of
O(T^2). Bidirectional self-attention only: every projected slot mixes all positions, future ones included."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.kv_cache import DecodingState
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.sdpa import sdpa


class LinformerAttention(MultiHeadAttention):
    """softmax(q (E k)^T / sqrt(D)) (F v) with E, F of shape (k, max_len) (paper §4, eq. 7).

    `place.max_len` (the model's longest sequence) sets E's and F's columns; a shorter sequence of S positions
    uses the first S. One E and one F per layer, shared by all heads (the paper's headwise sharing); `share_kv`
    uses E for the values too (key-value sharing). Pads' keys and values are zeroed before the projection, so
    right padding changes no real token's output (left padding moves tokens to other columns and does).

    Initialisation: E, F ~ N(0, 1/k), the random projection of the paper's Theorem 1 (a Johnson-Lindenstrauss
    map, roughly preserving each key channel's norm over the sequence); the authors' fairseq code draws them
    Xavier-uniform instead.

    Not causal, no cross-attention, no incremental decoding, no rotary positions or position bias (the
    projection mixes positions, so rotary's relative form would not survive it): a model refuses those
    combinations at construction, naming this class.

    `keep_weights` keeps the token-level matrix A = P F, (B, H, T, S): P (T, k) the softmax over the projected
    keys, F (k, S) the value projection (E when `share_kv`) with pads' columns zeroed, so out = A V exactly. Its
    rows need not sum to 1 and its entries can be negative: F is any real matrix.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model (its max_len sizes E and F).
        projected_len: k, the projected length of keys and values, >= 1 (256 in the paper's main runs).
        share_kv: use one projection E for keys and values.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(causal=False, cross_attention=False, rotary=False, position_bias=False,
                                            decoding="none")

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), projected_len: int = 256,
                 share_kv: bool = False, n_kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if projected_len < 1:
            raise ValueError(f"LinformerAttention: projected_len={projected_len}, must be >= 1")
        self.projected_len, self.share_kv = projected_len, share_kv
        std = projected_len ** -0.5
        self.project_k = nn.Parameter(torch.randn(projected_len, place.max_len) * std)           # E (k, max_len)
        self.project_v = None if share_kv else nn.Parameter(torch.randn(projected_len, place.max_len) * std)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) inputs, T <= place.max_len.
            context: must be None (no cross-attention).
            mask: padding; must not be causal.
            state: must be None (no incremental decoding).
            rotary: must be None (no rotary positions).
        Returns:
            (B, T, C).
        """
        if context is not None or state is not None or rotary is not None:
            raise ValueError("LinformerAttention does bidirectional self-attention only: no cross-attention, "
                             "incremental decoding or rotary positions")
        return super().forward(x, mask=mask)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """softmax(q (E k)^T / sqrt(D)) (F v); q (B, H, T, D), k and v (B, Hkv, S, D) at positions 0..S-1."""
        mask = mask or AttentionMask()
        S = k.shape[2]
        if mask.causal:
            raise ValueError("LinformerAttention cannot attend causally (supports.causal is False)")
        if S > self.place.max_len:
            raise ValueError(f"LinformerAttention: a sequence of {S} positions is longer than max_len="
                             f"{self.place.max_len}, the columns of its projections E and F")
        if mask.key_mask is not None:
            real = mask.key_mask[:, None, :S, None].to(k.device)                       # (B, 1, S, 1)
            k, v = k.masked_fill(~real, 0.0), v.masked_fill(~real, 0.0)
        project_v = self.project_k if self.project_v is None else self.project_v
        k = torch.einsum("ps,bhsd->bhpd", self.project_k[:, :S], k)                      # (B, Hkv, k, D)
        v = torch.einsum("ps,bhsd->bhpd", project_v[:, :S], v)
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights:
            return self._attend_keeping_weights(q, k, v, project_v[:, :S], mask.key_mask, dropout)
        return sdpa(q, k, v, dropout_p=dropout, enable_gqa=self.n_kv_heads != self.n_heads)

    def _attend_keeping_weights(self, q: Tensor, k: Tensor, v: Tensor, project_v: Tensor, key_mask: Tensor | None,
                                dropout: float) -> Tensor:
        """The explicit softmax over the projected keys k, v (B, Hkv, k, D), keeping A = P F (B, H, T, S) with F
        (k, S) the value projection; pads' columns are 0, as their values were zeroed."""
        y = self._attend_explicitly(q, k, v, AttentionMask(), dropout)                     # keeps P (B, H, T, k)
        project_v = project_v.detach().float()[None, None]                                 # (1, 1, k, S)
        if key_mask is not None:
            project_v = project_v * key_mask[:, None, None, :project_v.shape[-1]].to(project_v.device)  # (B, 1, k, S)
        self.weights = self.weights @ project_v                                           # (B, H, T, S)
        return y
