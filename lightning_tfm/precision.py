"""What the machine computes natively, read at run time (the CPUs this runs on differ from day to day): bf16
matmuls (CUDA with bf16, or a CPU with AMX-BF16 or AVX512-BF16; elsewhere bf16 is emulated and slower than
fp32), and the training precision `auto_precision` picks from that."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")     # /proc/cpuinfo flags of CPUs with bf16 dot products
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (Linux); empty where that file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


@dataclass(frozen=True)
class Native:
    """Whether a device runs a number format natively, and why, in words for the log."""

    bf16: bool
    reason: str


def native_bf16(accelerator: str, flags: frozenset[str] | None = None) -> Native:
    """bf16 on `accelerator` ("cpu", "cuda", "gpu" or "auto"): native or emulated, with the reason."""
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Native(True, f"{torch.cuda.get_device_name()} computes bf16 natively")
        return Native(False, "this GPU does not support bf16")
    flags = cpu_flags() if flags is None else flags
    have = [f for f in BF16_FLAGS if f in flags]
    cpu = cpu_model()
    if have:
        return Native(True, f"the CPU ({cpu}) has {' and '.join(have)}")
    return Native(False, f"the CPU ({cpu}) has neither {' nor '.join(BF16_FLAGS)}: bf16 would be emulated, slower "
                         "than fp32")


def auto_precision(accelerator: str, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The Trainer precision to train with: "bf16-mixed" where bf16 is native, else "32-true"; and why."""
    native = native_bf16(accelerator, flags)
    return ("bf16-mixed" if native.bf16 else "32-true"), native.reason
