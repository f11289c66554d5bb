"""What the tests in tests/cli/ share: the three small configs they run, the overrides that make their model
tiny and their fit 20 steps, and `check_fit`, the checks every fitted run passes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from commands import best_score, metrics
from tokenizers import Tokenizer

from lightning_tfm.checkpoints import load_checkpoint

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
