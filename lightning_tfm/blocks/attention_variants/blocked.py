"""Sparse attention computed on gathered blocks: work and memory grow with the allowed pairs, not T x S.

A plan (`block_plans.py`) groups the queries and names the keys each group can need. Attention runs batched
over the groups under the plan's small mask. Pieces that overlap merge as flash attention merges its tiles
(Dao et al. 2022, §3.1): each is exponentiated against its own row maximum and the pieces are rescaled together.
Patterns: Child et al. 2019; Beltagy et al. 2020; Zaheer et al. 2020.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tfm.blocks.attention_variants.block_plans import MIN, BlockPlan, plan_attention
from lightning_tfm.blocks.attention_variants.patterns import Pattern
from lightning_tfm.blocks.masks import PositionBias


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
    scaled = (q * D ** -0.5).view(B, Hkv, H // Hkv, T, D)     # once, not per gathered copy: (B, Hkv, R, T, D)
    p_drop = dropout if training else 0.0
    if len(plans) == 1:
        return _attend(scaled, k, v, plans[0], key_mask, bias, p_drop, True)[0].to(q.dtype)
    # each piece exponentiates against its own row maximum m (no gradient: a shift cancels) and is rescaled to
    # the common maximum before the one normalisation, as flash attention merges its tiles
    u, total, m = (torch.stack(x) for x in zip(*(_attend(scaled, k, v, plan, key_mask, bias, p_drop, False)
                                                     for plan in plans)))      # (P, B, H, T, Dv), (P, B, H, T) x2
    c = torch.exp(m - m.amax(0))                                                       # (P, B, H, T)
    # a row that sees some key totals >= 1 (its maximum weighs exp(0)); one that sees none totals 0 and gives 0
    total = (c * total).sum(0).clamp_min(1.0)                                          # (B, H, T)
    return ((c[..., None] * u).sum(0) / total[..., None]).to(q.dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan, key_mask: Tensor | None, bias: PositionBias | None,
            p_drop: float, normalise: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One piece on (B, Hkv, R, T, D) scaled queries: its fp32 (B, H, T, Dv) output normalised within the piece,
    or else sum_j exp(s_j - m) v_j, its (B, H, T) total sum_j exp(s_j - m) and the logits' row maximum m.
    Rows the piece does not compute, or where it allows no key, get output and total 0 (m finfo.min)."""
    B, Hkv, R, T, _ = q.shape
    G, Tq = plan.q_index.shape
    K = plan.k_index.shape[1]
    qg, kg, vg = _gather(q, k, v, plan)
    scores = torch.matmul(qg, kg.transpose(-1, -2)).float()    # (B*Hkv, G, R*Tq, K); no view, so masked in place
    if bias is not None:
        b = torch.vmap(bias)(plan.q_pos, plan.k_pos).float().view(G, Hkv, R * Tq, K).transpose(0, 1)
        scores = scores + b.repeat(B, 1, 1, 1)                                         # (B*Hkv, G, R*Tq, K)
    if plan.mask is not None and q.dtype == torch.float16:     # a half product may overflow to inf, which only
        scores = scores.masked_fill_(~plan.mask.repeat(1, R, 1), MIN)                # a fill overwrites
    elif plan.mask is not None:
        scores = scores.add_(plan.logits_mask if R == 1 else plan.logits_mask.repeat(1, R, 1))
    real = None if key_mask is None else key_mask.index_select(1, plan.k_index.flatten()).view(B, G, K)
    if real is not None:
        scores = scores.masked_fill_(~real.repeat_interleave(Hkv, 0)[:, :, None, :], MIN)   # (B*Hkv, G, 1, K)
    total = top = None
    if normalise:
        p = torch.softmax(scores, -1)                                                 # (B*Hkv, G, R*Tq, K)
    else:
        with torch.no_grad():
            top = scores.amax(-1, keepdim=True)                                       # (B*Hkv, G, R*Tq, 1)
        p = scores.sub_(top).exp_()
        total = p.sum(-1)
    if p_drop:
        p = F.dropout(p, p_drop)         # after the totals: a dropped weight keeps its share of the normalisation
    out = torch.matmul(p.to(vg.dtype), vg).float()                                    # (B*Hkv, G, R*Tq, Dv)
    if real is not None or not plan.rows_seen:                                       # empty rows give 0
        allowed = plan.mask[None] if real is None else real[:, :, None] & (True if plan.mask is None else plan.mask)
        seen = allowed.any(-1)[:, None, :, None].expand(B, Hkv, G, R, Tq).reshape(B * Hkv, G, R * Tq).float()
        out, total = out * seen[..., None], None if total is None else total * seen
    out = _scatter(out.view(B, Hkv, G, R, Tq, -1), plan, T, 0.0)                      # (B, H, T, Dv)
    if normalise:
        return out, None, None
    rows = (B, Hkv, G, R, Tq)
    return out, _scatter(total.view(rows), plan, T, 0.0), _scatter(top.view(rows), plan, T, MIN)   # (B, H, T) x2


def _gather(q: Tensor, k: Tensor, v: Tensor, plan: BlockPlan) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's queries (B*Hkv, G, R*Tq, D), keys (B*Hkv, G, K, D) and values (B*Hkv, G, K, Dv)."""
    B, Hkv, R, T, D = q.shape
    G, Tq = plan.q_index.shape
    K = plan.k_index.shape[1]
    if plan.k_shift is None:
        qg, index = q.index_select(3, plan.q_index.flatten()), plan.k_index.flatten()
        kg, vg = k.index_select(2, index).view(B * Hkv, G, K, D), v.index_select(2, index).view(B * Hkv, G, K, -1)
    else:
        qg = q if G * Tq == T else F.pad(q, (0, 0, 0, G * Tq - T))           # padding queries' rows are dropped
        kg, vg = _windows(k, G, Tq, plan.k_shift, K), _windows(v, G, Tq, plan.k_shift, K)
    qg = qg.view(B, Hkv, R, G, Tq, D).transpose(2, 3).reshape(B * Hkv, G, R * Tq, D)  # R heads share k and v
    return qg, kg, vg


def _windows(x: Tensor, G: int, Tq: int, shift: int, K: int) -> Tensor:
    """(B, Hkv, S, Dx) -> (B*Hkv, G, K, Dx) overlapping view, window g holding rows g*Tq + shift .. + K - 1 of its
    head. Heads lie end to end, each padded to G*Tq rows, so rows outside 0..S-1 read zeros or a neighbouring
    head (the plan masks them) and one batch stride spans heads and groups: matmul needs no copy."""
    B, Hkv, S, Dx = x.shape
    n = B * Hkv * G
    front, back = max(0, -shift), max(0, shift + K - Tq)
    x = x if G * Tq == S else F.pad(x, (0, 0, 0, G * Tq - S))
    rows = F.pad(x.reshape(n * Tq, Dx), (0, 0, front, back))                           # (front + n*Tq + back, Dx)
    return _Windows.apply(rows[front + shift:front + shift + (n - 1) * Tq + K], K, Tq).view(B * Hkv, G, K, Dx)


class _Windows(torch.autograd.Function):
    """(L, Dx) rows -> (n, size, Dx) view of the windows starting every `step` rows. The backward adds the
    windows' gradients back one `step`-row chunk at a time, several times faster on CPU than unfold's own."""

    @staticmethod
    def forward(ctx, rows: Tensor, size: int, step: int) -> Tensor:
        ctx.n_rows, ctx.step = rows.shape[0], step
        return rows.unfold(0, size, step).transpose(1, 2)                              # (n, size, Dx)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        n, size, Dx = grad.shape
        step = ctx.step
        chunks = -(-size // step)
        out = grad.new_empty((n - 1 + chunks) * step, Dx)
        out[n * step:].zero_()
        first = out[:n * step].view(n, step, Dx)       # chunk 0 of every window: all these rows when size >= step
        if size < step:
            first.zero_()
        first[:, :size] = grad[:, :step]
        for c in range(1, chunks):                     # chunk c of every window: the rows c*step .. (c + n)*step
            width = min(step, size - c * step)
            out[c * step:(c + n) * step].view(n, step, Dx)[:, :width] += grad[:, c * step:c * step + width]
        return out[:ctx.n_rows], None, None


def _scatter(x: Tensor, plan: BlockPlan, T: int, fill: float) -> Tensor:
    """(B, Hkv, G, R, Tq, ...) per-group rows -> (B, H, T, ...) in query order, `fill` where not computed."""
    B, Hkv, G, R, Tq = x.shape[:5]
    x = x.transpose(2, 3).reshape(B, Hkv * R, G * Tq, *x.shape[5:])                 # (B, H, G*Tq, ...)
    if plan.k_shift is not None:
        return x[:, :, :T]                                                           # the runs are in order
    return torch.cat([x, x.new_full((B, Hkv * R, 1, *x.shape[3:]), fill)], 2).index_select(2, plan.inverse)
