"""Trainer callbacks: training throughput in tokens per second, writing predictions to a file, and opt-in
`torch.compile`."""

from __future__ import annotations

import json
import re
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


_MISREADABLE = re.compile(r'[\n\r]|^["{\[]')   # a line break, or a start that reads as JSON


class PredictionWriter(BasePredictionWriter):
    """Write each prediction as one line of `path`, in the order of the input: plain text for a string, JSON
    for anything else (labels with probabilities) and for a string that could be misread (one spanning lines,
    or starting with `"`, `{` or `[`). So a line starting with `"`, `{` or `[` is JSON, any other is the text.

    Under DDP every rank predicts its share of the batches (rank r takes batches r, r + R, ...; see
    `BucketBatchSampler`), and rank 0 gathers them at the end and writes them in order, without the repeated
    batches that even out the ranks. A single process writes as it goes.

    Args:
        path: output file; its folder is created.
    """

    def __init__(self, path: str = "predictions.txt") -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self._file = None
        self._pending: list[tuple[int, list[Any]]] = []

    def on_predict_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._pending = []
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")

    def write_on_batch_end(self, trainer: L.Trainer, module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if trainer.world_size == 1:
            self._write(prediction)
            return
        loaders = trainer.predict_dataloaders
        loader = loaders[dataloader_idx] if isinstance(loaders, (list, tuple)) else loaders
        sampler = getattr(loader.batch_sampler, "_batch_sampler", loader.batch_sampler)   # Lightning's index wrapper
        real = getattr(sampler, "num_real_batches", None)
        if real is None:
            raise RuntimeError("PredictionWriter under DDP needs a BucketBatchSampler (our datamodules' loaders)"
                               " to put the ranks' predictions back in order; predict on one device instead")
        if batch_idx < real:
            self._pending.append((batch_idx * trainer.world_size + trainer.global_rank, list(prediction)))

    def on_predict_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self._pending)
            for _, prediction in sorted(batch for rank in gathered for batch in rank):
                self._write(prediction)
            self._pending = []
        if self._file is not None:
            self._file.close()
            self._file = None
            rank_zero_info(f"predictions written to {self.path}")

    def _write(self, prediction: Any) -> None:
        if self._file is None:
            return
        for item in prediction:
            plain = isinstance(item, str) and not _MISREADABLE.search(item)
            self._file.write((item if plain else json.dumps(item, ensure_ascii=False)) + "\n")


class CompileModel(L.Callback):
    """Opt-in `torch.compile` of the task's network before fit (add it to `trainer.callbacks`).

    The network (`module.model`) is compiled in place (`nn.Module.compile`), so parameter names and
    checkpoints stay as without it. Batches padded to a multiple of 8 keep the number of shapes small; decoding
    with a growing KV cache recompiles a few times, then runs eagerly (torch's recompile limit).

    Args:
        backend: torch.compile backend ("inductor"; "eager" only checks that the model traces).
        mode: None, "default", "reduce-overhead" or "max-autotune".
        dynamic: None lets torch decide which dimensions vary; True or False forces it.
        fullgraph: fail on graph breaks instead of splitting the graph.
    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool = False) -> None:
        self.options = {"backend": backend, "mode": mode, "dynamic": dynamic, "fullgraph": fullgraph}

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        network = getattr(module, "model", None)
        if stage == "fit" and isinstance(network, torch.nn.Module):
            network.compile(**self.options)
            rank_zero_info(f"CompileModel: {type(network).__name__} compiled with {self.options}")
