"""The block library: attention, feed-forward, normalization, positions, embeddings, caches and layers."""

from lightning_tfm.blocks.attention import Attention, AttentionMask, MultiHeadAttention, make_mask
from lightning_tfm.blocks.embeddings import OutputProjection, TokenEmbedding
from lightning_tfm.blocks.feedforward import FeedForward, GELUFeedForward, ReLUFeedForward, SiLUFeedForward, SwiGLU
from lightning_tfm.blocks.kv_cache import DecoderCache, KVCache
from lightning_tfm.blocks.layers import DecoderLayer, EncoderLayer
from lightning_tfm.blocks.lora import LoRALinear
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
    "ALiBiPositions", "Attention", "AttentionMask", "DecoderCache", "DecoderLayer", "EncoderLayer", "FeedForward",
    "GELUFeedForward", "KVCache", "LayerNorm", "LearnedPositions", "LoRALinear", "MultiHeadAttention",
    "NoPositions", "Norm", "OutputProjection", "Positions", "RMSNorm", "ReLUFeedForward", "RotaryPositions",
    "SiLUFeedForward", "SinusoidalPositions", "SwiGLU", "TokenEmbedding", "make_mask",
]
