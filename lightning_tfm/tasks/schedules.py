"""Learning-rate schedules, picked by `class_path` in YAML. Each is a LambdaLR stepped once per optimizer step,
whose factor multiplies the optimizer's base lr."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class InverseSqrtSchedule(LambdaLR):
    """The paper's schedule (§5.3): lrate = d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5),
    a linear warmup followed by inverse-square-root decay. Step counts from 1.

    Keep the optimizer's lr at 1.0 to get the paper's values; another lr scales them.

    Args:
        optimizer: the wrapped optimizer.
        d_model: the model width in the formula.
        warmup_steps: steps of linear increase (paper: 4000).
    """

    def __init__(self, optimizer: Optimizer, d_model: int = 512, warmup_steps: int = 4000) -> None:
        if d_model < 1 or warmup_steps < 1:
            raise ValueError(f"InverseSqrtSchedule: d_model={d_model} and warmup_steps={warmup_steps} must be >= 1")
        self.d_model, self.warmup_steps = d_model, warmup_steps
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        step = step + 1                       # LambdaLR counts from 0, the paper from 1
        return self.d_model ** -0.5 * min(step ** -0.5, step * self.warmup_steps ** -1.5)


class WarmupCosineSchedule(LambdaLR):
    """Linear warmup to the base lr, then cosine decay to min_ratio * base lr at total_steps (GPT-3, nanoGPT).

    Args:
        optimizer: the wrapped optimizer.
        warmup_steps: steps of linear increase from 0.
        total_steps: step at which the decay ends; the factor stays at min_ratio afterwards.
        min_ratio: final lr as a fraction of the base lr.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 100, total_steps: int = 5000,
                 min_ratio: float = 0.1) -> None:
        if warmup_steps < 0 or total_steps <= warmup_steps:
            raise ValueError(f"WarmupCosineSchedule: need 0 <= warmup_steps < total_steps, got warmup_steps="
                             f"{warmup_steps}, total_steps={total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosineSchedule: min_ratio={min_ratio}, must be in [0, 1]")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
