"""The pieces all three assemblies share: factory types for swappable blocks, the input embedding
(tokens + positions + dropout), stacks of encoder and decoder layers, and weight initialisation."""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor, nn

from lightning_tfm.blocks.attention import Attention, AttentionMask
from lightning_tfm.blocks.embeddings import TokenEmbedding
from lightning_tfm.blocks.feedforward import FeedForward
from lightning_tfm.blocks.kv_cache import DecoderCache, KVCache
from lightning_tfm.blocks.layers import DecoderLayer, EncoderLayer, NormPlacement, check_placement
from lightning_tfm.blocks.norms import Norm
from lightning_tfm.blocks.positions import Positions

AttentionFactory = Callable[[int, int], Attention]       # (d_model, n_heads) -> one attention block
FeedForwardFactory = Callable[[int, int], FeedForward]   # (d_model, d_ff) -> one feed-forward block
NormFactory = Callable[[int], Norm]                      # (d_model,) -> one normalization
PositionsFactory = Callable[[int, int], Positions]       # (d_model, n_heads) -> the position scheme


def check_sizes(model: str, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int,
                dropout: float) -> None:
    """Reject impossible sizes at construction, naming the values."""
    if vocab_size < 1:
        raise ValueError(f"{model}: vocab_size={vocab_size}, must be >= 1")
    if n_layers < 1 or d_ff < 1:
        raise ValueError(f"{model}: n_layers={n_layers} and d_ff={d_ff} must be >= 1")
    if n_heads < 1 or d_model % n_heads:
        raise ValueError(f"{model}: d_model={d_model} is not divisible by n_heads={n_heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{model}: dropout={dropout}, must be in [0, 1)")


class InputEmbedding(nn.Module):
    """Token embedding + absolute positions (+ segment embedding and norm, as BERT), then dropout (paper §5.4).

    Args:
        tokens: the token embedding (possibly shared with another stack).
        positions: the position scheme.
        dropout: dropout on the sum, in [0, 1).
        norm: a norm applied to the sum before dropout (BERT), or None.
        n_segments: segment (token type) vocabulary for sentence pairs (BERT); 0 for none.
    """

    def __init__(self, tokens: TokenEmbedding, positions: Positions, dropout: float, norm: Norm | None = None,
                 n_segments: int = 0) -> None:
        super().__init__()
        self.tokens, self.positions, self.norm = tokens, positions, norm
        self.segments = nn.Embedding(n_segments, tokens.d_model) if n_segments else None
        if self.segments is not None:
            nn.init.normal_(self.segments.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor, offset: int = 0, segments: Tensor | None = None) -> Tensor:
        """(B, T) ids at positions offset.. -> (B, T, C)."""
        x = self.positions(self.tokens(ids), offset)
        if segments is not None:
            if self.segments is None:
                raise ValueError("segment ids were given but the model was built with n_segments=0")
            x = x + self.segments(segments)
        elif self.segments is not None:
            x = x + self.segments.weight[0]          # BERT's default: every token in segment 0
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class EncoderStack(nn.Module):
    """n_layers `EncoderLayer`s and, for pre-norm, the final norm they need."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, attention: AttentionFactory,
                 feedforward: FeedForwardFactory, norm: NormFactory, dropout: float,
                 norm_placement: NormPlacement) -> None:
        super().__init__()
        check_placement(norm_placement)
        self.layers = nn.ModuleList(
            EncoderLayer(attention(d_model, n_heads), feedforward(d_model, d_ff), norm(d_model), norm(d_model),
                         dropout, norm_placement)
            for _ in range(n_layers))
        self.final_norm = norm(d_model) if norm_placement == "pre" else None

    def forward(self, x: Tensor, mask: AttentionMask, cache: DecoderCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cache.self_attn[i] if cache is not None else None, rotary)
        return x if self.final_norm is None else self.final_norm(x)


class DecoderStack(nn.Module):
    """n_layers `DecoderLayer`s and, for pre-norm, the final norm they need."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, attention: AttentionFactory,
                 cross_attention: AttentionFactory, feedforward: FeedForwardFactory, norm: NormFactory,
                 dropout: float, norm_placement: NormPlacement) -> None:
        super().__init__()
        check_placement(norm_placement)
        self.layers = nn.ModuleList(
            DecoderLayer(attention(d_model, n_heads), cross_attention(d_model, n_heads),
                         feedforward(d_model, d_ff), norm(d_model), norm(d_model), norm(d_model),
                         dropout, norm_placement)
            for _ in range(n_layers))
        self.final_norm = norm(d_model) if norm_placement == "pre" else None

    def forward(self, x: Tensor, memory: Tensor, self_mask: AttentionMask, memory_mask: AttentionMask,
                cache: DecoderCache | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            self_cache: KVCache | None = cache.self_attn[i] if cache is not None else None
            cross_cache: KVCache | None = cache.cross_attn[i] if cache is not None and cache.cross_attn else None
            x = layer(x, memory, self_mask, memory_mask, self_cache, cross_cache, rotary)
        return x if self.final_norm is None else self.final_norm(x)


def init_weights(model: nn.Module, n_layers: int, scheme: str) -> None:
    """Initialise linear layers.

    "xavier": Glorot-uniform weights, zero biases (fairseq's and the Annotated Transformer's choice for the
    paper's post-norm model). "gpt2": N(0, 0.02) weights, with the projections that write into the residual
    stream scaled by 1/sqrt(2 n_layers) (GPT-2 §2.3). Embeddings keep their own initialisation.
    """
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            residual = name.endswith(("attention.out", "feedforward.fc2"))
            nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * n_layers) if residual else 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
