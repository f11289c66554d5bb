"""The `lightning_tfm` command end to end: `fit`, `test` and `predict` for each task, run as a subprocess from
the repository root on slices of the real data (../shared/data), with every output below pytest's tmp_path.

Each task is fitted once per module (tiny model, 20 steps) and its checkpoints are shared by the tests. The
checks compare the command's outputs with each other: `test` on the validation slice from best.ckpt must
reproduce the validation metric that chose best.ckpt, and a run from the `--print_config` output must end
with the same weights as the run it was printed from. `--print_config` alone runs in this process: it only
parses, and a subprocess spends ~7 s importing torch and Lightning.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from commands import ROOT, best_score, error_line, lightning_tfm, metrics
from tokenizers import Tokenizer

from lightning_tfm import cli
from lightning_tfm.checkpoints import load_checkpoint

# configs/variants/ holds overrides that only parse on top of their base (tests/test_variant_configs.py)
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name != "variants" or p.stem.endswith("_base"))
LM, MT, SST2 = "configs/lm/shakespeare_char_small.yaml", "configs/translation/multi30k_small.yaml", \
    "configs/classification/sst2_small.yaml"
MODEL = "--model.init_args.model.init_args"
TINY = [f"{MODEL}.d_model", 32, f"{MODEL}.n_layers", 1, f"{MODEL}.n_heads", 2, f"{MODEL}.d_ff", 64,
        "--trainer.max_steps", 20, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def check_fit(run: Path, monitor: str, mode: str, columns: tuple[str, ...]) -> list[dict[str, float]]:
    """best.ckpt and last.ckpt exist, hold the trained tokenizer, and best.ckpt holds the best `monitor`."""
    rows = [r for r in metrics(run) if monitor in r]
    assert len(rows) >= 1
    for row in rows:
        assert all(math.isfinite(row[c]) for c in columns), row
    best, last = load_checkpoint(run / "checkpoints/best.ckpt"), load_checkpoint(run / "checkpoints/last.ckpt")
    assert last["global_step"] == 20 and best["global_step"] <= 20
    assert best_score(run / "checkpoints/best.ckpt") == pytest.approx((min if mode == "min" else max)(
        r[monitor] for r in rows), rel=1e-6)
    trained = Tokenizer.from_file(str(run / "tokenizer/tokenizer.json")).to_str()
    assert best["tokenizer"] == last["tokenizer"] == trained
    return rows


def lm_fit_args(data: Path, run: Path) -> list:
    return ["fit", "--config", LM, "--trainer.default_root_dir", run, *TINY,
            f"{MODEL}.positions.init_args.max_len", 32, "--model.init_args.max_new_tokens", 20,
            "--data.train_path", data / "lm_train.txt", "--data.block_size", 32, "--data.batch_size", 8,
            "--data.batches_per_epoch", 10, "--trainer.limit_val_batches", 4]


@pytest.fixture(scope="module")
def lm_fit(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run = tmp_path_factory.mktemp("lm")
    return run, lightning_tfm(*lm_fit_args(data, run))


@pytest.fixture(scope="module")
def lm_run(lm_fit) -> Path:
    return lm_fit[0]


@pytest.fixture(scope="module")
def mt_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("mt")
    lightning_tfm("fit", "--config", MT, "--trainer.default_root_dir", run, *TINY,
                  "--model.init_args.max_extra_len", 8, "--data.train_path", data / "mt_train",
                  "--data.val_path", data / "mt_val", "--data.tokenizer_vocab_size", 1000, "--data.max_tokens", 512,
                  "--trainer.limit_train_batches", 10)
    return run


@pytest.fixture(scope="module")
def sst2_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sst2")
    lightning_tfm("fit", "--config", SST2, "--trainer.default_root_dir", run, *TINY,
                  "--data.train_path", data / "sst2_train.tsv", "--data.val_path", data / "sst2_dev.tsv",
                  "--data.tokenizer_vocab_size", 1000, "--data.batch_size", 32, "--trainer.val_check_interval", 10)
    return run


# --- language model --------------------------------------------------------------------------------------


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
                  "--data.test_path", data / "lm_val.txt", "--data.block_size", 32, "--data.batch_size", 8,
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
                  "--data.tokenizer_path", lm_run / "tokenizer/tokenizer.json",   # the checkpoint's own: accepted
                  "--data.batch_size", 2, "--predictions.path", out, "--trainer.enable_progress_bar", "false")
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(prompts)
    alphabet = set((data / "lm_train.txt").read_text(encoding="utf-8")[:36_000])
    for prompt, line in zip(prompts, lines):
        text = json.loads(line) if line.startswith('"') else line    # JSON-quoted when it spans lines
        room = min(20, 32 - len(prompt))                             # max_new_tokens, then the 32-token context
        assert 0 < len(text) <= room                                 # the continuation only, not the prompt
        assert set(text) <= alphabet


# --- translation -----------------------------------------------------------------------------------------


def test_translation_fit_logs_loss_and_bleu(mt_run):
    rows = check_fit(mt_run, "val_bleu", "max", ("val_loss", "val_bleu"))
    assert len(rows) == 2                                          # epochs of 10 batches
    for row in rows:
        assert 0 <= row["val_bleu"] <= 100 and row["val_loss"] > 0


def test_translation_test_uses_the_checkpoint_tokenizer(data, mt_run, tmp_path):
    # Another vocabulary size and a fresh folder would train another tokenizer; the checkpoint's must win.
    lightning_tfm("test", "--config", MT, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  mt_run / "checkpoints/best.ckpt", "--data.test_path", data / "mt_val",
                  "--data.tokenizer_vocab_size", 500, "--data.max_tokens", 512,
                  "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    best_step = load_checkpoint(mt_run / "checkpoints/best.ckpt")["global_step"]
    (val,) = [r for r in metrics(mt_run) if "val_loss" in r and r["step"] == best_step - 1]
    assert row["test_loss"] == pytest.approx(val["val_loss"], rel=1e-5)   # same weights, tokens and batches
    assert 0 <= row["test_bleu"] <= 100                                  # beam 4 here, greedy in validation
    assert not (tmp_path / "tokenizer").exists()


def test_translation_average_of_epoch_checkpoints_evaluates_like_any_checkpoint(data, mt_run, tmp_path):
    epochs = sorted(map(str, (mt_run / "checkpoints").glob("epoch-*.ckpt")))
    assert [Path(p).name for p in epochs] == ["epoch-00.ckpt", "epoch-01.ckpt"]
    proc = lightning_tfm("average", *epochs, "--last", 5, "--output", tmp_path / "averaged.ckpt")
    assert "averaged 2 checkpoints" in proc.stdout
    first, second = (load_checkpoint(p)["state_dict"] for p in epochs)
    averaged = load_checkpoint(tmp_path / "averaged.ckpt")["state_dict"]
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-7)
    lightning_tfm("test", "--config", MT, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  tmp_path / "averaged.ckpt", "--data.test_path", data / "mt_val", "--data.max_tokens", 512,
                  "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    assert math.isfinite(row["test_loss"]) and 0 <= row["test_bleu"] <= 100


def test_translation_predict_writes_one_line_per_source(data, mt_run, tmp_path):
    sources = (data / "mt_val.en").read_text(encoding="utf-8").splitlines()[:5]
    (tmp_path / "src.txt").write_text("\n".join(sources) + "\n", encoding="utf-8")
    out = tmp_path / "translations.txt"
    lightning_tfm("predict", "--config", MT, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  mt_run / "checkpoints/best.ckpt", "--data.predict_path", tmp_path / "src.txt",
                  "--predictions.path", out, "--trainer.enable_progress_bar", "false")
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) - 1 == len(sources) and lines[-1] == ""
    for line in lines[:-1]:                                  # plain text, special tokens dropped
        assert not line.startswith(('"', "{")) and not re.search(r"<pad>|<s>|</s>|<unk>", line)


# --- classification --------------------------------------------------------------------------------------


def test_classification_fit_logs_accuracy_and_f1(sst2_run):
    rows = check_fit(sst2_run, "val_acc", "max", ("val_loss", "val_acc", "val_f1"))
    assert [r["step"] for r in rows] == [9, 19]                    # val_check_interval 10
    for row in rows:
        assert 0 <= row["val_f1"] <= 1 and 0 <= row["val_acc"] <= 1
    assert load_checkpoint(sst2_run / "checkpoints/best.ckpt")["label_names"] == ["0", "1"]


def test_classification_test_from_checkpoint_reproduces_best_val_acc(data, sst2_run, tmp_path):
    lightning_tfm("test", "--config", SST2, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  sst2_run / "checkpoints/best.ckpt", "--data.train_path", data / "sst2_train.tsv",
                  "--data.test_path", data / "sst2_dev.tsv", "--data.tokenizer_vocab_size", 300,
                  "--data.batch_size", 32, "--trainer.enable_progress_bar", "false")
    (row,) = metrics(tmp_path)
    assert row["test_acc"] == pytest.approx(best_score(sst2_run / "checkpoints/best.ckpt"), abs=1e-6)
    assert 0 <= row["test_f1"] <= 1
    assert not (tmp_path / "tokenizer").exists()


def test_classification_predict_writes_label_names_and_probabilities(data, sst2_run, tmp_path):
    sentences = ["a gorgeous , witty , seductive movie . ", "dull and lifeless ", "it 's a film "]
    (tmp_path / "in.tsv").write_text("sentence\n" + "\n".join(sentences) + "\n", encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    lightning_tfm("predict", "--config", SST2, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                  sst2_run / "checkpoints/best.ckpt", "--data.train_path", data / "sst2_train.tsv",
                  "--data.predict_path", tmp_path / "in.tsv", "--predictions.path", out,
                  "--trainer.enable_progress_bar", "false")
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(records) == len(sentences)
    for r in records:
        probs = r["probabilities"]
        assert set(probs) == {"0", "1"} and sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert r["label"] == max(probs, key=probs.get) and r["probability"] == probs[r["label"]]


# --- the checkpoint's tokenizer, the printed config, help and errors -----------------------------------


def test_explicit_tokenizer_other_than_the_checkpoints_is_an_error(data, lm_run, sst2_run, tmp_path):
    other = sst2_run / "tokenizer/tokenizer.json"
    proc = lightning_tfm("test", "--config", LM, "--trainer.default_root_dir", tmp_path, "--ckpt_path",
                         lm_run / "checkpoints/best.ckpt", "--data.test_path", data / "lm_val.txt",
                         "--data.tokenizer_path", other, ok=False)
    assert re.fullmatch(rf"ValueError: data\.tokenizer_path={re.escape(str(other))} is not the tokenizer stored with "
                        r".*best\.ckpt; leave data\.tokenizer_path unset .*", error_line(proc))


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`lightning_tfm ... --print_config` run by `cli.main` in this process, returning what it printed."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning_tfm"])        # pytest's own arguments are not ours
    precision = torch.get_float32_matmul_precision()        # main() sets it; keep other tests unaffected

    def run(*args) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            cli.main([str(a) for a in args])
        assert exit_.value.code in (0, None)
        return capsys.readouterr().out

    yield run
    torch.set_float32_matmul_precision(precision)


def test_print_config_fed_back_gives_the_same_run(data, lm_run, in_process, tmp_path):
    printed = in_process(*lm_fit_args(data, tmp_path / "again"), "--print_config")
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    lightning_tfm("fit", "--config", tmp_path / "printed.yaml")
    ours = load_checkpoint(tmp_path / "again/checkpoints/last.ckpt")["state_dict"]
    theirs = load_checkpoint(lm_run / "checkpoints/last.ckpt")["state_dict"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert metrics(tmp_path / "again") == metrics(lm_run)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_prints_back_the_same(config, in_process, tmp_path):
    printed = in_process("fit", "--config", config, "--print_config")
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["class_path"].startswith("lightning_tfm.tasks.")
    assert resolved["data"]["class_path"].startswith("lightning_tfm.data.")
    assert "${" not in printed                               # interpolations are resolved
    data_args = resolved["data"]["init_args"]
    if "LIGHTNING_TFM_DATA" not in os.environ:               # the shipped paths point at ../shared/data
        for key, value in data_args.items():
            if key.endswith("_path") and value is not None and not value.startswith("my_data/"):  # README makes it
                langs = [data_args[k] for k in ("src_lang", "tgt_lang") if k in data_args]
                assert (ROOT / value).is_file() or langs and all((ROOT / f"{value}.{x}").is_file() for x in langs), \
                    f"{config.name}: data.{key}={value} not found"
    (tmp_path / "printed.yaml").write_text(printed, encoding="utf-8")
    assert in_process("fit", "--config", tmp_path / "printed.yaml", "--print_config") == printed


def test_help_lists_the_subcommands():
    proc = lightning_tfm("--help")
    usage = re.search(r"\{([a-z_,]+)\}", proc.stdout)
    assert usage and {"fit", "validate", "test", "predict"} <= set(usage.group(1).split(","))
    assert "lightning_tfm.tasks.TranslationModule" in proc.stdout


BAD_HEADS = [f"{MODEL}.d_model", 32, f"{MODEL}.n_heads", 3]
BAD_HEADS_MESSAGE = "ValueError: DecoderOnly: d_model=32 is not divisible by n_heads=3"


@pytest.mark.filterwarnings("ignore::DeprecationWarning:lightning.pytorch.cli")   # its calls into jsonargparse 4.53
def test_a_bad_value_is_one_line_on_stderr_and_exit_code_1(in_process, monkeypatch, capsys, tmp_path):
    # in this process (in_process sets the folder, argv and matmul precision): it stops while building the model.
    # jsonargparse wraps the model's error in a dump of the whole config; the one line is the model's message
    monkeypatch.delenv("LIGHTNING_TFM_TRACEBACK", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fit", "--config", LM, "--trainer.default_root_dir", str(tmp_path), *map(str, BAD_HEADS)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"lightning_tfm fit: {BAD_HEADS_MESSAGE} (set LIGHTNING_TFM_TRACEBACK=1 for the " \
        "traceback)"
    assert "Traceback" not in err and "Union subtypes" not in err


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
                         "--data.tokenizer_vocab_size", 100, ok=False)
    assert error_line(proc).startswith(f"ValueError: {tmp_path / 'dev.tsv'}:3: label 'neutral' is not one of the "
                                      "known labels ['0', '1']")
