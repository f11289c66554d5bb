"""A real translation run with `AttentionMapImages` switched on in the config: each validation logs the
cross-attention of one fixed validation example as an image to the offline W&B run and to TensorBoard, and
`lightning_tfm attention` then draws from the checkpoint that run wrote (in this process: it builds no Trainer,
`in_process`, tests/conftest.py)."""

from pathlib import Path

import matplotlib.image
import pytest
from commands import lightning_tfm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

MT = "configs/translation/multi30k_small.yaml"
MODEL = "--model.init_args.model.init_args"
WITH_MAPS = """
trainer:
  logger:
    - class_path: lightning.pytorch.loggers.WandbLogger
      init_args: {save_dir: "${....default_root_dir}", project: lightning_tfm, name: maps}
    - class_path: lightning.pytorch.loggers.TensorBoardLogger
      init_args: {save_dir: "${....default_root_dir}", name: tb}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: "${....default_root_dir}/checkpoints", filename: last, enable_version_counter: false}
    - class_path: lightning_tfm.callbacks.AttentionMapImages
      init_args: {attention: [cross, encoder], heads: [0]}
"""


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("maps")
    (run / "maps.yaml").write_text(WITH_MAPS, encoding="utf-8")
    lightning_tfm("fit", "--config", MT, "--config", run / "maps.yaml", "--trainer.default_root_dir", run,
                  f"{MODEL}.d_model", 32, f"{MODEL}.n_layers", 1, f"{MODEL}.n_heads", 2, f"{MODEL}.d_ff", 64,
                  "--trainer.max_steps", 8, "--trainer.val_check_interval", 4, "--trainer.limit_val_batches", 1,
                  "--trainer.enable_progress_bar", "false", "--model.init_args.max_extra_len", 4,
                  "--data.train_path", data / "mt_train", "--data.val_path", data / "mt_val",
                  "--data.tokenization.vocab_size", 300, "--data.batching.max_tokens", 256,
                  extra_env={"WANDB_MODE": "offline"})
    return run


def test_each_validation_draws_the_chosen_maps(run):
    steps = sorted(p.name for p in (run / "attention_maps").iterdir())
    assert steps == ["step-4", "step-8"]                       # not the sanity check's
    for step in steps:
        names = sorted(p.name for p in (run / "attention_maps" / step).glob("*.png"))
        assert names == ["cross_layer0.png", "encoder_layer0.png"]
        assert matplotlib.image.imread(run / "attention_maps" / step / "cross_layer0.png").std() > 0


def test_images_reach_wandb_and_tensorboard(run):
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    images = list((wandb_run / "files" / "media" / "images" / "attention").glob("cross_layer0_*.png"))
    assert len(images) == 2
    (events,) = run.glob("tb/version_*/events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
    accumulator.Reload()
    logged = accumulator.Images("attention/cross_layer0")
    assert [e.step for e in logged] == [4, 8] and logged[0].width > 100


def test_the_attention_command_reads_the_runs_checkpoint(run, in_process, tmp_path):
    proc = in_process("attention", run / "checkpoints" / "last.ckpt", "--text", "A man is riding a bicycle.",
                      "--attention", "cross", "--output", tmp_path)
    assert "translation:" in proc.stdout
    assert (tmp_path / "cross_layer0.png").is_file()
