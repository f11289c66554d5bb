"""Masked-LM pretraining of the encoder-only Transformer (BERT, Devlin et al. 2019, §3.1): predict the original
token at the positions the data chose (labels -100 elsewhere) through a `MaskedLMHead` tied to the token
embedding, with masked-token accuracy and perplexity (exp of the token-weighted mean loss) over the whole
evaluation set. `predict` fills in the mask tokens of input texts."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import AdamW, Optimizer
from torchmetrics import MeanMetric

from lightning_tfm.data.masking import IGNORE_INDEX
from lightning_tfm.finetune import FineTuning
from lightning_tfm.models.encoder_only import EncoderOnly
from lightning_tfm.models.heads import MaskedLMHead
from lightning_tfm.tasks.base import OptimizerFactory, ScheduleFactory, TaskModule


def masked_lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Mean cross-entropy over the chosen positions only.

    Args:
        logits: (..., V) logits.
        labels: (...) the original id at chosen positions, -100 elsewhere.

    Returns:
        The mean loss over chosen positions (0, with zero gradients, when none is chosen: a short batch can
        draw no mask, and `F.cross_entropy`'s mean would be 0/0 = NaN) and the number of chosen positions.
    """
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = int((labels != IGNORE_INDEX).sum())
    return total / max(n_tokens, 1), n_tokens


class MaskedLanguageModelModule(TaskModule):
    """Pretrain an `EncoderOnly` model to recover masked tokens; fill in `<mask>` tokens of texts.

    The head's output projection shares its weight with the encoder's token embedding (BERT's
    `get_output_embeddings`), so its only new parameters are the dense layer, the norm and the output bias.
    Batches come from `MaskedLMDataModule`: "ids" (B, T) corrupted inputs, "mask" (B, T) real tokens,
    "labels" (B, T). Logged: `train_loss`; `val_loss`, `val_ppl`, `val_acc` (and `test_*`) over the whole set.

    Args:
        model: factory vocab_size -> the encoder (a model class or preset with its other arguments set);
            None takes the architecture of `init_from`.
        vocab_size: size of the tokenizer's vocabulary (linked from the data by the CLI).
        init_from: pretrained weights to start from: a lightning_tfm checkpoint, a folder written by
            `lightning_tfm export`, or a Hugging Face folder (save_pretrained). The backbone must match it (leave
            `model` unset to take its architecture); the tokenizer comes with it. See README "Fine-tuning".
        finetune: freezing, a separate backbone learning rate, or LoRA adapters; None trains everything.
        optimizer: factory params -> optimizer; None is AdamW(lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01,
            fused=True)
            (BERT, Appendix A.2).
        lr_schedule: factory optimizer -> scheduler stepped every step, e.g. `WarmupCosineSchedule`; None for a
            constant lr.
    """

    def __init__(self, model: Callable[[int], EncoderOnly] | None = None, vocab_size: int | None = None,
                 init_from: str | None = None, finetune: FineTuning | None = None,
                 optimizer: OptimizerFactory | None = None, lr_schedule: ScheduleFactory | None = None) -> None:
        super().__init__(optimizer, lr_schedule, init_from, finetune)
        self.save_hyperparameters()
        self.model = self.build_backbone(model, vocab_size)
        self.head = MaskedLMHead(self.model.d_model, self.model.vocab_size)
        self.head.output.tie_to(self.model.embedding.tokens)
        self.load_pretrained()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc, self.test_acc = MeanMetric(), MeanMetric()
        self.mask_id: int | None = None
        self.special_ids: list[int] = []

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, V) logits at every position."""
        return self.head(self.model(ids, mask))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss, _, n_tokens = self._loss(batch)
        return self.training_loss(loss, max(n_tokens, 1))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss, self.val_acc)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss, self.test_acc)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Each text with every mask token replaced by the most probable non-special token."""
        if self.mask_id is None:
            raise ValueError("MaskedLanguageModelModule does not know the mask token's id: predict with a "
                             "MaskedLMDataModule, which provides it")
        ids, mask = batch["ids"], batch["mask"]
        at = ids == self.mask_id                                                       # (B, T)
        logits = self.head(self.model(ids, mask)[at]).float()                         # (N, V)
        n_known = self.tokenizer.get_vocab_size(with_added_tokens=True)
        logits[:, n_known:] = float("-inf")           # rows of the embedding the tokenizer has no token for
        logits[:, self.special_ids] = float("-inf")
        filled = ids.masked_scatter(at, logits.argmax(-1))
        return [self.tokenizer.decode(row[real].tolist(), skip_special_tokens=True)
                for row, real in zip(filled, mask)]

    def default_optimizer(self, params: Iterable) -> Optimizer:
        return AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01, fused=True)

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        truncation = getattr(datamodule, "truncation", None)
        if truncation is not None and truncation.max_len > self.model.max_len:
            raise ValueError(f"data.truncation.max_len={truncation.max_len} is longer than the model's positions "
                             f"(max_len={self.model.max_len}); lower data.truncation.max_len or raise the positions' "
                             "max_len")
        specials = datamodule.special_ids
        self.mask_id, self.special_ids = specials.mask, specials.all()

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, int]:
        """Mean loss over the chosen positions, whether each prediction is right (N,), and N."""
        labels = batch["labels"]
        chosen = labels != IGNORE_INDEX                                                 # (B, T)
        hidden = self.model(batch["ids"], batch["mask"])                                # (B, T, C)
        logits = self.head(hidden[chosen])  # (N, V): only chosen positions, as BERT's gather_indexes
        loss, n_tokens = masked_lm_loss(logits, labels[chosen])
        return loss, logits.argmax(-1) == labels[chosen], n_tokens

    def _evaluate(self, batch: dict[str, Any], mean_loss: MeanMetric, accuracy: MeanMetric) -> None:
        loss, correct, n_tokens = self._loss(batch)
        if n_tokens:
            mean_loss.update(loss, weight=n_tokens)      # token-weighted, so the mean is over the whole set
            accuracy.update(correct.float())

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_loss, self.val_acc)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_loss, self.test_acc)

    def _log_metrics(self, stage: str, mean_loss: MeanMetric, accuracy: MeanMetric) -> None:
        """Log the loss, perplexity and masked-token accuracy of the whole set (synced by torchmetrics)."""
        if mean_loss.update_count or self.trainer.world_size > 1:    # compute() syncs: every rank must call it
            loss = mean_loss.compute()
            self.log(f"{stage}_loss", loss, prog_bar=True)
            self.log(f"{stage}_ppl", torch.exp(loss))
            self.log(f"{stage}_acc", accuracy.compute(), prog_bar=True)
        mean_loss.reset()
        accuracy.reset()
