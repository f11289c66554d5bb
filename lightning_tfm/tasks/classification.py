"""Sequence classification with the encoder-only Transformer (BERT §4.1): pooled hidden states, a linear head,
cross-entropy (or one sigmoid per label for multi-label data), and accuracy and macro-F1 over the whole
evaluation set. Label names travel with the checkpoint so predictions come back as names."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import torch.nn.functional as F
from torch import Tensor
from torch.optim import AdamW, Optimizer
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from lightning_tfm.finetune import FineTuning
from lightning_tfm.models.encoder_only import EncoderOnly
from lightning_tfm.models.heads import ClassificationHead
from lightning_tfm.tasks.base import OptimizerFactory, ScheduleFactory, TaskModule


class ClassificationModule(TaskModule):
    """Classify sequences (or sequence pairs) with an `EncoderOnly` backbone and a `ClassificationHead`.

    Args:
        model: factory vocab_size -> the encoder (a model class or preset with its other arguments set);
            None takes the architecture of `init_from`.
        vocab_size: size of the tokenizer's vocabulary (linked from the data by the CLI).
        n_classes: number of classes (linked from the data's label set by the CLI).
        multi_label: each example has any number of the labels (linked from the data by the CLI): a sigmoid and
            binary cross-entropy per label, labels predicted at probability > 0.5; `acc` is then the share of
            examples whose label set is exactly right.
        pooling: "cls" (first token, BERT) or "mean" over real tokens.
        head_dropout: dropout before the classifier, in [0, 1).
        pooler: BERT's dense + tanh layer on the pooled vector.
        init_from: pretrained weights to start from: a lightning_tfm checkpoint, a folder written by
            `lightning_tfm export`, or a Hugging Face folder (save_pretrained). The backbone must match it (leave
            `model` unset to take its architecture); the tokenizer comes with it. See README "Fine-tuning".
        finetune: freezing, a separate backbone learning rate, or LoRA adapters; None trains everything.
        optimizer: factory params -> optimizer; None is AdamW(lr=1e-4, weight_decay=0.01, fused=True).
        lr_schedule: factory optimizer -> scheduler stepped every step; None for a constant lr.
    """

    def __init__(self, model: Callable[[int], EncoderOnly] | None = None, vocab_size: int | None = None,
                 n_classes: int = 2, multi_label: bool = False, pooling: Literal["cls", "mean"] = "cls",
                 head_dropout: float = 0.1, pooler: bool = False,
                 init_from: str | None = None, finetune: FineTuning | None = None,
                 optimizer: OptimizerFactory | None = None, lr_schedule: ScheduleFactory | None = None) -> None:
        super().__init__(optimizer, lr_schedule, init_from, finetune)
        self.save_hyperparameters()
        self.model = self.build_backbone(model, vocab_size)
        self.head = ClassificationHead(self.model.d_model, n_classes, pooling, head_dropout, pooler)
        self.load_pretrained()
        self.multi_label = multi_label
        if multi_label:
            metrics = MetricCollection({"acc": MultilabelExactMatch(n_classes),
                                        "f1": MultilabelF1Score(n_classes, average="macro")})
        else:
            metrics = MetricCollection({"acc": MulticlassAccuracy(n_classes, average="micro"),
                                        "f1": MulticlassF1Score(n_classes, average="macro")})
        self.val_metrics, self.test_metrics = metrics.clone(prefix="val_"), metrics.clone(prefix="test_")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.label_names: list[str] = [str(i) for i in range(n_classes)]

    def forward(self, ids: Tensor, mask: Tensor | None = None, segments: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, n_classes) logits."""
        return self.head(self.model(ids, mask, segments), mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.training_loss(self._loss(self._logits(batch), batch["labels"]), len(batch["labels"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Each input's label (or labels, for multi-label data) with its probability, and every label's."""
        if self.multi_label:
            probs = self._logits(batch).float().sigmoid()
            return [{"labels": [name for name, q in zip(self.label_names, p.tolist()) if q > 0.5],
                     "probabilities": {name: round(q, 6) for name, q in zip(self.label_names, p.tolist())}}
                    for p in probs]
        probs = self._logits(batch).float().softmax(-1)
        best = probs.argmax(-1)
        return [{"label": self.label_names[i], "probability": round(p[i].item(), 6),
                 "probabilities": {name: round(q, 6) for name, q in zip(self.label_names, p.tolist())}}
                for i, p in zip(best.tolist(), probs)]

    def default_optimizer(self, params: Iterable) -> Optimizer:
        return AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        names = list(datamodule.label_names)
        if len(names) != self.hparams.n_classes:
            raise ValueError(f"the data has {len(names)} labels {names} but the model was built with "
                             f"n_classes={self.hparams.n_classes}")
        self.label_names = names
        if getattr(datamodule, "text_pair_column", None) and self.model.embedding.segments is None:
            raise ValueError(f"data.text_pair_column={datamodule.text_pair_column!r} gives sentence pairs, but the "
                             "model has no segment embeddings (n_segments=0): set the model's n_segments to 2")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["label_names"] = self.label_names

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("label_names")
        if stored is not None and self.label_names != [str(i) for i in range(len(stored))] \
                and list(stored) != self.label_names:
            raise ValueError(f"the data's labels {self.label_names} differ from the checkpoint's {stored}")
        if stored is not None:
            self.label_names = list(stored)

    def _logits(self, batch: dict[str, Any]) -> Tensor:
        return self(batch["ids"], batch["mask"], batch.get("segments"))

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy against class indices (B,), or binary cross-entropy per label against (B, n) multi-hot."""
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        """Loss, accuracy and macro-F1 over the whole set (under DDP each example is on one rank, once)."""
        mean_loss, metrics = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_metrics")
        logits = self._logits(batch)
        labels = batch["labels"]
        mean_loss.update(self._loss(logits, labels), weight=len(labels))
        metrics.update(logits.sigmoid() if self.multi_label else logits.argmax(-1), labels.long())
        self.log(f"{stage}_loss", mean_loss)
        self.log_dict(metrics, prog_bar=True)
