"""Callbacks the subprocess tests add to a real `lightning_tfm fit` (with tests/support on PYTHONPATH), to see
inside the run: which batches each rank trained on, each rank's final weights, and a real SIGKILL mid-epoch or
in the middle of a checkpoint write."""

from __future__ import annotations

import hashlib
import io
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch


def fingerprint(batch: dict[str, Any]) -> str:
    """A short hash of the batch's tensors, to compare batches across runs."""
    digest = hashlib.sha1()
    for key in sorted(batch):
        if isinstance(batch[key], torch.Tensor):
            digest.update(key.encode())
            digest.update(batch[key].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class RecordBatches(L.Callback):
    """Append "step epoch batch_idx fingerprint" for every training batch to `<folder>/batches.rank<r>.txt`."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"batches.rank{trainer.global_rank}.txt", "a") as f:
            f.write(f"{trainer.global_step} {trainer.current_epoch} {batch_idx} {fingerprint(batch)}\n")


class SaveRankWeights(L.Callback):
    """At the end of fit, every rank writes its model's weights to `<folder>/weights.rank<r>.pt`."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), self.folder / f"weights.rank{trainer.global_rank}.pt")


class SigkillAtStep(L.Callback):
    """Kill this process with SIGKILL (no cleanup, no handler runs) once `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SigkillDuringCheckpointWrite(L.Callback):
    """At optimizer step `step`, let the checkpoint file receive half of its bytes (flushed to disk), then kill
    this process with SIGKILL: a crash in the middle of a checkpoint write."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.global_step != self.step:
            return
        whole_save = torch.save

        def half_then_kill(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            buffer = io.BytesIO()
            whole_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = half_then_kill       # the checkpoint is written right after this hook returns


class PoisonWeightsAtStep(L.Callback):
    """Fill the first parameter with NaN before batch `step`, as a diverged update would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(module.parameters()).fill_(float("nan"))


class SaveFirstBatch(L.Callback):
    """Save the first training batch's tensors to `<folder>/first_batch.pt`, to recompute its loss elsewhere."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)},
                       self.folder / "first_batch.pt")


class ReadStepsAtSetup(L.Callback):
    """Reads `trainer.estimated_stepping_batches` in `setup`, which builds the training loader before a
    resumed run restores the datamodule's state (the order of Lightning-AI/pytorch-lightning#20550, where a
    schedule's `configure_optimizers` reads it under a strategy that restores after setup)."""

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            assert trainer.estimated_stepping_batches > 0
