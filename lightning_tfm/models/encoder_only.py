"""The encoder-only Transformer of BERT (Devlin et al. 2019): a bidirectional stack whose hidden states feed
task heads (classification, masked LM)."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.embeddings import TokenEmbedding
from lightning_tfm.blocks.feedforward import GELUFeedForward
from lightning_tfm.blocks.layers import NormPlacement
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.norms import LayerNorm
from lightning_tfm.blocks.positions import LearnedPositions
from lightning_tfm.models.attention_contract import check_attention, check_padding
from lightning_tfm.models.stacks import (
    AttentionFactory,
    EncoderStack,
    FeedForwardFactory,
    InputEmbedding,
    NormFactory,
    PositionsFactory,
    check_sizes,
    init_weights,
    tile,
)


class EncoderOnly(nn.Module):
    """BERT: token + position (+ segment) embeddings, a norm, and n_layers bidirectional layers.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: layers.
        n_heads: query heads per attention block.
        d_ff: inner width of the feed-forward blocks.
        dropout: residual and embedding dropout, in [0, 1).
        attention: factory (d_model, n_heads, place) -> self-attention block, for every layer.
        attention_pattern: factories repeated over the layers instead; None uses `attention` everywhere.
        feedforward: factory (d_model, d_ff) -> feed-forward block; None for all-attention layers.
        norm: factory (d_model,) -> normalization.
        positions: factory (d_model, n_heads) -> position scheme; its max_len bounds the input.
        norm_placement: "post" (BERT, the paper) or "pre".
        n_segments: segment (token type) embeddings for sentence pairs; 0 for none.
        embedding_norm: normalize the summed embeddings (BERT does).
        scale_embeddings: multiply token embeddings by sqrt(d_model) (paper §3.4).
    """

    def __init__(self, vocab_size: int, d_model: int = 768, n_layers: int = 12, n_heads: int = 12,
                 d_ff: int = 3072, dropout: float = 0.1, attention: AttentionFactory = MultiHeadAttention,
                 attention_pattern: list[AttentionFactory] | None = None,
                 feedforward: FeedForwardFactory | None = GELUFeedForward, norm: NormFactory = LayerNorm,
                 positions: PositionsFactory = LearnedPositions, norm_placement: NormPlacement = "post",
                 n_segments: int = 2, embedding_norm: bool = True, scale_embeddings: bool = False) -> None:
        super().__init__()
        check_sizes("EncoderOnly", vocab_size, d_model, n_heads, n_layers, d_ff, dropout)
        if n_segments < 0:
            raise ValueError(f"EncoderOnly: n_segments={n_segments}, must be >= 0")
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.embedding = InputEmbedding(TokenEmbedding(vocab_size, d_model, scale_embeddings),
                                        positions(d_model, n_heads), dropout,
                                        norm(d_model) if embedding_norm else None, n_segments)
        place = LayerPlace(causal=False, max_len=self.embedding.positions.max_len)
        self.stack = EncoderStack(d_model, n_heads, d_ff, tile(attention, attention_pattern, n_layers), feedforward,
                                  norm, dropout, norm_placement, place)
        check_attention("EncoderOnly", self.stack, self.embedding.positions)
        init_weights(self, n_layers, "gpt2")

    @property
    def max_len(self) -> int:
        return self.embedding.positions.max_len

    def forward(self, ids: Tensor, mask: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        """Args:
            ids: (B, T) token ids.
            mask: (B, T) bool, True for real tokens, False for padding; None if nothing is padded.
            segments: (B, T) segment ids for sentence pairs; None puts every token in segment 0.
        Returns:
            (B, T, C) hidden states.
        """
        T = ids.shape[1]
        positions = self.embedding.positions
        attn_mask = AttentionMask.build(mask, causal=False, bias=positions.position_bias())
        check_padding("EncoderOnly", self.stack, attn_mask)
        x = self.embedding(ids, 0, segments)
        return self.stack(x, attn_mask, rotary=positions.rotary(T))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
