"""Seeded synthetic corpora for scripts/data_scale.py, made from the shipped data and streamed to disk in chunks (a
corpus is never held in memory, only the small real files it draws from).

- `parallel_corpus`: N pairs, each joining 1-3 randomly drawn Multi30k training pairs (sources joined by a space,
  targets likewise, so line i of train.en still translates line i of train.de), plus the real Multi30k val.
- `lm_corpus`: lines drawn at random from Tiny Shakespeare and the WikiText-2 valid/test files (its train split
  does not ship) until the file holds at least the requested bytes.

Each folder gets a corpus.json, written last, with the settings and every file's size; a later call with the same
settings reuses a folder whose files still have those sizes, and says so (`generated: False`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

CHUNK = 100_000     # pairs or lines generated at a time


def _reusable(folder: Path, settings: dict) -> dict | None:
    """The corpus.json record when `folder` was generated with `settings` and its files have the recorded sizes."""
    record_path = folder / "corpus.json"
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    same = all(record.get(k) == v for k, v in settings.items())
    sizes = all((folder / f).is_file() and (folder / f).stat().st_size == n for f, n in record["files"].items())
    return record if same and sizes else None


def _finish(folder: Path, settings: dict, started: float) -> dict:
    record = {**settings, "files": {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.suffix != ".json"},
              "seconds": time.perf_counter() - started}
    (folder / "corpus.json").write_text(json.dumps(record, indent=1))       # last: vouches for complete files
    return {**record, "generated": True}


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]     # the files end with a newline


def parallel_corpus(data: Path, folder: Path, pairs: int, seed: int) -> dict:
    """`pairs` synthetic pairs as folder/train.{en,de}, plus the real Multi30k val; see the module docstring."""
    settings = {"kind": "parallel", "pairs": pairs, "seed": seed}
    if record := _reusable(folder, settings):
        return {**record, "generated": False}
    started, rng = time.perf_counter(), np.random.default_rng([seed, pairs])
    en, de = _lines(data / "multi30k/train.en"), _lines(data / "multi30k/train.de")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with (folder / "train.en").open("wb") as f_en, (folder / "train.de").open("wb") as f_de:
        for begin in range(0, pairs, CHUNK):
            ends = np.cumsum(rng.integers(1, 4, size=min(CHUNK, pairs - begin)))    # 1-3 Multi30k pairs each
            picks = rng.integers(0, len(en), size=int(ends[-1])).tolist()
            spans = list(zip([0, *ends[:-1].tolist()], ends.tolist()))
            for side, out in ((en, f_en), (de, f_de)):
                out.write(b"".join(b" ".join(side[j] for j in picks[a:b]) + b"\n" for a, b in spans))
    for lang in ("en", "de"):
        shutil.copyfile(data / f"multi30k/val.{lang}", folder / f"val.{lang}")
    return _finish(folder, settings, started)


def lm_corpus(data: Path, folder: Path, gb: float, seed: int) -> dict:
    """folder/train.txt: lines of Tiny Shakespeare and WikiText-2 drawn at random until >= `gb` * 1e9 bytes."""
    target = int(gb * 1e9)
    settings = {"kind": "lm", "bytes": target, "seed": seed}
    if record := _reusable(folder, settings):
        return {**record, "generated": False}
    started, rng = time.perf_counter(), np.random.default_rng([seed, target])
    sources = [data / "tiny_shakespeare/input.txt", data / "wikitext2_eval_only/wiki.valid.raw",
               data / "wikitext2_eval_only/wiki.test.raw"]
    pool = [line for path in sources for line in path.read_bytes().splitlines(keepends=True)]
    sizes = np.array([len(line) for line in pool])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    written = 0
    with (folder / "train.txt").open("wb") as out:
        while written < target:
            picks = rng.integers(0, len(pool), size=CHUNK)
            ends = np.cumsum(sizes[picks])
            picks = picks[:int(np.searchsorted(ends, target - written)) + 1]    # stop at the line that reaches it
            out.write(b"".join(pool[j] for j in picks.tolist()))
            written += int(sizes[picks].sum())
    return _finish(folder, {**settings, "sources": [str(p) for p in sources]}, started)
