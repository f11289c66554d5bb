"""lightning_tfm/console.py in this process: each third-party message is silenced and nothing else (our own
warnings and Lightning's other lines still show), user errors become one line and exit 1 while bugs keep their
traceback, and LIGHTNING_TFM_TRACEBACK lets a user error through. tests/cli/test_language_model.py checks a real
fit's output."""

import logging
import warnings

import lightning_utilities.core.rank_zero as rank_zero_module
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities._pytree import _tree_flatten

from lightning_tfm.console import _TIPS as TIPS
from lightning_tfm.console import TRACEBACK_ENV, drop_wandb_anonymous, one_line_errors, quiet_third_party

HINT = f" (set {TRACEBACK_ENV}=1 for the traceback)"


def lightning_info(tmp_path) -> list[str]:
    """What Lightning logs through rank_zero_info while a Trainer is built."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    log = rank_zero_module.log                         # the logger rank_zero_info uses now
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path), accelerator="cpu", enable_progress_bar=False,
                enable_model_summary=False)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return [r.getMessage() for r in records]


def test_lightning_tips_are_dropped_and_its_other_lines_kept(tmp_path):
    log = rank_zero_module.log
    log.removeFilter(TIPS)
    assert any(m.startswith("💡 Tip:") and "litlogger" in m for m in lightning_info(tmp_path))   # there without
    quiet_third_party()
    quiet_third_party()                                # idempotent
    assert log.filters.count(TIPS) == 1
    messages = lightning_info(tmp_path)
    assert not any("Tip" in m for m in messages)
    assert any(m.startswith("GPU available:") for m in messages)


def test_lightning_pytree_deprecation_is_silenced_and_our_warnings_are_not():
    loaders = {"train": [torch.ones(2)], "extra": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(loaders)
    assert any("LeafSpec" in str(w.message) for w in caught)                  # torch warns without the filter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        _tree_flatten(loaders)
        rank_zero_warn("data.train: truncated 1 of 2 texts to data.truncation.max_len=8")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning)   # same text, other module
    assert [str(w.message) for w in caught] == ["data.train: truncated 1 of 2 texts to data.truncation.max_len=8",
                                                "`isinstance(treespec, LeafSpec)` is deprecated"]


def test_mixed_precision_summary_warning_is_silenced(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities.model_summary import ModelSummary

    model = BoringModel()
    model.trainer = Trainer(default_root_dir=tmp_path, logger=False, accelerator="cpu", precision="bf16-mixed")

    def summary_warnings() -> list[str]:
        ModelSummary(model).total_parameters
        return [str(w.message) for w in caught if "model summary" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert summary_warnings()                                              # Lightning warns without the filter
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        assert summary_warnings() == []


def test_wandb_logger_leaves_anonymous_out_unless_asked_for(tmp_path):
    plain, anonymous = WandbLogger(save_dir=tmp_path), WandbLogger(save_dir=tmp_path, anonymous=True)
    assert plain._wandb_init["anonymous"] is None                 # what Lightning passes to wandb.init
    drop_wandb_anonymous([CSVLogger(tmp_path), plain, anonymous])
    assert "anonymous" not in plain._wandb_init
    assert anonymous._wandb_init["anonymous"] == "allow"


@pytest.mark.parametrize("error", [ValueError("data.truncation.max_len=1, must be >= 3"),
                                   FileNotFoundError("data.train_path=x.txt does not exist")])
def test_a_user_error_is_one_line_on_stderr_and_exit_code_1(error, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_, one_line_errors("lightning_tfm fit"):
        raise error
    assert exit_.value.code == 1
    assert capsys.readouterr().err == f"lightning_tfm fit: {type(error).__name__}: {error}{HINT}\n"


@pytest.mark.parametrize("bug", [RuntimeError("CUDA error"), AssertionError(), KeyError("ids"), KeyboardInterrupt()])
def test_a_bug_or_an_interrupt_keeps_its_traceback(bug, capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(type(bug)), one_line_errors("lightning_tfm fit"):
        raise bug
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("value, one_line", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_lightning_tfm_traceback_lets_a_user_error_through(value, one_line, capsys, monkeypatch):
    monkeypatch.setenv(TRACEBACK_ENV, value)
    with pytest.raises(SystemExit if one_line else ValueError), one_line_errors("lightning_tfm fit"):
        raise ValueError("bad")
    assert bool(capsys.readouterr().err) == one_line


class Heads:
    def __init__(self, d_model: int = 32, n_heads: int = 4) -> None:
        if d_model % n_heads:
            raise ValueError(f"Heads: d_model={d_model} is not divisible by n_heads={n_heads}")


def test_the_error_jsonargparse_wraps_is_reported_and_ours_that_wrap_another_are_kept(capsys, monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--heads", type=Heads | None)
    config = parser.parse_args(["--heads", f"{Heads.__module__}.Heads", "--heads.n_heads", "3"])
    with pytest.raises(SystemExit), one_line_errors("lightning_tfm fit"):
        parser.instantiate(config)                    # ValueError "Does not validate ... Union subtypes ..." from it
    assert capsys.readouterr().err == f"lightning_tfm fit: ValueError: Heads: d_model=32 is not divisible by " \
        f"n_heads=3{HINT}\n"

    with pytest.raises(SystemExit), one_line_errors("lightning_tfm fit"):
        try:
            b"\xff".decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError("train.txt:3: not UTF-8") from e
    assert capsys.readouterr().err == f"lightning_tfm fit: ValueError: train.txt:3: not UTF-8{HINT}\n"
