"""A task built in Python, with factories as classes and functools.partials, writes a checkpoint as plain as
the CLI's: it loads with weights_only=True, rebuilds with load_from_checkpoint and serves as init_from."""

import functools

import lightning as L
import torch

from lightning_tfm.blocks import NoPositions
from lightning_tfm.checkpoints import load_checkpoint
from lightning_tfm.models import EncoderOnly
from lightning_tfm.tasks import ClassificationModule, WarmupCosineSchedule

ENCODER = functools.partial(EncoderOnly, d_model=32, n_layers=1, n_heads=2, d_ff=64, positions=NoPositions)


def save(task, path):
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return path


def test_python_factories_are_stored_as_class_path_configs_and_the_checkpoint_rebuilds(tmp_path):
    torch.manual_seed(0)
    task = ClassificationModule(ENCODER, vocab_size=50, n_classes=3,
                                optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
                                lr_schedule=functools.partial(WarmupCosineSchedule, warmup_steps=5, total_steps=50))
    path = save(task, tmp_path / "task.ckpt")
    hparams = load_checkpoint(path)["hyper_parameters"]          # weights_only: plain data only
    positions = {"class_path": "lightning_tfm.blocks.positions.NoPositions"}
    assert hparams["model"] == {"class_path": "lightning_tfm.models.encoder_only.EncoderOnly",
                                "init_args": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                                              "positions": positions}}
    assert hparams["optimizer"] == {"class_path": "torch.optim.adamw.AdamW", "init_args": {"lr": 1e-3}}

    again = ClassificationModule.load_from_checkpoint(path, weights_only=True).eval()
    ids, mask = torch.randint(5, 50, (2, 7)), torch.ones(2, 7, dtype=torch.bool)
    torch.testing.assert_close(again(ids, mask), task.eval()(ids, mask))
    assert isinstance(again.model.embedding.positions, NoPositions)
    optimizer = again.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-3

    tuned = ClassificationModule(vocab_size=50, n_classes=3, init_from=str(path)).eval()
    torch.testing.assert_close(tuned(ids, mask), task(ids, mask))


def test_a_lambda_is_left_as_it_is():
    task = ClassificationModule(ENCODER, vocab_size=50, optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert callable(task.hparams["optimizer"]) and "_instantiator" not in task.hparams
