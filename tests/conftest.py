"""Puts tests/support on sys.path: `commands` (running the CLI in a subprocess) and `probes` (callbacks the
subprocess tests add to real runs); `data`, slices of the real data for the subprocess tests."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from commands import DATA, head_lines  # noqa: E402


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
