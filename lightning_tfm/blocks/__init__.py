"""The block library: attention, feed-forward, normalization, positions, embeddings, caches and layers."""

from lightning_tfm.blocks.attention import Attention, LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.embeddings import OutputProjection, TokenEmbedding
from lightning_tfm.blocks.feedforward import FeedForward, GELUFeedForward, ReLUFeedForward, SiLUFeedForward, SwiGLU
from lightning_tfm.blocks.kv_cache import DecoderCache, DecodingState, KVCache, MemoryCache, WindowCache
from lightning_tfm.blocks.layers import DecoderLayer, EncoderLayer
from lightning_tfm.blocks.lora import LoRALinear
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.norms import LayerNorm, Norm, RMSNorm
from lightning_tfm.blocks.positions import (
                                            ALiBiPositions,
                                            LearnedPositions,
                                            NoPositions,
                                            Positions,
                                            RotaryPositions,
                                            SinusoidalPositions,
)

__all__ = [
    "ALiBiPositions", "Attention", "AttentionMask", "DecoderCache", "DecoderLayer", "DecodingState", "EncoderLayer",
    "FeedForward", "GELUFeedForward", "KVCache", "LayerNorm", "LayerPlace", "LearnedPositions", "LoRALinear",
    "MemoryCache", "MultiHeadAttention", "NoPositions", "Norm", "OutputProjection", "Positions", "RMSNorm",
    "ReLUFeedForward", "RotaryPositions", "SiLUFeedForward", "SinusoidalPositions", "Supports", "SwiGLU",
    "TokenEmbedding", "WindowCache",
]
