"""Which keys each query may see, drawn from the blocks that compute it, never by hand: a block is built and
placed (`LayerPlace`), run in eval mode with `keep_weights` on a seeded random input, and one head's weights are
drawn as a query x key grid, black where the weight is not 0 (or |weight| on a log colour scale). Softmax weights
are >= 0; a block that mixes keys before attending (Linformer) keeps effective weights that may be negative. The
catalogue holds the variants of the efficient-attention literature at sizes scaled to the picture's length, as
configs/variants/*.yaml scale them to a 256-token context."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import Tensor

from lightning_tfm.blocks import attention_variants as av
from lightning_tfm.blocks.attention import Attention, LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.viz.canvas import figure, save_png

NamedBlock = tuple[str, Attention]      # (panel title, a placed block)
PANEL = (3.4, 3.8)                      # inches of one panel, width and height
HEADING = 0.5                           # inches above the panels for the figure's title


@dataclass
class Panel:
    """One block's picture.

    Attributes:
        title: class name and key arguments.
        weights: (T, S) attention weights of one head; S > T where a block adds keys (persistent memory).
        causal: whether the block was placed in a causal stack.
    """

    title: str
    weights: Tensor
    causal: bool


def build_block(cls: type[Attention], init_args: dict[str, Any], d_model: int, n_heads: int, place: LayerPlace,
                seed: int = 0) -> Attention:
    """cls(d_model, n_heads, place, **init_args) with seeded initial weights, the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(d_model, n_heads, place, **init_args)


def attention_weights(block: Attention, length: int, head: int = 0, seed: int = 0) -> Tensor:
    """(T, S) weights of `head` for one seeded random input of `length` positions, causal as the block is placed.

    Raises:
        ValueError: the block cannot keep its weights ("... cannot keep attention weights"), or no such head.
    """
    if not 0 <= head < block.n_heads:
        raise ValueError(f"head={head}, but {type(block).__name__} has heads 0..{block.n_heads - 1}")
    block.eval()
    block.keep_weights = True
    x = torch.randn(1, length, block.d_model, generator=torch.Generator().manual_seed(seed))   # (B=1, T, C)
    with torch.no_grad():
        block(x, mask=AttentionMask(causal=block.place.causal))
    return block.weights[0, head].float()                                                     # (T, S)


def allowed_keys(block: Attention, length: int, head: int = 0, seed: int = 0) -> Tensor:
    """(T, S) bool, True where a query may see a key: its weight is not 0 (at these sizes and random weights no
    softmax weight underflows to 0)."""
    return attention_weights(block, length, head, seed) != 0


def panels(blocks: Iterable[NamedBlock], head: int = 0, seed: int = 0) -> tuple[list[Panel], list[str]]:
    """The panels of the blocks that keep weights, each drawn at the length it is placed for (`place.max_len`),
    and a note for each block skipped because it cannot keep weights."""
    drawn, skipped = [], []
    for title, block in blocks:
        try:
            weights = attention_weights(block, block.place.max_len, head, seed)
        except ValueError as e:
            if "cannot keep attention weights" not in str(e):
                raise
            skipped.append(f"{title.splitlines()[0]}: skipped, {e}")
            continue
        drawn.append(Panel(title, weights, block.place.causal))
    return drawn, skipped


def catalogue(length: int) -> list[tuple[type[Attention], dict[str, Any], bool]]:
    """(class, init_args, causal) of every variant, sizes scaled to `length` as the configs scale them to 256
    (window 1/4, blocks 1/8, strides sqrt(T)); causal where the class can be, bidirectional otherwise."""
    root, eighth, quarter = max(2, round(math.sqrt(length))), max(2, length // 8), max(2, length // 4)
    variants = [
        (MultiHeadAttention, {}),
        (av.SlidingWindowAttention, {"window": quarter}),
        (av.StridedAttention, {"stride": root}),
        (av.BandStridedAttention, {"window": root, "stride": root}),
        (av.BlockLocalAttention, {"block": eighth}),
        (av.BlockGlobalAttention, {"block": eighth, "n_global": max(1, length // 32)}),
        (av.DilatedWindowAttention, {"window": eighth, "dilation": 4}),
        # spans a quarter of max_span, where the configs start from the ramp alone (init_span 0)
        (av.AdaptiveSpanAttention, {"max_span": length, "ramp": eighth, "init_span": 0.25}),
        (av.RoutingAttention, {"n_clusters": root, "window": eighth}),
        (av.PersistentMemoryAttention, {"n_memory": quarter}),
        (av.LinearAttention, {}),
        (av.PerformerAttention, {"n_features": 16}),
        (av.MemoryCompressedAttention, {"compression": 4}),
    ]
    bidirectional = [
        (MultiHeadAttention, {}),        # the reference for the bidirectional-only variants after it
        (av.ClusteredAttention, {"n_clusters": eighth}),
        (av.LinformerAttention, {"projected_len": quarter}),
        (av.InducingPointAttention, {"n_inducing": eighth}),
        (av.PoolingformerAttention, {"window": max(1, length // 32), "pool_window": quarter, "pool": 4}),
    ]
    return ([(cls, args, cls.supports.causal) for cls, args in variants]
            + [(cls, args, False) for cls, args in bidirectional])


def variant_blocks(length: int, d_model: int = 64, n_heads: int = 4, seed: int = 0) -> Iterator[NamedBlock]:
    """Every catalogued variant, built and placed for `length` positions, with its panel title."""
    for cls, init_args, causal in catalogue(length):
        place = LayerPlace(causal=causal, max_len=length)
        yield title(cls, init_args, causal), build_block(cls, init_args, d_model, n_heads, place, seed)


def title(cls: type, init_args: dict[str, Any], causal: bool, extra: str = "") -> str:
    """"ClassName(arg=value, ...)" over a second line saying causal or bidirectional (and `extra`)."""
    args = ", ".join(f"{name}={value}" for name, value in init_args.items())
    second = "causal" if causal else "bidirectional"
    return f"{cls.__name__}({args})\n{extra + ', ' if extra else ''}{second}"


def draw_patterns(drawn: list[Panel], path: str | os.PathLike, weights: bool = False, columns: int = 4,
                  heading: str = "") -> Path:
    """A grid of panels, queries down and keys across, and write it to `path`.

    Args:
        drawn: the panels (`panels`).
        path: the PNG to write.
        weights: draw |weight| on a log colour scale instead of black (weight not 0) and white.
        columns: panels per row.
        heading: the figure's title.
    """
    if not drawn:
        raise ValueError("no attention pattern to draw: every block was skipped")
    cols = min(columns, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    height = PANEL[1] * rows + HEADING
    fig, axes = figure(PANEL[0] * cols, height, nrows=rows, ncols=cols, squeeze=False, layout="constrained")
    for ax, panel in zip_longest(axes.flat, drawn):
        if panel is None:
            ax.axis("off")
        else:
            _draw_panel(fig, ax, panel, weights)
    if not heading:
        heading = ("|attention weight| of each query (rows) for each key" if weights
                   else "Which keys each query may see (black: weight not 0)")
    fig.suptitle(textwrap.fill(heading, int(9 * PANEL[0] * cols)), fontsize=10)   # about 9 characters an inch
    return save_png(fig, path)


def _draw_panel(fig: Figure, ax: Axes, panel: Panel, weights: bool) -> None:
    grid = panel.weights.abs().numpy()                                    # (T, S)
    if weights:
        positive = grid[grid > 0]
        top = float(positive.max()) if positive.size else 1.0
        low = min(float(positive.min()) if positive.size else top, top / 10)
        image = ax.imshow(np.ma.masked_less_equal(grid, 0), cmap="viridis", norm=LogNorm(low, top),
                          interpolation="nearest")
        ax.set_facecolor("white")                                         # keys never seen stay white
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(which="both", labelsize=7)
    else:
        ax.imshow(grid > 0, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    T, S = grid.shape
    ax.set_title("\n".join(textwrap.fill(line, 44) for line in panel.title.splitlines()), fontsize=8)
    ax.set_xlabel("key" if S == T else f"key ({S} columns)", fontsize=8)
    ax.set_ylabel("query", fontsize=8)
    ax.tick_params(labelsize=7)


def draw_variant_patterns(path: str | os.PathLike, length: int = 64, weights: bool = False, head: int = 0,
                          seed: int = 0) -> Path:
    """Every catalogued variant's pattern in one PNG (those that cannot keep weights left out)."""
    drawn, _ = panels(variant_blocks(length, seed=seed), head, seed)
    return draw_patterns(drawn, path, weights)
