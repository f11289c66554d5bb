"""Batched beam search with GNMT's length penalty (Wu et al. 2016, §7), defaults from "Attention Is All You
Need" (Vaswani et al. 2017, §6.1: beam 4, alpha 0.6, at most input length + 50 tokens). All bookkeeping of
the B sentences x k beams is done on tensors; the model is only seen through `Step` and `Reorder`. As in
CTranslate2, the first step runs once per sentence and settled sentences leave the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_tfm.decoding.step import Reorder, Step, _prefix_2d, _row_limits

_NEG_INF = float("-inf")


def length_penalty(length: Tensor | int, alpha: float) -> Tensor:
    """GNMT's length penalty lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, §7).

    Hypotheses are ranked by log P(Y | X) / lp(Y). alpha = 0 ranks by log-probability alone; a larger alpha
    favours longer outputs. This is not |Y| ** alpha (Hugging Face's `length_penalty`). GNMT's coverage
    penalty is not implemented.

    Args:
        length: |Y|, generated tokens including EOS: an int or a tensor of any shape.
        alpha: the strength of the normalization (Vaswani et al. 2017 use 0.6).

    Returns:
        float64 tensor of `length`'s shape.
    """
    return ((5.0 + torch.as_tensor(length, dtype=torch.float64)) / 6.0) ** alpha


@dataclass
class BeamSearchResult:
    """The n best finished hypotheses of each sentence, best first.

    Attributes:
        n_best_tokens: (B, N, L) generated tokens (no prefix), EOS included, pad_id after the end.
        n_best_scores: (B, N) log P(Y | X) / lp(Y); -inf where fewer than N hypotheses finished.
        n_best_lengths: (B, N) |Y|, EOS included; 0 where none finished.
    """

    n_best_tokens: Tensor
    n_best_scores: Tensor
    n_best_lengths: Tensor

    @property
    def tokens(self) -> Tensor:
        """(B, L) the best hypothesis of each sentence."""
        return self.n_best_tokens[:, 0]

    @property
    def scores(self) -> Tensor:
        """(B,) its normalized score."""
        return self.n_best_scores[:, 0]

    @property
    def lengths(self) -> Tensor:
        """(B,) its length, EOS included."""
        return self.n_best_lengths[:, 0]


def beam_search(step: Step, reorder: Reorder, prefix: Tensor, eos_id: int, max_len: Tensor | int,
                beam_size: int = 4, alpha: float = 0.6, pad_id: int = 0, n_best: int = 1) -> BeamSearchResult:
    """Keep the k best hypotheses of each sentence, step by step, and return the best finished ones.

    At step n every live hypothesis is extended by every token. The k best extensions by log-probability
    form the new beam; those that end in EOS (all of them at the sentence's `max_len`) are finished, scored
    log P / lp(n) and stored, and the k best extensions that do not end become the live hypotheses, so the
    beam stays full (as in fairseq and Hugging Face). A hypothesis that reaches `max_len` without EOS is
    finished as it is, like in `greedy_search`.

    Stopping criterion (exact, for any alpha): a sentence stops once it has `n_best` finished hypotheses and
    no live one can still beat the n_best-th of them. Log-probabilities are <= 0, so a live hypothesis with
    summed log-probability s can at best finish with s / max(lp(n + 1), lp(max_len)). This is the rule of
    Hugging Face's `early_stopping="never"`, with per-sentence limits. fairseq's rule (stop at k finished) and
    Hugging Face's default heuristic (bound with the current length) can miss a longer hypothesis that the
    length penalty would rank first (tested).
    With alpha = 0 the bound is s itself, so the search stops as soon as no live hypothesis is better; with
    beam_size 1 it then equals greedy search (tested).

    The model computes only what can still change the result, as CTranslate2 does: the first step runs on
    one row per sentence (its k beams would be identical), and a sentence that stops leaves the batch, so
    later steps run on the k rows of each sentence still searching.

    Args:
        step: feeds tokens, returns (rows, V) next-token log-probabilities (normalized, <= 0; see `Step`).
        reorder: rearranges the rows of the model state (see `Reorder`): after the first step from one row
            per sentence to its k beams, then after every step to the parents, without settled sentences.
        prefix: (B,) start tokens (BOS) or (B, t) prefixes, one per sentence.
        eos_id: the end-of-sequence id.
        max_len: most tokens to generate, EOS included: an int or (B,) per sentence (e.g. source length + 50).
        beam_size: k, hypotheses kept per sentence.
        alpha: length penalty strength, see `length_penalty`.
        pad_id: written after the end of each hypothesis.
        n_best: finished hypotheses to return per sentence, in [1, beam_size].

    Returns:
        the n best hypotheses of each sentence; `.tokens` (B, L) and `.scores` (B,) hold the best.

    Raises:
        ValueError: on beam_size < 1, n_best outside [1, beam_size], a malformed prefix or max_len, or an
            eos_id outside the vocabulary.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size}, must be >= 1")
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best={n_best}, must be in [1, beam_size={beam_size}]")
    prefix = _prefix_2d(prefix)
    B, k, device = prefix.shape[0], beam_size, prefix.device
    limits = _row_limits(max_len, B, device)
    log_probs = step(prefix)                                                # (B, V), one row per sentence
    if not 0 <= eos_id < log_probs.shape[-1]:
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {log_probs.shape[-1]}) of step's output")
    dtype = torch.promote_types(log_probs.dtype, torch.float32)
    beams = _Beams.start(limits, k, n_best, int(limits.max()), dtype, pad_id)
    found = _Beams.start(limits, 0, n_best, int(limits.max()), dtype, pad_id)     # no live ones: the result
    sentences = torch.arange(B, device=device)                              # (B',) those still searching
    rows = 1                                                                # rows per sentence in the state
    for n in range(1, int(limits.max()) + 1):
        parents, tokens, settled = beams.advance(log_probs.view(len(sentences), rows, -1), n, eos_id, alpha)
        # (B', k) rows of the parents; before the expansion a sentence's one row is the parent of all its beams
        parent_rows = torch.arange(len(sentences), device=device)[:, None] * rows + parents.clamp(max=rows - 1)
        n_settled = int(settled.sum())
        if n_settled:
            found.store(sentences[settled], beams, settled)
        if n_settled == len(sentences):
            break
        if n_settled:
            keep = (~settled).nonzero().squeeze(1)                          # (B'',) settled sentences leave
            beams.keep(keep)
            sentences, parent_rows, tokens = sentences[keep], parent_rows[keep], tokens[keep]
        reorder(parent_rows.view(-1), k)
        rows = k
        log_probs = step(tokens.view(-1, 1))                                # (B'' k, V)
    return found.result(pad_id)


@dataclass
class _Beams:
    """The search state of B' sentences with k beams each, N best finished kept, at most L tokens.

    live_tokens: (B', k, L) the live hypotheses, pad_id after their current length.
    live_scores: (B', k) their summed log-probabilities; -inf marks an empty slot.
    finished_tokens: (B', N, L), finished_scores (B', N) normalized (-inf: empty), finished_lengths (B', N).
    limits: (B',) most tokens each sentence may generate.
    """

    live_tokens: Tensor
    live_scores: Tensor
    finished_tokens: Tensor
    finished_scores: Tensor
    finished_lengths: Tensor
    limits: Tensor

    @classmethod
    def start(cls, limits: Tensor, k: int, N: int, L: int, dtype: torch.dtype, pad_id: int) -> _Beams:
        B, device = len(limits), limits.device
        live_scores = torch.full((B, k), _NEG_INF, dtype=dtype, device=device)
        live_scores[:, :1] = 0.0                    # one empty hypothesis; k copies would fill the beam with twins
        return cls(torch.full((B, k, L), pad_id, dtype=torch.long, device=device), live_scores,
                   torch.full((B, N, L), pad_id, dtype=torch.long, device=device),
                   torch.full((B, N), _NEG_INF, dtype=dtype, device=device),
                   torch.zeros(B, N, dtype=torch.long, device=device), limits)

    def advance(self, log_probs: Tensor, n: int, eos_id: int, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        """Extend every live hypothesis to length n with log_probs (B', k, V), or (B', 1, V) when all beams
        share them; return the (B', k) parent beam and token of each new live hypothesis, and the (B',)
        sentences whose N best can no longer change."""
        B, k = self.live_scores.shape
        V = log_probs.shape[-1]
        candidates = (self.live_scores[..., None] + log_probs).view(B, k * V)   # (B', k V) all extensions
        at_limit = (n >= self.limits)[:, None]                                  # (B', 1)
        # at most k of the candidates end in EOS (one per beam), so the 2k best hold the k best that end here
        # and the k best that go on: one top-k over k V candidates instead of two and a masked copy
        best, index = candidates.topk(2 * k, dim=-1)                            # (B', 2k), best first
        is_eos = index % V == eos_id
        self._finish(best[:, :k].masked_fill(~(is_eos[:, :k] | at_limit), _NEG_INF), index[:, :k] // V,
                     index[:, :k] % V, n, alpha)
        order = (is_eos.long() * 2 * k + torch.arange(2 * k, device=index.device)).argsort(dim=-1)[:, :k]
        best, index = best.gather(1, order), index.gather(1, order)             # (B', k) the k best going on
        parents, tokens = index // V, index % V
        self.live_tokens = _extended(self.live_tokens, parents, tokens, n)
        self.live_scores = best.masked_fill(at_limit, _NEG_INF)
        return parents, tokens, self._settled(n, alpha)

    def _finish(self, scores: Tensor, parents: Tensor, tokens: Tensor, n: int, alpha: float) -> None:
        """Merge the k extensions (B', k) of length n into the N best; scores are summed log-probabilities,
        -inf for extensions that do not finish."""
        N, L = self.finished_scores.shape[1], self.live_tokens.shape[2]
        normalized = scores / length_penalty(n, alpha).to(scores)
        merged_scores = torch.cat([self.finished_scores, normalized], dim=1)                    # (B', N + k)
        merged_tokens = torch.cat([self.finished_tokens, _extended(self.live_tokens, parents, tokens, n)], dim=1)
        merged_lengths = torch.cat([self.finished_lengths, torch.full_like(parents, n)], dim=1)
        self.finished_scores, keep = merged_scores.topk(N, dim=-1)                             # (B', N)
        self.finished_tokens = merged_tokens.gather(1, keep[..., None].expand(-1, -1, L))
        self.finished_lengths = merged_lengths.gather(1, keep)

    def _settled(self, n: int, alpha: float) -> Tensor:
        """(B',) the sentences at their limit, or whose N-th best finished score no live hypothesis can beat."""
        best_live = self.live_scores.max(dim=-1).values                                        # (B',)
        largest_lp = torch.maximum(length_penalty(n + 1, alpha), length_penalty(self.limits, alpha))
        return (self.finished_scores[:, -1] >= best_live / largest_lp.to(best_live)) | (n >= self.limits)

    def keep(self, index: Tensor) -> None:
        """Keep sentences `index` (B'',) only."""
        for name in ("live_tokens", "live_scores", "finished_tokens", "finished_scores", "finished_lengths",
                     "limits"):
            setattr(self, name, getattr(self, name).index_select(0, index))

    def store(self, rows: Tensor, beams: _Beams, which: Tensor) -> None:
        """Copy the finished hypotheses of `beams`' sentences `which` (B',) bool into this state's `rows`."""
        self.finished_tokens[rows] = beams.finished_tokens[which]
        self.finished_scores[rows] = beams.finished_scores[which]
        self.finished_lengths[rows] = beams.finished_lengths[which]

    def result(self, pad_id: int) -> BeamSearchResult:
        found = self.finished_scores > _NEG_INF                                                # (B, N)
        lengths = self.finished_lengths.masked_fill(~found, 0)
        L = max(int(lengths.max()), 1)
        tokens = self.finished_tokens[..., :L].masked_fill(~found[..., None], pad_id)
        return BeamSearchResult(tokens, self.finished_scores, lengths)


def _extended(tokens: Tensor, parents: Tensor, new: Tensor, n: int) -> Tensor:
    """(B, k, L) hypotheses, (B, k) parent beams and next tokens -> (B, k, L) children with new at n - 1."""
    children = tokens.gather(1, parents[..., None].expand(-1, -1, tokens.shape[2]))
    children[:, :, n - 1] = new
    return children
