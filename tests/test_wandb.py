"""Weights & Biases with no account and no network: the configs' WandbLogger writes an offline run, which is
read back from disk (tests/support/wandb_records.py): the whole resolved config, the model's hyperparameters,
the metrics (losses, validation metrics, throughput) and the config file are in it."""

from pathlib import Path

from commands import lightning_tfm, metrics
from wandb_records import run_contents

LM = "configs/lm/shakespeare_char_small.yaml"
MODEL = "--model.init_args.model.init_args"


def offline_runs(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def test_fit_logs_config_hyperparameters_and_metrics_to_an_offline_run(data, tmp_path):
    proc = lightning_tfm("fit", "--config", LM, "--trainer.default_root_dir", tmp_path, f"{MODEL}.d_model", 32,
                         f"{MODEL}.n_layers", 1, f"{MODEL}.n_heads", 2, f"{MODEL}.d_ff", 64,
                         f"{MODEL}.positions.init_args.max_len", 32, "--data.train_path", data / "lm_train.txt",
                         "--data.block_size", 32, "--data.batching.batch_size", 8, "--data.batches_per_epoch", 10,
                         "--trainer.max_steps", 20, "--trainer.limit_val_batches", 2, "--trainer.log_every_n_steps",
                         5, "--trainer.enable_progress_bar", "false", extra_env={"WANDB_MODE": "offline"})
    (run,) = offline_runs(tmp_path)                                     # one run per job
    # wandb (0.31 here) warned on the `anonymous` key Lightning's WandbLogger always passes; console.py drops it
    assert "anonymous setting" not in proc.stdout + proc.stderr
    assert f"  logs (WandbLogger): {run.resolve()}" in proc.stdout.splitlines()
    config, history, summary = run_contents(run)
    resolved = config["config"]
    assert resolved["trainer"]["max_steps"] == 20
    assert resolved["model"]["init_args"]["model"]["init_args"]["d_model"] == 32
    assert resolved["data"]["init_args"]["train_path"] == str(data / "lm_train.txt")
    assert config["max_new_tokens"] == 300 and config["vocab_size"] > 30     # save_hyperparameters()
    logged = {key for row in history for key in row}
    assert {"train_loss", "train_tok_s", "val_loss", "val_ppl", "trainer/global_step"} <= logged
    val = [row["val_loss"] for row in history if "val_loss" in row]
    assert val == [row["val_loss"] for row in metrics(tmp_path) if "val_loss" in row]   # as the CSV has them
    assert len(val) == 2 and summary["val_loss"] == val[-1]
    assert (run / "files" / "config.yaml").is_file()
