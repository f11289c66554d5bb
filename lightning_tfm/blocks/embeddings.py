"""Token embeddings, optionally scaled by sqrt(d_model) (paper §3.4), and the pre-softmax output projection
that can share its weight with them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TokenEmbedding(nn.Module):
    """Look up a d_model vector per token id.

    Args:
        vocab_size: number of token ids.
        d_model: width of the embeddings.
        scaled: multiply by sqrt(d_model), as the paper does (§3.4).
        pad_id: id whose vector starts at zero; None if there is no padding token.
    """

    def __init__(self, vocab_size: int, d_model: int, scaled: bool = False, pad_id: int | None = None) -> None:
        super().__init__()
        if vocab_size < 1 or d_model < 1:
            raise ValueError(f"TokenEmbedding: vocab_size={vocab_size} and d_model={d_model} must be >= 1")
        if pad_id is not None and not 0 <= pad_id < vocab_size:
            raise ValueError(f"TokenEmbedding: pad_id={pad_id} is outside [0, vocab_size={vocab_size})")
        # N(0, 1/C) when scaled, so that x sqrt(C) has unit variance; GPT/BERT's N(0, 0.02^2) otherwise
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * (d_model ** -0.5 if scaled else 0.02))
        self.d_model, self.scaled, self.pad_id = d_model, scaled, pad_id
        if pad_id is not None:
            with torch.no_grad():
                self.weight[pad_id].zero_()

    def forward(self, ids: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, C)."""
        x = F.embedding(ids, self.weight)
        if self.scaled:
            x = x * math.sqrt(self.d_model)   # paper §3.4: lifts the N(0, 1/C) init to the O(1) scale of the sinusoids
        return x


class OutputProjection(nn.Module):
    """The pre-softmax linear map from d_model to vocabulary logits; `tie_to` shares the embedding's weight
    (paper §3.4, Press & Wolf 2017).

    Args:
        d_model: width of the residual stream.
        vocab_size: number of token ids.
        bias: add a per-token bias (Marian's final_logits_bias).
    """

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model) * 0.02)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def tie_to(self, embedding: TokenEmbedding) -> None:
        self.weight = embedding.weight

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, V) logits."""
        return F.linear(x, self.weight, self.bias)
