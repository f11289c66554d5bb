"""The synthetic long-range tasks (scripts/long_range_tasks.py) are what they claim: ListOps values agree with an
evaluator written independently here (Python's own arithmetic on the expression turned into calls), lengths
stay in range, splits differ by seed and repeat by seed; every copied symbol's target is the symbol length
positions earlier. And scripts/long_range.py runs end to end, each variant only on the task its
`supports` allows."""

import json
import statistics
import subprocess
import sys

import torch
from commands import ROOT, cli_env

sys.path.insert(0, str(ROOT / "scripts"))
from long_range_tasks import LISTOPS_VOCAB, Copy, encode_listops, listops  # noqa: E402

FUNCTIONS = {"MAX": lambda *a: max(a), "MIN": lambda *a: min(a), "MED": lambda *a: statistics.median_low(a),
             "SM": lambda *a: sum(a) % 10}


def python_value(tokens: list[str]) -> int:
    """`[MAX 4 [MIN 2 3 ] ]` -> eval("MAX(4, MIN(2, 3, ), )")."""
    text = " ".join(f"{t[1:]}(" if t.startswith("[") else ")," if t == "]" else f"{t}," for t in tokens)
    return eval(text.rstrip(","), {"__builtins__": {}}, FUNCTIONS)


def test_listops_values_lengths_and_seeds():
    rows = listops(200, seed=5, min_len=20, max_len=60, max_depth=4, max_args=5)
    assert len(rows) == 200
    assert all(20 <= len(tokens) <= 60 for tokens, _ in rows)
    assert all(label == python_value(tokens) for tokens, label in rows)
    assert {t for tokens, _ in rows for t in tokens} <= set(LISTOPS_VOCAB[1:])
    assert len({label for _, label in rows}) == 10
    assert listops(20, seed=5, min_len=20, max_len=60) == listops(20, seed=5, min_len=20, max_len=60)
    assert listops(20, seed=5, min_len=20, max_len=60) != listops(20, seed=6, min_len=20, max_len=60)


def test_listops_encoding_pads_on_the_right_with_id_0():
    rows = listops(8, seed=0, min_len=10, max_len=30)
    ids, real, labels = encode_listops(rows)
    assert ids.shape == (8, max(len(t) for t, _ in rows)) and labels.tolist() == [label for _, label in rows]
    for i, (tokens, _) in enumerate(rows):
        assert real[i].sum() == len(tokens) and [LISTOPS_VOCAB[j] for j in ids[i, : len(tokens)]] == tokens
        assert not ids[i, len(tokens):].any()


def test_every_copied_symbol_is_predicted_from_length_plus_one_positions_back():
    task = Copy(length=10, n_symbols=5)
    ids, targets = task.sample(50, seed=3)
    assert ids.shape == targets.shape == (50, 20) and ids.max() < task.vocab_size
    assert (ids[:, 10] == 5).all() and (targets[:, :10] == -100).all()
    for t in range(10, 20):                        # the next symbol at t is the one L = 10 positions back
        assert torch.equal(targets[:, t], ids[:, t - 10])
    assert torch.equal(ids[:, 11:], ids[:, :9])
    assert torch.equal(task.sample(50, seed=3)[0], ids) and not torch.equal(task.sample(50, seed=4)[0], ids)


def test_the_benchmark_runs_each_variant_on_the_tasks_it_supports(tmp_path):
    out = tmp_path / "long_range"
    proc = subprocess.run([sys.executable, "scripts/long_range.py", "--steps", "2", "--batch", "4", "--threads", "1",
                           "--listops-len", "16", "32", "--copy-len", "12", "--only", "full", "adaptive_span",
                           "linformer", "--out", str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    assert {(r["task"], r["variant"]) for r in records} == {
        ("listops", "full"), ("listops", "linformer"), ("copy", "full"), ("copy", "adaptive_span")}
    assert all(0 <= r["test_acc"] <= 1 and r["train_s"] > 0 and r["steps"] == 2 for r in records)
    assert "| copy | adaptive_span |" in out.with_suffix(".md").read_text()
