"""Fixtures over the shared real data (../shared/data beside the checkout, or $LIGHTNING_TFM_DATA).

Small slices of it are written to temporary files so tokenizers train in well under a second.
"""

import os
from pathlib import Path

import pytest
import torch

DATA = Path(os.environ.get("LIGHTNING_TFM_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "multi30k" / "train.en").is_file():
        pytest.fail(f"shared data not found at {DATA}; set LIGHTNING_TFM_DATA to the folder holding multi30k/ etc.")
    return DATA


def _head(path: Path, n: int) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return "".join(f.readline() for _ in range(n))


@pytest.fixture(scope="session")
def multi30k_small(data_dir, tmp_path_factory) -> Path:
    """train 2000 / val 200 / test2016 200 lines of Multi30k, as <dir>/{train,val,test2016}.{en,de}."""
    out = tmp_path_factory.mktemp("multi30k")
    for split, n in (("train", 2000), ("val", 200), ("test2016", 200)):
        for lang in ("en", "de"):
            (out / f"{split}.{lang}").write_text(_head(data_dir / "multi30k" / f"{split}.{lang}", n),
                                                 encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def sst2_small(data_dir, tmp_path_factory) -> Path:
    """The header and first 3000 rows of SST-2's train.tsv, byte for byte."""
    path = tmp_path_factory.mktemp("sst2") / "train.tsv"
    path.write_text(_head(data_dir / "sst2" / "train.tsv", 3001), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ag_news_small(data_dir, tmp_path_factory) -> Path:
    """The header and first 2000 rows of AG News train_10k.csv, byte for byte."""
    path = tmp_path_factory.mktemp("ag_news") / "train.csv"
    path.write_text(_head(data_dir / "ag_news" / "train_10k.csv", 2001), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def shakespeare_small(data_dir, tmp_path_factory) -> Path:
    """The first 100,000 characters of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("shakespeare") / "input.txt"
    text = (data_dir / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    path.write_text(text[:100_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def lengths():
    """Lengths shaped like subword counts of short sentences: 2000 draws in [3, 60)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(3, 30, (2000,), generator=g) + torch.randint(0, 30, (2000,), generator=g)).tolist()
