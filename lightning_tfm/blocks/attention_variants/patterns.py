"""Sparse attention patterns as small composable values: which key positions each query position may see.

A pattern is a frozen dataclass with `allows(q_pos, k_pos) -> bool tensor` over absolute positions that
broadcast, (T, 1) against (1, S). Causality is not part of a pattern: callers apply key <= query on top.
Patterns combine with `|` (`Union`), giving the composites of the papers: band + strided for periodic data
(Child et al. 2019, "Generating Long Sequences with Sparse Transformers", §4.2) and block-local + global tokens
for text (Beltagy et al. 2020, Longformer, §3.1; Zaheer et al. 2020, BigBird, §2). Besides `allows`, a pattern
may give hints that let `blocked.sparse_attention` gather only the keys it can need (`modulus`, `key_range`,
`key_positions`, `query_positions`); a new pattern with `allows` alone is correct but computed densely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class Pattern:
    """Base of the patterns: `allows` plus the planning hints, whose defaults mean "any key, any query".

    Subclasses are frozen dataclasses: values that compare and hash, since plans are cached per pattern."""

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Args:
            q_pos: long query positions, e.g. (T, 1).
            k_pos: long key positions broadcasting against q_pos, e.g. (1, S).
        Returns:
            bool tensor of the broadcast shape, True where the query may see the key.
        """
        raise NotImplementedError

    def parts(self) -> tuple[Pattern, ...]:
        """The pieces computed each with its own plan; their allowed pairs may overlap."""
        return (self,)

    @property
    def modulus(self) -> int:
        """m such that every allowed pair has q_pos = k_pos (mod m); 1 means no such structure."""
        return 1

    def key_range(self, q_lo: Tensor, q_hi: Tensor) -> tuple[Tensor, Tensor] | None:
        """(first, last) key position any query in [q_lo, q_hi] may see, elementwise; None if unbounded."""
        return None

    def key_positions(self) -> tuple[int, ...] | None:
        """The only key positions any query may see (the same for all queries), or None."""
        return None

    def query_positions(self) -> tuple[int, ...] | None:
        """The only query positions that may see any key, or None."""
        return None

    def __or__(self, other: Pattern) -> Union:
        return Union(self, other)


@dataclass(frozen=True)
class Everything(Pattern):
    """Full attention: every query sees every key (the reference the sparse patterns are cut from)."""

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return torch.ones_like(q_pos - k_pos, dtype=torch.bool)


@dataclass(frozen=True)
class Band(Pattern):
    """Sliding window (Longformer §3.1): query i sees the keys with |i - j| <= window - 1.

    Causal, this is the `window` keys ending at the query, i - window + 1 .. i (Longformer's causal form, Mistral's
    sliding window). Bidirectional, it is window - 1 keys on each side plus the query's own, 2 * window - 1 in all;
    Longformer's bidirectional window w (w / 2 on each side) is `Band(w // 2 + 1)`. A window >= T gives full
    attention. Work and memory grow as O(T * window).

    Args:
        window: keys a causal query sees, >= 1.
    """

    window: int

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"Band: window={self.window}, must be >= 1")

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return (q_pos - k_pos).abs() < self.window

    def key_range(self, q_lo: Tensor, q_hi: Tensor) -> tuple[Tensor, Tensor]:
        return q_lo - (self.window - 1), q_hi + (self.window - 1)


@dataclass(frozen=True)
class Dilated(Pattern):
    """Dilated sliding window (Longformer §3.1): keys at distances 0, d, 2d, .., (window - 1) * d from the query.

    Like `Band` (which is `Dilated(window, 1)`): causal queries see `window` keys ending at themselves, spaced by
    `dilation`; bidirectional ones see window - 1 on each side too. Work and memory grow as O(T * window).

    Args:
        window: keys a causal query sees, >= 1.
        dilation: distance between consecutive keys, >= 1.
    """

    window: int
    dilation: int

    def __post_init__(self) -> None:
        if self.window < 1 or self.dilation < 1:
            raise ValueError(f"Dilated: window={self.window}, dilation={self.dilation}, both must be >= 1")

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        distance = q_pos - k_pos
        return (distance % self.dilation == 0) & (distance.abs() <= (self.window - 1) * self.dilation)

    @property
    def modulus(self) -> int:
        return self.dilation

    def key_range(self, q_lo: Tensor, q_hi: Tensor) -> tuple[Tensor, Tensor]:
        span = (self.window - 1) * self.dilation
        return q_lo - span, q_hi + span


@dataclass(frozen=True)
class Strided(Pattern):
    """Strided attention (Sparse Transformer §4.2, A^(2)): query i sees the keys j with (i - j) % stride == 0.

    The paper's strided pattern is `Band(stride) | Strided(stride)`. Alone, each query sees about S / stride
    keys, so work and memory are O(T * S / stride) by nature: the paper takes stride ~ sqrt(T).

    Args:
        stride: period of the seen keys, >= 1.
    """

    stride: int

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ValueError(f"Strided: stride={self.stride}, must be >= 1")

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return (q_pos - k_pos) % self.stride == 0

    @property
    def modulus(self) -> int:
        return self.stride


@dataclass(frozen=True)
class BlockLocal(Pattern):
    """Block-local attention (BigBird §2, Sparse Transformer's "fixed" A^(1)): positions are cut into blocks of
    `block` from position 0, and a query sees the keys of its own block. Work and memory grow as O(T * block).

    Args:
        block: positions per block, >= 1.
    """

    block: int

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"BlockLocal: block={self.block}, must be >= 1")

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return torch.div(q_pos, self.block, rounding_mode="floor") == torch.div(k_pos, self.block,
                                                                              rounding_mode="floor")

    def key_range(self, q_lo: Tensor, q_hi: Tensor) -> tuple[Tensor, Tensor]:
        first = torch.div(q_lo, self.block, rounding_mode="floor") * self.block
        return first, torch.div(q_hi, self.block, rounding_mode="floor") * self.block + self.block - 1


@dataclass(frozen=True)
class _GlobalSet(Pattern):
    """The global positions shared by `Global` and its two parts."""

    n_first: int = 0
    positions: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.n_first < 0 or any(p < 0 for p in self.positions) or not (self.n_first or self.positions):
            raise ValueError(f"{type(self).__name__}: n_first={self.n_first}, positions={self.positions}; "
                             "give n_first >= 1 or some positions >= 0")

    def _is_global(self, pos: Tensor) -> Tensor:
        # comparisons only, no tensor built from the positions: FlexAttention compiles this into its mask_mod,
        # where inductor cannot lower a tensor constant (torch 2.11: "'Tensor' object has no attribute 'get_dtype'")
        is_global = pos < self.n_first
        for p in self._global_positions()[self.n_first:]:                 # the positions past the first n
            is_global = is_global | (pos == p)
        return is_global

    def _global_positions(self) -> tuple[int, ...]:
        return tuple(sorted(set(range(self.n_first)) | set(self.positions)))


@dataclass(frozen=True)
class GlobalQueries(_GlobalSet):
    """The global queries' rows: they see every key (one half of `Global`)."""

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self._is_global(q_pos) & torch.ones_like(k_pos, dtype=torch.bool)

    def query_positions(self) -> tuple[int, ...]:
        return self._global_positions()


@dataclass(frozen=True)
class GlobalKeys(_GlobalSet):
    """The global keys' columns: every query sees them (the other half of `Global`)."""

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self._is_global(k_pos) & torch.ones_like(q_pos, dtype=torch.bool)

    def key_positions(self) -> tuple[int, ...]:
        return self._global_positions()


@dataclass(frozen=True)
class Global(_GlobalSet):
    """Global tokens (Longformer §3.1, BigBird's ITC): the positions 0 .. n_first - 1 and `positions` see every
    key and are seen by every query. Costs g x S for the g global rows plus g keys for every other query.

    Args:
        n_first: the first n_first positions are global (a [CLS] token, a prompt), >= 0.
        positions: further global positions, each >= 0.
    """

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        return self._is_global(q_pos) | self._is_global(k_pos)

    def parts(self) -> tuple[Pattern, ...]:
        return GlobalKeys(self.n_first, self.positions), GlobalQueries(self.n_first, self.positions)


@dataclass(frozen=True, init=False)
class Union(Pattern):
    """A query sees a key if any of `patterns` allows it; `a | b` builds one, flattening nested unions.

    Args:
        *patterns: the patterns to combine, at least one.
    """

    patterns: tuple[Pattern, ...]

    def __init__(self, *patterns: Pattern) -> None:
        if not patterns:
            raise ValueError("Union: give at least one pattern")
        flat = tuple(p for pattern in patterns
                     for p in (pattern.patterns if isinstance(pattern, Union) else (pattern,)))
        object.__setattr__(self, "patterns", flat)

    def allows(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        allowed = self.patterns[0].allows(q_pos, k_pos)
        for pattern in self.patterns[1:]:
            allowed = allowed | pattern.allows(q_pos, k_pos)
        return allowed

    def parts(self) -> tuple[Pattern, ...]:
        return tuple(part for pattern in self.patterns for part in pattern.parts())
