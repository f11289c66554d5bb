"""Matplotlib without a display, and PNG files written whole: every picture command draws on a figure from
`figure` and hands it to `save_png`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")        # no display on servers; must come before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DPI = 100


def figure(width: float, height: float, **subplots: Any) -> tuple[Figure, Any]:
    """A figure of width x height inches (at `DPI`, so width * DPI pixels) and its axes (`plt.subplots`)."""
    fig, axes = plt.subplots(figsize=(width, height), dpi=DPI, **subplots)
    return fig, axes


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` as PNG through a temporary file renamed over it, and close it. The size is the
    figure's, width x height inches at `DPI`: no tight cropping, so callers can rely on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
