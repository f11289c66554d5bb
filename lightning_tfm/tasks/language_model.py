"""Language modeling with the decoder-only Transformer (GPT): next-token cross-entropy, perplexity over the
whole evaluation set (exp of the mean token loss), and generation by greedy search or sampling with
temperature, top-k and top-p, all through the KV cache."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import AdamW, Optimizer
from torchmetrics import MeanMetric

from lightning_tfm.decoding import greedy_search, sample
from lightning_tfm.finetune import FineTuning
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.tasks.base import OptimizerFactory, ScheduleFactory, TaskModule


class LanguageModelModule(TaskModule):
    """Train a `DecoderOnly` model to predict the next token; generate continuations of prompts.

    Args:
        model: factory vocab_size -> the decoder (a model class or preset with its other arguments set);
            None takes the architecture of `init_from`.
        vocab_size: size of the tokenizer's vocabulary (linked from the data by the CLI).
        max_new_tokens: tokens generated per prompt by `predict`.
        temperature: sampling temperature; 0 is greedy search.
        top_k: sample among the k most probable tokens only; None for all.
        top_p: sample from the smallest set of tokens whose probability reaches p (nucleus); None for all.
        init_from: pretrained weights to start from: a lightning_tfm checkpoint, a folder written by
            `lightning_tfm export`, or a Hugging Face folder (save_pretrained). The backbone must match it (leave
            `model` unset to take its architecture); the tokenizer comes with it. See README "Fine-tuning".
        finetune: freezing, a separate backbone learning rate, or LoRA adapters; None trains everything.
        optimizer: factory params -> optimizer; None is AdamW(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
            fused=True).
        lr_schedule: factory optimizer -> scheduler stepped every step, e.g. `WarmupCosineSchedule`.
    """

    def __init__(self, model: Callable[[int], DecoderOnly] | None = None, vocab_size: int | None = None,
                 max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None,
                 init_from: str | None = None, finetune: FineTuning | None = None,
                 optimizer: OptimizerFactory | None = None, lr_schedule: ScheduleFactory | None = None) -> None:
        super().__init__(optimizer, lr_schedule, init_from, finetune)
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"LanguageModelModule: max_new_tokens={max_new_tokens} must be >= 1 and "
                             f"temperature={temperature} >= 0")
        self.save_hyperparameters()
        self.model = self.build_backbone(model, vocab_size)
        self.load_pretrained()
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.eos_id: int | None = None

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T) ids -> (B, T, V) next-token logits."""
        return self.model(ids, mask)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.training_loss(*self._loss(batch))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        """Continue each prompt of the batch; prompts run one at a time since they differ in length."""
        texts = []
        for ids in batch["prompts"]:
            prompt = torch.as_tensor(ids, dtype=torch.long, device=self.device)[None]      # (1, t)
            new = self.generate(prompt, self.max_new_tokens)[0].tolist()
            if self.eos_id is not None and self.eos_id in new:
                new = new[: new.index(self.eos_id)]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True))
        return texts

    def default_optimizer(self, params: Iterable) -> Optimizer:
        return AdamW(params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        self.eos_id = getattr(datamodule, "eos_id", None)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, generator: torch.Generator | None = None) -> Tensor:
        """(B, t) prompts -> (B, max_new_tokens) continuations, by sampling or (temperature 0) greedy search."""
        room = self.model.max_len - prompt.shape[1]
        if room < 1:
            raise ValueError(f"the prompt has {prompt.shape[1]} tokens, the model's context is "
                             f"{self.model.max_len}: shorten the prompt")
        max_new_tokens = min(max_new_tokens, room)
        cache = self.model.new_cache(prompt.shape[1] + max_new_tokens)

        def step(tokens: Tensor) -> Tensor:
            # project only the last position: the prompt's other logits are never used
            return self.model.output(self.model.hidden(tokens, cache=cache)[:, -1]).float()

        if self.temperature == 0:
            return greedy_search(step, prompt, -1 if self.eos_id is None else self.eos_id, max_new_tokens)
        return sample(step, prompt, max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                      top_p=self.top_p, generator=generator, eos_id=self.eos_id)

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        """Mean next-token cross-entropy over real target tokens: input ids[:, :-1], targets ids[:, 1:]."""
        ids, mask = batch["ids"], batch.get("mask")
        logits = self.model(ids[:, :-1], None if mask is None else mask[:, :-1])             # (B, T, V)
        targets = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return loss, int((targets != -100).sum())

    def _evaluate(self, batch: dict[str, Any], mean_loss: MeanMetric) -> None:
        loss, n_tokens = self._loss(batch)
        mean_loss.update(loss, weight=n_tokens)       # token-weighted, so the mean is over the whole set

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test", self.test_loss)

    def _log_perplexity(self, stage: str, mean_loss: MeanMetric) -> None:
        """Log the loss and perplexity of the whole set (synced across processes by torchmetrics)."""
        if mean_loss.update_count or self.trainer.world_size > 1:    # compute() syncs: every rank must call it
            loss = mean_loss.compute()
            self.log(f"{stage}_loss", loss, prog_bar=True)
            self.log(f"{stage}_ppl", torch.exp(loss))
        mean_loss.reset()
