"""Trainer callbacks: training throughput in tokens per second, and writing predictions to a file."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


def count_tokens(batch: Any) -> int:
    """Real (unpadded) tokens in a batch: the sum of its boolean masks, else the size of its id tensors."""
    if not isinstance(batch, dict):
        return 0
    masks = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dtype == torch.bool]
    if masks:
        return int(sum(int(m.sum()) for m in masks))
    return int(sum(v.numel() for k, v in batch.items() if isinstance(v, torch.Tensor) and k in ("ids", "src", "tgt")))


class TokensPerSecond(L.Callback):
    """Log training throughput (`train_tok_s`, real tokens per second on this process, and the global figure
    `train_tok_s_global` under DDP) to the progress bar and the loggers, averaged over `window` steps.

    Args:
        window: optimizer steps per measurement.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"TokensPerSecond: window={window}, must be >= 1")
        self.window = window
        self._tokens, self._steps, self._start = 0, 0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._steps == 0:
            self._start = time.perf_counter()
        self._tokens += count_tokens(batch)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._steps += 1
        if self._steps < self.window:
            return
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        module.log("train_tok_s", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        if trainer.world_size > 1:
            module.log("train_tok_s_global", rate * trainer.world_size, on_step=True, on_epoch=False,
                       rank_zero_only=True)
        self._tokens, self._steps = 0, 0


class PredictionWriter(BasePredictionWriter):
    """Write each prediction as one line of `path`: plain text for a string (JSON-quoted if it spans lines),
    JSON for anything else (labels with probabilities). Predictions keep the order of the input.

    Args:
        path: output file; its folder is created.
    """

    def __init__(self, path: str = "predictions.txt") -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._file = None

    def on_predict_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer: L.Trainer, module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self._file is None:
            return
        for item in prediction:
            line = item if isinstance(item, str) and "\n" not in item else json.dumps(item, ensure_ascii=False)
            self._file.write(line + "\n")

    def on_predict_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            rank_zero_info(f"predictions written to {self.path}")
