"""The shared timing helper: workload sizes and their presets, one measurement (`Record`), and `Bench`, which
times ours against the peer alternately after warm-up and measures peak memory (CUDA allocator statistics on a
GPU, the process's resident set sampled from a thread on a CPU)."""

from __future__ import annotations

import ctypes
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

Run = Callable[[], int]          # does one unit of work, returns how many items (tokens, sentences) it produced


@dataclass(frozen=True)
class Sizes:
    """Model and workload sizes; `prompt`/`new` are the greedy prompt and output, `beam_*` the beam workload."""

    n_layers: int = 6
    d_model: int = 384
    n_heads: int = 6
    vocab: int = 8192
    seq: int = 256
    cls_seq: int = 128
    batch: int = 8
    prompt: int = 64
    new: int = 128
    beam_batch: int = 8
    beam_src: int = 32
    beam_new: int = 32
    repeats: int = 5
    warmup: int = 2


QUICK = dict(seq=128, cls_seq=64, batch=4, prompt=32, new=32, beam_batch=4, beam_src=16, beam_new=16, repeats=3,
             warmup=1)
TINY = dict(QUICK, n_layers=2, d_model=64, n_heads=4, vocab=512, seq=32, cls_seq=16, batch=2, prompt=8, new=8,
            beam_batch=2, beam_src=8, beam_new=8, repeats=2)


@dataclass
class Record:
    """One measurement; ratio is ours/peer (higher is better), peer/ours for memory."""

    name: str
    ours: float
    peer: float | None
    unit: str
    ratio: float | None
    ours_min: float | None = None
    ours_max: float | None = None
    peer_min: float | None = None
    peer_max: float | None = None
    note: str = ""


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"


class Bench:
    """Device, sizes, timing and memory helpers, and the records collected so far."""

    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        self.s, self.device = sizes, device
        self.records: list[Record] = []
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def rate(self, run: Run) -> float:
        self.sync()
        start = time.perf_counter()
        n = run()
        self.sync()
        return n / (time.perf_counter() - start)

    def compare(self, name: str, unit: str, ours: Run, peer: Run, note: str = "") -> Record:
        """Warm up both, then time them alternately, swapping who goes first every repeat (cancels drift)."""
        for _ in range(self.s.warmup):
            ours(), peer()
        rates: dict[str, list[float]] = {"ours": [], "peer": []}
        for i in range(self.s.repeats):
            for key, run in ((("ours", ours), ("peer", peer)) if i % 2 == 0 else (("peer", peer), ("ours", ours))):
                rates[key].append(self.rate(run))
        o, p = statistics.median(rates["ours"]), statistics.median(rates["peer"])
        return self.add(Record(name, o, p, unit, o / p, min(rates["ours"]), max(rates["ours"]), min(rates["peer"]),
                               max(rates["peer"]), note))

    def compare_memory(self, name: str, ours: Run, peer: Run) -> Record | None:
        """Peak memory of one more call each (after `compare` warmed them up, so optimizer state exists)."""
        if self.device.type != "cuda" and not Path("/proc/self/statm").is_file():
            self.log(f"{name}: skipped, this OS has no /proc/self/statm to read the resident set from")
            return None
        o, p = self.peak_mib(ours), self.peak_mib(peer)
        method = "max_memory_allocated above the level at entry" if self.device.type == "cuda" else \
            "peak RSS above the level at entry, sampled every 0.5 ms, after malloc_trim"
        return self.add(Record(name, o, p, "MiB", p / o if o else None, note=method))

    def peak_mib(self, run: Run) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return _rss_peak_mib(run)

    def add(self, record: Record) -> Record:
        self.records.append(record)
        peer = "" if record.peer is None else f" peer {record.peer:,.1f},"
        self.log(f"{record.name}: ours {record.ours:,.1f},{peer} {record.unit}, ratio {fmt(record.ratio)}")
        return record

    def resized(self, **sizes: int) -> Bench:
        """The same bench (records, clock) with other repeat counts."""
        other = Bench(replace(self.s, **sizes), self.device)
        other.records, other.start = self.records, self.start
        return other


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak_mib(run: Run) -> float:
    """CPU has no allocator statistics for tensors, so watch the process's resident set from a thread while
    `run` executes (torch ops release the GIL). glibc keeps freed memory for reuse, which would hide a second
    model's allocations behind the first one's leftovers: malloc_trim returns it to the OS before the baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass                                  # not glibc: the figure may read low
    base = peak = _rss_bytes()
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(5e-4)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run()
    done.set()
    watcher.join()
    return (max(peak, _rss_bytes()) - base) / 2 ** 20
