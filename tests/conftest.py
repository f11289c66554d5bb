"""Puts tests/support on sys.path: `commands` (running the CLI in a subprocess) and `probes` (callbacks the
subprocess tests add to real runs); `data`, slices of the real data for the subprocess tests; `in_process`, the
command run in this process where it stops before a Trainer exists. Also one thread per xdist worker, and the
order the files run in (see `pytest_collection_modifyitems`)."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from commands import DATA, ROOT, head_lines  # noqa: E402

TESTS = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker computes on one thread: there are as many workers as cores (pyproject.toml), and two
    workers' OpenMP threads spinning on two busy cores slow both down (commands.cli_env gives the CLI
    subprocesses one thread for the same reason). Without xdist (`-n 0`) torch keeps its default."""
    if hasattr(config, "workerinput"):
        torch.set_num_threads(1)


# one test that computes for about two minutes on one core: started first, so that it never ends the run alone
LONGEST = TESTS / "test_pretraining_helps.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest file first, then the files that run whole programs (at the top of tests/, and tests/cli/),
    then the unit tests that mirror the package. With `--dist loadfile --no-loadscope-reorder` (pyproject.toml)
    the workers take files in this order, so the long files start early and the many short ones even out the
    two workers at the end."""
    def group(item: pytest.Item) -> int:
        folder = item.path.parent
        return 0 if item.path == LONGEST else 1 if folder in (TESTS, TESTS / "cli") else 2
    items.sort(key=group)                               # stable: each group keeps its order


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """Slices of the real data: 40,000 characters of Tiny Shakespeare (and its last 10%, the LM's validation
    split, as a file of its own); 1000 Multi30k training pairs and 24 validation pairs; 1000 SST-2 training
    rows and 96 dev rows."""
    if not (DATA / "multi30k" / "train.en").is_file():
        pytest.fail(f"shared data not found at {DATA}; set LIGHTNING_TFM_DATA to the folder holding multi30k/ etc.")
    out = tmp_path_factory.mktemp("data")
    text = (DATA / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")[:40_000]
    (out / "lm_train.txt").write_text(text, encoding="utf-8")
    (out / "lm_val.txt").write_text(text[int(len(text) * 0.9):], encoding="utf-8")  # the val_fraction=0.1 cut
    for split, n in (("train", 1000), ("val", 24)):
        for lang in ("en", "de"):
            text = head_lines(DATA / "multi30k" / f"{split}.{lang}", n)
            (out / f"mt_{split}.{lang}").write_text(text, encoding="utf-8")
    (out / "sst2_train.tsv").write_text(head_lines(DATA / "sst2" / "train.tsv", 1001), encoding="utf-8")
    (out / "sst2_dev.tsv").write_text(head_lines(DATA / "sst2" / "dev.tsv", 97), encoding="utf-8")
    return out


@pytest.fixture
def in_process(monkeypatch, capsys):
    """`lightning_tfm ARGS` run by `cli.main` in this process, from the repository root, returning a
    CompletedProcess like `commands.lightning_tfm` (with `ok`, fail unless it exits 0). For commands that stop
    before a Trainer exists (they only parse, or fail while parsing or building) and for `average`, `export` and
    `attention`, which need none: a subprocess spends ~9 s importing torch and Lightning. What main() changes in
    this process is put back: the environment (W&B's mode, Lightning's PL_GLOBAL_SEED), the random states it
    seeds and the matmul precision."""
    from lightning_tfm import cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["lightning_tfm"])        # pytest's own arguments are not ours
    environ = dict(os.environ)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    precision = torch.get_float32_matmul_precision()

    def run(*args, ok: bool = True) -> subprocess.CompletedProcess:
        os.environ["WANDB_MODE"] = "disabled"                   # as commands.cli_env gives a subprocess
        capsys.readouterr()
        code = 0
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
        if isinstance(code, str):                               # sys.exit(message), as the interpreter does
            print(code, file=sys.stderr)
            code = 1
        out = capsys.readouterr()
        proc = subprocess.CompletedProcess(["lightning_tfm", *map(str, args)], code or 0, out.out, out.err)
        if ok and proc.returncode != 0:
            pytest.fail(f"lightning_tfm {' '.join(map(str, args))} exited {proc.returncode}:\n{out.err[-4000:]}")
        return proc

    yield run
    os.environ.clear()
    os.environ.update(environ)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    torch.set_float32_matmul_precision(precision)
