"""Task heads on top of a stack's hidden states: sequence classification (BERT §4.1) and masked-LM (BERT §3.1)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tfm.blocks.embeddings import OutputProjection
from lightning_tfm.blocks.norms import LayerNorm


def pool(hidden: Tensor, mask: Tensor | None, pooling: str) -> Tensor:
    """(B, T, C) hidden states -> (B, C): the first ([CLS]) position, or the mean over real tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if mask is None:
        return hidden.mean(1)
    weights = mask.to(hidden.dtype)[..., None]                                 # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ClassificationHead(nn.Module):
    """Pool the sequence, then (optionally BERT's tanh pooler layer) dropout and a linear map to class logits.

    Args:
        d_model: width of the hidden states.
        n_classes: number of classes (or labels, for multi-label tasks).
        pooling: "cls" takes the first token (BERT); "mean" averages the real tokens.
        dropout: dropout before the output layer, in [0, 1).
        pooler: apply BERT's dense + tanh layer to the pooled vector first.
    """

    def __init__(self, d_model: int, n_classes: int, pooling: Literal["cls", "mean"] = "cls", dropout: float = 0.1,
                 pooler: bool = False) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"ClassificationHead: n_classes={n_classes}, must be >= 1")
        if pooling not in ("cls", "mean"):
            raise ValueError(f"ClassificationHead: pooling={pooling!r}, must be 'cls' or 'mean'")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ClassificationHead: dropout={dropout}, must be in [0, 1)")
        self.pooling = pooling
        self.pooler = nn.Linear(d_model, d_model) if pooler else None
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(d_model, n_classes)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T, C) hidden states, (B, T) real-token mask -> (B, n_classes) logits."""
        x = pool(hidden, mask, self.pooling)
        if self.pooler is not None:
            x = torch.tanh(self.pooler(x))
        return self.classifier(self.dropout(x))


class MaskedLMHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then the output projection (tied to the token embedding
    by the caller through `output.tie_to`).

    Args:
        d_model: width of the hidden states.
        vocab_size: number of token ids.
        eps: LayerNorm epsilon (BERT: 1e-12).
    """

    def __init__(self, d_model: int, vocab_size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = LayerNorm(d_model, eps=eps)
        self.output = OutputProjection(d_model, vocab_size, bias=True)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., C) -> (..., V) logits."""
        return self.output(self.norm(F.gelu(self.dense(hidden))))
