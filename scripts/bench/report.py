"""Output: the records as a plain-text table, and the JSON file (`meta`: versions, device, threads, sizes;
`records`: every `Record` as a dict)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import transformers

from .timing import Record, Sizes, fmt


def table(records: list[Record]) -> str:
    rows = [("measurement", "ours", "peer", "unit", "ratio", "ours min..max", "peer min..max")]
    for r in records:
        spread = [f"{fmt(lo)}..{fmt(hi)}" if lo is not None else "-"
                  for lo, hi in ((r.ours_min, r.ours_max), (r.peer_min, r.peer_max))]
        rows.append((r.name, fmt(r.ours), fmt(r.peer), r.unit, fmt(r.ratio), *spread))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def meta(quick: bool, tiny: bool, s: Sizes, device: torch.device) -> dict[str, Any]:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "quick": quick, "tiny": tiny, "dtype": "float32",
            "sizes": asdict(s)}


def write_json(path: Path, meta: dict[str, Any], records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in records]}, indent=1))
