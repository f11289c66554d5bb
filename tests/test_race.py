"""scripts/race.py end to end at a smoke size (tiny models, 100 training pairs, 24 validation and 24 test2016
pairs, 2.4 seconds of training time a system, a snapshot every 1.2 s), and its training clock on its own. The
quality numbers themselves are the race's business, not a test's: the checks are on what is recorded, that the
two runs obey the stated budgets, and that the three outputs agree with each other."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from commands import DATA, ROOT, cli_env, head_lines

from lightning_tfm.checkpoints import load_checkpoint

sys.path.insert(0, str(ROOT / "scripts"))

import race_clock  # noqa: E402
from race_clock import Clock  # noqa: E402

MARKS = [0.02, 0.04]


@pytest.fixture(scope="module")
def race(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi30k")
    for lang in ("en", "de"):
        (folder / f"train.{lang}").write_text((data / f"mt_train.{lang}").read_text(encoding="utf-8"), "utf-8")
        (folder / f"val.{lang}").write_text((data / f"mt_val.{lang}").read_text(encoding="utf-8"), "utf-8")
        (folder / f"test2016.{lang}").write_text(head_lines(DATA / "multi30k" / f"test2016.{lang}", 24), "utf-8")
    out = tmp_path_factory.mktemp("race")
    proc = subprocess.run([sys.executable, "scripts/race.py", "--minutes", "0.04", "--snapshot-every", "0.02",
                           "--seeds", "1", "--data", str(folder), "--out", str(out), "--threads", "1",
                           "--max-train-pairs", "100", "--tiny"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout


def test_race_records_one_row_per_snapshot_for_both_systems(race):
    out, _ = race
    report = json.loads((out / "race.json").read_text())
    assert [(r["system"], r["seed"]) for r in report["runs"]] == [("ours", 1), ("marian", 1)]
    assert (out / "data" / "train.en").read_text().count("\n") == 100
    for run in report["runs"]:
        snaps = run["snapshots"]
        assert [s["mark_minutes"] for s in snaps] == MARKS
        for s, mark in zip(snaps, MARKS):
            assert s["minutes"] >= mark and Path(s["path"]).is_file()
            assert 0 <= s["val_bleu"] <= 100 and 0 <= s["test_bleu"] <= 100
            assert s["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
        assert 0 < snaps[0]["step"] <= snaps[1]["step"] and 0 < snaps[0]["tokens"] < snaps[1]["tokens"]
        # real source + target tokens never exceed the padded budget of both sides: 2048 (ours), 4096 (Marian)
        budget = 2048 if run["system"] == "ours" else 4096
        assert snaps[1]["tokens"] <= 2 * budget * snaps[1]["step"]
        assert 0 <= run["final"]["test_bleu"] <= 100


def test_race_stops_ours_on_training_time_and_averages_its_last_epochs(race):
    out, _ = race
    ours = json.loads((out / "race.json").read_text())["runs"][0]
    assert "--trainer.max_time" in ours["command"] and "race_clock.TrainingClock" in ours["command"]
    last = load_checkpoint(out / "ours_seed1" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == ours["snapshots"][-1]["step"]       # the clock stopped it, nothing else
    averaged = load_checkpoint(ours["final"]["checkpoint"])
    assert ours["final"]["checkpoint"].endswith("averaged.ckpt")
    assert 2 <= len(averaged["averaged_from"]) <= 5
    assert ours["final"]["averaged_from"] == [p.rsplit("/", 1)[-1] for p in averaged["averaged_from"]]


def test_race_markdown_and_png_show_the_json(race):
    out, stdout = race
    report = json.loads((out / "race.json").read_text())
    text = (out / "race.md").read_text()
    assert text in stdout                                              # the tables are printed at the end
    for mark in MARKS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {mark:g} |"))
        for run in report["runs"]:
            snap = next(s for s in run["snapshots"] if s["mark_minutes"] == mark)
            assert f"| {snap['test_bleu']:.2f} |" in row
    assert "| ours seed 1 |" in text and "| marian seed 1 |" in text
    assert report["settings"]["precision"] == "fp32" and "both trained in fp32" in text
    png = (out / "race.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (800, 500)


def test_clock_counts_batches_not_pauses_and_marks_each_snapshot_once(monkeypatch):
    now = iter([0, 10, 30, 100, 130])                 # perf_counter readings, seconds
    monkeypatch.setattr(race_clock.time, "perf_counter", lambda: next(now))
    clock = Clock(budget_minutes=1.0, every_minutes=0.4)
    assert clock.marks == [0.4, 0.8, 1.0]
    seen = []
    clock.resume()                                    # t=0
    for pause_after in (False, True, False):          # batches ending at t=10, 30; pause; resume at 100, batch at 130
        clock.batch_done(tokens=7)
        while (mark := clock.due()) is not None:
            seen.append((mark, clock.seconds))
        if pause_after:
            clock.resume()                            # evaluation between t=30 and t=100 is not counted
    assert seen == [(0.4, 30), (0.8, 60), (1.0, 60)] and clock.over and clock.tokens == 21
    with pytest.raises(ValueError, match="every_minutes=0"):
        Clock(budget_minutes=1.0, every_minutes=0)


def test_peer_bf16_step_autocasts_the_forward_and_keeps_fp32_weights():
    """`--precision bf16` for the peer: the forward and loss run in bfloat16 (the loss moves by bf16 rounding,
    not more), the weights and their update stay fp32."""
    import torch
    from race_marian import TINY, _step, build_marian

    s_ids, t_ids = torch.randint(4, 50, (3, 7)), torch.randint(4, 50, (3, 6))
    s_mask, t_mask = torch.ones(3, 7, dtype=torch.bool), torch.ones(3, 6, dtype=torch.bool)
    losses = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build_marian(TINY, 50, pad=0, bos=1, eos=2).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        torch.manual_seed(1)                          # the same dropout masks in both
        losses[bf16] = _step(model, optimizer, s_ids, s_mask, t_ids, t_mask, bf16=bf16)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters()
                   if p.grad is not None)
    assert losses[True] != losses[False] and abs(losses[True] - losses[False]) < 0.05 * losses[False]
