"""Efficient attention variants, siblings of `MultiHeadAttention` chosen per layer by class_path.

Restricting attention: position-based sparse patterns (and the blocked kernel that computes them), adaptive
attention span, persistent memory, content-based routing (k-means). Approximating it: linearized attention
(elu+1, Performer), query prototypes (clustered attention), memory compression (memory-compressed attention,
Linformer, inducing points, Poolingformer)."""

from lightning_tfm.blocks.attention_variants.adaptive_span import AdaptiveSpanAttention
from lightning_tfm.blocks.attention_variants.block_plans import BlockPlan, plan_attention
from lightning_tfm.blocks.attention_variants.blocked import sparse_attention
from lightning_tfm.blocks.attention_variants.clustered import ClusteredAttention
from lightning_tfm.blocks.attention_variants.compressed import CompressedCache, MemoryCompressedAttention
from lightning_tfm.blocks.attention_variants.inducing_points import InducingPointAttention
from lightning_tfm.blocks.attention_variants.kmeans import OnlineKMeans
from lightning_tfm.blocks.attention_variants.linear_attention import LinearAttention, LinearAttentionState
from lightning_tfm.blocks.attention_variants.linformer import LinformerAttention
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
from lightning_tfm.blocks.attention_variants.performer import PerformerAttention
from lightning_tfm.blocks.attention_variants.persistent_memory import PersistentMemoryAttention
from lightning_tfm.blocks.attention_variants.poolingformer import PoolingformerAttention
from lightning_tfm.blocks.attention_variants.routing import RoutingAttention
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
    "BlockLocalAttention", "BlockPlan", "ClusteredAttention", "CompressedCache", "Dilated", "DilatedWindowAttention",
    "Everything", "Global", "GlobalKeys", "GlobalQueries", "InducingPointAttention", "LinearAttention",
    "LinearAttentionState", "LinformerAttention", "MemoryCompressedAttention", "OnlineKMeans", "Pattern",
    "PerformerAttention", "PersistentMemoryAttention", "PoolingformerAttention", "RoutingAttention",
    "SlidingWindowAttention", "SparseAttention", "Strided", "StridedAttention", "Union", "plan_attention",
    "sparse_attention",
]
