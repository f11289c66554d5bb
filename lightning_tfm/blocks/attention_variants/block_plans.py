"""Plans for the blocked sparse kernel (`blocked.py`): which queries go together and which keys each group
reads, computed from positions only and cached per shape and offset.

For each piece of a pattern (`Pattern.parts`, merged when they share a plan) queries are grouped, by residue
mod `Pattern.modulus` and then in runs of `block`, and each group takes the keys it can need (`key_range`,
`key_positions`): a window sliding with its run, read as an overlapping view, or else a padded (G, K) index.
Each group gets a small (G, Tq, K) mask; a later piece excludes the pairs of earlier ones, so every pair counts
once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tfm.blocks.attention_variants.patterns import Pattern

MIN = torch.finfo(torch.float32).min     # a finite "minus infinity": a row with no key stays finite, never NaN
# a piece's (G, Tq) q_index and q_valid, (G, K) k_index and k_valid, (T,) inverse, and k_shift (see BlockPlan)
_Layout = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int | None]


@dataclass(frozen=True)
class BlockPlan:
    """Which queries and keys one piece of a pattern computes, as G groups of Tq queries and K keys.

    Attributes:
        q_index: (G, Tq) long, query indices into 0..T-1 (padding slots hold 0).
        k_index: (G, K) long, key indices into 0..S-1 (padding slots hold a clamped index).
        q_pos: (G, Tq) long absolute query positions, for the bias.
        k_pos: (G, K) long absolute key positions, for the bias.
        mask: (G, Tq, K) bool, True = may attend: pattern, causality, padding slots and the earlier pieces'
            pairs all applied; None when every pair is allowed.
        inverse: (T,) long, where each query's row sits among the G * Tq gathered ones; G * Tq if none.
        logits_mask: (G, Tq, K) fp32 added to the logits, 0 where `mask` allows and finfo.min elsewhere (unlike a
            masked fill, an add needs no backward pass); None with `mask`.
        k_shift: None, or group g holds queries g * Tq .. g * Tq + Tq - 1 and keys g * Tq + k_shift .. + K - 1
            (slots outside 0..S-1 masked), taken as a reshape and an overlapping view instead of gathered copies.
        rows_seen: every query the piece computes may see some key (padding aside): no row needs zeroing.
    """

    q_index: Tensor
    k_index: Tensor
    q_pos: Tensor
    k_pos: Tensor
    mask: Tensor | None
    inverse: Tensor
    logits_mask: Tensor | None = None
    k_shift: int | None = None
    rows_seen: bool = False


def plan_attention(pattern: Pattern, n_queries: int, n_keys: int, *, causal: bool, q_offset: int = 0,
                   k_start: int = 0, block: int = 64,
                   device: torch.device | str | None = None) -> tuple[BlockPlan, ...]:
    """The blocks `sparse_attention` computes for queries at positions q_offset.. and keys at k_start..; cached.

    Args:
        pattern: which pairs are allowed.
        n_queries: T.
        n_keys: S.
        causal: whether a query may not see later keys.
        q_offset: position of the first query.
        k_start: position of the first key (a sliding-window cache that kept only its last keys).
        block: queries per group, >= 1.
        device: where the index tensors live.
    Returns:
        one `BlockPlan` per piece of the pattern.
    """
    if block < 1:
        raise ValueError(f"plan_attention: block={block}, must be >= 1")
    return _plan_cached(pattern, n_queries, n_keys, causal, q_offset, k_start, block, torch.device(device or "cpu"))


@functools.lru_cache(maxsize=64)
def _plan_cached(pattern: Pattern, T: int, S: int, causal: bool, q_offset: int, k_start: int, block: int,
                 device: torch.device) -> tuple[BlockPlan, ...]:
    pieces: list[list[Pattern]] = []
    for part in pattern.parts():
        same = [p for p in pieces if _lattice(part) and _lattice(p[0]) and p[0].modulus == part.modulus]
        if same:
            same[0].append(part)     # one gather serves both: their key ranges join
        else:
            pieces.append([part])
    plans, earlier = [], []
    for piece in pieces:
        plans.append(_plan_piece(piece, earlier, T, S, causal, q_offset, k_start, block, device))
        earlier += piece
    return tuple(plans)


def _lattice(part: Pattern) -> bool:
    return part.key_positions() is None and part.query_positions() is None


def _bounded(part: Pattern) -> bool:
    zero = torch.zeros(1, dtype=torch.long)
    return part.key_range(zero, zero) is not None


def _plan_piece(parts: list[Pattern], earlier: list[Pattern], T: int, S: int, causal: bool, q_offset: int,
                k_start: int, block: int, device: torch.device) -> BlockPlan:
    args = (parts, T, S, causal, q_offset, k_start, block, device)
    windows = parts[0].modulus == 1 and _lattice(parts[0]) and all(_bounded(p) for p in parts)
    layout = _window_layout(*args) if windows else None
    q_index, q_valid, k_index, k_valid, inverse, k_shift = layout or _gather_layout(*args)
    q_pos, k_pos = q_index + q_offset, k_index + k_start
    q_grid, k_grid = q_pos[:, :, None], k_pos[:, None, :]                             # (G, Tq, 1), (G, 1, K)
    mask = q_valid[:, :, None] & k_valid[:, None, :] & _union(parts, q_grid, k_grid)
    if earlier:
        mask = mask & ~_union(earlier, q_grid, k_grid)                                # each pair counted once
    if causal:
        mask = mask & (k_grid <= q_grid)
    every = bool(mask.all())
    logits_mask = None if every else torch.zeros(mask.shape, device=device).masked_fill_(~mask, MIN)
    return BlockPlan(q_index, k_index.contiguous(), q_pos, k_pos.contiguous(), None if every else mask, inverse,
                     logits_mask, k_shift, bool((mask.any(-1) | ~q_valid).all()))


def _window_layout(parts: list[Pattern], T: int, S: int, causal: bool, q_offset: int, k_start: int, block: int,
                   device: torch.device) -> _Layout | None:
    """Runs of `block` queries, each with the window of keys sliding with it; None where the keys outrun the runs
    (S > G * Tq) or the windows would hold many more keys than a gather (the ranges vary by group)."""
    Tq = min(block, T)
    G = -(-T // Tq)
    first = torch.arange(G, device=device) * Tq                                      # (G,) each run's first query
    q_hi = (first + Tq - 1).clamp_max(T - 1) + q_offset
    lo, hi = (x - k_start for x in _key_span(parts, first + q_offset, q_hi, causal, k_start, k_start + S - 1))
    need = hi >= lo                                                                   # (G,) groups with some key
    if S > G * Tq or not bool(need.any()):
        return None
    shift = int((lo - first)[need].min())
    K = int((hi - first)[need].max()) - shift + 1
    if K > int((hi - lo)[need].max()) + 1 + Tq // 2:
        return None
    if K >= 128:
        K = -(-K // 16) * 16      # whole 16-key tiles: BLAS and softmax run ~8% faster than on a ragged width
    q_index = first[:, None] + torch.arange(Tq, device=device)                       # (G, Tq)
    k_index = first[:, None] + shift + torch.arange(K, device=device)                # (G, K)
    q_valid, k_valid = q_index < T, (k_index >= 0) & (k_index < S)
    return q_index * q_valid, q_valid, k_index.clamp(0, S - 1), k_valid, torch.arange(T, device=device), shift


def _gather_layout(parts: list[Pattern], T: int, S: int, causal: bool, q_offset: int, k_start: int, block: int,
                   device: torch.device) -> _Layout:
    """Queries grouped by residue and run of `block` (all at once when the keys are unbounded) and the keys each
    group can need, as a padded index."""
    head = parts[0]
    q_idx = torch.arange(T, device=device)
    q_all = q_idx + q_offset
    if head.query_positions() is not None:
        q_idx = q_idx[torch.isin(q_all, torch.tensor(head.query_positions(), device=device))]
    k_end = k_start + S - 1
    k_set = head.key_positions()
    if k_set is not None:
        k_set = torch.tensor([p for p in k_set if k_start <= p <= k_end], dtype=torch.long, device=device)
    if len(q_idx) == 0 or (k_set is not None and len(k_set) == 0):
        none = torch.zeros(1, 1, dtype=torch.long, device=device)     # nothing to compute: one empty slot
        return none, none.bool(), none, none.bool(), torch.ones_like(q_all), None
    bounded = k_set is not None or all(_bounded(p) for p in parts)
    group, slot = _group_queries(q_idx, q_idx + q_offset, head.modulus, block if bounded else None)
    G, Tq = int(group.max()) + 1, int(slot.max()) + 1
    q_index = torch.zeros(G, Tq, dtype=torch.long, device=device)
    q_valid = torch.zeros(G, Tq, dtype=torch.bool, device=device)
    q_index[group, slot], q_valid[group, slot] = q_idx, True
    q_pos = q_index + q_offset                                                        # (G, Tq)
    if k_set is not None:
        k_pos, k_valid = k_set.expand(G, -1), torch.ones(G, len(k_set), dtype=torch.bool, device=device)
    else:
        q_lo = q_pos.masked_fill(~q_valid, k_end + T + q_offset).amin(1)             # (G,)
        k_pos, k_valid = _key_lattice(parts, q_lo, q_pos.masked_fill(~q_valid, -1).amax(1), causal, k_start, k_end)
    inverse = torch.full((T,), G * Tq, dtype=torch.long, device=device)
    inverse[q_idx] = group * Tq + slot
    return q_index, q_valid, (k_pos - k_start).clamp(0, S - 1), k_valid, inverse, None


def _group_queries(q_idx: Tensor, q_pos: Tensor, modulus: int, chunk: int | None) -> tuple[Tensor, Tensor]:
    """Group id and slot of each query: one group per residue mod `modulus` and run of `chunk` (None: one run)."""
    n = torch.div(q_pos, modulus, rounding_mode="floor")
    run = torch.div(n, chunk, rounding_mode="floor") if chunk else torch.zeros_like(n)
    _, group = torch.unique(run * modulus + q_pos % modulus, return_inverse=True)        # (T',)
    counts = torch.bincount(group)
    order = torch.argsort(group, stable=True)
    slot = torch.empty_like(group)
    slot[order] = torch.arange(len(group), device=q_idx.device) - (counts.cumsum(0) - counts)[group[order]]
    return group, slot


def _key_lattice(parts: list[Pattern], q_lo: Tensor, q_hi: Tensor, causal: bool, k_start: int,
                 k_end: int) -> tuple[Tensor, Tensor]:
    """(G, K) key positions each group can need (its residue, inside the joined key ranges) and their validity."""
    lo, hi = _key_span(parts, q_lo, q_hi, causal, k_start, k_end)
    m = parts[0].modulus
    first = lo + (q_lo - lo) % m                                 # first key >= lo with the group's residue
    count = torch.where(hi >= first, torch.div(hi - first, m, rounding_mode="floor") + 1, 0)   # (G,)
    steps = torch.arange(max(int(count.max()), 1), device=q_lo.device)
    return first[:, None] + m * steps, steps < count[:, None]                       # (G, K) each


def _key_span(parts: list[Pattern], q_lo: Tensor, q_hi: Tensor, causal: bool, k_start: int,
              k_end: int) -> tuple[Tensor, Tensor]:
    """(G,) first and last key positions, within k_start..k_end, that the queries q_lo..q_hi of a group may see."""
    ranges = [p.key_range(q_lo, q_hi) for p in parts]
    if all(r is not None for r in ranges):
        lo, hi = torch.stack([r[0] for r in ranges]).amin(0), torch.stack([r[1] for r in ranges]).amax(0)
    else:
        lo, hi = torch.full_like(q_lo, k_start), torch.full_like(q_hi, k_end)
    return lo.clamp_min(k_start), (torch.minimum(hi, q_hi) if causal else hi).clamp_max(k_end)


def _union(parts: list[Pattern], q_pos: Tensor, k_pos: Tensor) -> Tensor:
    allowed = parts[0].allows(q_pos, k_pos)
    for part in parts[1:]:
        allowed = allowed | part.allows(q_pos, k_pos)
    return allowed
