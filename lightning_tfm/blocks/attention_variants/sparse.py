"""Position-based sparse attention (Child et al. 2019; Beltagy et al. 2020; Zaheer et al. 2020) as siblings of
`MultiHeadAttention`: the same projections, attention restricted to the pairs a `Pattern` allows.

`SparseAttention` takes any pattern (from Python: `SparseAttention(256, 4, pattern=Band(64) | Strided(16))`); the
named classes below fix one, so YAML selects them by class_path with plain integers. Training and long prompts
run the blocked kernel (`blocked.sparse_attention`), whose work grows with the allowed pairs, or on CUDA
FlexAttention with the pattern as its block mask (`flex.py`); a short step (one new token) attends densely over
the few keys its decoding state kept. A pattern that looks back a bounded
distance decodes with a `WindowCache` of that many keys instead of a growing one.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.attention_variants.blocked import sparse_attention
from lightning_tfm.blocks.attention_variants.flex import flex_available, flex_sparse_attention
from lightning_tfm.blocks.attention_variants.patterns import (
    Band,
    BlockLocal,
    Dilated,
    Everything,
    Global,
    Pattern,
    Strided,
)
from lightning_tfm.blocks.kv_cache import DecodingState, KVCache, MemoryCache, WindowCache
from lightning_tfm.blocks.masks import AttentionMask

_DENSE_PAIRS = 4096     # below this many (query, key) pairs a dense masked product beats planning the blocks


def lookback(pattern: Pattern, max_len: int) -> int | None:
    """The furthest back, in positions, a query below max_len may look under `pattern`; None if unbounded."""
    q = torch.arange(max_len)
    furthest = 0
    for part in pattern.parts():
        span = part.key_range(q, q) if part.key_positions() is None else None
        if span is None:
            return None
        furthest = max(furthest, int((q - span[0]).max()))
    return furthest


class SparseAttention(MultiHeadAttention):
    """Multi-head attention over the (query, key) pairs of a position pattern, causal or bidirectional.

    Exact: it equals full attention under the explicit mask pattern & causal & padding (tested for every
    pattern), and a pattern that allows everything is full attention.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        pattern: which query and key positions may meet (`patterns.py`; combine with `|`).
        block: queries per block of the blocked kernel.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    supports: ClassVar[Supports] = Supports(cross_attention=False)

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), pattern: Pattern = Everything(),
                 block: int = 64, n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout)
        if block < 1:
            raise ValueError(f"{type(self).__name__}: block={block}, must be >= 1")
        self.pattern, self.block = pattern, block

    def new_state(self, max_len: int = 0) -> DecodingState:
        if self.place.cross:
            return MemoryCache()
        reach = lookback(self.pattern, max(max_len, self.place.max_len)) if self.place.causal else None
        return KVCache(max_len) if reach is None else WindowCache(reach)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """q (B, H, T, D) at positions offset.., k and v (B, Hkv, S, D) ending at the newest position."""
        mask = mask or AttentionMask()
        T, S = q.shape[2], k.shape[2]
        key_start = mask.offset + T - S                  # a window cache keeps only the last keys
        key_mask = mask.key_mask[:, key_start:key_start + S] if mask.key_mask is not None else None
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights or T * S <= _DENSE_PAIRS:
            return self._attend_densely(q, k, v, mask, key_start, dropout)
        if flex_available(q, dropout, mask.bias is not None):
            return flex_sparse_attention(q, k, v, self.pattern, causal=mask.causal, q_offset=mask.offset,
                                         k_start=key_start, key_mask=key_mask)
        return sparse_attention(q, k, v, self.pattern, causal=mask.causal, q_offset=mask.offset, k_start=key_start,
                                key_mask=key_mask, bias=mask.bias, block=self.block, dropout=self.dropout,
                                training=self.training)

    def _attend_densely(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, key_start: int,
                        dropout: float) -> Tensor:
        """The explicit computation under the pattern's mask: short steps, and `keep_weights`."""
        q_pos = mask.query_positions(q.shape[2], q.device)
        k_pos = torch.arange(key_start, key_start + k.shape[2], device=q.device)
        pattern = self.pattern.allows(q_pos[:, None], k_pos[None, :])                  # (T, S)
        return self._attend_explicitly(q, k, v, mask, dropout, key_start, pattern)


class SlidingWindowAttention(SparseAttention):
    """Band attention (Longformer §3.1; Mistral's sliding window): a causal query sees the `window` keys ending
    at itself; a bidirectional one sees window - 1 keys on each side and itself. Decoding keeps window - 1 keys.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        window: keys a causal query sees, >= 1.
        block: queries per block of the blocked kernel.
        n_kv_heads: key/value heads; None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), window: int = 256,
                 block: int = 64, n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, Band(window), block, n_kv_heads, dropout)


class DilatedWindowAttention(SparseAttention):
    """Dilated sliding window (Longformer §3.1): `window` keys spaced `dilation` apart, reaching
    (window - 1) * dilation positions back (and forward, bidirectionally) at the cost of `window`.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        window: keys a causal query sees, >= 1.
        dilation: distance between consecutive keys, >= 1.
        block: queries per block of the blocked kernel.
        n_kv_heads: key/value heads; None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), window: int = 128,
                 dilation: int = 2, block: int = 64, n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, Dilated(window, dilation), block, n_kv_heads, dropout)


class StridedAttention(SparseAttention):
    """Strided attention (Sparse Transformer §4.2): query i sees keys j with (i - j) % stride == 0, about
    T / stride keys each, so its work is O(T^2 / stride); the paper takes stride ~ sqrt(T).

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        stride: distance between the keys a query sees, >= 1.
        block: queries per block of the blocked kernel.
        n_kv_heads: key/value heads; None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), stride: int = 64,
                 block: int = 64, n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, Strided(stride), block, n_kv_heads, dropout)


class BandStridedAttention(SparseAttention):
    """The Sparse Transformer's strided pattern (§4.2, for periodic data such as images and music): a local
    band of `window` keys plus every `stride`-th key before it.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        window: keys of the local band a causal query sees, >= 1.
        stride: distance between the strided keys, >= 1 (the paper: stride = window ~ sqrt(T)).
        block: queries per block of the blocked kernel.
        n_kv_heads: key/value heads; None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), window: int = 128,
                 stride: int = 128, block: int = 64, n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, Band(window) | Strided(stride), block, n_kv_heads, dropout)


class BlockLocalAttention(SparseAttention):
    """Block-local attention: the sequence is cut into blocks of `block` positions and a query sees the keys of
    its own block (causally: those up to itself). Blocks sit at absolute positions, so left padding moves them.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        block: positions per attention block, >= 1 (also the kernel's query block).
        n_kv_heads: key/value heads; None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), block: int = 64,
                 n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, BlockLocal(block), block, n_kv_heads, dropout)


class BlockGlobalAttention(SparseAttention):
    """Block-local attention plus global tokens, the composite the notes give for text (Longformer §3.1,
    BigBird §2): the first `n_global` positions see every key and every query sees them (a [CLS] token, a
    prompt). Causal, the global tokens see only earlier keys like any other.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        block: positions per attention block, >= 1.
        n_global: leading positions that are global, >= 1.
        n_kv_heads: key/value heads; None means n_heads.
        dropout: dropout on the attention weights, in [0, 1).
    """

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), block: int = 64,
                 n_global: int = 1, n_kv_heads: int | None = None, dropout: float = 0.0) -> None:
        super().__init__(d_model, n_heads, place, BlockLocal(block) | Global(n_first=n_global), block, n_kv_heads,
                         dropout)
