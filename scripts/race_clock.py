"""The race's clock, one definition of training time for both systems (scripts/race.py): the sum over training
batches of the wall time from the end of the previous batch (or the start of the epoch, or the end of a
snapshot) to the end of this one. That holds loading and collating the batch, forward, backward, the optimizer
and schedule step and the framework's per-step work. It leaves out the evaluation and checkpoint writing done
between epochs, snapshot writing, setup, tokenizer training and Lightning's sanity check.

Lightning's `Timer` (`trainer.max_time`) counts differently: wall time from `on_train_start`, validation and
checkpoint writes included. So `TrainingClock` stops our run itself when the training time reaches the budget,
as `Timer` does (`trainer.should_stop` at the end of a batch), and the race passes a generous `max_time` only
as a cap. `TrainingClock` is imported by the `lightning_tfm fit` subprocess (scripts/ on its PYTHONPATH); the
Marian loop uses `Clock` directly."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L


def real_tokens(batch: dict[str, Any]) -> int:
    """Unpadded source + target tokens of a translation batch (target with its bos and eos)."""
    return int(batch["src_mask"].sum()) + int(batch["tgt_mask"].sum())


class Clock:
    """Training time, snapshot marks and the stop, shared by both systems.

    Args:
        budget_minutes: training minutes after which to stop, > 0.
        every_minutes: minutes of training between snapshots, > 0; the last snapshot is at the budget.
    """

    def __init__(self, budget_minutes: float, every_minutes: float) -> None:
        if budget_minutes <= 0 or every_minutes <= 0:
            raise ValueError(f"Clock: budget_minutes={budget_minutes} and every_minutes={every_minutes} must be > 0")
        n = int(budget_minutes / every_minutes + 1e-9)
        marks = [round(every_minutes * (i + 1), 6) for i in range(n)]
        self.marks = marks + ([budget_minutes] if not marks or marks[-1] < budget_minutes - 1e-9 else [])
        self.budget_s = budget_minutes * 60
        self.seconds, self.tokens = 0.0, 0
        self._since: float | None = None

    def resume(self) -> None:
        """Start counting (at the start of an epoch, or after a snapshot)."""
        self._since = time.perf_counter()

    def batch_done(self, tokens: int) -> None:
        """Count the time since the last resume or batch, and the batch's tokens."""
        now = time.perf_counter()
        if self._since is None:
            raise RuntimeError("Clock.batch_done before Clock.resume")
        self.seconds += now - self._since
        self.tokens += tokens
        self._since = now

    def due(self) -> float | None:
        """The snapshot mark (minutes) just passed, else None; each mark is returned once."""
        if self.marks and self.seconds >= self.marks[0] * 60:
            return self.marks.pop(0)
        return None

    @property
    def over(self) -> bool:
        return self.seconds >= self.budget_s

    def snapshot(self, mark: float, step: int, save: Callable[[Path], None], folder: Path,
                 extra: dict[str, Any] | None = None, suffix: str = ".ckpt") -> dict[str, Any]:
        """Write a snapshot through `save(path)` (not counted), append its record to folder/snapshots.jsonl."""
        path = folder / f"snapshot-{mark:g}min{suffix}"
        save(path)
        record = {"mark_minutes": mark, "minutes": round(self.seconds / 60, 4), "step": step, "tokens": self.tokens,
                  "path": str(path), **(extra or {})}
        with open(folder / "snapshots.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.resume()
        return record


class TrainingClock(L.Callback):
    """Weights-only snapshots every `every_minutes` of training time, and the stop at `budget_minutes`
    (see the module docstring for what is counted).

    Args:
        budget_minutes: training minutes after which the run stops.
        every_minutes: training minutes between snapshots.
        dirpath: folder of the snapshots and of snapshots.jsonl.
    """

    def __init__(self, budget_minutes: float, every_minutes: float, dirpath: str) -> None:
        self.clock = Clock(budget_minutes, every_minutes)
        self.dirpath = Path(dirpath)
        self._losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / "snapshots.jsonl").unlink(missing_ok=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.resume()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._losses = [*self._losses[-49:], float(outputs["loss"])]     # float() waits for the step's kernels
        self.clock.batch_done(real_tokens(batch))
        while (mark := self.clock.due()) is not None:
            self._snapshot(trainer, mark)
        if self.clock.over:
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.clock.marks:        # stopped by something else (max_epochs, max_time) before the budget
            self._snapshot(trainer, self.clock.marks.pop(0), ended_early=True)
            self.clock.marks.clear()

    def _snapshot(self, trainer: L.Trainer, mark: float, **extra: Any) -> None:
        extra = {**extra, "train_loss": round(sum(self._losses) / max(len(self._losses), 1), 4)}
        self.clock.snapshot(mark, trainer.global_step, lambda path: trainer.save_checkpoint(path, weights_only=True),
                            self.dirpath, extra)
