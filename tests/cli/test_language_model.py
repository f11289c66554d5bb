"""`lightning_tfm fit`, `test` and `predict` for the character LM, run as a subprocess from the repository
root on a slice of Tiny Shakespeare, with every output below pytest's tmp_path.

The LM is fitted once for this file (tiny model, 20 steps) and its checkpoints are shared by the tests. The
checks compare the command's outputs with each other: `test` on the validation slice from best.ckpt must
reproduce the validation loss that chose best.ckpt, and a run from the `--print_config` output must end with
the same weights as the run it was printed from. Commands that stop before a Trainer exists run in this
process (`in_process`, tests/conftest.py).
"""

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import LM, MODEL, TINY, check_fit
from commands import best_score, error_line, lightning_tfm, metrics
from tokenizers import Tokenizer

from lightning_tfm.checkpoints import load_checkpoint
from lightning_tfm.data import train_tokenizer


def lm_fit_args(data: Path, run: Path) -> list:
    return ["fit", "--config", LM, "--trainer.default_root_dir", run, *TINY,
            f"{MODEL}.positions.init_args.max_len", 32, "--model.init_args.max_new_tokens", 20,
            "--data.train_path", data / "lm_train.txt", "--data.block_size", 32, "--data.batching.batch_size", 8,
            "--data.batches_per_epoch", 10, "--trainer.limit_val_batches", 4]


@pytest.fixture(scope="module")
def lm_fit(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("lm")
    return run, lightning_tfm(*lm_fit_args(data, run))


@pytest.fixture(scope="module")
def lm_run(lm_fit) -> Path:
    return lm_fit[0]


def test_lm_fit_logs_loss_and_perplexity(lm_run):
    rows = check_fit(lm_run, "val_loss", "min", ("val_loss", "val_ppl"))
    assert len(rows) == 2                                          # 20 steps, epochs of 10 batches
    for row in rows:
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-5)
    vocab_size = Tokenizer.from_file(str(lm_run / "tokenizer/tokenizer.json")).get_vocab_size()
    # 10 steps in (lr still warming up) the model is close to a uniform guess, and 10 more steps improve on it
    assert rows[1]["val_loss"] < rows[0]["val_loss"] < math.log(vocab_size) + 0.25


# what Lightning 2.6, torch 2.13 and wandb 0.31 printed on every fit (lightning_tfm/console.py silences each);
# tests/test_wandb.py checks wandb's with W&B on
NOISE = ["💡 Tip:", "litlogger", "litmodels", "anonymous setting", "LeafSpec", "_pytree", "Traceback"]


def test_lm_fit_prints_where_the_run_is_saved_and_no_third_party_noise(lm_fit):
    run, proc = lm_fit
    console = proc.stdout + proc.stderr
    assert [noise for noise in NOISE if noise in console] == []
    assert "GPU available: " in console                    # Lightning's own lines still show
    run = run.resolve()
    score = best_score(run / "checkpoints/best.ckpt")
    assert proc.stdout.splitlines()[-4:] == [
        f"Run saved in {run}",
        f"  checkpoints: {run / 'checkpoints'}: best.ckpt (best val_loss={score:.4g}), last.ckpt",
        f"  logs (CSVLogger): {run / 'logs/version_0'}",
        f"  config: {run / 'logs/version_0/config.yaml'}"]
    assert (run / "logs/version_0/config.yaml").is_file()


def test_lm_test_from_checkpoint_reproduces_best_val_loss(data, lm_run, tmp_path):
    # No training file at all: the tokenizer can only come from the checkpoint.
    lightning_tfm("test", "--config", LM, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  lm_run / "checkpoints/best.ckpt", "--data.train_path", tmp_path / "absent.txt",
                  "--data.test_path", data / "lm_val.txt", "--data.block_size", 32, "--data.batching.batch_size", 8,
                  "--trainer.limit_test_batches", 4, "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    assert row["test_loss"] == pytest.approx(best_score(lm_run / "checkpoints/best.ckpt"), rel=1e-6)
    assert row["test_ppl"] == pytest.approx(math.exp(row["test_loss"]), rel=1e-5)
    assert not (tmp_path / "tokenizer").exists()


def test_lm_predict_continues_each_prompt(data, lm_run, tmp_path):
    prompts = ["ROMEO:", "First Citizen:", "the"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "generated.txt"
    lightning_tfm("predict", "--config", LM, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  lm_run / "checkpoints/best.ckpt", "--data.predict_path", tmp_path / "prompts.txt",
                  "--data.tokenization.path", lm_run / "tokenizer/tokenizer.json",   # the checkpoint's own: accepted
                  "--data.batching.batch_size", 2, "--predictions.path", out, "--trainer.enable_progress_bar", "false")
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(prompts)
    alphabet = set((data / "lm_train.txt").read_text(encoding="utf-8")[:36_000])
    for prompt, line in zip(prompts, lines):
        text = json.loads(line) if line.startswith('"') else line    # JSON-quoted when it spans lines
        room = min(20, 32 - len(prompt))                             # max_new_tokens, then the 32-token context
        assert 0 < len(text) <= room                                 # the continuation only, not the prompt
        assert set(text) <= alphabet


def test_explicit_tokenizer_other_than_the_checkpoints_is_an_error(data, lm_run, in_process, tmp_path):
    # another character vocabulary (SST-2's text); the error comes before any Trainer, so in this process
    other = tmp_path / "other.json"
    train_tokenizer([(data / "sst2_train.tsv").read_text(encoding="utf-8")], "char").save(str(other))
    proc = in_process("test", "--config", LM, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                      lm_run / "checkpoints/best.ckpt", "--data.test_path", data / "lm_val.txt",
                      "--data.tokenization.path", other, ok=False)
    assert re.fullmatch(rf"ValueError: data\.tokenization\.path={re.escape(str(other))} is not the tokenizer "
                        r"stored with "
                        r".*best\.ckpt; leave data\.tokenization\.path unset .*", error_line(proc))


def test_print_config_fed_back_gives_the_same_run(data, lm_run, in_process, tmp_path):
    printed = in_process(*lm_fit_args(data, tmp_path / "again"), "--print_config").stdout
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    lightning_tfm("fit", "--config", tmp_path / "printed.yaml")
    ours = load_checkpoint(tmp_path / "again/checkpoints/last.ckpt")["state_dict"]
    theirs = load_checkpoint(lm_run / "checkpoints/last.ckpt")["state_dict"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert metrics(tmp_path / "again") == metrics(lm_run)
