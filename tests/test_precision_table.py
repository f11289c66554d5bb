"""scripts/precision_table.py on the character LM, shrunk to a 1-layer d_model 32 model on a slice of Tiny
Shakespeare for 40 steps: both precisions run (the saved config says which), the JSON holds the curves of the
runs' own metrics.csv with the summaries computed from them, the Markdown shows the JSON's numbers, and the
figure has the requested size. Nothing here is timed; tok/s is only checked to exist."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
from commands import metrics
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import precision_table  # noqa: E402

MODEL = "--model.init_args.model.init_args"
STEPS, VAL_EVERY = 40, 10


@pytest.fixture(scope="module")
def table(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Path]:
    """The script's JSON, its output folder and its runs folder."""
    tmp = tmp_path_factory.mktemp("precision_table")
    returned = precision_table.main([
        "--only", "lm", "--steps", str(STEPS), "--val-every", str(VAL_EVERY), "--val-batches", "2", "--threads",
        "1", "--root", str(tmp / "runs"), "--out", str(tmp / "out"), "--",
        f"{MODEL}.d_model", "32", f"{MODEL}.n_layers", "1", f"{MODEL}.n_heads", "2", f"{MODEL}.d_ff", "64",
        "--data.train_path", str(data / "lm_train.txt"), "--trainer.enable_model_summary", "false"])
    written = json.loads((tmp / "out/precision_table.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return written, tmp / "out", tmp / "runs"


@pytest.mark.parametrize("precision", precision_table.PRECISIONS)
def test_each_precision_ran_and_its_curves_are_its_metrics(table, precision):
    written, _, runs = table
    run = written["families"]["lm"]["runs"][precision]
    assert f"--trainer.precision {precision}" in run["command"]
    assert run["precision"] == precision and run["seed"] == 1337    # read back from the run's saved config
    assert run["steps_done"] == STEPS
    rows = metrics(runs / "lm" / precision)
    train = [(int(r["step"]), r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(int(r["step"]), r["val_loss"]) for r in rows if "val_loss" in r]
    assert [s for s, _ in train] == run["train_curve"]["step"] == list(range(STEPS))
    assert [v for _, v in train] == run["train_curve"]["loss"]
    assert [s for s, _ in val] == run["val_points"]["step"] == [9, 19, 29, 39]    # every VAL_EVERY steps
    assert [v for _, v in val] == run["val_points"]["loss"]
    losses = [v for _, v in train]
    pairs = [losses[0]] + [(a + b) / 2 for a, b in zip(losses, losses[1:])]      # window STEPS // 20 = 2
    assert run["train_curve"]["smoothed"] == pytest.approx(pairs)
    assert run["train_loss"] == pytest.approx(sum(losses[-4:]) / 4)             # the last 10% of steps
    assert run["val_loss"] == val[-1][1]
    # TokensPerSecond measures every 20 steps, at steps 19 and 39; the CSV repeats a value until the next one
    measured = [r["train_tok_s"] for r in rows if "train_tok_s" in r and int(r["step"]) in (19, 39)]
    assert run["tok_s_points"] == 2 and run["tok_s"] == pytest.approx(sum(measured) / 2) and run["tok_s"] > 0


def test_comparison_is_computed_from_the_two_runs(table):
    family = table[0]["families"]["lm"]
    fp32, bf16 = (family["runs"][p] for p in precision_table.PRECISIONS)
    assert family["tok_s_ratio"] == pytest.approx(bf16["tok_s"] / fp32["tok_s"])
    gaps = [abs(a - b) for a, b in zip(fp32["train_curve"]["smoothed"], bf16["train_curve"]["smoothed"])]
    assert family["max_train_loss_diff"] == pytest.approx(max(gaps))
    assert family["max_val_loss_diff"] == pytest.approx(
        max(abs(a - b) for a, b in zip(fp32["val_points"]["loss"], bf16["val_points"]["loss"])))
    assert 0 < family["max_train_loss_diff"] < 0.05     # bf16 rounds differently, yet trains like fp32


def _close(cell: str, value: float) -> bool:
    """`cell` is `value` rounded to the digits the cell shows."""
    decimals = len(cell.partition(".")[2])
    return abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-9


def test_markdown_shows_the_json_numbers(table):
    written, out, _ = table
    text = (out / "precision_table.md").read_text()
    (row,) = [line for line in text.splitlines() if line.startswith("| lm ")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    family = written["families"]["lm"]
    fp32, bf16 = (family["runs"][p] for p in precision_table.PRECISIONS)
    assert cells[1] == "`configs/lm/shakespeare_char_small.yaml`"
    numbers = [cells[2], cells[3], cells[4], *cells[5].split(" / "), *cells[6].split(" / "), *cells[7].split(" / ")]
    want = [fp32["tok_s"], bf16["tok_s"], family["tok_s_ratio"], fp32["train_loss"], bf16["train_loss"],
            fp32["val_loss"], bf16["val_loss"], family["max_train_loss_diff"], family["max_val_loss_diff"]]
    assert all(_close(c, w) for c, w in zip(numbers, want, strict=True)), (numbers, want)
    machine = written["machine"]
    assert f"picks **{machine['auto_precision']}** here, since {machine['auto_precision_reason']}" in text
    assert machine["auto_precision"] in precision_table.PRECISIONS
    assert set(machine["flags"]) == set(precision_table.FLAGS)
    assert all(math.isfinite(x) for x in machine["load_before"] + machine["load_after"])
    assert re.search(rf"{STEPS} steps per fit, validation every {VAL_EVERY} steps on 2 batches", text)


def test_figure_has_the_requested_size(table):
    with Image.open(table[1] / "precision_table.png") as image:
        assert image.size == (1200, 400)
