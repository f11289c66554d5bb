"""Inducing-point attention (Lee et al. 2019, "Set Transformer", §3.2, ISAB): m learned inducing points attend to
the sequence and summarise it in m vectors H; every token then attends to H. Two attentions of T x m each:
O(T m) time and memory instead of O(T^2)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports, project_rows
from lightning_tfm.blocks.kv_cache import DecodingState
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.norms import LayerNorm


class InducingPointAttention(MultiHeadAttention):
    """ISAB_m(X) = MAB(X, H), H = MAB(I, X), with I the m learned inducing points (Lee et al. 2019, eq. 9-10).

    The first MAB is computed here in full, as the paper writes it (eq. 6-7):
    H0 = LayerNorm(I + Attn(I W_q, X W_k, X W_v)) and H = LayerNorm(H0 + rFF(H0)), with the row-wise
    feed-forward rFF(h) = relu(h W_f + b_f) of the authors' code and its multi-head output taken as the
    concatenated heads (no output projection before the residual, as in that code). Pads are no key; a row with
    no real token gives H from I alone. The second MAB's attention is this block's output,
    out = Attn(X W_q, H W_hk, H W_hv) W_o (every token sees all m slots of H); its residual, LayerNorm and
    rFF are the ones the model's layer already wraps around any attention block, so they are not repeated here.

    Projections: the inherited fused projection gives the tokens' queries (second attention) and keys and
    values (first attention); its query slice also projects the inducing points (the paper gives each MAB
    its own query projection; sharing it ties the two query spaces, which I, being free, can adapt to);
    `summary_kv` projects H to the second attention's keys and values. Softmax in fp32.

    The block has no positions: with padding on either side the real tokens' outputs are unchanged. It is
    bidirectional self-attention only: no causal form (H mixes every token), no cross-attention, no rotary
    positions or position bias, no incremental decoding.

    `keep_weights` keeps the composition A2 A1, (B, H, T, S): A2 (T, m) the tokens' weights over the slots of H
    (per head), A1 (m, S) the inducing points' weights over the tokens, averaged over heads since every slot of H
    concatenates all heads' summaries. Rows sum to 1 and pads get 0; it shows the routing through the m slots,
    not an exact decomposition of the output (H passes through LayerNorm and rFF).

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        n_inducing: inducing points m, >= 1 (the paper's experiments use 16 or 32).
        n_kv_heads: key/value heads (grouped- or multi-query attention) of both attentions; None means n_heads.
        dropout: dropout on both attentions' weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(causal=False, cross_attention=False, rotary=False, position_bias=False,
                                            decoding="none")

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_inducing: int = 32,
                 n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if n_inducing < 1:
            raise ValueError(f"InducingPointAttention: n_inducing={n_inducing}, must be >= 1")
        self.n_inducing = n_inducing
        # unit scale, like the normalised tokens they attend over
        self.inducing_points = nn.Parameter(torch.randn(n_inducing, d_model))                  # (m, C)
        self.summary_norm = LayerNorm(d_model)
        self.summary_ff = nn.Linear(d_model, d_model, bias=bias)
        self.summary_ff_norm = LayerNorm(d_model)
        self.summary_kv = nn.Linear(d_model, 2 * self.n_kv_heads * self.head_dim, bias=bias)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) the sequence.
            context: must be None (no cross-attention).
            mask: which tokens are real (`key_mask`); not causal, no position bias.
            state: must be None (no incremental decoding).
            rotary: must be None (the inducing points have no position).
        Returns:
            (B, T, C).
        """
        mask = mask or AttentionMask()
        self._check(context, mask, state, rotary)
        B, T, _ = x.shape
        q, k, v = self._split(self.qkv(x), B, T)                                     # (B, H or Hkv, T, D)
        h = self.summarise(k, v, mask.key_mask)                                      # (B, m, C)
        to_slots = self.weights                                                      # A1 (B, H, m, S) if kept
        kv = self._heads(self.summary_kv(h), B, self.n_inducing, 2 * self.n_kv_heads)
        h_k, h_v = kv.chunk(2, dim=1)                                                # (B, Hkv, m, D) each
        y = self._attend_explicitly(q, h_k, h_v, AttentionMask(), self._dropout())   # (B, H, T, D)
        if self.keep_weights:    # A2 (B, H, T, m) @ head-averaged A1 (B, 1, m, S)
            self.weights = self.weights @ to_slots.mean(1, keepdim=True)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

    def summarise(self, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
        """H = MAB(I, X): the inducing points attend to the real tokens' keys and values (B, Hkv, T, D) ->
        (B, m, C)."""
        B, m = k.shape[0], self.n_inducing
        q = self._heads(project_rows(self.qkv, self.inducing_points, 0, self.q_width), 1, m, self.n_heads)
        a = self._attend_explicitly(q.expand(B, -1, -1, -1), k, v, AttentionMask(key_mask=key_mask),
                                    self._dropout())                                 # (B, H, m, D)
        h = self.summary_norm(self.inducing_points + a.transpose(1, 2).reshape(B, m, self.q_width))
        return self.summary_ff_norm(h + F.relu(self.summary_ff(h)))

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def _check(self, context: Tensor | None, mask: AttentionMask, state: DecodingState | None,
               rotary: tuple[Tensor, Tensor] | None) -> None:
        name = type(self).__name__
        if context is not None or state is not None:
            raise ValueError(f"{name} is self-attention over a whole sequence: no cross-attention, no decoding")
        if mask.causal or mask.bias is not None or rotary is not None:
            raise ValueError(f"{name} is bidirectional and takes no positions (supports.causal, rotary and "
                             "position_bias are False)")
