"""Online spherical k-means, one set of centroids per head, as the Routing Transformer routes with (Roy et al.
2021, §4.1): unit-norm centroids, each vector assigned to the centroid of highest cosine similarity, centroids
moved by an exponential moving average of the vectors assigned to them. And `cluster_chunks`, the layout in
which attention over clustered tokens computes only same-cluster pairs (`routing.py`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


class OnlineKMeans(nn.Module):
    """Per-head spherical k-means updated by an exponential moving average once per optimizer step.

    The centroids are a persistent buffer, so checkpoints hold them and a resumed run routes as the interrupted
    one would have. Statistics of the vectors seen since the last update (per-cluster sums and counts, fp32)
    are plain attributes, not buffers: DDP broadcasts buffers from rank 0 before each forward, which would
    replace every other rank's statistics. `update` sums them over the ranks first (when torch.distributed is
    initialised), so every rank moves its centroids identically.

    Args:
        n_heads: heads, each with its own centroids.
        n_clusters: centroids per head, >= 1.
        dim: width of the routed vectors (the head dimension), >= 1.
        decay: EMA decay of the centroids, in (0, 1) (the paper: 0.999).
        seed: seed of the random initial centroids (normal, then normalised).
    """

    def __init__(self, n_heads: int, n_clusters: int, dim: int, decay: float = 0.999, seed: int = 0) -> None:
        super().__init__()
        if n_heads < 1 or n_clusters < 1 or dim < 1:
            raise ValueError(f"OnlineKMeans: n_heads={n_heads}, n_clusters={n_clusters} and dim={dim} must be >= 1")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"OnlineKMeans: decay={decay}, must be in (0, 1)")
        self.decay = decay
        generator = torch.Generator().manual_seed(seed)
        centroids = torch.randn(n_heads, n_clusters, dim, generator=generator)
        self.register_buffer("centroids", F.normalize(centroids, dim=-1))        # (H, K, D), persistent
        self.sums: Tensor | None = None      # (H, K, D) fp32, since the last update
        self.counts: Tensor | None = None    # (H, K) fp32

    @property
    def n_clusters(self) -> int:
        return self.centroids.shape[1]

    def assign(self, x: Tensor) -> Tensor:
        """(B, H, T, D) unit vectors -> (B, H, T) index of the centroid of highest cosine similarity. In fp32
        even under autocast, so that a token routes alike whatever the shape of the computation around it."""
        with torch.autocast(x.device.type, enabled=False):
            similarity = torch.einsum("bhtd,hkd->bhtk", x.float(), self.centroids.float())
        return similarity.argmax(-1)

    def accumulate(self, x: Tensor, ids: Tensor, real: Tensor | None = None) -> None:
        """Add unit vectors x (B, H, T, D), assigned to `ids` (B, H, T), to the statistics of their clusters;
        positions where `real` (B, T) is False (padding) are left out."""
        x, ids = x.detach().float().transpose(1, 2), ids.transpose(1, 2)            # (B, T, H, D), (B, T, H)
        if real is not None:
            x, ids = x[real], ids[real]                                              # (N, H, D), (N, H)
        x, ids = x.reshape(-1, *x.shape[-2:]), ids.reshape(-1, ids.shape[-1])
        H, K, D = self.centroids.shape
        if self.sums is None:
            self.sums = x.new_zeros(H, K, D)
            self.counts = x.new_zeros(H, K)
        flat = (ids + torch.arange(H, device=ids.device) * K).flatten()             # (N H,) into H K slots
        self.sums.view(H * K, D).index_add_(0, flat, x.reshape(-1, D))
        self.counts.view(H * K).index_add_(0, flat, x.new_ones(flat.shape))

    @torch.no_grad()
    def update(self) -> None:
        """c <- normalise(decay c + (1 - decay) mean of the vectors assigned to c), for the clusters that got
        any since the last update (summed over DDP ranks), then start the statistics afresh."""
        if self.sums is None:
            return
        sums, counts = self.sums, self.counts
        self.sums, self.counts = None, None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        if not bool(counts.any()):
            return
        centroids = self.centroids.float()
        mean = sums / counts.clamp_min(1.0)[..., None]
        moved = F.normalize(self.decay * centroids + (1.0 - self.decay) * mean, dim=-1)
        self.centroids.copy_(torch.where(counts[..., None] > 0, moved, centroids))


def cluster_chunks(q_ids: Tensor, k_ids: Tensor, n_clusters: int, chunk: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """How the cluster part lays out its work. Each head's queries, sorted by cluster (by position within one),
    fill chunks of `chunk` slots, each cluster starting a new chunk; a chunk gathers the W keys of its cluster
    (W: the largest cluster's keys). Index T (or S) marks an empty query (key) slot.

    Args:
        q_ids: (B, H, T) queries' clusters.
        k_ids: (B, H, S) keys' clusters.
    Returns:
        slot (B, H, T): each query's slot; members (B, H, n chunk): each slot's query; chunk_cluster (B, H, n):
        each chunk's cluster; cluster_keys (B, H, K, W): each cluster's keys, in ascending order.
    """
    (B, H, T), S, K, C = q_ids.shape, k_ids.shape[-1], n_clusters, chunk
    q_sizes, k_sizes = _counts(q_ids, K), _counts(k_ids, K)                              # (B, H, K)
    q_chunks = -(-q_sizes // C)
    chunk_end = q_chunks.cumsum(-1)                                                      # chunks up to cluster k
    n, width = (int(x) for x in torch.stack([chunk_end[..., -1].max(), k_sizes.max()]).clamp_min(1))  # one sync
    order = torch.argsort(q_ids, dim=-1, stable=True)                                    # (B, H, T) by cluster
    cluster = q_ids.gather(-1, order)
    rank = _arange(T, q_ids) - (q_sizes.cumsum(-1) - q_sizes).gather(-1, cluster)       # place in its cluster
    slot = torch.empty_like(order).scatter_(-1, order, ((chunk_end - q_chunks) * C).gather(-1, cluster) + rank)
    members = torch.full((B, H, n * C), T, device=q_ids.device)
    members.scatter_(-1, slot, _arange(T, q_ids).expand_as(slot))
    chunk_cluster = torch.searchsorted(chunk_end, _arange(n, q_ids).expand(B, H, n).contiguous(), right=True)
    k_slot = (k_sizes.cumsum(-1) - k_sizes)[..., None] + _arange(width, k_ids)         # (B, H, K, W) sorted keys
    k_order = F.pad(torch.argsort(k_ids, dim=-1, stable=True), (0, 1), value=S)
    cluster_keys = k_order.gather(-1, k_slot.flatten(2).clamp_max(S)).view_as(k_slot)
    cluster_keys = cluster_keys.masked_fill(_arange(width, k_ids) >= k_sizes[..., None], S)
    return slot, members, chunk_cluster.clamp_max(K - 1), cluster_keys


def _counts(ids: Tensor, n: int) -> Tensor:
    """(B, H, L) cluster ids -> (B, H, n) how many of each."""
    counts = torch.zeros(*ids.shape[:-1], n, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(-1, ids, torch.ones_like(ids))


def _arange(n: int, like: Tensor) -> Tensor:
    return torch.arange(n, device=like.device)
