"""Auxiliary losses reach the training loss of every task through one place, logged on their own and never in
validation; blocks' own updates run once per optimizer step, also under gradient accumulation."""

from functools import partial
from typing import ClassVar

import lightning as L
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from torch import Tensor, nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly
from lightning_tfm.tasks import ClassificationModule, LanguageModelModule, MaskedLanguageModelModule, TranslationModule

SMALL = dict(d_model=16, n_layers=2, n_heads=2, d_ff=32, dropout=0.0)


class PenalisedAttention(MultiHeadAttention):
    """Full attention with a learned scalar whose square is an auxiliary loss, counting its optimizer steps."""

    supports: ClassVar[Supports] = Supports()

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace()) -> None:
        super().__init__(d_model, n_heads, place)
        self.scale = nn.Parameter(torch.tensor(3.0))
        self.steps = 0

    def auxiliary_losses(self) -> dict[str, Tensor]:
        return {"toy_penalty": self.scale ** 2} if self.training else {}

    def after_optimizer_step(self) -> None:
        self.steps += 1


def _batches(task: str, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(4, 20, (2, 6), generator=g) for _ in range(n)]
    mask = torch.ones(2, 6, dtype=torch.bool)
    if task == "language_model":
        return [{"ids": x, "mask": mask} for x in ids]
    if task == "translation":
        return [{"src": x, "src_mask": mask, "tgt": x, "tgt_mask": mask, "refs": ["a", "b"]} for x in ids]
    if task == "classification":
        return [{"ids": x, "mask": mask, "labels": torch.tensor([0, 1])} for x in ids]
    labels = torch.full((2, 6), -100)
    labels[:, 2] = 5
    return [{"ids": x, "mask": mask, "labels": labels} for x in ids]


TASKS = {
    "language_model": lambda: LanguageModelModule(partial(DecoderOnly, **SMALL, attention=PenalisedAttention),
                                                  vocab_size=24),
    "translation": lambda: TranslationModule(partial(EncoderDecoder, **SMALL, attention=PenalisedAttention),
                                             vocab_size=24),
    "classification": lambda: ClassificationModule(partial(EncoderOnly, **SMALL, attention=PenalisedAttention),
                                                   vocab_size=24, n_classes=2),
    "masked_lm": lambda: MaskedLanguageModelModule(partial(EncoderOnly, **SMALL, attention=PenalisedAttention),
                                                   vocab_size=24),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_training_adds_the_auxiliary_loss_and_logs_it_apart(task):
    module = TASKS[task]()
    blocks = [m for m in module.modules() if isinstance(m, PenalisedAttention)]
    batch = _batches(task, 1)[0]
    module.train()
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value.detach()))
    logged: dict[str, float] = {}
    total = module.training_step(batch, 0)
    assert logged["train_toy_penalty"] == pytest.approx(9.0 * len(blocks))
    assert float(total) == pytest.approx(logged["train_loss"] + 9.0 * len(blocks))
    total.backward()
    assert all(b.scale.grad == pytest.approx(6.0) for b in blocks)       # d(scale^2)/d scale reaches each block


class _Loader(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches
        self.tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(24)}, unk_token="t0"))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_blocks_update_once_per_optimizer_step_under_gradient_accumulation(tmp_path, accumulate):
    module = TASKS["language_model"]()
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_Loader(_batches("language_model", 2 * accumulate)))
    blocks = [m for m in module.modules() if isinstance(m, PenalisedAttention)]
    assert [b.steps for b in blocks] == [2, 2]
    assert trainer.global_step == 2
