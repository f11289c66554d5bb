"""Clustered attention (Vyas et al. 2020, "Fast Transformers with Clustered Attention"): per head the queries are
grouped into clusters, each cluster's centroid attends to the keys once, and every query takes its cluster's
output: O(T C D) for the clustering and O(C S D) for the attention instead of O(T S D)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.masks import AttentionMask


class ClusteredAttention(MultiHeadAttention):
    """Bidirectional self-attention computed once per cluster of queries (Vyas et al. 2020, §3.2).

    Per (batch row, head), the real queries are grouped into at most `n_clusters` clusters by Lloyd's k-means
    on the (rotated, with rotary positions) query vectors; the centroid Q_c of a cluster, the mean of its
    queries, attends to every real key, A_c = softmax(Q_c K^T / sqrt(D)) (softmax in fp32), and each query
    returns its cluster's A_c V. Gradients reach the queries through the centroids; the assignment is discrete.

    Differences from the paper: the paper first hashes the queries to bits (LSH) and runs k-means in Hamming
    space, which makes the clustering O(T C bits); we cluster the query vectors themselves (Euclidean), which
    costs O(T C D) per iteration and needs no random projections. The initial centroids are not random: of the
    n real queries, those of ranks floor(c n / k), c < k = min(n_clusters, n), evenly spaced by rank, so the
    clustering does not depend on where the padding is; pads join no cluster and are no key. A row with
    n <= n_clusters real queries gives each query its own cluster: exact full attention. The paper's improved
    variant (i-clustered: the top-k keys of each cluster recomputed per query) is not implemented. Dropout
    drops a cluster's weights for all its queries together.

    `keep_weights` keeps the weights each query actually uses, its centroid's A_c, as (B, H, T, S): the queries
    of one cluster share a row, so the picture shows the clustering.

    Cost: O(T C D (iterations + 1)) to cluster and O(C S D) to attend, memory O(T C + C S) per head.
    Self-attention only (no cross-attention, no incremental decoding), bidirectional, no position bias;
    rotary positions rotate queries and keys before the clustering (a shift of every position rotates every
    query alike, which k-means and the dot products ignore).

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model. Each head clusters its own queries.
        place: where the block sits; given by the model.
        n_clusters: clusters per head, >= 1.
        iterations: Lloyd iterations after the initialisation, >= 0; 0 assigns each query to its nearest seed.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: dropout on the centroids' attention weights, in [0, 1).
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(causal=False, cross_attention=False, position_bias=False, decoding="none")

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_clusters: int = 32,
                 iterations: int = 10, n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        if n_clusters < 1:
            raise ValueError(f"ClusteredAttention: n_clusters={n_clusters}, must be >= 1")
        if iterations < 0:
            raise ValueError(f"ClusteredAttention: iterations={iterations}, must be >= 0")
        self.n_clusters, self.iterations = n_clusters, iterations

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """Each query takes its cluster centroid's attention; q (B, H, T, D), k and v (B, Hkv, T, D), the keys
        those of the queries (self-attention of a whole sequence)."""
        mask = mask or AttentionMask()
        self._check(q, k, mask)
        B, H, T, D = q.shape
        real = mask.key_mask if mask.key_mask is not None else q.new_ones(B, T, dtype=torch.bool)
        assign = self.clusters(q, real)                                                  # (B, H, T)
        centroids = _cluster_means(q.float(), assign, real, min(self.n_clusters, T)).to(q.dtype)   # (B, H, C, D)
        dropout = self.dropout if self.training else 0.0
        out = self._attend_explicitly(centroids, k, v, AttentionMask(key_mask=mask.key_mask), dropout)  # (B,H,C,D)
        if self.keep_weights:     # the centroids' (B, H, C, S) weights, one row per query
            self.weights = self.weights.gather(2, assign[..., None].expand(B, H, T, self.weights.shape[-1]))
        return out.gather(2, assign[..., None].expand(B, H, T, D))                       # (B, H, T, D)

    @torch.no_grad()
    def clusters(self, q: Tensor, real: Tensor) -> Tensor:
        """(B, H, T) cluster index of every query after `iterations` Lloyd steps (pads get the nearest centroid,
        but count in none); q (B, H, T, D), real (B, T) True for real tokens."""
        T = q.shape[2]
        q = q.float()
        n_slots = min(self.n_clusters, T)
        seeds, valid = _seeds(real, n_slots)                                             # (B, C) each
        centroids = q.gather(2, seeds[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))   # (B, H, C, D)
        for _ in range(self.iterations):
            centroids = _cluster_means(q, _nearest(q, centroids, valid), real, n_slots, keep=centroids)
        return _nearest(q, centroids, valid)

    def _check(self, q: Tensor, k: Tensor, mask: AttentionMask) -> None:
        name = type(self).__name__
        if mask.causal or mask.bias is not None:
            raise ValueError(f"{name} is bidirectional and takes no position bias (supports.causal and "
                             "supports.position_bias are False)")
        if q.shape[2] != k.shape[2] or mask.offset:
            raise ValueError(f"{name} attends within one whole sequence: no cross-attention, no decoding cache")


def _seeds(real: Tensor, n_slots: int) -> tuple[Tensor, Tensor]:
    """The initial centroids' query indices (B, C) and which slots hold a cluster (B, C): the real tokens of
    ranks floor(c n / k), c < k = min(C, n), for n real tokens in the row."""
    n = real.sum(1, keepdim=True)                                                       # (B, 1)
    k = n.clamp(max=n_slots)
    slot = torch.arange(n_slots, device=real.device)[None, :]                           # (1, C)
    valid = slot < k
    rank = torch.where(valid, slot * n // k.clamp_min(1), 0)                              # (B, C)
    cumulative = real.long().cumsum(1)                                                  # (B, T) reals up to t
    index = torch.searchsorted(cumulative, rank + 1)     # first position holding rank + 1 reals: the ranked one
    return index.clamp(max=real.shape[1] - 1), valid


def _nearest(q: Tensor, centroids: Tensor, valid: Tensor) -> Tensor:
    """(B, H, T) index of the valid centroid nearest each query: argmin |c|^2 - 2 q.c (|q|^2 is the same for
    every centroid), computed without the (T, C, D) differences."""
    distance = centroids.square().sum(-1)[:, :, None, :] - 2 * q @ centroids.transpose(-1, -2)   # (B, H, T, C)
    return distance.masked_fill(~valid[:, None, None, :], float("inf")).argmin(-1)


def _cluster_means(q: Tensor, assign: Tensor, real: Tensor, n_slots: int, keep: Tensor | None = None) -> Tensor:
    """(B, H, C, D) mean of the real queries in each cluster; an empty cluster keeps `keep` (zeros if None)."""
    B, H, T, D = q.shape
    weight = real[:, None, :].to(q.dtype).expand(B, H, T)                                 # pads count in none
    sums = q.new_zeros(B, H, n_slots, D).scatter_add(2, assign[..., None].expand(B, H, T, D), q * weight[..., None])
    counts = q.new_zeros(B, H, n_slots).scatter_add(2, assign, weight)[..., None]           # (B, H, C, 1)
    means = sums / counts.clamp_min(1.0)
    return means if keep is None else torch.where(counts > 0, means, keep)
