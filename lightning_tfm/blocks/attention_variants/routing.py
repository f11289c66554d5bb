"""Content-based sparse attention, the Routing Transformer (Roy et al. 2021, "Efficient Content-Based Sparse
Attention with Routing Transformers"): queries and keys are routed to clusters by online k-means (`kmeans.py`),
and a query attends to the keys of its own cluster plus a local window of keys around it.

The cluster part sorts each head's queries and keys by cluster and lays the sorted queries out in chunks, each
within one cluster, that gather only that cluster's keys. The window part gathers, per block of queries, the
keys within the window by position, leaving out the pairs the cluster part holds. Each part ends in a partial
softmax; their log-sum-exps merge them into the softmax over the union, exactly.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.attention_variants.kmeans import OnlineKMeans, cluster_chunks
from lightning_tfm.blocks.kv_cache import DecodingState, KVCache
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import apply_rotary

_EMPTY = -1e30       # a masked logit: finite, so a row with no allowed key stays free of NaN (its weights are zeroed)


class RoutingAttention(MultiHeadAttention):
    """Multi-head attention over the pairs that share a k-means cluster or lie within a local window.

    Query i sees key j iff (cluster(q_i) == cluster(k_j) or |i - j| < window) and the mask allows the pair
    (causal: j <= i; key j not padding): causal queries see at least the `window` keys ending at themselves,
    bidirectional ones window - 1 keys on each side too (as `Band`). Queries and keys are normalised per head
    and routed by the same per-head centroids (the paper's shared query/key space), before rotary positions
    rotate them: routing depends on content alone, so shifting a sequence (left padding) routes it alike. The
    logits are the ordinary q k^T / sqrt(D): routing only decides which pairs exist. One cluster is full
    attention exactly.

    Exact where the paper approximates: its balanced top-k routing gives every cluster the same number of
    queries and keys, so a causal query may be grouped with later keys (masked afterwards) and some tokens are
    routed nowhere; here every token goes to its nearest centroid, whatever the cluster sizes. A head's work is
    O(T (largest cluster + window)) instead of O(T^2).

    Training accumulates the normalised queries and keys of real tokens with their clusters; after each
    optimizer step the centroids move by an exponential moving average of them (summed over DDP ranks), so
    gradient accumulation updates them once. The commitment loss, commitment * mean ||x - c(x)||^2 over real
    queries and keys, pulls the projections (not the centroids) towards their centroids (paper §4.1).

    Decoding keeps every key and value and each key's clusters (`RoutingCache`), exact while the centroids stay
    fixed (inference). Short steps, and `keep_weights`, take the explicit dense path under the same pattern.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model. Each head has its own centroids.
        place: where the block sits; given by the model.
        n_clusters: k-means clusters per head, >= 1 (the paper: about sqrt(T)).
        window: local window, >= 0: keys at |i - j| < window are seen whatever their cluster; 0 for none.
        commitment: coefficient of the commitment loss, >= 0 (0: no loss).
        decay: EMA decay of the centroids, in (0, 1) (the paper: 0.999).
        chunk: queries per chunk of the sorted computation and per block of the window computation, >= 1.
        seed: seed of the initial centroids.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads. Keys are
            repeated to the query heads and routed per query head.
        dropout: dropout on the attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(cross_attention=False, position_bias=False)
    dense_pairs: ClassVar[int] = 4096     # up to this many (query, key) pairs the explicit dense path is faster

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_clusters: int = 8,
                 window: int = 64, commitment: float = 1e-4, decay: float = 0.999, chunk: int = 64, seed: int = 0,
                 n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        for name, value, low in (("n_clusters", n_clusters, 1), ("window", window, 0), ("chunk", chunk, 1)):
            if value < low:
                raise ValueError(f"RoutingAttention: {name}={value}, must be >= {low}")
        if commitment < 0:
            raise ValueError(f"RoutingAttention: commitment={commitment}, must be >= 0")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"RoutingAttention: decay={decay}, must be in (0, 1)")
        self.window, self.commitment, self.chunk = window, commitment, chunk
        self.kmeans = OnlineKMeans(n_heads, n_clusters, self.head_dim, decay, seed)
        self._commitment_loss: Tensor | None = None

    def auxiliary_losses(self) -> dict[str, Tensor]:
        if not self.training or self.commitment == 0 or self._commitment_loss is None:
            return {}
        return {"routing_commitment": self.commitment * self._commitment_loss}

    def after_optimizer_step(self) -> None:
        self.kmeans.update()

    def new_state(self, max_len: int = 0) -> RoutingCache:
        return RoutingCache(max_len)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As `MultiHeadAttention.forward` (self-attention only); queries and keys are routed before their
        rotary rotation, so routing depends on content alone.

        Args:
            x: (B, T, C) queries' inputs.
            context: must be None: cross-attention is not supported.
            mask: which keys each query sees; None for all.
            state: this block's `RoutingCache`: earlier keys, values and key clusters.
            rotary: (cos, sin) (T, D) of the query positions, for rotary position embeddings.
        Returns:
            (B, T, C).
        """
        if context is not None:
            raise ValueError("RoutingAttention cannot attend to another sequence (supports.cross_attention is False)")
        mask = mask or AttentionMask()
        B, T, _ = x.shape
        q, k, v = self._split(self.qkv(x), B, T)
        q_ids, k_ids = self.route(q, k, mask)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if state is not None:
            k, v, k_ids = state.append_routed(k, v, k_ids)                         # (B, Hkv or H, L + T, ..)
        y = self._attend_routed(q, k, v, q_ids, k_ids, mask)                          # (B, H, T, D)
        return self.out(y.transpose(1, 2).reshape(B, T, self.q_width))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """The contract's entry point: q (B, H, T, D) and k, v (B, Hkv, S, D) routed as they are given."""
        mask = mask or AttentionMask()
        q_ids, k_ids = self.route(q, k, mask)
        return self._attend_routed(q, k, v, q_ids, k_ids, mask)

    def route(self, q: Tensor, k: Tensor, mask: AttentionMask) -> tuple[Tensor, Tensor]:
        """(B, H, T) clusters of the queries and (B, H, S) of the keys (B, Hkv, S, D), each key routed once per
        query head of its group, the keys ending at the newest position. In training, also the k-means
        statistics and the commitment loss."""
        T, S = q.shape[2], k.shape[2]
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        q_unit, k_unit = F.normalize(q.float(), dim=-1), F.normalize(k.float(), dim=-1)
        q_ids, k_ids = self.kmeans.assign(q_unit), self.kmeans.assign(k_unit)
        q_real, k_real = _real(mask, mask.offset, T), _real(mask, mask.offset + T - S, S)
        self._learn(q_unit, q_ids, q_real, k_unit, k_ids, k_real)
        return q_ids, k_ids

    def _attend_routed(self, q: Tensor, k: Tensor, v: Tensor, q_ids: Tensor, k_ids: Tensor,
                       mask: AttentionMask) -> Tensor:
        """q (B, H, T, D) at positions offset.., k and v (B, Hkv, S, D) ending at the newest position, routed
        to q_ids (B, H, T) and k_ids (B, H, S)."""
        if mask.bias is not None:
            raise ValueError("RoutingAttention cannot take a position bias (supports.position_bias is False)")
        T, S = q.shape[2], k.shape[2]
        key_start = mask.offset + T - S
        dropout = self.dropout if self.training else 0.0
        if self.keep_weights or T * S <= self.dense_pairs:
            pattern = self.routing_pattern(q_ids, k_ids, mask.offset, key_start)
            return self._attend_explicitly(q, k, v, mask, dropout, key_start, pattern)
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)           # (B, H, S, D)
        k_real = _real(mask, key_start, S)
        out, lse = self._cluster_part(q, k, v, q_ids, k_ids, k_real, mask.causal, dropout)
        if self.window > 0 and self.kmeans.n_clusters > 1:
            local, local_lse = self._window_part(q, k, v, q_ids, k_ids, k_real, mask.causal, dropout)
            share = torch.sigmoid(lse - local_lse)[..., None]       # exp(lse) / (exp(lse) + exp(local_lse))
            out = share * out + (1.0 - share) * local
        return out.to(v.dtype)

    def routing_pattern(self, q_ids: Tensor, k_ids: Tensor, q_start: int, key_start: int) -> Tensor:
        """(B, H, T, S) routing pattern, before causality and padding: same cluster, or within the window."""
        q_pos = torch.arange(q_start, q_start + q_ids.shape[2], device=q_ids.device)
        k_pos = torch.arange(key_start, key_start + k_ids.shape[2], device=q_ids.device)
        near = (q_pos[:, None] - k_pos[None, :]).abs() < self.window                             # (T, S)
        return (q_ids[..., :, None] == k_ids[..., None, :]) | near

    def _learn(self, q_unit: Tensor, q_ids: Tensor, q_real: Tensor | None, k_unit: Tensor, k_ids: Tensor,
               k_real: Tensor | None) -> None:
        """In training: the k-means statistics, and the commitment loss mean ||x - c(x)||^2 over real queries
        and keys (centroids constant, so its gradient reaches the projections only)."""
        self._commitment_loss = None
        if not self.training:
            return
        self.kmeans.accumulate(q_unit, q_ids, q_real)
        self.kmeans.accumulate(k_unit, k_ids, k_real)
        if self.commitment == 0:
            return
        total = count = q_unit.new_zeros(())
        centroids = self.kmeans.centroids.float()
        for x, ids, real in ((q_unit, q_ids, q_real), (k_unit, k_ids, k_real)):
            nearest = centroids[torch.arange(self.n_heads, device=ids.device)[:, None], ids]    # (B, H, T, D)
            distance = (x - nearest).square().sum(-1)                                          # (B, H, T)
            weight = torch.ones_like(distance) if real is None else real[:, None].expand_as(distance).float()
            total, count = total + (distance * weight).sum(), count + weight.sum()
        self._commitment_loss = total / count.clamp_min(1.0)

    def _cluster_part(self, q: Tensor, k: Tensor, v: Tensor, q_ids: Tensor, k_ids: Tensor, k_real: Tensor | None,
                      causal: bool, dropout: float) -> tuple[Tensor, Tensor]:
        """Attention within clusters, k and v (B, H, S, D) repeated to the query heads: the (B, H, T, D) fp32
        output normalised over these pairs and (B, H, T) their log-sum-exp (about -1e30 for a query with none).
        Work: (T + K C) W pairs per head (`cluster_chunks`), against T S for full attention."""
        B, H, T, D = q.shape
        S, C = k.shape[2], self.chunk
        slot, members, chunk_cluster, cluster_keys = cluster_chunks(q_ids, k_ids, self.kmeans.n_clusters, C)
        n = chunk_cluster.shape[-1]
        key = _select(cluster_keys, chunk_cluster)                                   # (B, H, n, W), S: none
        allowed = (key < S)[..., None, :]
        if causal:        # query index i is key index S - T + i
            allowed = allowed & (key[..., None, :] <= members.view(B, H, n, C, 1) + (S - T))
        # empty slots read the last query or key: masked, or never read back
        key, cluster_keys, members = key.clamp_max(S - 1), cluster_keys.clamp_max(S - 1), members.clamp_max(T - 1)
        if k_real is not None:
            real = _select(k_real[:, None].expand(B, H, S), key.flatten(2)).view_as(key)
            allowed = allowed & real[..., None, :]                                      # (B, H, n, C, W)
        qs = _select(q, members).view(B, H, n, C, D)
        # keys and values gathered once per cluster, then copied per chunk in blocks of W D
        ks, vs = (_select(_select(x, cluster_keys.flatten(2)).view(*cluster_keys.shape, D), chunk_cluster)
                  for x in (k, v))                                                  # (B, H, n, W, D)
        logits = (qs @ ks.transpose(-1, -2)).float() * self.head_dim ** -0.5
        out, lse = _partial_softmax(logits, allowed, vs, dropout, self.training)
        return _select(out.view(B, H, n * C, D), slot), lse.view(B, H, n * C).gather(-1, slot)

    def _window_part(self, q: Tensor, k: Tensor, v: Tensor, q_ids: Tensor, k_ids: Tensor, k_real: Tensor | None,
                     causal: bool, dropout: float) -> tuple[Tensor, Tensor]:
        """Attention within the window, leaving out the same-cluster pairs (the cluster part has them); as
        `_cluster_part`. Block b of C queries gathers the keys from `back` before its first query to `ahead`
        after its last one (a strided view of the padded keys)."""
        B, H, T, D = q.shape
        S = k.shape[2]
        C = min(self.chunk, T)
        n, first = -(-T // C), S - T                       # query index i is key index first + i
        back = min(self.window - 1, first + (n - 1) * C)    # no block needs keys before index 0
        ahead = 0 if causal else min(self.window - 1, T - C)
        width = back + C + ahead
        blocks = [F.pad(x, (0, 0, back, n * C - T + ahead))[:, :, first:].unfold(2, width, C) for x in (k, v)]
        ks, vs = blocks[0], blocks[1].transpose(-1, -2)    # (B, H, n, D, K), (B, H, n, K, D)
        qs = F.pad(q, (0, 0, 0, n * C - T)).view(B, H, n, C, D)
        start = first - back + torch.arange(n, device=q.device)[:, None] * C
        key = start + torch.arange(width, device=q.device)                                       # (n, K)
        distance = torch.arange(C, device=q.device)[:, None] + back - torch.arange(width, device=q.device)  # (C, K)
        near = distance.abs() < self.window
        if causal:
            near = near & (distance >= 0)
        allowed = near & ((key >= 0) & (key < S))[:, None, :]                                     # (n, C, K)
        key = key.clamp(0, S - 1).flatten().expand(B, H, -1)
        q_cluster = F.pad(q_ids, (0, n * C - T)).view(B, H, n, C)
        allowed = allowed & (q_cluster[..., None] != k_ids.gather(-1, key).view(B, H, n, 1, width))
        if k_real is not None:
            allowed = allowed & k_real[:, None].expand(B, H, S).gather(-1, key).view(B, H, n, 1, width)
        logits = (qs @ ks).float() * self.head_dim ** -0.5                                        # (B, H, n, C, K)
        out, lse = _partial_softmax(logits, allowed, vs, dropout, self.training)
        return out.view(B, H, n * C, D)[:, :, :T], lse.view(B, H, n * C)[:, :, :T]


def _real(mask: AttentionMask, start: int, length: int) -> Tensor | None:
    """(B, length) True for the real tokens at positions start..start + length - 1; None if none is padding."""
    return None if mask.key_mask is None else mask.key_mask[:, start:start + length]


def _select(x: Tensor, index: Tensor) -> Tensor:
    """Entries `index` (B, H, M) of x (B, H, L, ...) along L -> (B, H, M, ...), each a contiguous copy."""
    B, H, L = x.shape[:3]
    flat = index + torch.arange(B * H, device=x.device).view(B, H, 1) * L
    # indexing, not index_select: the latter copies rows of many elements slowly on CPU
    return x.reshape(B * H * L, *x.shape[3:])[flat.flatten()].view(*index.shape, *x.shape[3:])


def _partial_softmax(logits: Tensor, allowed: Tensor, v: Tensor, dropout: float,
                     training: bool) -> tuple[Tensor, Tensor]:
    """softmax over the allowed entries of the last dim of fp32 logits, times v: (.., Q, D) fp32 output and
    (.., Q) log-sum-exp. A row with no allowed entry gives zeros and a log-sum-exp near -1e30, which the merge
    weighs by 0; the masked logits are finite, so nothing on the way is NaN."""
    logits = logits.masked_fill_(~allowed, _EMPTY)          # in place: the product's backward does not need it
    weights = torch.softmax(logits, -1)                     # fused; exp of the masked logits is slow on CPU
    top = logits.argmax(-1, keepdim=True)                   # lse = logit - log softmax, at the largest one
    lse = (logits.gather(-1, top) - weights.gather(-1, top).log()).squeeze(-1)
    weights = F.dropout(weights, dropout, training)
    seen = (lse > _EMPTY / 2)[..., None]
    return (weights.to(v.dtype) @ v).float() * seen, lse


class RoutingCache(KVCache):
    """A `KVCache` that also keeps the cached keys' clusters (B, H, L), fixed while decoding (inference does
    not move the centroids): a step routes only its new keys, and the keys were routed before their rotation.

    Args:
        max_len: positions to preallocate on the first append (0: exactly what the first append brings).
    """

    def __init__(self, max_len: int = 0) -> None:
        super().__init__(max_len)
        self.ids: Tensor | None = None

    def append_routed(self, k: Tensor, v: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) and their clusters (B, H, T); return all of them (.., L + T, ..)."""
        k, v = self.append(k, v)
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], dim=2)
        return k, v, self.ids

    def select(self, index: Tensor) -> None:
        super().select(index)
        if self.ids is not None:
            self.ids = self.ids.index_select(0, index)
