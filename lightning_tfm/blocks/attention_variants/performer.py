"""Performer (Choromanski et al. 2021, "Rethinking Attention with Performers"): linear attention whose feature
map, positive orthogonal random features (FAVOR+), estimates the softmax kernel exp(q . k / sqrt(D)) without bias.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from lightning_tfm.blocks.attention import LayerPlace
from lightning_tfm.blocks.attention_variants.linear_attention import LinearAttention, fp32


def orthogonal_gaussian(n_rows: int, dim: int, generator: torch.Generator) -> Tensor:
    """(n_rows, dim) rows w_f with E[exp(w . x)] = exp(|x|^2 / 2), as i.i.d. N(0, I) rows, but orthogonal within
    each block of `dim` rows (paper §2.4: lower variance): directions from the QR of a Gaussian matrix, norms
    drawn from chi(dim) (the norms of Gaussian vectors), independently per row."""
    blocks = []
    for start in range(0, n_rows, dim):
        q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        q = q * r.diagonal().sign()          # the sign fix that makes Q uniform (Haar); QR alone is biased
        blocks.append(q.T[:min(dim, n_rows - start)])                   # orthonormal rows
    norms = torch.randn(n_rows, dim, generator=generator).norm(dim=1)    # chi(dim)
    return torch.cat(blocks) * norms[:, None]


class PerformerAttention(LinearAttention):
    """`LinearAttention` with FAVOR+ features (Choromanski et al. 2021, §2.3, Lemma 1):
    phi(x) = exp(w_f . x' - |x'|^2 / 2) / sqrt(m), f = 1..m, with x' = x / D^(1/4), so that
    E[phi(q) . phi(k)] = exp(q . k / sqrt(D)), the softmax's kernel; the features are positive, so the
    denominator is too.

    Stabilisers (constant factors that cancel between numerator and denominator): a query's features are divided
    by their own maximum (that reads only the query). Key features are divided by one data-independent constant
    exp(c) with c = max(0, max_f |w_f|^2 / 2 - 40): w . k' - |k'|^2 / 2 = (|w|^2 - |w - k'|^2) / 2 <= |w|^2 / 2 for
    every key, so no key feature exceeds e^40 / sqrt(m) and no sum of them overflows fp32; with the margin of 40,
    keys near zero do not underflow either (c = max_f |w_f|^2 / 2 alone is ~88 for D = 128, at fp32's smallest
    normal number). The official implementation instead subtracts a max over all keys of the sequence: in causal
    mode that reads future keys, and since it then adds an epsilon to every feature (and a large future key can
    underflow earlier keys' features), a later token changes earlier outputs: a causality leak.

    The random matrix is a persistent buffer (saved in checkpoints). With `redraw_interval` N > 0 it is redrawn
    after every N optimizer steps, from a generator seeded by (seed, layer index, cross or not, number of
    redraws): every DDP rank draws the same matrix, and the layers of a model differ. The step count is a buffer
    too, so a resumed run continues the same sequence of matrices.

    `keep_weights` keeps the implied weights A_ts = phi(q_t) . phi(k_s) / sum_s' phi(q_t) . phi(k_s') (causal:
    s <= t), (B, H, T, S) with out = A V exactly, FAVOR+'s estimate of the softmax weights (as `LinearAttention`:
    not while decoding with a recurrent state).

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        n_features: random features m, >= 1 (the paper uses 256 for D = 64); more features, less variance.
        redraw_interval: optimizer steps between redraws of the random matrix, >= 0 (0: never).
        seed: seed of the random matrices.
        chunk: positions per chunk of the causal parallel form, >= 1.
        eps: floor of the denominator, > 0; only keeps 0 / 0 from NaN for a query that sees no key.
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: must be 0 (there are no attention weights to drop).
        bias: add biases to the projections.
    """

    headroom: ClassVar[float] = 40.0     # log of the largest key feature (times sqrt(m)) the shift allows

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), n_features: int = 256,
                 redraw_interval: int = 0, seed: int = 0, chunk: int = 64, eps: float = 1e-30,
                 n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, chunk, eps, n_kv_heads, dropout, bias)
        if n_features < 1:
            raise ValueError(f"PerformerAttention: n_features={n_features}, must be >= 1")
        if redraw_interval < 0:
            raise ValueError(f"PerformerAttention: redraw_interval={redraw_interval}, must be >= 0 (0: never)")
        self.n_features, self.redraw_interval, self.seed = n_features, redraw_interval, seed
        self.register_buffer("projection", self._draw(0))                       # (m, D)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))        # optimizer steps seen

    def _draw(self, redraws: int) -> Tensor:
        mixed = ((self.seed * 1_000_003 + self.place.index) * 2 + self.place.cross) * 1_000_003 + redraws
        generator = torch.Generator().manual_seed(mixed % 2 ** 63)
        return orthogonal_gaussian(self.n_features, self.head_dim, generator)

    def redraw(self) -> None:
        """Draw the matrix that belongs to the current step count (the same on every rank)."""
        redraws = int(self.steps) // self.redraw_interval if self.redraw_interval else 0
        self.projection.copy_(self._draw(redraws))

    def after_optimizer_step(self) -> None:
        if not self.redraw_interval:
            return
        self.steps += 1
        if int(self.steps) % self.redraw_interval == 0:
            self.redraw()

    def features(self, x: Tensor, is_query: bool) -> Tensor:
        """FAVOR+ features (B, H, T, D) -> (B, H, T, m) float32, each row scaled by its stabiliser."""
        with fp32(x):
            x = x.float() * self.head_dim ** -0.25
            logits = x @ self.projection.float().T                               # (B, H, T, m): w_f . x'
            if is_query:        # -|q'|^2 / 2 is constant per query too: the query's own max removes both
                logits = logits - logits.amax(-1, keepdim=True).detach()
            else:
                logits = logits - x.square().sum(-1, keepdim=True) / 2 - self.key_shift()
            return logits.exp() / math.sqrt(self.n_features)

    def key_shift(self) -> Tensor:
        """c = max(0, max_f |w_f|^2 / 2 - headroom), the same for every key: it never reads the data."""
        return (self.projection.float().square().sum(-1).amax() / 2 - self.headroom).clamp_min(0.0)
