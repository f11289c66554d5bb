"""Our trainer callbacks: CompileModel compiles the network in place (names and checkpoints unchanged);
TokensPerSecond counts real tokens, not padding."""

import functools

import lightning as L
import torch
from datamodule_settings import build

from lightning_tfm.blocks import LearnedPositions
from lightning_tfm.callbacks import CompileModel, count_tokens
from lightning_tfm.data import LanguageModelDataModule
from lightning_tfm.models import DecoderOnly
from lightning_tfm.tasks import LanguageModelModule


def test_compile_model_compiles_the_network_in_place_and_training_runs(data, tmp_path):
    datamodule = build(LanguageModelDataModule, train_path=str(data / "lm_train.txt"),
                       tokenization={"kind": "char", "save_dir": str(tmp_path / "tok")}, block_size=16,
                       batching={"batch_size": 4}, batches_per_epoch=3)
    network = functools.partial(DecoderOnly, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                positions=functools.partial(LearnedPositions, max_len=16))
    task = LanguageModelModule(network, datamodule.vocab_size)
    names = list(task.state_dict())
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        use_distributed_sampler=False, callbacks=[CompileModel(backend="eager")],
                        default_root_dir=tmp_path)
    trainer.fit(task, datamodule=datamodule)
    assert task.model._compiled_call_impl is not None
    assert list(task.state_dict()) == names and trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val_loss"])


def test_count_tokens_counts_real_tokens_of_every_mask():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert count_tokens({"src": torch.zeros(2, 3), "src_mask": mask, "tgt_mask": mask[:, :2]}) == 6
    assert count_tokens({"ids": torch.zeros(4, 8, dtype=torch.long)}) == 32


def test_prediction_lines_are_plain_text_unless_they_could_be_misread(tmp_path):
    import json

    from lightning_tfm.callbacks import PredictionWriter

    writer = PredictionWriter(str(tmp_path / "out.txt"))
    writer._file = (tmp_path / "out.txt").open("w", encoding="utf-8")
    items = ["Ein Hund läuft.", "two\nlines", '"quoted" text', "{braces}", "[x]", {"label": "pos", "probability": 0.9}]
    writer._write(items)
    writer._file.close()
    lines = (tmp_path / "out.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "Ein Hund läuft."
    assert [json.loads(line) for line in lines[1:]] == items[1:]
    assert all(line[0] in '"{' for line in lines[1:])
