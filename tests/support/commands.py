"""Helpers of the tests that run the `lightning_tfm` command in a subprocess, from the repository root."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_tfm.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("LIGHTNING_TFM_DATA", ROOT.parent / "shared" / "data"))
SUPPORT = Path(__file__).resolve().parent


def lightning_tfm(*args, ok: bool = True, extra_env: dict[str, str] | None = None,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `lightning_tfm` from the repository root; with `ok`, fail showing its stderr unless it
    exits 0. `extra_env` adds environment variables."""
    script = Path(sys.executable).with_name("lightning_tfm")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_tfm.cli"]
    proc = subprocess.run(command + [str(a) for a in args], cwd=ROOT, env={**cli_env(), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        pytest.fail(f"lightning_tfm {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: one OpenMP thread (the models are tiny, and two spinning threads on
    two busy cores run 4x slower), tests/support importable, for the probes, and W&B off (it starts a service
    process per run; tests/test_wandb.py turns it on)."""
    path = os.pathsep.join([str(SUPPORT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "WANDB_MODE": "disabled"}


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The `Type: message` of the user error that stopped the command, which must have printed it as its last
    line, `lightning_tfm SUBCOMMAND: Type: message (set LIGHTNING_TFM_TRACEBACK=1 ...)`, with no traceback, and
    exited 1 (the exception must be ours, not torch's)."""
    assert proc.returncode == 1, f"exit code {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    found = re.fullmatch(r"lightning_tfm [a-z]+: (.+) \(set LIGHTNING_TFM_TRACEBACK=1 for the traceback\)", last)
    assert found, last
    return found.group(1)


def metrics(run: Path) -> list[dict[str, float]]:
    """The rows of the run's CSVLogger metrics.csv, empty cells left out."""
    (path,) = run.glob("logs/version_*/metrics.csv")
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def best_score(ckpt: Path) -> float:
    """The monitored value ModelCheckpoint recorded when it wrote `ckpt`."""
    states = load_checkpoint(ckpt)["callbacks"].values()
    return next(float(s["best_model_score"]) for s in states if "best_model_score" in s)


def head_lines(path: Path, n: int) -> str:
    """The first n lines of a file, line endings kept."""
    with open(path, encoding="utf-8", newline="") as f:
        return "".join(f.readline() for _ in range(n))


