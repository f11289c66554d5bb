"""Checks and helpers the DataModules share when they read their splits: the file behind a `data.<key>` path,
and a seeded validation split carved from the training rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lightning_tfm.data.compressed import find_file


def check_file(key: str, path: str) -> Path:
    """The file to read for `data.<key>`: `path`, or its one compressed sibling `path.gz`/`.xz`/`.zst` when
    `path` does not exist (`compressed.find_file`); FileNotFoundError naming the config key when neither is."""
    found = find_file(path)
    if not found.is_file():
        raise FileNotFoundError(f"data.{key}={path} does not exist")
    return found


def carve_validation(rows: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val): a random `fraction` of `rows` (at least one, drawn with `seed`) held out as validation,
    both in file order."""
    n_val = max(1, round(len(rows) * fraction))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]
