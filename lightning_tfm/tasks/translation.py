"""Translation with the encoder-decoder Transformer, trained and decoded as in "Attention Is All You Need":
teacher forcing on the target shifted right, label-smoothed cross-entropy (§5.4), Adam(0.9, 0.98, 1e-9) with
the inverse-square-root schedule (§5.3), beam search with beam 4 and length penalty 0.6, output length up to
input length + 50 (§6.1), and corpus BLEU (sacreBLEU) over the whole evaluation set."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Adam, Optimizer
from torchmetrics import MeanMetric
from torchmetrics.text import SacreBLEUScore

from lightning_tfm.decoding import beam_search, greedy_search
from lightning_tfm.finetune import FineTuning
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.tasks.base import OptimizerFactory, ScheduleFactory, TaskModule


class CorpusBLEU(SacreBLEUScore):
    """sacreBLEU's corpus BLEU on detokenized text (13a tokenization, cased), on the 0-100 scale that sacreBLEU
    and the papers report (torchmetrics' own is 0-1)."""

    def compute(self) -> Tensor:
        return super().compute() * 100


@torch.no_grad()
def translate(model: EncoderDecoder, src: Tensor, src_mask: Tensor | None, bos_id: int, eos_id: int, pad_id: int,
              beam_size: int = 4, alpha: float = 0.6, max_extra_len: int = 50) -> Tensor:
    """Translate a batch as the paper does (§6.1): beam search, or greedy search for beam 1, generating at most
    source length + max_extra_len tokens, but never more than the model has target positions (`max_len`).

    The one decoding path of `TranslationModule` and of scripts/bench: `EncoderDecoder.search_state` keeps the
    encoder side once per sentence, and finished sentences leave the batch.

    Args:
        model: the encoder-decoder.
        src: (B, S) source ids.
        src_mask: (B, S) bool, True for real tokens; None if nothing is padded.
        bos_id, eos_id, pad_id: the start, end and padding ids of the target.
        beam_size: k; 1 is greedy search.
        alpha: GNMT length penalty of beam search.
        max_extra_len: outputs may be this many tokens longer than their source.

    Returns:
        (B, L) long target ids without BOS, EOS included, pad_id after it.
    """
    B, S = src.shape
    src_len = src_mask.sum(-1) if src_mask is not None else torch.full((B,), S, device=src.device)
    max_len = (src_len + max_extra_len).clamp(max=model.max_len)   # L tokens feed positions 0 .. L - 1
    state = model.search_state(src, src_mask, int(max_len.max()))
    start = torch.full((B,), bos_id, dtype=torch.long, device=src.device)
    if beam_size == 1:
        return greedy_search(state.step, start, eos_id, max_len, pad_id, reorder=state.reorder)
    return beam_search(state.step, state.reorder, start, eos_id, max_len, beam_size=beam_size, alpha=alpha,
                       pad_id=pad_id).tokens


class TranslationModule(TaskModule):
    """Train an `EncoderDecoder` on sentence pairs, evaluate with corpus BLEU, translate with beam search.

    Args:
        model: factory vocab_size -> the encoder-decoder (a model class or preset with its other arguments set);
            None takes the architecture of `init_from`.
        vocab_size: size of the tokenizer's vocabulary (linked from the data by the CLI).
        label_smoothing: epsilon of label smoothing (paper: 0.1).
        beam_size: beam for test and predict (paper: 4); 1 is greedy search.
        val_beam_size: beam for validation BLEU; 1 (greedy) keeps validation fast.
        length_penalty: alpha of the GNMT penalty ((5 + |Y|) / 6)^alpha (paper: 0.6).
        max_extra_len: outputs may be this many tokens longer than their input (paper: 50).
        init_from: pretrained weights to start from: a lightning_tfm checkpoint, a folder written by
            `lightning_tfm export`, or a Hugging Face folder (save_pretrained). The backbone must match it (leave
            `model` unset to take its architecture); the tokenizer comes with it. See README "Fine-tuning".
        finetune: freezing, a separate backbone learning rate, or LoRA adapters; None trains everything.
        optimizer: factory params -> optimizer; None is the paper's Adam(lr=1, betas=(0.9, 0.98), eps=1e-9, fused=True),
            whose lr of 1 lets `InverseSqrtSchedule` set the paper's values.
        lr_schedule: factory optimizer -> scheduler stepped every step, e.g. `InverseSqrtSchedule`.
    """

    def __init__(self, model: Callable[[int], EncoderDecoder] | None = None, vocab_size: int | None = None,
                 label_smoothing: float = 0.1, beam_size: int = 4, val_beam_size: int = 1,
                 length_penalty: float = 0.6, max_extra_len: int = 50,
                 init_from: str | None = None, finetune: FineTuning | None = None,
                 optimizer: OptimizerFactory | None = None, lr_schedule: ScheduleFactory | None = None) -> None:
        super().__init__(optimizer, lr_schedule, init_from, finetune)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"TranslationModule: label_smoothing={label_smoothing}, must be in [0, 1)")
        if beam_size < 1 or val_beam_size < 1:
            raise ValueError(f"TranslationModule: beam_size={beam_size} and val_beam_size={val_beam_size} "
                             "must be >= 1")
        self.save_hyperparameters()
        self.model = self.build_backbone(model, vocab_size)
        self.load_pretrained()
        self.label_smoothing, self.length_penalty, self.max_extra_len = label_smoothing, length_penalty, max_extra_len
        self.beam_size, self.val_beam_size = beam_size, val_beam_size
        self.val_bleu, self.test_bleu = CorpusBLEU(tokenize="13a"), CorpusBLEU(tokenize="13a")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.pad_id = self.bos_id = self.eos_id = -1

    def forward(self, src: Tensor, src_mask: Tensor | None = None, beam_size: int | None = None) -> Tensor:
        """Translate a batch: (B, S) source ids -> (B, L) target ids (EOS included, padded with pad_id)."""
        beam_size = self.beam_size if beam_size is None else beam_size
        return translate(self.model, src, src_mask, self.bos_id, self.eos_id, self.pad_id, beam_size=beam_size,
                         alpha=self.length_penalty, max_extra_len=self.max_extra_len)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.training_loss(*self._loss(batch))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_beam_size)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.beam_size)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        return self.detokenize(self(batch["src"], batch["src_mask"]))

    def default_optimizer(self, params: Iterable) -> Optimizer:
        return Adam(params, lr=1.0, betas=(0.9, 0.98), eps=1e-9, fused=True)

    def check_data(self, datamodule: Any) -> None:
        super().check_data(datamodule)
        self.pad_id, self.bos_id, self.eos_id = datamodule.pad_id, datamodule.bos_id, datamodule.eos_id

    def detokenize(self, ids: Tensor) -> list[str]:
        """(B, L) target ids -> text, stopping at EOS and dropping special tokens."""
        rows = []
        for row in ids.tolist():
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            rows.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return rows

    def _loss(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        """Label-smoothed cross-entropy per target token, padding ignored; the target is fed shifted right."""
        tgt, tgt_mask = batch["tgt"], batch["tgt_mask"]            # (B, T + 1): BOS y1 .. yn EOS
        logits = self.model(batch["src"], tgt[:, :-1], batch["src_mask"], tgt_mask[:, :-1])   # (B, T, V)
        labels = tgt[:, 1:].masked_fill(~tgt_mask[:, 1:], -100)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)
        return loss, int(tgt_mask[:, 1:].sum())

    def _evaluate(self, batch: dict[str, Any], stage: str, beam_size: int) -> None:
        """Token-weighted loss and corpus BLEU over the whole set (under DDP each sentence is on one rank, once)."""
        mean_loss, bleu = getattr(self, f"{stage}_loss"), getattr(self, f"{stage}_bleu")
        loss, n_tokens = self._loss(batch)
        mean_loss.update(loss, weight=n_tokens)
        hypotheses = self.detokenize(self(batch["src"], batch["src_mask"], beam_size))
        bleu.update(hypotheses, [[ref] for ref in batch["refs"]])
        self.log(f"{stage}_loss", mean_loss)
        self.log(f"{stage}_bleu", bleu, prog_bar=True)
