"""Workloads more than one family times: one training step, and transformers' `generate` as the peer of our
searches. Both searches are made to emit exactly the requested number of tokens (EOS masked out of the scores),
and a search that did not is an error, since the rates would not compare equal work."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pairs import EOS
from .timing import Run


def train_step(forward: Callable[[], Tensor], labels: Tensor, model: nn.Module, n_tokens: int) -> Run:
    """One optimizer step of cross-entropy; the loss is computed by the same code for ours and the peer. Both
    use fused AdamW: our tasks' default, and transformers' Trainer default (`adamw_torch_fused`, torch >= 2.8)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> int:
        logits = forward()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)        # frees the gradients, so peak memory sees them each step
        return n_tokens
    return step


def no_eos(scores: Tensor) -> Tensor:
    """Mask EOS, as transformers' MinNewTokensLogitsProcessor does, so every row runs the full length."""
    scores[:, EOS] = float("-inf")           # an int index: no host-to-device copy per step
    return scores


def peer_generate(model: nn.Module, inputs: Tensor, new: int, beam: int, prefix: int) -> Run:
    """transformers' generate; `prefix` is how many leading positions of its output are not new tokens."""
    beam_args = {"num_beams": beam, "length_penalty": 0.6} if beam > 1 else {"num_beams": 1}

    def run() -> int:
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, **beam_args)
        n = count_generated((out.shape[0], out.shape[1] - prefix), inputs.shape[0], new)
        return n if beam == 1 else n // new
    return run


def count_generated(shape: tuple[int, ...], rows: int, new: int) -> int:
    if tuple(shape) != (rows, new):
        raise SystemExit(f"a search produced {tuple(shape)} tokens instead of {(rows, new)}; the rates would "
                         "not compare equal work")
    return rows * new
