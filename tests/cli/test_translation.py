"""`lightning_tfm fit`, `test`, `average` and `predict` for translation, run as a subprocess from the
repository root on a slice of Multi30k, with every output below pytest's tmp_path.

The model is fitted once for this file (tiny model, 20 steps) and its checkpoints are shared by the tests; the
fit reads prepared rows (`data.prepared_dir`), which it prepares itself first.
`test` on the validation slice from best.ckpt must reproduce the validation loss logged at that step.
`average` builds no Trainer, so it runs in this process (`in_process`, tests/conftest.py).
"""

import math
import re
from pathlib import Path

import pytest
import torch
from cli_runs import MT, TINY, check_fit
from commands import lightning_tfm, metrics

from lightning_tfm.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def mt_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mt")
    lightning_tfm("fit", "--config", MT, "--trainer.default_root_dir", run, *TINY,
                  "--model.init_args.max_extra_len", 8, "--data.train_path", data / "mt_train",
                  "--data.val_path", data / "mt_val", "--data.tokenization.vocab_size", 1000,
                  "--data.batching.max_tokens", 512,
                  "--trainer.limit_train_batches", 10, "--data.prepared_dir", run / "prepared")
    return run


def test_prepare_command_finds_the_rows_fit_prepared_and_refuses_a_changed_setting(data, mt_run, in_process):
    args = ["prepare", "--config", MT, "--trainer.default_root_dir", mt_run, "--data.train_path", data / "mt_train",
            "--data.val_path", data / "mt_val", "--data.tokenization.vocab_size", 1000,
            "--data.prepared_dir", mt_run / "prepared"]
    assert in_process(*args).stdout.strip() == f"{mt_run / 'prepared' / 'manifest.json'}: up to date, nothing to do"
    proc = in_process(*args, "--data.truncation.max_len", 100, ok=False)
    assert proc.returncode == 1 and re.search(r"max_len 256 -> 100; rerun with --rebuild", proc.stderr)
    assert "Traceback" not in proc.stderr
    proc = in_process(*args[:-2], ok=False)
    assert "data.init_args.prepared_dir is not set: add it to the config" in proc.stderr


def test_translation_fit_logs_loss_and_bleu(mt_run):
    rows = check_fit(mt_run, "val_bleu", "max", ("val_loss", "val_bleu"))
    assert len(rows) == 2                                          # epochs of 10 batches
    for row in rows:
        assert 0 <= row["val_bleu"] <= 100 and row["val_loss"] > 0


def test_translation_test_uses_the_checkpoint_tokenizer(data, mt_run, tmp_path):
    # Another vocabulary size and a fresh folder would train another tokenizer; the checkpoint's must win.
    lightning_tfm("test", "--config", MT, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  mt_run / "checkpoints/best.ckpt", "--data.test_path", data / "mt_val",
                  "--data.tokenization.vocab_size", 500, "--data.batching.max_tokens", 512,
                  "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    best_step = load_checkpoint(mt_run / "checkpoints/best.ckpt")["global_step"]
    (val,) = [r for r in metrics(mt_run) if "val_loss" in r and r["step"] == best_step - 1]
    assert row["test_loss"] == pytest.approx(val["val_loss"], rel=1e-5)   # same weights, tokens and batches
    assert 0 <= row["test_bleu"] <= 100                                  # beam 4 here, greedy in validation
    assert not (tmp_path / "tokenizer").exists()


def test_translation_average_of_epoch_checkpoints_evaluates_like_any_checkpoint(data, mt_run, in_process, tmp_path):
    epochs = sorted(map(str, (mt_run / "checkpoints").glob("epoch-*.ckpt")))
    assert [Path(p).name for p in epochs] == ["epoch-00.ckpt", "epoch-01.ckpt"]
    proc = in_process("average", *epochs, "--last", 5, "--output", tmp_path / "averaged.ckpt")
    assert "averaged 2 checkpoints" in proc.stdout
    first, second = (load_checkpoint(p)["state_dict"] for p in epochs)
    averaged = load_checkpoint(tmp_path / "averaged.ckpt")["state_dict"]
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-7)
    lightning_tfm("test", "--config", MT, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  tmp_path / "averaged.ckpt", "--data.test_path", data / "mt_val", "--data.batching.max_tokens", 512,
                  "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    assert math.isfinite(row["test_loss"]) and 0 <= row["test_bleu"] <= 100


def test_translation_predict_in_int8_writes_one_line_per_source(data, mt_run, tmp_path):
    sources = (data / "mt_val.en").read_text(encoding="utf-8").splitlines()[:5]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    out = tmp_path / "translations.txt"
    proc = lightning_tfm("predict", "--config", MT, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                         mt_run / "checkpoints/best.ckpt", "--data.predict_path", tmp_path / "src.txt",
                         "--predictions.path", out, "--trainer.enable_progress_bar", "false",
                         "--inference_precision", "int8")
    assert re.search(r"TranslationModule: evaluating in int8: \d+ linear maps in int8", proc.stdout + proc.stderr)
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) - 1 == len(sources) and lines[-1] == ""
    for line in lines[:-1]:                                  # plain text, special tokens dropped
        assert not line.startswith(('"', "{")) and not re.search(r"<pad>|<s>|</s>|<unk>", line)
