"""Key/value caches for incremental decoding: each generated token attends to the keys and values of all
earlier ones without recomputing them."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of one attention block, (B, Hkv, L, D) each, in a buffer that grows by doubling.

    Self-attention appends the new positions at every step. Cross-attention fills it once with the
    projected encoder output and then only reads it (`filled`).

    Args:
        max_len: positions to preallocate on the first append (0: exactly what the first append brings).
    """

    def __init__(self, max_len: int = 0) -> None:
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    @property
    def filled(self) -> bool:
        return self.length > 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, Hkv, T, D) after the cached positions; return all keys and values (B, Hkv, L+T, D)."""
        end = self.length + k.shape[2]
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], max(self.max_len, end), k.shape[3])
            self.v = v.new_empty(*v.shape[:2], max(self.max_len, end), v.shape[3])
        elif end > self.k.shape[2]:
            self.k, self.v = self._grown(self.k, end), self._grown(self.v, end)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grown(self, buffer: Tensor, needed: int) -> Tensor:
        bigger = buffer.new_empty(*buffer.shape[:2], max(needed, 2 * buffer.shape[2]), buffer.shape[3])
        bigger[:, :, : self.length] = buffer[:, :, : self.length]
        return bigger

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam reordering, expanding each sentence to its beams, dropping rows).

        Copies only the filled positions, not the whole preallocated buffer."""
        if self.k is not None:
            self.k, self.v = self._rows(self.k, index), self._rows(self.v, index)

    def _rows(self, buffer: Tensor, index: Tensor) -> Tensor:
        picked = buffer.new_empty(len(index), *buffer.shape[1:])
        torch.index_select(buffer[:, :, : self.length], 0, index, out=picked[:, :, : self.length])
        return picked


class DecoderCache:
    """The caches of a whole decoder stack: one self-attention cache per layer and, in an encoder-decoder,
    one cross-attention cache per layer.

    Args:
        n_layers: decoder layers.
        max_len: positions to preallocate for self-attention.
        cross: whether the layers also attend to an encoder output.
    """

    def __init__(self, n_layers: int, max_len: int = 0, cross: bool = False) -> None:
        self.self_attn = [KVCache(max_len) for _ in range(n_layers)]
        self.cross_attn = [KVCache() for _ in range(n_layers)] if cross else None

    @property
    def length(self) -> int:
        """Positions decoded so far: the offset of the next token."""
        return self.self_attn[0].length

    def reorder(self, index: Tensor) -> None:
        """Follow beam search's choice of parent hypotheses (B,) within each sentence.

        Cross-attention caches are left alone: all beams of a sentence share the same encoder output.
        """
        for cache in self.self_attn:
            cache.select(index)

    def select(self, index: Tensor) -> None:
        """Keep or repeat whole rows, self- and cross-attention alike (e.g. expand sentences to beams)."""
        self.reorder(index)
        for cache in self.cross_attn or []:
            cache.select(index)


def expand_index(batch_size: int, n: int, device: torch.device | None = None) -> Tensor:
    """Row index that repeats each of batch_size rows n times: [0,0,..,1,1,..] (B * n,)."""
    return torch.arange(batch_size, device=device).repeat_interleave(n)
