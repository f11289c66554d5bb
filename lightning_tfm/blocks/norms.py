"""Normalization blocks: LayerNorm (Ba et al. 2016, used by the paper) and RMSNorm (Zhang & Sennrich 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Norm(nn.Module):
    """Base of the normalizations; a model builds one per sub-layer from a factory `(d_model,) -> Norm`."""

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"{type(self).__name__}: d_model={d_model}, must be >= 1")
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps={eps}, must be > 0")
        self.d_model = d_model
        self.eps = eps


class LayerNorm(Norm):
    """LayerNorm over the last dimension, with learned gain and (optionally) bias.

    Args:
        d_model: size of the normalized dimension.
        eps: added to the variance; the paper's implementations use 1e-6 to 1e-5, BERT 1e-12.
        bias: learn an additive bias (GPT-2, BERT and the paper do).
    """

    def __init__(self, d_model: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__(d_model, eps)
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)


class RMSNorm(Norm):
    """Root-mean-square normalization: x / rms(x) * gain, no centering and no bias.

    Args:
        d_model: size of the normalized dimension.
        eps: added to the mean square; the same default as LayerNorm so a class swap keeps it.
    """

    def __init__(self, d_model: int, eps: float = 1e-5) -> None:
        super().__init__(d_model, eps)
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (self.d_model,), self.weight, self.eps)
