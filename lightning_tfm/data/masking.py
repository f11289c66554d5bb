"""BERT's masked-LM corruption (Devlin et al. 2019, §3.1 and Appendix A.1).

Each ordinary token is chosen with probability 15%. A chosen token is replaced by the mask token 80% of the
time, by a random token 10% of the time, and kept 10% of the time; the label is the original id at chosen
positions and -100 (cross-entropy's `ignore_index`) everywhere else. Special tokens, padding included, are
never chosen. Two deviations from BERT's `create_pretraining_data.py`, both as in Hugging Face's
`DataCollatorForLanguageModeling`: positions are chosen independently (15% in expectation rather than
exactly round(15%) per sequence), and random replacements are drawn only from non-special tokens, so the
model never sees a stray pad or cls in the middle of a sentence.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100


def mask_tokens(ids: Tensor, special_ids: Sequence[int], mask_id: int, vocab_size: int,
                generator: torch.Generator | None = None, mask_prob: float = 0.15, replace_prob: float = 0.8,
                random_prob: float = 0.1) -> tuple[Tensor, Tensor]:
    """Corrupt a batch for masked-LM training.

    Args:
        ids: (B, T) int64 token ids, padding included.
        special_ids: ids never chosen (pad, cls, sep, mask, ...); `mask_id` is always added.
        mask_id: the mask token's id.
        vocab_size: random replacements are drawn from [0, vocab_size) minus `special_ids`.
        generator: source of randomness, on `ids.device`, for reproducible masking; None uses torch's global RNG.
        mask_prob: chance that an ordinary token is chosen.
        replace_prob: chance that a chosen token becomes `mask_id`.
        random_prob: chance that a chosen token becomes a random ordinary token; the rest,
            1 - replace_prob - random_prob, stay unchanged.

    Returns:
        inputs (B, T) int64, the corrupted ids, and labels (B, T) int64: the original id where chosen,
        -100 elsewhere. `ids` is not modified.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_tokens: mask_prob={mask_prob}, must be in [0, 1]")
    if replace_prob < 0 or random_prob < 0 or replace_prob + random_prob > 1.0:
        raise ValueError(f"mask_tokens: replace_prob={replace_prob}, random_prob={random_prob}; both must be "
                         ">= 0 with a sum <= 1")
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=torch.long, device=ids.device)
    ordinary = torch.ones(vocab_size, dtype=torch.bool, device=ids.device)
    ordinary[special[special < vocab_size]] = False
    candidates = ordinary.nonzero().squeeze(1)                                       # (V - n_special,)
    if len(candidates) == 0 and random_prob > 0:
        raise ValueError(f"mask_tokens: vocab_size={vocab_size} leaves no non-special token to draw from")

    def uniform() -> Tensor:
        return torch.rand(ids.shape, generator=generator, device=ids.device)        # (B, T)

    chosen = (uniform() < mask_prob) & ~torch.isin(ids, special)                    # (B, T)
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    # one draw decides the fate of each chosen token: [0, p_mask) mask, [p_mask, p_mask + p_rand) random
    fate = uniform()
    to_mask = chosen & (fate < replace_prob)
    to_random = chosen & (fate >= replace_prob) & (fate < replace_prob + random_prob)
    inputs = ids.clone()
    inputs[to_mask] = mask_id
    if to_random.any():
        picks = torch.randint(len(candidates), (int(to_random.sum()),), generator=generator, device=ids.device)
        inputs[to_random] = candidates[picks]
    return inputs, labels
