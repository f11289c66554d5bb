"""Decoding state for incremental decoding: each generated token attends to what earlier steps left behind
without recomputing it. Every attention block owns the state of its own layer (`Attention.new_state`): a
growing key/value cache for full attention, the projected encoder output for cross-attention, and whatever a
variant needs (a window of recent keys, a recurrent summary). The model counts positions, not the states."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class DecodingState(Protocol):
    """What every layer's decoding state offers: keep or repeat batch rows (beam reordering, expanding
    sentences to beams, dropping finished rows)."""

    def select(self, index: Tensor) -> None: ...


def select_rows(buffer: Tensor, index: Tensor, filled: int) -> Tensor:
    """Rows `index` of a (B, Hkv, L, D) buffer, copying only its first `filled` positions."""
    picked = buffer.new_empty(len(index), *buffer.shape[1:])
    torch.index_select(buffer[:, :, :filled], 0, index, out=picked[:, :, :filled])
    return picked


class KVCache:
    """Keys and values of one self-attention block, (B, Hkv, L, D) each, in a buffer that grows by doubling.

    Args:
        max_len: positions to preallocate on the first append (0: exactly what the first append brings).
    """

    def __init__(self, max_len: int = 0) -> None:
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

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
        """Keep batch rows `index`; copies only the filled positions, not the whole preallocated buffer."""
        if self.k is not None:
            self.k, self.v = select_rows(self.k, index, self.length), select_rows(self.v, index, self.length)


class WindowCache:
    """The keys and values of the last `window` positions only, for attention that never looks further back
    (a sliding window, an adaptive span): memory stays O(window) however long the generation. The keys it
    returns end at the newest position, so they start at position offset + T - S (what the attention computes).

    Args:
        window: positions to keep after each step, >= 0 (a step of T tokens briefly holds window + T).
    """

    def __init__(self, window: int) -> None:
        if window < 0:
            raise ValueError(f"WindowCache: window={window}, must be >= 0")
        self.window = window
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add k, v (B, Hkv, T, D); return the kept and the new keys and values (B, Hkv, L + T, D)."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        drop = max(0, k.shape[2] - self.window)
        self.k, self.v = k[:, :, drop:], v[:, :, drop:]
        return k, v

    def select(self, index: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class MemoryCache:
    """The keys and values a cross-attention block projected from the encoder output: one row per sentence
    when its beams share them (`Supports.shared_memory`), else one per decoded row."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def store(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def select(self, index: Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class DecoderCache:
    """The decoding states of a whole decoder stack, one per layer (and one per cross-attention block in an
    encoder-decoder), plus the number of positions decoded so far, which the model advances.

    Args:
        self_attn: each layer's self-attention state.
        cross_attn: each layer's cross-attention state, or None for a decoder-only model.
    """

    def __init__(self, self_attn: list[DecodingState], cross_attn: list[DecodingState] | None = None) -> None:
        self.self_attn, self.cross_attn = self_attn, cross_attn
        self.length = 0

    def advance(self, n: int) -> None:
        """Count n more decoded positions (the next token's offset)."""
        self.length += n

    def reorder(self, index: Tensor, memory_index: Tensor | None = None) -> None:
        """Follow beam search: self-attention states take rows `index` (R,), the parent of each new row.

        Cross-attention states take rows `memory_index` when given (sentences expanded to beams or dropped);
        otherwise they stay, since the parents are beams of the same sentence, which share the encoder output.
        """
        for state in self.self_attn:
            state.select(index)
        if memory_index is not None:
            for state in self.cross_attn or []:
                state.select(memory_index)

    def select(self, index: Tensor) -> None:
        """Keep or repeat whole rows, self- and cross-attention alike (e.g. expand sentences to beams)."""
        self.reorder(index, index)
