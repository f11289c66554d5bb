"""The decoder-only Transformer of GPT (Radford et al. 2018, 2019): a causal stack over token embeddings with
a language-model head."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.embeddings import OutputProjection, TokenEmbedding
from lightning_tfm.blocks.feedforward import GELUFeedForward
from lightning_tfm.blocks.kv_cache import DecoderCache
from lightning_tfm.blocks.layers import NormPlacement
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.norms import LayerNorm
from lightning_tfm.blocks.positions import LearnedPositions
from lightning_tfm.models.attention_contract import check_attention, check_padding, decoding_states
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


class DecoderOnly(nn.Module):
    """GPT: token + position embeddings, n_layers causal self-attention layers, and tied output logits.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_layers: layers.
        n_heads: query heads per attention block.
        d_ff: inner width of the feed-forward blocks.
        dropout: residual and embedding dropout, in [0, 1).
        attention: factory (d_model, n_heads, place) -> self-attention block, for every layer.
        attention_pattern: factories repeated over the layers instead (e.g. three local layers, then a full
            one); None uses `attention` everywhere.
        feedforward: factory (d_model, d_ff) -> feed-forward block; None for all-attention layers.
        norm: factory (d_model,) -> normalization.
        positions: factory (d_model, n_heads) -> position scheme; its max_len bounds the context.
        norm_placement: "pre" (GPT-2) or "post" (GPT-1).
        tie_embeddings: share the token embedding with the output projection (paper §3.4).
        scale_embeddings: multiply token embeddings by sqrt(d_model) (paper §3.4).
    """

    def __init__(self, vocab_size: int, d_model: int = 768, n_layers: int = 12, n_heads: int = 12,
                 d_ff: int = 3072, dropout: float = 0.1, attention: AttentionFactory = MultiHeadAttention,
                 attention_pattern: list[AttentionFactory] | None = None,
                 feedforward: FeedForwardFactory | None = GELUFeedForward, norm: NormFactory = LayerNorm,
                 positions: PositionsFactory = LearnedPositions, norm_placement: NormPlacement = "pre",
                 tie_embeddings: bool = True, scale_embeddings: bool = False) -> None:
        super().__init__()
        check_sizes("DecoderOnly", vocab_size, d_model, n_heads, n_layers, d_ff, dropout)
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.embedding = InputEmbedding(TokenEmbedding(vocab_size, d_model, scale_embeddings),
                                        positions(d_model, n_heads), dropout)
        place = LayerPlace(causal=True, max_len=self.embedding.positions.max_len)
        self.stack = EncoderStack(d_model, n_heads, d_ff, tile(attention, attention_pattern, n_layers), feedforward,
                                  norm, dropout, norm_placement, place)
        check_attention("DecoderOnly", self.stack, self.embedding.positions)
        self.output = OutputProjection(d_model, vocab_size)
        init_weights(self, n_layers, "gpt2")
        if tie_embeddings:
            self.output.tie_to(self.embedding.tokens)

    @property
    def max_len(self) -> int:
        return self.embedding.positions.max_len

    def forward(self, ids: Tensor, mask: Tensor | None = None, cache: DecoderCache | None = None) -> Tensor:
        """Args:
            ids: (B, T) token ids.
            mask: (B, T + cached) bool, True for real tokens, False for padding; None if nothing is padded.
            cache: keys and values of earlier positions; new ones are appended.
        Returns:
            (B, T, V) next-token logits.
        """
        return self.output(self.hidden(ids, mask, cache))

    def hidden(self, ids: Tensor, mask: Tensor | None = None, cache: DecoderCache | None = None) -> Tensor:
        """(B, T) ids -> (B, T, C) final hidden states (after the final norm)."""
        offset = cache.length if cache is not None else 0
        T = ids.shape[1]
        positions = self.embedding.positions
        attn_mask = AttentionMask.build(mask, causal=True, offset=offset, bias=positions.position_bias())
        check_padding("DecoderOnly", self.stack, attn_mask)
        x = self.embedding(ids, offset)
        x = self.stack(x, attn_mask, cache, positions.rotary(T, offset))
        if cache is not None:
            cache.advance(T)
        return x

    def new_cache(self, max_len: int = 0) -> DecoderCache:
        """Empty decoding states, one per layer (a KV cache preallocated for max_len positions, or what the
        layer's attention keeps instead)."""
        blocks = [layer.attention for layer in self.stack.layers]
        return DecoderCache(decoding_states("DecoderOnly", blocks, max_len))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
