"""Fine-tuning: pretrained sources (our checkpoints and exports, Hugging Face folders), loading them into a
task with a report, freezing, per-part learning rates and LoRA."""

from lightning_tfm.finetune.controls import FineTuning, LoRA, freeze_bottom
from lightning_tfm.finetune.loading import LoadReport, load_pretrained
from lightning_tfm.finetune.sources import (
    PretrainedSource,
    architecture_factory,
    merge_adapters,
    read_source,
    read_tokenizer,
)

__all__ = ["FineTuning", "LoRA", "LoadReport", "PretrainedSource", "architecture_factory", "freeze_bottom",
           "load_pretrained", "merge_adapters", "read_source", "read_tokenizer"]
