"""Position-wise feed-forward blocks (paper §3.3): ReLU, GELU, SiLU, and the gated SwiGLU (Shazeer 2020)."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn


def _check(name: str, d_model: int, d_ff: int, dropout: float) -> None:
    if d_model < 1 or d_ff < 1:
        raise ValueError(f"{name}: d_model={d_model} and d_ff={d_ff} must both be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout={dropout}, must be in [0, 1)")


class FeedForward(nn.Module):
    """Base of the feed-forward blocks: FFN(x) = W2 act(W1 x + b1) + b2, applied to each position alike.

    A model builds one per layer from a factory `(d_model, d_ff) -> FeedForward`.

    Args:
        d_model: width of the residual stream (input and output).
        d_ff: inner width; the paper uses 4 * d_model (2048 for 512).
        dropout: dropout on the inner activations (not in the paper, which drops only sub-layer outputs).
        bias: add biases to both projections.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        _check(type(self).__name__, d_model, d_ff, dropout)
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def residual_projections(self) -> list[nn.Linear]:
        """The linear layer whose output is added to the residual stream (GPT-2 scales its init)."""
        return [self.fc2]

    def activate(self, h: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define its activation")

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.fc2(self.dropout(self.activate(self.fc1(x))))


class ReLUFeedForward(FeedForward):
    """max(0, x W1 + b1) W2 + b2, the paper's FFN (§3.3, equation 2)."""

    def activate(self, h: Tensor) -> Tensor:
        return F.relu(h)


class GELUFeedForward(FeedForward):
    """GELU feed-forward (Hendrycks & Gimpel 2016) as in GPT and BERT.

    Args:
        d_model: width of the residual stream.
        d_ff: inner width.
        dropout: dropout on the inner activations.
        bias: add biases to both projections.
        approximate: "none" for the exact erf form (BERT), "tanh" for GPT-2's approximation.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = True,
                 approximate: Literal["none", "tanh"] = "none") -> None:
        super().__init__(d_model, d_ff, dropout, bias)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELUFeedForward: approximate={approximate!r}, must be 'none' or 'tanh'")
        self.approximate = approximate

    def activate(self, h: Tensor) -> Tensor:
        return F.gelu(h, approximate=self.approximate)


class SiLUFeedForward(FeedForward):
    """SiLU / swish feed-forward, as in Marian's translation models."""

    def activate(self, h: Tensor) -> Tensor:
        return F.silu(h)


class SwiGLU(FeedForward):
    """Gated feed-forward: (silu(x W) * x V) W2 (Shazeer 2020, "GLU Variants Improve Transformer").

    fc1 computes the gate and the value in one fused matmul of width 2 * d_ff. To keep the parameter
    count of a d_ff-wide ReLU block, pass d_ff = 2/3 of it (the paper's convention).
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__(d_model, d_ff, dropout, bias)
        self.fc1 = nn.Linear(d_model, 2 * d_ff, bias=bias)   # (C) -> (2 * d_ff): gate and value

    def activate(self, h: Tensor) -> Tensor:
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value
