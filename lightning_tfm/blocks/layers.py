"""Transformer layers: the residual wiring around attention and feed-forward blocks (paper §3.1).

Post-norm is the paper's LayerNorm(x + Dropout(Sublayer(x))); pre-norm is x + Dropout(Sublayer(Norm(x)))
(GPT-2, Xiong et al. 2020), which trains deep stacks without warmup tricks and needs a final norm after the
stack (the models add it). Dropout sits where the paper puts it: on each sub-layer output, before the add.
"""

from __future__ import annotations

from typing import Callable, Literal

from torch import Tensor, nn

from lightning_tfm.blocks.attention import Attention, AttentionMask
from lightning_tfm.blocks.feedforward import FeedForward
from lightning_tfm.blocks.kv_cache import DecodingState
from lightning_tfm.blocks.norms import Norm

NormPlacement = Literal["pre", "post"]


def check_placement(placement: str) -> None:
    if placement not in ("pre", "post"):
        raise ValueError(f"norm_placement={placement!r}, must be 'pre' or 'post'")


class _Residual(nn.Module):
    """One sub-layer with its norm, dropout and residual add, pre- or post-norm."""

    def __init__(self, norm: Norm, dropout: float, placement: NormPlacement) -> None:
        super().__init__()
        check_placement(placement)
        self.norm, self.dropout, self.pre = norm, nn.Dropout(dropout), placement == "pre"

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual (paper §3.1, encoder).

    With a causal mask this is also GPT's decoder block, which has no cross-attention. Without a feed-forward
    block it is the all-attention layer (Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent
    Memory"), whose attention carries the feed-forward's role through persistent memory vectors.

    Args:
        attention: the self-attention block.
        feedforward: the position-wise feed-forward block; None for an all-attention layer.
        attention_norm: norm of the attention sub-layer.
        feedforward_norm: norm of the feed-forward sub-layer (unused without a feed-forward block).
        dropout: residual dropout on each sub-layer output, in [0, 1).
        norm_placement: "post" (the paper, BERT) or "pre" (GPT-2).
    """

    def __init__(self, attention: Attention, feedforward: FeedForward | None, attention_norm: Norm,
                 feedforward_norm: Norm | None, dropout: float = 0.1, norm_placement: NormPlacement = "post") -> None:
        super().__init__()
        self.attention, self.feedforward = attention, feedforward
        self.attention_residual = _Residual(attention_norm, dropout, norm_placement)
        self.feedforward_residual = (_Residual(feedforward_norm, dropout, norm_placement)
                                     if feedforward is not None else None)

    def forward(self, x: Tensor, mask: AttentionMask | None = None, state: DecodingState | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        x = self.attention_residual(x, lambda h: self.attention(h, mask=mask, state=state, rotary=rotary))
        if self.feedforward_residual is None:
            return x
        return self.feedforward_residual(x, self.feedforward)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention to the encoder output, then feed-forward (paper §3.1, decoder).

    Args:
        self_attention: the (causal) self-attention block.
        cross_attention: attention from the decoder to the encoder output.
        feedforward: the position-wise feed-forward block; None for all-attention layers.
        self_attention_norm: norm of the self-attention sub-layer.
        cross_attention_norm: norm of the cross-attention sub-layer.
        feedforward_norm: norm of the feed-forward sub-layer (unused without a feed-forward block).
        dropout: residual dropout on each sub-layer output, in [0, 1).
        norm_placement: "post" (the paper) or "pre".
    """

    def __init__(self, self_attention: Attention, cross_attention: Attention, feedforward: FeedForward | None,
                 self_attention_norm: Norm, cross_attention_norm: Norm, feedforward_norm: Norm | None,
                 dropout: float = 0.1, norm_placement: NormPlacement = "post") -> None:
        super().__init__()
        self.self_attention, self.cross_attention, self.feedforward = self_attention, cross_attention, feedforward
        self.self_attention_residual = _Residual(self_attention_norm, dropout, norm_placement)
        self.cross_attention_residual = _Residual(cross_attention_norm, dropout, norm_placement)
        self.feedforward_residual = (_Residual(feedforward_norm, dropout, norm_placement)
                                     if feedforward is not None else None)

    def forward(self, x: Tensor, memory: Tensor, self_mask: AttentionMask | None = None,
                memory_mask: AttentionMask | None = None, self_state: DecodingState | None = None,
                cross_state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args:
            x: (B, T, C) target-side states.
            memory: (B, S, C) encoder output.
            self_mask: causal (and padding) mask of the target.
            memory_mask: padding mask of the source.
            self_state, cross_state: the two attention blocks' decoding states.
            rotary: (cos, sin) of the target positions, for rotary position embeddings.
        Returns:
            (B, T, C).
        """
        x = self.self_attention_residual(
            x, lambda h: self.self_attention(h, mask=self_mask, state=self_state, rotary=rotary))
        x = self.cross_attention_residual(
            x, lambda h: self.cross_attention(h, context=memory, mask=memory_mask, state=cross_state))
        if self.feedforward_residual is None:
            return x
        return self.feedforward_residual(x, self.feedforward)
