"""The pieces all three assemblies share: factory types for swappable blocks, the input embedding
(tokens + positions + dropout), stacks of encoder and decoder layers, and weight initialisation."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from torch import Tensor, nn

from lightning_tfm.blocks.attention import Attention, LayerPlace
from lightning_tfm.blocks.embeddings import TokenEmbedding
from lightning_tfm.blocks.feedforward import FeedForward
from lightning_tfm.blocks.kv_cache import DecoderCache
from lightning_tfm.blocks.layers import DecoderLayer, EncoderLayer, NormPlacement, check_placement
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.norms import Norm
from lightning_tfm.blocks.positions import Positions

AttentionFactory = Callable[[int, int, LayerPlace], Attention]   # (d_model, n_heads, place) -> one block
FeedForwardFactory = Callable[[int, int], FeedForward]   # (d_model, d_ff) -> one feed-forward block
NormFactory = Callable[[int], Norm]                      # (d_model,) -> one normalization
PositionsFactory = Callable[[int, int], Positions]       # (d_model, n_heads) -> the position scheme


def tile(factory: AttentionFactory, pattern: list[AttentionFactory] | None, n_layers: int) -> list[AttentionFactory]:
    """One attention factory per layer: `pattern` repeated over the layers, or `factory` for every layer when
    there is no pattern (e.g. [local, local, local, full] puts a full layer every fourth)."""
    if pattern is not None and not pattern:
        raise ValueError("an attention pattern must name at least one attention block")
    return [pattern[i % len(pattern)] for i in range(n_layers)] if pattern else [factory] * n_layers


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


def _places(place: LayerPlace, n_layers: int) -> list[LayerPlace]:
    return [dataclasses.replace(place, index=i, n_layers=n_layers) for i in range(n_layers)]


class EncoderStack(nn.Module):
    """`EncoderLayer`s, one per attention factory, and, for pre-norm, the final norm they need.

    Args:
        d_model, n_heads, d_ff: sizes of every layer.
        attention: one self-attention factory per layer (see `tile`).
        feedforward: factory of the feed-forward blocks; None for all-attention layers.
        norm: factory of the norms.
        dropout: residual dropout.
        norm_placement: "pre" or "post".
        place: where the stack's attention sits (causal or not, maximum length); the index is filled per layer.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, attention: list[AttentionFactory],
                 feedforward: FeedForwardFactory | None, norm: NormFactory, dropout: float,
                 norm_placement: NormPlacement, place: LayerPlace) -> None:
        super().__init__()
        check_placement(norm_placement)
        self.layers = nn.ModuleList(
            EncoderLayer(factory(d_model, n_heads, where),
                         feedforward(d_model, d_ff) if feedforward is not None else None, norm(d_model),
                         norm(d_model) if feedforward is not None else None, dropout, norm_placement)
            for factory, where in zip(attention, _places(place, len(attention))))
        self.final_norm = norm(d_model) if norm_placement == "pre" else None

    def forward(self, x: Tensor, mask: AttentionMask, cache: DecoderCache | None = None,
                rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, cache.self_attn[i] if cache is not None else None, rotary)
        return x if self.final_norm is None else self.final_norm(x)


class DecoderStack(nn.Module):
    """`DecoderLayer`s, one per self-attention factory, and, for pre-norm, the final norm they need.

    Args:
        d_model, n_heads, d_ff: sizes of every layer.
        attention: one causal self-attention factory per layer (see `tile`).
        cross_attention: factory of the cross-attention blocks.
        feedforward: factory of the feed-forward blocks; None for all-attention layers.
        norm: factory of the norms.
        dropout: residual dropout.
        norm_placement: "pre" or "post".
        place: where the self-attention sits (causal, maximum length); the index is filled per layer.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, attention: list[AttentionFactory],
                 cross_attention: AttentionFactory, feedforward: FeedForwardFactory | None, norm: NormFactory,
                 dropout: float, norm_placement: NormPlacement, place: LayerPlace) -> None:
        super().__init__()
        check_placement(norm_placement)
        self.layers = nn.ModuleList(
            DecoderLayer(factory(d_model, n_heads, where),
                         cross_attention(d_model, n_heads, dataclasses.replace(where, causal=False, cross=True)),
                         feedforward(d_model, d_ff) if feedforward is not None else None, norm(d_model),
                         norm(d_model), norm(d_model) if feedforward is not None else None, dropout, norm_placement)
            for factory, where in zip(attention, _places(place, len(attention))))
        self.final_norm = norm(d_model) if norm_placement == "pre" else None

    def forward(self, x: Tensor, memory: Tensor, self_mask: AttentionMask, memory_mask: AttentionMask,
                cache: DecoderCache | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            self_state = cache.self_attn[i] if cache is not None else None
            cross_state = cache.cross_attn[i] if cache is not None and cache.cross_attn else None
            x = layer(x, memory, self_mask, memory_mask, self_state, cross_state, rotary)
        return x if self.final_norm is None else self.final_norm(x)


def init_weights(model: nn.Module, n_layers: int, scheme: str) -> None:
    """Initialise linear layers.

    "xavier": Glorot-uniform weights, zero biases (fairseq's and the Annotated Transformer's choice for the
    paper's post-norm model). "gpt2": N(0, 0.02) weights, with the projections that write into the residual
    stream scaled by 1/sqrt(2 n_layers) (GPT-2 §2.3); each block names those (`residual_projections`), so a
    variant keeps the scaling whatever it calls its layers. Embeddings keep their own initialisation.
    """
    residual = {id(linear) for block in model.modules() if hasattr(block, "residual_projections")
                for linear in block.residual_projections()}
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        if scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            scaled = id(module) in residual
            nn.init.normal_(module.weight, std=0.02 / math.sqrt(2 * n_layers) if scaled else 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
