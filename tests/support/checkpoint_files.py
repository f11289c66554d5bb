"""Checkpoints as a lightning_tfm run writes them (the keys `Trainer.save_checkpoint` and our tasks put in), made
without a Trainer so the fine-tuning tests stay fast."""

from pathlib import Path

import torch
from lightning import LightningModule

TINY_ENCODER = {"class_path": "lightning_tfm.models.presets.TinyEncoder", "init_args": {"dropout": 0.0}}
TINY_DECODER = {"class_path": "lightning_tfm.models.presets.TinyDecoder"}


def write_checkpoint(task: LightningModule, path: Path, architecture: dict, **extra) -> Path:
    """Save `task` the way LightningCLI + Trainer do: hyper_parameters with the task's class path and the
    model as a class_path config, the state_dict, and what `on_save_checkpoint` adds (tokenizer, labels)."""
    hparams = {k: v for k, v in task.hparams.items() if k not in ("optimizer", "lr_schedule", "finetune")}
    hparams.update(_class_path=f"{type(task).__module__}.{type(task).__name__}", model=architecture)
    checkpoint = {"hyper_parameters": hparams, "state_dict": task.state_dict(), "global_step": 7, **extra}
    if task.tokenizer is not None:
        checkpoint["tokenizer"] = task.tokenizer.to_str()
    torch.save(checkpoint, path)
    return path
