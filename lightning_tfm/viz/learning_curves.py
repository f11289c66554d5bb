"""Learning curves of one or more runs overlaid, read from Lightning's CSVLogger files
(`RUN/logs/version_N/metrics.csv`, as the configs set the logger up). A run resumed from its last checkpoint
writes a new version whose steps go on from the previous one's; such versions are joined, while a version that
starts again from step 0 begins a fresh run and only the newest is drawn."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_tfm.viz.canvas import figure, save_png

PANEL = (5.5, 4.2)            # inches of one metric's panel


@dataclass
class Run:
    """The logged values of one run.

    Attributes:
        label: its name in the legend.
        files: the metrics.csv files read, oldest first.
        rows: one dict per logged row, column -> value; a missing value is absent (not NaN).
    """

    label: str
    files: list[Path]
    rows: list[dict[str, float]]

    @property
    def metrics(self) -> list[str]:
        """Every column logged at least once, except the axes."""
        return sorted({name for row in self.rows for name in row} - {"step", "epoch"})


def metrics_files(run: str | os.PathLike) -> list[Path]:
    """The metrics.csv files of a run directory (or the file itself), oldest version first.

    Raises:
        FileNotFoundError: no such file, or no metrics.csv under the directory.
    """
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise FileNotFoundError(f"{run} does not exist; give a run directory or a metrics.csv file")
    found = [path for pattern in ("metrics.csv", "version_*/metrics.csv", "logs/version_*/metrics.csv")
             for path in run.glob(pattern)]
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {run} (looked for metrics.csv, version_*/metrics.csv and "
                                "logs/version_*/metrics.csv, as CSVLogger writes them)")
    return sorted(found, key=_version)


def _version(path: Path) -> tuple[int, str]:
    match = re.fullmatch(r"version_(\d+)", path.parent.name)
    return (int(match.group(1)) if match else -1, str(path))


def read_rows(path: Path) -> list[dict[str, float]]:
    """The rows of one metrics.csv, empty cells left out. Raises ValueError naming path:line on a bad cell."""
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise ValueError(f"{path} is not a CSVLogger metrics file: no 'step' column in its header")
        for line, record in enumerate(reader, start=2):
            try:
                rows.append({name: float(value) for name, value in record.items() if name and value not in ("", None)})
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from e
    return rows


def read_run(run: str | os.PathLike, label: str | None = None) -> Run:
    """A run's rows: its newest version, joined with the older versions it resumed (each ending before the next
    begins), ordered by step."""
    files = metrics_files(run)
    tables = [read_rows(path) for path in files]
    keep = len(tables) - 1
    while keep > 0 and _resumed(tables[keep - 1], tables[keep]):
        keep -= 1
    rows = sorted((row for table in tables[keep:] for row in table), key=lambda row: row.get("step", 0.0))
    return Run(label or _label(Path(run)), files[keep:], rows)


def _resumed(earlier: list[dict[str, float]], later: list[dict[str, float]]) -> bool:
    """Whether `later` goes on from `earlier`: it begins after the last step `earlier` logged."""
    before = [row["step"] for row in earlier if "step" in row]
    after = [row["step"] for row in later if "step" in row]
    return bool(before and after) and max(before) < min(after)


def _label(run: Path) -> str:
    """The run directory's name: RUN for RUN/logs/version_0/metrics.csv, RUN itself for a directory."""
    if run.is_dir():
        run = run.resolve()
        return run.parent.name if run.name == "logs" else run.name
    parts = run.resolve().parts
    return parts[-4] if len(parts) >= 4 and parts[-3] == "logs" else run.parent.name


def default_metrics(runs: Sequence[Run]) -> list[str]:
    """Every logged column named train_*loss or val_*loss, in any of the runs."""
    names = {name for run in runs for name in run.metrics}
    return sorted(name for name in names if name.startswith(("train_", "val_")) and name.endswith("loss"))


def check_metrics(runs: Sequence[Run], metrics: Sequence[str]) -> None:
    """Raise ValueError for a metric no run logged, listing those there are."""
    for metric in metrics:
        if not any(metric in run.metrics for run in runs):
            available = sorted({name for run in runs for name in run.metrics})
            files = ", ".join(str(path) for run in runs for path in run.files)
            raise ValueError(f"no metric {metric!r} in {files}; available: {', '.join(available)}")


def series(run: Run, metric: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, value) of a metric in logging order; with x "epoch", the mean per epoch."""
    points = [(row[x], row[metric]) for row in run.rows if metric in row and x in row]
    if x == "epoch":
        by_epoch: dict[float, list[float]] = {}
        for epoch, value in points:
            by_epoch.setdefault(epoch, []).append(value)
        points = [(epoch, sum(values) / len(values)) for epoch, values in sorted(by_epoch.items())]
    return [p[0] for p in points], [p[1] for p in points]


def draw_curves(runs: Sequence[Run], metrics: Sequence[str], path: str | os.PathLike, x: str = "step") -> Path:
    """One panel per metric, the runs overlaid in it, written to `path`.

    Args:
        runs: the runs (`read_run`).
        metrics: columns to draw; each must be logged by some run.
        path: the PNG to write.
        x: "step" or "epoch" (then the mean of each epoch).
    """
    if x not in ("step", "epoch"):
        raise ValueError(f"x={x!r}: choose 'step' or 'epoch'")
    if not metrics:
        raise ValueError("no metric to draw: the runs log no train_*loss or val_*loss column; name one with --metric")
    check_metrics(runs, metrics)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = figure(PANEL[0] * cols, PANEL[1] * rows, nrows=rows, ncols=cols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(metrics):
            ax.axis("off")
            continue
        for run in runs:
            xs, ys = series(run, metrics[index], x)
            if xs:
                ax.plot(xs, ys, label=run.label, linewidth=1.3, marker="." if len(xs) < 30 else None)
        ax.set_title(metrics[index], fontsize=10)
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)
