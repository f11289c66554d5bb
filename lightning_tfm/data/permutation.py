"""Seeded orders without a permutation array: `derive_seed` and `IndexPermutation`, a keyed bijection of
[0, n) evaluated on numpy index arrays, so a sampler can shuffle tens of millions of examples holding O(1) state.

`IndexPermutation` is a Feistel network (Luby & Rackoff 1988: four or more rounds of a pseudo-random round
function give a pseudo-random permutation) over the smallest power-of-two domain holding [0, n), with cycle
walking (Black & Rogaway 2002, "Ciphers with arbitrary finite domains", §3): a value that lands at n or above is
encrypted again until it falls inside, which keeps the map a bijection of [0, n). The round function is
MurmurHash3's 32-bit finaliser (Appleby 2011), keyed per round.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6          # Luby-Rackoff needs 4 for a pseudo-random permutation; 2 more for a margin on small domains
_MIX1, _MIX2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
_MAX_N = 2**32       # positions are uint32: twice as fast as uint64 and far beyond any corpus we batch
_CHUNK = 2**18       # positions encrypted at a time: the temporaries stay in cache (2-3x faster on 10M than whole)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from several integers, e.g. (seed, epoch, rank).

    Hashing instead of adding (torch's DistributedSampler uses seed + epoch) keeps runs with seeds 1 and 2
    from replaying each other's epochs one epoch apart.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _mix(x: np.ndarray, key: np.uint32) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser of `x + key`, elementwise on uint32 (wrapping arithmetic is intended)."""
    z = x + key
    z ^= z >> np.uint32(16)
    z *= _MIX1
    z ^= z >> np.uint32(13)
    z *= _MIX2
    z ^= z >> np.uint32(16)
    return z


class IndexPermutation:
    """A pseudo-random bijection of [0, n), keyed by `seed`, applied to whole arrays of positions.

    `perm(np.arange(n))` is a permutation of `range(n)` (tested for many n), but any slice of positions can be
    mapped on its own in O(len(positions)) time and memory, which is what lets a sampler walk an epoch's order
    pool by pool. Different seeds give unrelated orders; the same seed always the same one.

    Args:
        n: size of the domain, in [1, 2**32].
        seed: key, e.g. `derive_seed(seed, epoch)`.
    """

    def __init__(self, n: int, seed: int) -> None:
        if not 1 <= n <= _MAX_N:
            raise ValueError(f"IndexPermutation: n={n}, must be in [1, 2**32]")
        self.n = n
        bits = max(2, (n - 1).bit_length())        # domain 2**bits < 2n, so cycle walking takes < 2 passes on average
        self._low_bits = bits // 2                 # the halves alternate widths (an unbalanced Feistel on odd bits)
        self._high_bits = bits - self._low_bits
        self._keys = [np.uint32(derive_seed(seed, r) & 0xFFFFFFFF) for r in range(_ROUNDS)]

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Args:
            positions: (N,) integers in [0, n).
        Returns:
            (N,) int64, the image of each position; distinct positions give distinct images.
        """
        positions = np.asarray(positions)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise ValueError(f"IndexPermutation: positions must lie in [0, {self.n}), "
                             f"got [{positions.min()}, {positions.max()}]")
        out = np.empty(positions.shape, dtype=np.int64)
        flat, result = positions.reshape(-1), out.reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            result[start:start + _CHUNK] = self._walk(flat[start:start + _CHUNK].astype(np.uint32))
        return out

    def _walk(self, x: np.ndarray) -> np.ndarray:
        """Encrypt, then re-encrypt the values outside [0, n) until none is left (cycle walking)."""
        x = self._encrypt(x)
        todo = np.flatnonzero(x >= self.n)
        while todo.size:                           # each pass leaves fewer than half behind, on average
            again = self._encrypt(x[todo])
            x[todo] = again
            todo = todo[again >= self.n]
        return x

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        """The Feistel network on [0, 2**bits): each round maps (high, low) to (low, high ^ F(low)), which
        the next round undoes knowing `low`, so every round (and the network) is a bijection."""
        high_bits, low_bits = self._high_bits, self._low_bits
        for key in self._keys:
            low = x & np.uint32((1 << low_bits) - 1)
            high = x >> np.uint32(low_bits)
            high ^= _mix(low, key) & np.uint32((1 << high_bits) - 1)
            low <<= np.uint32(high_bits)
            x = low | high
            high_bits, low_bits = low_bits, high_bits   # `low` is now on top and `high` at the bottom
        return x
