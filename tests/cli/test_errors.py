"""A user's mistake stops `lightning_tfm` with one line on stderr naming the value, file or line, and exit code
1; LIGHTNING_TFM_TRACEBACK=1 shows the traceback instead. The data errors come from a real `fit` in a
subprocess, on slices of the real data; the bad model value stops while the model is built, so that one runs
in this process (`in_process`, tests/conftest.py)."""

import pytest
from cli_runs import LM, MODEL, MT, SST2, TINY
from commands import error_line, lightning_tfm

BAD_HEADS = [f"{MODEL}.d_model", 32, f"{MODEL}.n_heads", 3]
BAD_HEADS_MESSAGE = "ValueError: DecoderOnly: d_model=32 is not divisible by n_heads=3"


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")   # its calls into jsonargparse 4.53
def test_a_bad_value_is_one_line_on_stderr_and_exit_code_1(in_process, monkeypatch, tmp_path):
    # jsonargparse wraps the model's error in a dump of the whole config; the one line is the model's message
    monkeypatch.delenv("LIGHTNING_TFM_TRACEBACK", raising=False)
    proc = in_process("fit", "--config", LM, "--trainer.default_root_dir", tmp_path, *BAD_HEADS, ok=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == f"lightning_tfm fit: {BAD_HEADS_MESSAGE} (set LIGHTNING_TFM_TRACEBACK=1 " \
        "for the traceback)"
    assert "Traceback" not in proc.stderr and "Union subtypes" not in proc.stderr


def test_inference_precision_is_refused_for_fit(in_process, tmp_path):
    proc = in_process("fit", "--config", LM, "--trainer.default_root_dir", tmp_path, "--inference_precision", "int8",
                      ok=False)
    assert error_line(proc) == "ValueError: inference_precision=int8 applies to test and predict, not to fit"


def test_lightning_tfm_traceback_shows_the_traceback(tmp_path):
    proc = lightning_tfm("fit", "--config", LM, "--trainer.default_root_dir", tmp_path, *BAD_HEADS, ok=False,
                         extra_env={"LIGHTNING_TFM_TRACEBACK": "1"})
    assert proc.returncode == 1
    assert "Traceback (most recent call last):" in proc.stderr
    assert f"\n{BAD_HEADS_MESSAGE}\n" in proc.stderr                        # where it was raised, with the cause
    assert "for the traceback)" not in proc.stderr


def test_missing_training_file_names_the_key_and_path(tmp_path):
    missing = tmp_path / "missing.tsv"
    proc = lightning_tfm("fit", "--config", SST2, "--trainer.default_root_dir", tmp_path,
                         "--data.train_path", missing, ok=False)
    assert error_line(proc) == f"FileNotFoundError: data.train_path={missing} does not exist"


def test_misaligned_parallel_files_name_both(data, tmp_path):
    sources = (data / "mt_train.en").read_text(encoding="utf-8").splitlines()[:5]
    targets = (data / "mt_train.de").read_text(encoding="utf-8").splitlines()[:4]
    (tmp_path / "train.en").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("\n".join(targets) + "\n", encoding="utf-8")
    proc = lightning_tfm("fit", "--config", MT, "--trainer.default_root_dir", tmp_path,
                         "--data.train_path", tmp_path / "train", ok=False)
    assert error_line(proc).startswith(f"ValueError: {tmp_path / 'train.en'} has 5 lines but "
                                      f"{tmp_path / 'train.de'} has 4")


def test_validation_label_unseen_in_training_names_file_and_line(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine film \t1\na dull film \t0\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine \t1\nso so \tneutral\n", encoding="utf-8")
    proc = lightning_tfm("fit", "--config", SST2, "--trainer.default_root_dir", tmp_path, *TINY,
                         "--data.train_path", tmp_path / "train.tsv", "--data.val_path", tmp_path / "dev.tsv",
                         "--data.tokenization.vocab_size", 100, ok=False)
    assert error_line(proc).startswith(f"ValueError: {tmp_path / 'dev.tsv'}:3: label 'neutral' is not one of the "
                                      "known labels ['0', '1']")
