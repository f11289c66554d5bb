"""scripts/bench.py runs end to end at tiny sizes: ours and transformers agree on the logits (the script exits
non-zero otherwise) and every measurement is a well-formed record. Speed itself is the benchmark's business,
not a test's: nothing here depends on the numbers."""

import json
import subprocess
import sys

from commands import ROOT, cli_env


def test_bench_tiny_writes_a_record_for_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--quick", "--tiny", "--threads", "1", "--json",
                           str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    names = [r["name"] for r in records]
    for family in ("decoder", "classifier", "seq2seq"):
        assert any(n.startswith(f"{family} train") for n in names), names
    assert any("beam 4" in n for n in names) and sum(n.startswith("data ") for n in names) == 3
    for r in records:
        assert r["ours"] > 0 and r["peer"] > 0 and r["ratio"] > 0 and r["unit"], r
        expected = r["peer"] / r["ours"] if r["unit"] == "MiB" else r["ours"] / r["peer"]
        assert abs(r["ratio"] - expected) <= 1e-6 * expected, r
    assert "MFU: skipped" in proc.stdout + proc.stderr or any("MFU" in n for n in names)


def test_bench_maps_tiny_measures_maps_against_no_maps_and_transformers(tmp_path):
    out = tmp_path / "maps.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--only", "maps", "--tiny", "--threads", "1", "--json",
                           str(out)], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [r["name"].split(":")[0] for r in records] == ["forward"] * 2 + ["forward with maps", "forward without maps"]
    assert all(r["ours"] > 0 and r["peer"] > 0 for r in records)
