"""Pictures of the position schemes, computed by the classes of `blocks/positions.py`, three panels a scheme:
sinusoidal (the table, a few of its dimensions, the dot product of one position with every other; paper §3.5),
learned (the same, of a checkpoint's trained table), rotary (the cos table, a few frequencies, and the score of a
rotated constant query/key pair against their distance; RoFormer §3.4.3) and ALiBi (the bias of the steepest and
the gentlest head, and every head's bias against distance; Press et al. 2022)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from lightning_tfm.blocks.positions import ALiBiPositions, RotaryPositions, SinusoidalPositions, apply_rotary
from lightning_tfm.checkpoints import load_checkpoint
from lightning_tfm.viz.canvas import figure, save_png

KINDS = ("sinusoidal", "learned", "rotary", "alibi")
ROW = (15.0, 3.6)                                            # inches of one scheme's row of three panels
_LEARNED_KEY = re.compile(r"positions(\.table)?\.weight$")    # LearnedPositions keeps its table in `.table`


def sinusoid_table(length: int, d_model: int) -> Tensor:
    """(T, C) sinusoids of positions 0..T-1, as `SinusoidalPositions` adds them."""
    return SinusoidalPositions(d_model, max_len=length).table


def learned_table(checkpoint: str | os.PathLike) -> tuple[str, Tensor]:
    """(state_dict key, (max_len, C) table) of the first learned position table in a Lightning checkpoint.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a safe checkpoint, or no learned positions (the message names the scheme it has).
    """
    loaded = load_checkpoint(checkpoint)
    state = loaded.get("state_dict") or {}
    keys = [key for key in state if _LEARNED_KEY.search(key)]
    if not keys:
        raise ValueError(f"checkpoint {checkpoint} has no learned position table (no state_dict key ending in "
                         f"positions.weight or positions.table.weight): its model uses "
                         f"{_position_scheme(loaded.get('hyper_parameters'))}")
    return keys[0], state[keys[0]].float()


def _position_scheme(hparams: Any) -> str:
    """The class named by the first `positions` entry of the stored hyperparameters, or what is known."""
    if isinstance(hparams, dict):
        for key, value in hparams.items():
            if key == "positions":
                name = value.get("class_path") if isinstance(value, dict) else value
                return str(name).rsplit(".", 1)[-1]
            found = _position_scheme(value)
            if found != "an unrecorded position scheme":
                return found
    return "an unrecorded position scheme"


def rotary_scores(length: int, d_model: int, n_heads: int) -> Tensor:
    """(T,) score q_m . k_n / D of a constant query and key (all ones) rotated to positions m and n = m - d,
    for distances d = 0..T-1: it depends on d alone, 1 at d = 0."""
    rope = RotaryPositions(d_model, n_heads, max_len=length)
    ones = torch.ones(1, 1, length, rope.head_dim)                                    # (B=1, H=1, T, D)
    rotated = apply_rotary(ones, *rope.rotary(length))[0, 0]                          # (T, D)
    return rotated.flip(0) @ rotated[-1] / rope.head_dim                              # index d: key at T-1-d


def alibi_bias(length: int, n_heads: int) -> Tensor:
    """(H, T, T) ALiBi logits of queries and keys 0..T-1 (the symmetric form; causal models use j <= i)."""
    positions = torch.arange(length)
    return ALiBiPositions(d_model=1, n_heads=n_heads).bias(positions, positions)


def draw_positions(path: str | os.PathLike, kinds: Sequence[str] = ("sinusoidal", "rotary", "alibi"),
                   length: int = 128, d_model: int = 128, n_heads: int = 8,
                   checkpoint: str | os.PathLike | None = None) -> Path:
    """One row of three panels per scheme, written to `path`.

    Args:
        path: the PNG to write.
        kinds: schemes among `KINDS`, one row each.
        length: positions drawn, T.
        d_model: width of the sinusoids and of the rotary model (head dimension d_model / n_heads, even).
        n_heads: heads of the rotary model and of ALiBi.
        checkpoint: a Lightning checkpoint with learned positions; needed for "learned".
    """
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"position kinds {list(kinds)}: choose one or more of {list(KINDS)}")
    if length < 2 or d_model < 2 or n_heads < 1:
        raise ValueError(f"length={length}, d_model={d_model}, n_heads={n_heads}: need length, d_model >= 2, "
                         "n_heads >= 1")
    if "learned" in kinds and checkpoint is None:
        raise ValueError("learned positions are read from a trained model: give a checkpoint")
    learned = learned_table(checkpoint) if "learned" in kinds else None
    fig, axes = figure(ROW[0], ROW[1] * len(kinds), nrows=len(kinds), ncols=3, squeeze=False)
    for row, kind in zip(axes, kinds):
        if kind == "sinusoidal":
            _table_row(fig, row, sinusoid_table(length, d_model), f"sinusoidal, d_model {d_model}", cosine=False)
        elif kind == "learned":
            key, table = learned
            _table_row(fig, row, table[:length], f"learned ({key})", cosine=True)
        elif kind == "rotary":
            _rotary_row(fig, row, length, d_model, n_heads)
        else:
            _alibi_row(fig, row, length, n_heads)
    fig.tight_layout()
    return save_png(fig, path)


def _table_row(fig: Figure, row: Sequence[Axes], table: Tensor, name: str, cosine: bool) -> None:
    """An absolute table (T, C): heatmap, a few dimensions against position, similarity of the middle position."""
    T, C = table.shape
    image = row[0].imshow(table.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=row[0], fraction=0.046, pad=0.02)
    _labels(row[0], f"{name}: table", "dimension", "position")
    for dim in sorted({0, 1, C // 4, C // 2, C - 1}):
        row[1].plot(table[:, dim].numpy(), label=f"dim {dim}", linewidth=1)
    row[1].legend(fontsize=7)
    _labels(row[1], "a few dimensions", "position", "value")
    p = T // 2
    similarity = table @ table[p]                                                     # (T,)
    if cosine:
        similarity = similarity / (table.norm(dim=1) * table[p].norm()).clamp_min(1e-12)
    row[2].plot(similarity.numpy(), linewidth=1)
    row[2].axvline(p, color="grey", linestyle=":", linewidth=1)
    _labels(row[2], f"{'cosine' if cosine else 'dot-product'} similarity of position {p} with each position",
            "position", "similarity")


def _rotary_row(fig: Figure, row: Sequence[Axes], length: int, d_model: int, n_heads: int) -> None:
    rope = RotaryPositions(d_model, n_heads, max_len=length)
    cos, _ = rope.rotary(length)                                                      # (T, D)
    D = rope.head_dim
    image = row[0].imshow(cos.numpy(), aspect="auto", cmap="RdBu_r", interpolation="nearest")
    fig.colorbar(image, ax=row[0], fraction=0.046, pad=0.02)
    _labels(row[0], f"rotary, head dim {D}: cos table", "head dimension", "position")
    for pair in sorted({0, D // 8, D // 4, D // 2 - 1}):
        row[1].plot(cos[:, pair].numpy(), label=f"pair {pair}", linewidth=1)
    row[1].legend(fontsize=7)
    _labels(row[1], "cos of a few frequency pairs", "position", "cos")
    row[2].plot(rotary_scores(length, d_model, n_heads).numpy(), linewidth=1)
    _labels(row[2], "score of rotated constant q, k (q.k / D)", "relative distance m - n", "score")


def _alibi_row(fig: Figure, row: Sequence[Axes], length: int, n_heads: int) -> None:
    bias = alibi_bias(length, n_heads)                                                # (H, T, T)
    future = torch.ones(length, length, dtype=torch.bool).triu(1)                     # j > i: masked when causal
    for ax, head in ((row[0], 0), (row[1], n_heads - 1)):
        shown = bias[head].masked_fill(future, float("nan")).numpy()
        image = ax.imshow(shown, aspect="auto", cmap="viridis", vmax=0.0, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
        slope = -float(bias[head, 1, 0])
        _labels(ax, f"ALiBi head {head} (slope {slope:.3g}), causal", "key", "query")
    for head in range(n_heads):
        row[2].plot(bias[head, -1].flip(0).numpy(), label=f"head {head}", linewidth=1)   # distance 0..T-1
    row[2].legend(fontsize=6, ncol=2)
    _labels(row[2], "bias against distance, per head", "distance i - j", "bias")


def _labels(ax: Axes, title: str, x: str, y: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(x, fontsize=8)
    ax.set_ylabel(y, fontsize=8)
    ax.tick_params(labelsize=7)
