"""Sparse attention computed on gathered blocks: work and memory grow with the allowed pairs, not T x S.

For each piece of a pattern (`Pattern.parts`, merged when they share a plan) queries are grouped, by residue
mod `Pattern.modulus` and then in runs of `block`, and each group gathers the keys it can need (`key_range`,
`key_positions`) into a padded (G, K) index. Attention runs batched over the groups with a small (G, Tq, K) mask
built from positions only; the plans are cached per shape and offset. Pieces that overlap count each pair once
(a later piece excludes the pairs of earlier ones) and merge through their log-sum-exp, as flash attention
merges its tiles (Dao et al. 2022, §3.1). Patterns: Child et al. 2019; Beltagy et al. 2020; Zaheer et al. 2020.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tfm.blocks.attention_variants.patterns import Pattern
from lightning_tfm.blocks.masks import PositionBias


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
    """

    q_index: Tensor
    k_index: Tensor
    q_pos: Tensor
    k_pos: Tensor
    mask: Tensor | None
    inverse: Tensor


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


def _plan_piece(parts: list[Pattern], earlier: list[Pattern], T: int, S: int, causal: bool, q_offset: int,
                k_start: int, block: int, device: torch.device) -> BlockPlan:
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
        return BlockPlan(none, none[0:1], none + q_offset, none + k_start,
                         torch.zeros(1, 1, 1, dtype=torch.bool, device=device), torch.ones_like(q_all))
    bounded = k_set is not None or all(_bounded(p) for p in parts)
    # an unbounded piece gathers every key once per residue class rather than once per run of queries
    group, slot = _group_queries(q_idx, q_idx + q_offset, head.modulus, block if bounded else None)
    G, Tq = int(group.max()) + 1, int(slot.max()) + 1
    q_index = torch.zeros(G, Tq, dtype=torch.long, device=device)
    q_valid = torch.zeros(G, Tq, dtype=torch.bool, device=device)
    q_index[group, slot], q_valid[group, slot] = q_idx, True
    q_pos = q_index + q_offset                                                        # (G, Tq)
    q_lo = q_pos.masked_fill(~q_valid, k_end + T + q_offset).amin(1)                 # (G,)
    q_hi = q_pos.masked_fill(~q_valid, -1).amax(1)
    if k_set is not None:
        k_pos, k_valid = k_set.expand(G, -1), torch.ones(G, len(k_set), dtype=torch.bool, device=device)
    else:
        k_pos, k_valid = _key_lattice(parts, q_lo, q_hi, causal, k_start, k_end)
    q_grid, k_grid = q_pos[:, :, None], k_pos[:, None, :]                             # (G, Tq, 1), (G, 1, K)
    mask = q_valid[:, :, None] & k_valid[:, None, :]
    mask = mask & _union(parts, q_grid, k_grid)
    if earlier:
        mask = mask & ~_union(earlier, q_grid, k_grid)                                # each pair counted once
    if causal:
        mask = mask & (k_grid <= q_grid)
    inverse = torch.full((T,), G * Tq, dtype=torch.long, device=device)
    inverse[q_idx] = group * Tq + slot
    k_index = (k_pos - k_start).clamp(0, S - 1)
    return BlockPlan(q_index, k_index.contiguous(), q_pos, k_pos.contiguous(),
                     None if bool(mask.all()) else mask, inverse)


def _key_lattice(parts: list[Pattern], q_lo: Tensor, q_hi: Tensor, causal: bool, k_start: int,
                 k_end: int) -> tuple[Tensor, Tensor]:
    """(G, K) key positions each group can need (its residue, inside the joined key ranges) and their validity."""
    ranges = [p.key_range(q_lo, q_hi) for p in parts]
    if all(r is not None for r in ranges):
        lo = torch.stack([r[0] for r in ranges]).amin(0)
        hi = torch.stack([r[1] for r in ranges]).amax(0)
    else:
        lo, hi = torch.full_like(q_lo, k_start), torch.full_like(q_hi, k_end)
    if causal:
        hi = torch.minimum(hi, q_hi)
    lo, hi = lo.clamp_min(k_start), hi.clamp_max(k_end)
    m = parts[0].modulus
    first = lo + (q_lo - lo) % m                                 # first key >= lo with the group's residue
    count = torch.where(hi >= first, torch.div(hi - first, m, rounding_mode="floor") + 1, 0)   # (G,)
    steps = torch.arange(max(int(count.max()), 1), device=q_lo.device)
    return first[:, None] + m * steps, steps < count[:, None]                       # (G, K) each


def _union(parts: list[Pattern], q_pos: Tensor, k_pos: Tensor) -> Tensor:
    allowed = parts[0].allows(q_pos, k_pos)
    for part in parts[1:]:
        allowed = allowed | part.allows(q_pos, k_pos)
    return allowed


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, *, causal: bool, q_offset: int = 0,
                     k_start: int = 0, key_mask: Tensor | None = None, bias: PositionBias | None = None,
                     block: int = 64, dropout: float = 0.0, training: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias) v over the pairs `pattern` (and causality, and key_mask) allows.

    Equal to the dense computation with the explicit (T, S) mask, in outputs and gradients; a query that may see
    no key gets 0, as torch SDPA gives. Softmax statistics are fp32 whatever the input dtype.

    Args:
        q: (B, H, T, D) queries at positions q_offset .. q_offset + T - 1.
        k: (B, Hkv, S, D) keys at positions k_start .. k_start + S - 1; Hkv divides H (grouped-query attention,
            query head h reads key/value head h // (H // Hkv)).
        v: (B, Hkv, S, Dv) values.
        pattern: which query and key positions may meet.
        causal: whether a query may not see later keys.
        q_offset: position of the first query (the number of cached positions before this step).
        k_start: position of the first key.
        key_mask: (B, S) bool over the given keys, True for real tokens, False for padding; None if none.
        bias: (q_pos (T,), k_pos (S,)) -> (H, T, S) additive logits (ALiBi); called (through `torch.vmap`) on the
            gathered blocks only.
        block: queries per group; larger blocks mean fewer, wider gathers.
        dropout: dropout on the attention weights, in [0, 1), applied when `training`.
        training: whether to apply dropout.
    Returns:
        (B, H, T, Dv).
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if H % Hkv or k.shape[:3] != v.shape[:3] or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"sparse_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; "
                         "want q (B, H, T, D), k (B, Hkv, S, D) and v (B, Hkv, S, Dv) with Hkv dividing H")
    if key_mask is not None and tuple(key_mask.shape) != (B, S):
        raise ValueError(f"sparse_attention: key_mask {tuple(key_mask.shape)}, want (B, S) = {(B, S)}")
    plans = plan_attention(pattern, T, S, causal=causal, q_offset=q_offset, k_start=k_start, block=block,
                           device=q.device)
    q = q.view(B, Hkv, H // Hkv, T, D)                   # (B, H, T, D) -> (B, Hkv, R, T, D): heads sharing k, v
    p_drop = dropout if training else 0.0
    outs, lses = zip(*(_attend(q, k, v, plan, key_mask, bias, p_drop, len(plans) > 1) for plan in plans))
    if len(plans) == 1:
        return outs[0].to(q.dtype)
    lse = torch.stack(lses)                                                            # (P, B, H, T)
    weight = torch.softmax(lse, 0)                    # each piece's share of the row's total mass, (P, B, H, T)
    out = sum(w[..., None] * o for w, o in zip(weight, outs))                          # (B, H, T, D)
    return out.to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, key_mask: Tensor | None,
            bias: PositionBias | None, p_drop: float, need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """One piece: (B, H, T, Dv) fp32 output normalised within the piece, and its (B, H, T) log-sum-exp if asked.

    Rows the piece does not compute, or where it allows no key, get output 0 and log-sum-exp about finfo.min."""
    B, Hkv, R, T, D = q.shape
    G, Tq = plan.q_index.shape
    K = plan.k_index.shape[1]
    qg = q.index_select(3, plan.q_index.flatten()).view(B, Hkv, R, G, Tq, D)
    qg = qg.transpose(2, 3).reshape(B, Hkv, G, R * Tq, D) / math.sqrt(D)   # R heads of a kv head share its keys
    kg = k.index_select(2, plan.k_index.flatten()).view(B, Hkv, G, K, D)
    vg = v.index_select(2, plan.k_index.flatten()).view(B, Hkv, G, K, -1)
    scores = (qg @ kg.transpose(-1, -2)).float().view(B, Hkv, G, R, Tq, K)
    if bias is not None:
        b = torch.vmap(bias)(plan.q_pos, plan.k_pos)                                   # (G, H, Tq, K)
        scores = scores + b.float().view(G, Hkv, R, Tq, K).transpose(0, 1)            # (Hkv, G, R, Tq, K)
    allowed = None if plan.mask is None else plan.mask.view(1, 1, G, 1, Tq, K)
    if key_mask is not None:
        real = key_mask.index_select(1, plan.k_index.flatten()).view(B, 1, G, 1, 1, K)
        allowed = real if allowed is None else real & allowed                       # (B, 1, G, 1, Tq, K)
    lse = None
    if allowed is not None:
        # a finite fill keeps empty rows finite (uniform weights, zeroed below): no NaN in outputs or gradients
        scores = scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)          # in place: a fresh tensor
    if need_lse:
        lse = torch.logsumexp(scores, -1)                                           # (B, Hkv, G, R, Tq)
    p = torch.softmax(scores, -1)                                                   # (B, Hkv, G, R, Tq, K)
    if p_drop:
        p = F.dropout(p, p_drop)       # weights are linear in each piece's share, so the merge stays exact
    out = (p.to(v.dtype).view(B, Hkv, G, R * Tq, K) @ vg).float()                    # (B, Hkv, G, R*Tq, Dv)
    if allowed is not None:
        seen = allowed.any(-1, keepdim=True).expand(-1, -1, -1, R, Tq, -1)       # (B or 1, 1, G, R, Tq, 1)
        out = out * seen.reshape(-1, 1, G, R * Tq, 1)                                  # empty rows give 0
    out = out.view(B, Hkv, G, R, Tq, -1).transpose(2, 3).reshape(B, Hkv * R, G * Tq, -1)
    out = torch.cat([out, out.new_zeros(B, Hkv * R, 1, out.shape[-1])], 2).index_select(2, plan.inverse)  # (B,H,T,Dv)
    if lse is not None:
        lse = lse.expand(B, Hkv, G, R, Tq).transpose(2, 3).reshape(B, Hkv * R, G * Tq)         # (B, H, G*Tq)
        lse = torch.cat([lse, lse.new_full((B, Hkv * R, 1), torch.finfo(lse.dtype).min)], 2)
        lse = lse.index_select(2, plan.inverse)                                                 # (B, H, T)
    return out, lse
