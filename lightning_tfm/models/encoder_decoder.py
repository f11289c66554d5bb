"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al. 2017, §3), for translation."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.embeddings import OutputProjection, TokenEmbedding
from lightning_tfm.blocks.feedforward import ReLUFeedForward
from lightning_tfm.blocks.kv_cache import DecoderCache
from lightning_tfm.blocks.layers import NormPlacement
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.norms import LayerNorm
from lightning_tfm.blocks.positions import SinusoidalPositions
from lightning_tfm.models.attention_contract import check_attention, check_padding, decoding_states
from lightning_tfm.models.stacks import (
    AttentionFactory,
    DecoderStack,
    EncoderStack,
    FeedForwardFactory,
    InputEmbedding,
    NormFactory,
    PositionsFactory,
    check_sizes,
    init_weights,
    tile,
)


class EncoderDecoder(nn.Module):
    """Encoder and decoder stacks with embeddings scaled by sqrt(d_model), sinusoidal positions, and one
    embedding matrix shared by source, target and the pre-softmax projection (paper §3.4) by default.

    Args:
        vocab_size: number of source token ids (and target ids when the vocabulary is shared).
        d_model: width of the residual stream (paper: 512).
        n_layers: layers in the encoder and in the decoder (paper: N = 6).
        n_heads: query heads per attention block (paper: h = 8).
        d_ff: inner width of the feed-forward blocks (paper: 2048).
        dropout: residual and embedding dropout, in [0, 1) (paper: 0.1).
        attention: factory (d_model, n_heads, place) -> self-attention block of every encoder layer (and of
            every decoder layer unless `decoder_attention` is given).
        cross_attention: factory (d_model, n_heads, place) -> decoder-to-encoder attention block.
        feedforward: factory (d_model, d_ff) -> feed-forward block; None for all-attention layers.
        norm: factory (d_model,) -> normalization.
        positions: factory (d_model, n_heads) -> position scheme, one for each side.
        norm_placement: "post" (the paper) or "pre".
        tgt_vocab_size: target vocabulary when it differs from the source one; None shares one vocabulary.
        share_embeddings: one embedding matrix for source and target (needs one shared vocabulary).
        tie_embeddings: the target embedding is also the pre-softmax projection.
        scale_embeddings: multiply embeddings by sqrt(d_model) (paper §3.4).
        output_bias: learn a per-token bias on the output logits (Marian).
        n_decoder_layers: decoder layers when they differ from n_layers; None means n_layers.
        attention_pattern: encoder self-attention factories repeated over the layers; None uses `attention`.
        decoder_attention: the decoder's causal self-attention; None uses `attention`.
        decoder_attention_pattern: decoder self-attention factories repeated over the layers; None uses
            `decoder_attention`.
    """

    def __init__(self, vocab_size: int, d_model: int = 512, n_layers: int = 6, n_heads: int = 8,
                 d_ff: int = 2048, dropout: float = 0.1, attention: AttentionFactory = MultiHeadAttention,
                 cross_attention: AttentionFactory = MultiHeadAttention,
                 feedforward: FeedForwardFactory | None = ReLUFeedForward, norm: NormFactory = LayerNorm,
                 positions: PositionsFactory = SinusoidalPositions, norm_placement: NormPlacement = "post",
                 tgt_vocab_size: int | None = None, share_embeddings: bool = True, tie_embeddings: bool = True,
                 scale_embeddings: bool = True, output_bias: bool = False,
                 n_decoder_layers: int | None = None, attention_pattern: list[AttentionFactory] | None = None,
                 decoder_attention: AttentionFactory | None = None,
                 decoder_attention_pattern: list[AttentionFactory] | None = None) -> None:
        super().__init__()
        n_decoder_layers = n_layers if n_decoder_layers is None else n_decoder_layers
        check_sizes("EncoderDecoder", vocab_size, d_model, n_heads, min(n_layers, n_decoder_layers), d_ff, dropout)
        tgt_vocab_size = vocab_size if tgt_vocab_size is None else tgt_vocab_size
        if share_embeddings and tgt_vocab_size != vocab_size:
            raise ValueError(f"EncoderDecoder: share_embeddings=True needs one vocabulary, but vocab_size="
                             f"{vocab_size} and tgt_vocab_size={tgt_vocab_size}")
        self.vocab_size, self.tgt_vocab_size, self.d_model = vocab_size, tgt_vocab_size, d_model
        self.n_decoder_layers = n_decoder_layers
        src_tokens = TokenEmbedding(vocab_size, d_model, scale_embeddings)
        tgt_tokens = src_tokens if share_embeddings else TokenEmbedding(tgt_vocab_size, d_model, scale_embeddings)
        self.src_embedding = InputEmbedding(src_tokens, positions(d_model, n_heads), dropout)
        self.tgt_embedding = InputEmbedding(tgt_tokens, positions(d_model, n_heads), dropout)
        max_len = self.src_embedding.positions.max_len
        self.encoder = EncoderStack(d_model, n_heads, d_ff, tile(attention, attention_pattern, n_layers),
                                    feedforward, norm, dropout, norm_placement, LayerPlace(max_len=max_len))
        decoder_attention = tile(decoder_attention or attention, decoder_attention_pattern, n_decoder_layers)
        self.decoder = DecoderStack(d_model, n_heads, d_ff, decoder_attention, cross_attention, feedforward, norm,
                                    dropout, norm_placement, LayerPlace(causal=True, max_len=max_len))
        check_attention("EncoderDecoder", self.encoder, self.src_embedding.positions)
        check_attention("EncoderDecoder", self.decoder, self.tgt_embedding.positions)
        self.output = OutputProjection(d_model, tgt_vocab_size, bias=output_bias)
        init_weights(self, n_layers + n_decoder_layers, "xavier")
        if tie_embeddings:
            self.output.tie_to(tgt_tokens)

    @property
    def max_len(self) -> int:
        return self.src_embedding.positions.max_len

    @property
    def shares_memory(self) -> bool:
        """Whether every cross-attention block lets a sentence's beams read one row of the encoder side
        (`Supports.shared_memory`); `decode` then takes memory with fewer rows than the target."""
        return all(layer.cross_attention.supports.shared_memory for layer in self.decoder.layers)

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                tgt_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced logits.

        Args:
            src: (B, S) source ids.
            tgt: (B, T) target ids, shifted right (starting with the start token).
            src_mask: (B, S) bool, True for real source tokens; None if nothing is padded.
            tgt_mask: (B, T) bool, True for real target tokens; None if nothing is padded.
        Returns:
            (B, T, V) logits of the next target token.
        """
        return self.decode(tgt, self.encode(src, src_mask), src_mask, tgt_mask)

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """(B, S) source ids -> (B, S, C) memory for the decoder."""
        positions = self.src_embedding.positions
        mask = AttentionMask.build(src_mask, causal=False, bias=positions.position_bias())
        check_padding("EncoderDecoder", self.encoder, mask)
        return self.encoder(self.src_embedding(src), mask, rotary=positions.rotary(src.shape[1]))

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor | None = None, tgt_mask: Tensor | None = None,
               cache: DecoderCache | None = None) -> Tensor:
        """Args:
            tgt: (B, T) target ids after the cached positions.
            memory: (B', S, C) encoder output (read once into the cache when one is given). B' = B, or, when
                `shares_memory`, B' dividing B: each row then serves B / B' consecutive target rows (beams).
            src_mask: (B', S) source padding mask.
            tgt_mask: (B, cached + T) target padding mask, or None.
            cache: self- and cross-attention caches for incremental decoding.
        Returns:
            (B, T, V) logits.
        Raises:
            ValueError: if memory has fewer rows than tgt and a cross-attention block cannot share them.
        """
        if memory.shape[0] != tgt.shape[0] and not self.shares_memory:
            raise ValueError(f"EncoderDecoder: memory has {memory.shape[0]} rows for {tgt.shape[0]} target rows, "
                             "but a cross-attention block cannot share a row (supports.shared_memory is False); "
                             "repeat the memory for every target row")
        offset = cache.length if cache is not None else 0
        T = tgt.shape[1]
        positions = self.tgt_embedding.positions
        self_mask = AttentionMask.build(tgt_mask, causal=True, offset=offset, bias=positions.position_bias())
        memory_mask = AttentionMask.build(src_mask, causal=False)
        check_padding("EncoderDecoder", self.decoder, self_mask)
        x = self.tgt_embedding(tgt, offset)
        x = self.decoder(x, memory, self_mask, memory_mask, cache, positions.rotary(T, offset))
        if cache is not None:
            cache.advance(T)
        return self.output(x)

    def new_cache(self, max_len: int = 0) -> DecoderCache:
        """Empty decoding states of the decoder: self-attention (preallocated for max_len target positions)
        and cross-attention (the encoder output, projected on the first step)."""
        layers = self.decoder.layers
        return DecoderCache(decoding_states("EncoderDecoder", [layer.self_attention for layer in layers], max_len),
                            decoding_states("EncoderDecoder", [layer.cross_attention for layer in layers], 0))

    def search_state(self, src: Tensor, src_mask: Tensor | None = None, max_len: int = 0) -> SearchState:
        """Encode a batch and return the state a search decodes it with: `beam_search(state.step,
        state.reorder, ...)` or `greedy_search(state.step, ..., reorder=state.reorder)`."""
        return SearchState(self, src, src_mask, max_len)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SearchState:
    """What a search over an `EncoderDecoder` keeps between steps, behind the `step` and `reorder` closures of
    `lightning_tfm.decoding`: the encoder output and source mask, and the decoder's cache.

    The encoder runs once per sentence. When the model `shares_memory`, the encoder side (output, mask and
    the cross-attention keys and values projected from it) keeps one row per sentence, which its beams read;
    otherwise it is copied to every row, as the blocks need. Self-attention caches keep one row per
    hypothesis. Rows of sentences the search has finished leave with `reorder`.

    Args:
        model: the encoder-decoder (in eval mode to decode deterministically).
        src: (B, S) source ids.
        src_mask: (B, S) bool, True for real tokens; None if nothing is padded.
        max_len: target positions to preallocate in the self-attention caches.
    """

    def __init__(self, model: EncoderDecoder, src: Tensor, src_mask: Tensor | None = None, max_len: int = 0) -> None:
        self.model, self.src_mask, self.shared = model, src_mask, model.shares_memory
        self.memory = model.encode(src, src_mask)                               # (B, S, C)
        self.cache = model.new_cache(max_len)
        self.sentences, self.beams = src.shape[0], 1            # rows: `sentences` groups of `beams` rows

    def step(self, tokens: Tensor) -> Tensor:
        """(R, t) new target ids -> (R, V) float32 next-token log-probabilities."""
        logits = self.model.decode(tokens, self.memory, self.src_mask, cache=self.cache)[:, -1]
        return logits.float().log_softmax(-1)

    def reorder(self, index: Tensor, beams: int) -> None:
        """Rows follow `index` (R,), `beams` consecutive rows per sentence (see `decoding.Reorder`)."""
        sentences = len(index) // beams
        if sentences == self.sentences and (self.shared or beams == self.beams):
            self.cache.reorder(index)      # parents are beams of the same sentence: the encoder side stays
        else:                              # sentences expanded to beams or dropped
            memory_index = index[::beams] // self.beams if self.shared else index             # (B',) or (R,)
            self.cache.reorder(index, memory_index)
            self.memory = self.memory.index_select(0, memory_index)
            if self.src_mask is not None:
                self.src_mask = self.src_mask.index_select(0, memory_index)
        self.sentences, self.beams = sentences, beams
