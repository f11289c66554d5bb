"""How much padding and memory `BucketBatchSampler` costs: a small table, and JSON with `--json PATH`.

Padding fraction = (padded tokens - real tokens) / padded tokens over one epoch, padding each batch to a
multiple of 8 as the collate functions do. It is reported for the sampler at `--pool-size`, for a lower bound
(the whole epoch sorted as one pool: the least padding this packing rule can reach), and, with `--old-module
PATH`, for another `BucketBatchSampler` loaded from that file (e.g. `git show HEAD:lightning_tfm/data/batching.py
> /tmp/old_batching.py`). Corpora: Multi30k train pairs, each pair's length approximated as 1.3 x the whitespace
token count of its longer side (about what a 10k BPE gives on these captions), and a synthetic corpus resampling
those lengths. Memory: the peak that tracemalloc traces while building the sampler and walking one epoch, and the
growth of the peak resident set in a fresh process (tracemalloc misses torch's allocations, e.g. `randperm`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lightning_tfm.data.batching import BucketBatchSampler  # noqa: E402


def load_sampler(path: str | None) -> type:
    """`BucketBatchSampler` from the module file at `path`, or ours when `path` is None."""
    if path is None:
        return BucketBatchSampler
    spec = importlib.util.spec_from_file_location("old_batching", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BucketBatchSampler


def multi30k_lengths(folder: Path) -> np.ndarray:
    """ceil(1.3 x whitespace tokens) of the longer side of each train pair."""
    sides = [(folder / f"train.{lang}").read_text(encoding="utf-8").splitlines() for lang in ("en", "de")]
    if len(sides[0]) != len(sides[1]):
        raise ValueError(f"{folder}: train.en has {len(sides[0])} lines and train.de {len(sides[1])}")
    return np.array([math.ceil(1.3 * max(len(s.split()), len(t.split()))) for s, t in zip(*sides)], dtype=np.int64)


def padding_fraction(sampler: Any, lengths: np.ndarray, multiple: int = 8) -> float:
    """(padded - real) / padded tokens over one epoch of `sampler`'s batches."""
    padded = real = 0
    for batch in sampler:
        batch_lengths = lengths[np.asarray(batch)]
        padded += len(batch) * -(-int(batch_lengths.max()) // multiple) * multiple
        real += int(batch_lengths.sum())
    return (padded - real) / padded


def epoch_cost(sampler_cls: type, lengths: np.ndarray, max_tokens: int, pool_size: int) -> dict[str, float]:
    """Seconds to count (`len`) and to walk one epoch, then the peak bytes tracemalloc sees in a second run
    (timed apart, since tracing slows every allocation)."""
    start = time.perf_counter()
    sampler = sampler_cls(lengths, max_tokens=max_tokens, pool_size=pool_size)
    batches = len(sampler)
    counted = time.perf_counter()
    walked = sum(1 for _ in sampler)
    done = time.perf_counter()
    if walked != batches:
        raise RuntimeError(f"{sampler_cls.__module__}: len() said {batches} batches, the epoch had {walked}")
    del sampler
    tracemalloc.start()
    sampler = sampler_cls(lengths, max_tokens=max_tokens, pool_size=pool_size)
    len(sampler), sum(1 for _ in sampler)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"count_s": counted - start, "walk_s": done - counted, "traced_peak_mb": peak / 2**20}


def rss_growth_mb(args: argparse.Namespace, which: str, n: int) -> float | None:
    """Peak resident-set growth (MB) of building and walking one epoch, measured in a fresh process."""
    command = [sys.executable, __file__, "--rss-child", which, str(n), "--max-tokens", str(args.max_tokens),
               "--pool-size", str(args.pool_size), "--seed", str(args.seed), "--data", str(args.data)]
    if args.old_module:
        command += ["--old-module", args.old_module]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    value = result.stdout.strip().splitlines()[-1]
    return None if value == "None" else float(value)


def rss_child(args: argparse.Namespace) -> None:
    """Print the peak RSS growth for `--rss-child WHICH N` (Linux: resets the peak through /proc/self/clear_refs)."""
    which, n = args.rss_child[0], int(args.rss_child[1])
    sampler_cls = load_sampler(args.old_module if which == "old" else None)
    lengths = np.random.default_rng(args.seed).choice(multi30k_lengths(args.data), n)

    def kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1])

    try:
        Path("/proc/self/clear_refs").write_text("5")            # resets VmHWM to the current VmRSS
    except OSError:
        print("None")
        return
    before = kib("VmRSS:")
    sampler = sampler_cls(lengths, max_tokens=args.max_tokens, pool_size=args.pool_size)
    len(sampler), sum(1 for _ in sampler)
    print((kib("VmHWM:") - before) / 1024)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k",
                        help="folder with train.en and train.de")
    parser.add_argument("--max-tokens", type=int, default=2048, help="padded-token budget per batch")
    parser.add_argument("--pool-size", type=int, default=16384, help="the sampler's pool_size")
    parser.add_argument("--synthetic", type=int, default=2_000_000, help="pairs in the resampled corpus")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[500_000, 2_000_000],
                        help="corpus sizes to measure memory and time at")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    parser.add_argument("--old-module", help="a batching.py to compare against, e.g. the last commit's")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--rss-child", nargs=2, metavar=("WHICH", "N"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.rss_child:
        return rss_child(args)
    samplers = {"new": BucketBatchSampler}
    if args.old_module:
        samplers["old"] = load_sampler(args.old_module)
    base = multi30k_lengths(args.data)
    corpora = {"multi30k": base, f"resampled_{args.synthetic}": np.random.default_rng(args.seed).choice(
        base, args.synthetic)}
    report: dict[str, Any] = {"max_tokens": args.max_tokens, "pool_size": args.pool_size, "padding": {},
                              "memory": {}}
    print(f"padding fraction (max_tokens={args.max_tokens}, pool_size={args.pool_size}, pad to multiples of 8)")
    print(f"{'corpus':<20}{'examples':>10}" + "".join(f"{name:>10}" for name in samplers) + f"{'bound':>10}")
    for name, lengths in corpora.items():
        row = {key: padding_fraction(cls(lengths, max_tokens=args.max_tokens, pool_size=args.pool_size), lengths)
               for key, cls in samplers.items()}
        row["bound"] = padding_fraction(BucketBatchSampler(lengths, max_tokens=args.max_tokens,
                                                           pool_size=len(lengths)), lengths)
        report["padding"][name] = row
        print(f"{name:<20}{len(lengths):>10}" + "".join(f"{row[key]:>10.2%}" for key in row))
    print("\nmemory and time of building the sampler and walking one epoch")
    print(f"{'sampler':<10}{'examples':>10}{'traced MB':>11}{'RSS+ MB':>10}{'count s':>9}{'walk s':>8}")
    for n in args.memory_sizes:
        lengths = np.random.default_rng(args.seed).choice(base, n)
        for key, cls in samplers.items():
            row = epoch_cost(cls, lengths, args.max_tokens, args.pool_size)
            row["rss_growth_mb"] = rss_growth_mb(args, key, n)
            report["memory"][f"{key}_{n}"] = row
            rss = "n/a" if row["rss_growth_mb"] is None else f"{row['rss_growth_mb']:.1f}"
            print(f"{key:<10}{n:>10}{row['traced_peak_mb']:>11.1f}{rss:>10}{row['count_s']:>9.2f}"
                  f"{row['walk_s']:>8.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
