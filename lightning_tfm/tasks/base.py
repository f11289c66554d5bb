"""What the three tasks share: the optimizer and schedule chosen from YAML, and the tokenizer (plus any
task metadata) carried inside every checkpoint so evaluation and fine-tuning use what training used."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Tokenizer
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

OptimizerFactory = Callable[[Iterable], Optimizer]
ScheduleFactory = Callable[[Optimizer], LRScheduler]


class TaskModule(L.LightningModule):
    """Base of the tasks.

    Args:
        optimizer: factory params -> optimizer; None gives the task's default.
        lr_schedule: factory optimizer -> LR scheduler, stepped every optimizer step; None for a constant lr.
    """

    def __init__(self, optimizer: OptimizerFactory | None = None, lr_schedule: ScheduleFactory | None = None) -> None:
        super().__init__()
        self.optimizer_factory, self.schedule_factory = optimizer, lr_schedule
        self.tokenizer: Tokenizer | None = None

    def default_optimizer(self, params: Iterable) -> Optimizer:
        raise NotImplementedError(f"{type(self).__name__} must define its default optimizer")

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = (self.optimizer_factory or self.default_optimizer)(params)
        if self.schedule_factory is None:
            return optimizer
        schedule = self.schedule_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def setup(self, stage: str) -> None:
        """Take the tokenizer (and what the task needs from the data) from the datamodule, and check they
        fit the model."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            self.tokenizer = datamodule.tokenizer
            self.check_data(datamodule)
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer: use a datamodule that provides one, "
                             "or load a checkpoint that carries one")
        if stage == "fit":
            n = sum(p.numel() for p in self.parameters())
            rank_zero_info(f"{type(self).__name__}: {n:,} parameters, {n - self.frozen_parameters():,} trainable")

    def frozen_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if not p.requires_grad)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Raise if the datamodule's tokenizer or labels do not fit the model (each task checks its own)."""
        vocab_size = datamodule.tokenizer.get_vocab_size()
        model_vocab = getattr(self.model, "vocab_size", None)
        if model_vocab is not None and vocab_size > model_vocab:
            raise ValueError(f"the tokenizer has {vocab_size} tokens but the model's vocab_size is {model_vocab}: "
                             "this checkpoint was trained with another tokenizer; pass the one stored with it")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer is not None:
            checkpoint["tokenizer"] = self.tokenizer.to_str()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("tokenizer")
        if stored is None:
            return
        if self.tokenizer is not None and self.tokenizer.to_str() != stored:
            raise ValueError("the data's tokenizer differs from the one stored in the checkpoint: evaluate and "
                             "fine-tune with the checkpoint's tokenizer (the CLI does this for --ckpt_path; in "
                             "Python, save it with `Tokenizer.from_str(ckpt['tokenizer']).save(path)` and give "
                             "that path to the datamodule)")
        self.tokenizer = Tokenizer.from_str(stored)
