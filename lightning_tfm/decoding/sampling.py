"""Ancestral sampling with temperature, top-k (Fan et al. 2018, §5.4) and nucleus / top-p filtering
(Holtzman et al. 2020, §3.1), applied in that order as in Hugging Face's `generate`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tfm.decoding.greedy import _generate
from lightning_tfm.decoding.step import Step


def keep_top_k(logits: Tensor, k: int) -> Tensor:
    """Set every score below the k-th largest of its row to -inf.

    Args:
        logits: (..., V) scores (logits or log-probabilities).
        k: tokens to keep per row, >= 1; tokens tied with the k-th largest are kept too.

    Returns:
        (..., V) the filtered scores.
    """
    _check_top_k(k)
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]                            # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def keep_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most probable tokens whose total probability reaches p (the nucleus).

    A token is dropped when the tokens ranked above it already hold probability >= p, so the most probable
    token always stays.

    Args:
        logits: (..., V) scores; their softmax gives the probabilities.
        p: the nucleus mass, in (0, 1]; 1 keeps everything.

    Returns:
        (..., V) the filtered scores.
    """
    _check_top_p(p)
    if p >= 1.0:
        return logits                          # skip: rounding in the cumulative sum could drop a tail token
    ranked, order = logits.sort(dim=-1, descending=True)                    # (..., V)
    probs = ranked.float().softmax(-1)
    above = F.pad(probs.cumsum(-1)[..., :-1], (1, 0))                       # (..., V) mass ranked above each token
    drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above >= p)   # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(step: Step, prefix: Tensor, max_new_tokens: Tensor | int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           eos_id: int | None = None, pad_id: int = 0) -> Tensor:
    """Draw each next token from softmax(scores / temperature) after top-k and top-p filtering.

    Args:
        step: feeds tokens, returns (B, V) next-token logits or log-probabilities (see `Step`).
        prefix: (B,) start tokens or (B, t) prompts, fed to `step` in the first call.
        max_new_tokens: most tokens to generate, EOS included: an int or (B,) per row.
        temperature: divides the scores, >= 0; 0 takes the most probable token (greedy search).
        top_k: sample among the k most probable tokens only; None for all.
        top_p: sample from the nucleus of mass top_p only, in (0, 1]; None for all.
        generator: the random source, on the device of the scores, for reproducible draws.
        eos_id: a row stops after emitting it; None generates max_new_tokens for every row.
        pad_id: written after a row has stopped.

    Returns:
        (B, L) long, the sampled tokens without the prefix, `pad_id` after EOS.

    Raises:
        ValueError: on a negative temperature, top_k < 1 or top_p outside (0, 1].
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature}, must be >= 0 (0 is greedy search)")
    if top_k is not None:
        _check_top_k(top_k)
    if top_p is not None:
        _check_top_p(top_p)

    def choose(scores: Tensor) -> Tensor:
        if temperature == 0:
            return scores.argmax(-1)
        logits = scores.float() / temperature                                # (B, V)
        if top_k is not None:
            logits = keep_top_k(logits, top_k)
        if top_p is not None:
            logits = keep_top_p(logits, top_p)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    return _generate(step, prefix, choose, max_new_tokens, eos_id, pad_id)


def _check_top_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"top_k={k}, must be >= 1 (None keeps every token)")


def _check_top_p(p: float) -> None:
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p={p}, must be in (0, 1] (None keeps every token)")
