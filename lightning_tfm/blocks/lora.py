"""Low-rank adapters (LoRA, Hu et al. 2021): a frozen linear map W plus a trainable update (alpha / r) B A of
rank r, with B starting at zero so the adapted model starts as the pretrained one (§4.1). Merging folds B A
into W, so an exported model has no adapters and no extra cost."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Linear):
    """A linear layer with a low-rank update: y = x W^T + b + (alpha / rank) dropout(x) A^T B^T.

    It keeps the name `weight` (and `bias`) of the layer it adapts, so pretrained weights load into it as they
    would into `nn.Linear`; only `lora_a`, `lora_b` and the buffer `lora_scale` are new.

    Args:
        in_features: input width.
        out_features: output width.
        rank: rank r of the update, >= 1.
        alpha: scale numerator; the update is multiplied by alpha / rank (paper §4.1).
        dropout: dropout on the adapter's input, in [0, 1).
        bias: whether the base layer has a bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ValueError(f"LoRALinear: rank={rank}, must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRALinear: dropout={dropout}, must be in [0, 1)")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))     # zero: the update starts at 0
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))            # as nn.Linear, and the paper's code
        self.lora_dropout = nn.Dropout(dropout)
        # stored with the adapters, so a state dict alone is enough to merge them (`finetune.merge_adapters`)
        self.register_buffer("lora_scale", torch.tensor(self.scale))

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float) -> LoRALinear:
        """A LoRALinear holding `linear`'s weight and bias (the same tensors, frozen)."""
        adapted = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=linear.bias is not None)
        adapted.to(device=linear.weight.device, dtype=linear.weight.dtype)
        adapted.weight, adapted.bias = linear.weight, linear.bias
        adapted.weight.requires_grad_(False)
        if adapted.bias is not None:
            adapted.bias.requires_grad_(False)
        return adapted

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x, 0, None)

    def rows(self, x: Tensor, start: int, end: int | None) -> Tensor:
        """The output features start:end only (attention projects queries and keys/values with slices of one
        fused layer); (..., in) -> (..., end - start)."""
        bias = None if self.bias is None else self.bias[start:end]
        base = F.linear(x, self.weight[start:end], bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_a), self.lora_b[start:end])   # (..., r) -> out
        return base + self.scale * update

    def merged(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function (in eval mode): W + (alpha / rank) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.scale * (self.lora_b @ self.lora_a))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"
