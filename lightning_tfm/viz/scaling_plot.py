"""The scaling benchmark (scripts/scaling.py) as log-log plots: the time of one forward + backward of one attention
block, and the peak memory it adds, against the sequence length, one line per variant; causal variants solid with
circles, bidirectional ones dashed with squares, full attention in black. Reads the benchmark's JSON:
{"records": [{"variant", "T", "seconds", "peak_mib", "causal"?}, ...], "summary": {...}}."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

from lightning_tfm.blocks import attention_variants
from lightning_tfm.viz.canvas import figure, save_png

_FIELDS = ("variant", "T", "seconds", "peak_mib")
SIZE = (12.0, 4.5)            # inches
TITLE = "One attention block (solid: causal, dashed: bidirectional), batch 1"


def read_scaling(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a scaling JSON file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or no records with the benchmark's fields.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write it with python scripts/scaling.py --out "
                                f"{path.with_suffix('')}")
    try:
        records = json.loads(path.read_text(encoding="utf-8")).get("records")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a scaling results file (a JSON object with 'records'): {e}") from e
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} holds no records; expected {{'records': [{{{', '.join(_FIELDS)}}}, ...]}}")
    for index, record in enumerate(records):
        missing = [name for name in _FIELDS if not isinstance(record, dict) or name not in record]
        if missing:
            raise ValueError(f"{path}: records[{index}] lacks {missing}; each record needs {list(_FIELDS)}")
    return records


def is_causal(record: dict[str, Any]) -> bool:
    """Whether a record was measured causal: its "causal" field, or, in files written before the field was, all
    variants but "full (bidir.)" and those whose class is bidirectional only (supports.causal False)."""
    if "causal" in record:
        return bool(record["causal"])
    name = record["variant"]
    if "bidir" in name:
        return False
    key = name.replace("_", "").replace(" ", "").lower()
    for class_name in attention_variants.__all__:
        cls = getattr(attention_variants, class_name)
        short = class_name.lower().removesuffix("attention")
        if isinstance(cls, type) and hasattr(cls, "supports") and short and key.startswith(short):
            return cls.supports.causal
    return True


def draw_scaling(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = TITLE) -> Path:
    """Time and peak memory against T, log-log, one line per variant, written to `path`.

    Args:
        records: the benchmark's records (`read_scaling`), one per variant and length.
        path: the PNG to write.
        title: the figure's title (the script adds its block's sizes).
    """
    fig, axes = figure(*SIZE, ncols=2)
    colors = matplotlib.colormaps["tab20"].colors
    for index, name in enumerate(dict.fromkeys(r["variant"] for r in records)):
        rows = sorted((r for r in records if r["variant"] == name), key=lambda r: r["T"])
        causal, full = is_causal(rows[0]), name.startswith("full")
        style = dict(marker="o" if causal else "s", linestyle="-" if causal else "--",
                     linewidth=2.5 if full else 1.2, color="black" if full else colors[index % len(colors)])
        lengths = [r["T"] for r in rows]
        axes[0].loglog(lengths, [r["seconds"] for r in rows], label=name, **style)
        axes[1].loglog(lengths, [max(r["peak_mib"], 0.1) for r in rows], label=name, **style)   # log needs > 0
    for ax, what in zip(axes, ("seconds per forward + backward", "peak memory added (MiB)")):
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)
