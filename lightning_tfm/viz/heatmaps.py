"""Attention maps as heatmaps with the tokens on the axes: one panel per head in a grid, keys across and
queries down, brighter for more weight, blank where the weight is exactly zero (a pair the block does not
compute)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from tokenizers import Tokenizer
from torch import Tensor

from lightning_tfm.viz.canvas import figure, save_png

MAX_LABELS = 64          # beyond this many tokens an axis labels every k-th one
_CMAP = matplotlib.colormaps["viridis"].with_extremes(bad="white")


def token_labels(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable labels of token ids: word-start markers dropped (SentencePiece's ▁, byte-level BPE's Ġ), a
    label that would be blank written as its escape."""
    labels = []
    for i in ids:
        token = tokenizer.id_to_token(int(i)) or f"<{i}>"
        token = token.replace("▁", "").replace("Ġ", "")
        if not token.strip():
            token = token.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or "␣"
        labels.append(token)
    return labels


def panel_inches(n_queries: int, n_keys: int) -> tuple[float, float]:
    """Width and height of one head's panel: room for a token label per row and column, within bounds."""
    return (min(max(1.5 + 0.16 * n_keys, 3.0), 14.0), min(max(1.2 + 0.16 * n_queries, 2.6), 14.0))


def draw_heads(maps: Tensor, queries: Sequence[str], keys: Sequence[str], title: str, path: str | os.PathLike,
               head_names: Sequence[str] | None = None, columns: int = 4) -> Path:
    """One PNG with a grid of heads.

    Args:
        maps: (heads, T, S) weights of one example.
        queries: T labels of the rows; keys: S labels of the columns.
        title: the figure's title (layer, model, text).
        path: the PNG to write.
        head_names: a title per panel; None numbers them "head 0", "head 1", ...
        columns: panels per row.
    """
    n, T, S = maps.shape
    if len(queries) != T or len(keys) != S:
        raise ValueError(f"draw_heads: maps of {T} x {S} but {len(queries)} query and {len(keys)} key labels")
    head_names = head_names or [f"head {h}" for h in range(n)]
    cols = min(n, columns)
    rows = math.ceil(n / cols)
    width, height = panel_inches(T, S)
    fig, axes = figure(width * cols, height * rows + 0.5, nrows=rows, ncols=cols, squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= n:
            ax.axis("off")
            continue
        weights = maps[h].float().numpy()
        # a pair the block never computes (masked, padded, outside a variant's pattern) has weight exactly 0:
        # drawn blank, so a variant's sparsity shows apart from small weights
        image = ax.imshow(np.ma.masked_equal(weights, 0.0), cmap=_CMAP, vmin=min(0.0, float(weights.min())),
                          aspect="auto", interpolation="nearest")
        ax.set_title(head_names[h], fontsize=9)
        _label(ax, queries, keys)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (height * rows + 0.5)))
    return save_png(fig, path)


def _label(ax, queries: Sequence[str], keys: Sequence[str]) -> None:
    for axis, labels, rotation in ((ax.xaxis, keys, 90), (ax.yaxis, queries, 0)):
        step = max(1, math.ceil(len(labels) / MAX_LABELS))
        ticks = list(range(0, len(labels), step))
        axis.set_ticks(ticks)
        axis.set_ticklabels([labels[i] for i in ticks], fontsize=7, rotation=rotation)
    ax.set_xlabel("keys", fontsize=8)
    ax.set_ylabel("queries", fontsize=8)
