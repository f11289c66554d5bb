"""Efficient attention variants, siblings of `MultiHeadAttention` chosen per layer by class_path: position-based
sparse patterns (and the blocked kernel that computes them), adaptive attention span and persistent memory."""

from lightning_tfm.blocks.attention_variants.adaptive_span import AdaptiveSpanAttention
from lightning_tfm.blocks.attention_variants.block_plans import BlockPlan, plan_attention
from lightning_tfm.blocks.attention_variants.blocked import sparse_attention
from lightning_tfm.blocks.attention_variants.patterns import (
    Band,
    BlockLocal,
    Dilated,
    Everything,
    Global,
    GlobalKeys,
    GlobalQueries,
    Pattern,
    Strided,
    Union,
)
from lightning_tfm.blocks.attention_variants.persistent_memory import PersistentMemoryAttention
from lightning_tfm.blocks.attention_variants.sparse import (
    BandStridedAttention,
    BlockGlobalAttention,
    BlockLocalAttention,
    DilatedWindowAttention,
    SlidingWindowAttention,
    SparseAttention,
    StridedAttention,
)

__all__ = [
    "AdaptiveSpanAttention", "Band", "BandStridedAttention", "BlockGlobalAttention", "BlockLocal",
    "BlockLocalAttention",
    "BlockPlan", "Dilated", "DilatedWindowAttention", "Everything", "Global", "GlobalKeys", "GlobalQueries", "Pattern",
    "PersistentMemoryAttention", "SlidingWindowAttention", "SparseAttention", "Strided", "StridedAttention", "Union",
    "plan_attention", "sparse_attention",
]
