"""Position information: sinusoidal (paper §3.5), learned absolute (GPT, BERT), rotary (RoPE, Su et al. 2021)
and ALiBi (Press et al. 2022).

Absolute schemes add a (T, C) table to the token embeddings (`forward`). Relative schemes leave the
embeddings alone and act inside self-attention: rotary rotates queries and keys (`rotary`), ALiBi adds a
per-head distance penalty to the attention logits (`position_bias`, a function of query and key positions, so
a sparse attention evaluates it only on the pairs it computes). A model asks its one `Positions` for all three
and hands the results to its layers; the class flags `rotates` and `biases` let it check, at construction,
that its attention blocks support them.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar, Literal

import torch
from torch import Tensor, nn


class Positions(nn.Module):
    """Base of the position schemes; a model builds one from a factory `(d_model, n_heads) -> Positions`.

    Args:
        d_model: width of the embeddings.
        n_heads: query heads of self-attention (used by the relative schemes).
        max_len: longest sequence the scheme is prepared for.
    """

    rotates: ClassVar[bool] = False      # rotates queries and keys inside attention
    biases: ClassVar[bool] = False       # adds a bias to the attention logits

    def __init__(self, d_model: int, n_heads: int, max_len: int = 4096) -> None:
        super().__init__()
        if max_len < 1:
            raise ValueError(f"{type(self).__name__}: max_len={max_len}, must be >= 1")
        self.d_model, self.n_heads, self.max_len = d_model, n_heads, max_len

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Add absolute positions offset..offset+T-1 to embeddings x (B, T, C); relative schemes return x."""
        return x

    def rotary(self, length: int, offset: int = 0) -> tuple[Tensor, Tensor] | None:
        """(cos, sin), each (T, D), for positions offset..offset+T-1, or None if the scheme does not rotate."""
        return None

    def position_bias(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        """A function (q_pos (T,), k_pos (S,)) -> (H, T, S) of logits added before the softmax, or None."""
        return None


class NoPositions(Positions):
    """No position information: the model sees its input as a bag of tokens.

    Self-attention is permutation-equivariant, so without positions an encoder's pooled output depends only on
    which tokens occur. Masked LM then learns which words occur together (CBOW with the whole text as the
    window, Mikolov et al. 2013), that is topics, and learns them in a few hundred steps
    (tests/test_pretraining_helps.py).

    Args:
        d_model: unused; part of the common factory signature.
        n_heads: unused; part of the common factory signature.
        max_len: longest sequence the model accepts.
    """


class SinusoidalPositions(Positions):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...) (paper §3.5).

    Args:
        d_model: width of the embeddings (even).
        n_heads: unused; part of the common factory signature.
        max_len: table length precomputed; longer inputs extend it on the fly.
        layout: "interleaved" is the paper's formula (sin on even, cos on odd dimensions); "split" puts all
            sines first and all cosines after, as tensor2tensor, fairseq and Marian do. Same information,
            permuted dimensions, so a converted checkpoint must keep the layout it was trained with.
    """

    def __init__(self, d_model: int, n_heads: int = 1, max_len: int = 4096,
                 layout: Literal["interleaved", "split"] = "interleaved") -> None:
        super().__init__(d_model, n_heads, max_len)
        if d_model % 2:
            raise ValueError(f"SinusoidalPositions: d_model={d_model}, must be even")
        if layout not in ("interleaved", "split"):
            raise ValueError(f"SinusoidalPositions: layout={layout!r}, must be 'interleaved' or 'split'")
        self.layout = layout
        self.register_buffer("table", self._table(max_len), persistent=False)

    def _table(self, length: int) -> Tensor:
        pos = torch.arange(length, dtype=torch.float64)[:, None]                  # (L, 1)
        inv_freq = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float64)
                             * (-math.log(10000.0) / self.d_model))                # (C/2,)
        angles = pos * inv_freq                                                     # (L, C/2)
        if self.layout == "split":
            table = torch.cat([angles.sin(), angles.cos()], dim=-1)
        else:
            table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)   # sin, cos, sin, cos...
        return table.float()                                                        # (L, C)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.shape[1]
        if end > self.table.shape[0]:
            self.table = self._table(max(end, 2 * self.table.shape[0])).to(self.table.device)
        return x + self.table[offset:end].to(x.dtype)


class LearnedPositions(Positions):
    """A trained table of max_len position vectors (GPT, BERT).

    Args:
        d_model: width of the embeddings.
        n_heads: unused; part of the common factory signature.
        max_len: number of positions; longer inputs are an error.
    """

    def __init__(self, d_model: int, n_heads: int = 1, max_len: int = 1024) -> None:
        super().__init__(d_model, n_heads, max_len)
        self.table = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.table.weight, std=0.02)      # GPT-2's scale, matching the token embeddings

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        end = offset + x.shape[1]
        if end > self.max_len:
            raise ValueError(f"LearnedPositions: position {end - 1} is beyond max_len={self.max_len}; "
                             "truncate the input or build the model with a larger max_len")
        return x + self.table.weight[offset:end]


def rotate_half(x: Tensor) -> Tensor:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1], the 90-degree turn of each (i, i + D/2) pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries or keys x (B, H, T, D) by position; cos and sin are (T, D)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class RotaryPositions(Positions):
    """Rotary position embedding (Su et al. 2021, RoFormer): query and key pairs of dimensions are rotated
    by an angle proportional to the position, so their dot product depends only on the offset between them.

    Pairs dimension i with i + D/2 (the GPT-NeoX / LLaMA arrangement).

    Args:
        d_model: width of the residual stream; the head dimension is d_model / n_heads (even).
        n_heads: query heads.
        max_len: positions precomputed; longer inputs extend the table on the fly.
        base: the wavelength base theta (10000 in RoFormer).
    """

    rotates = True

    def __init__(self, d_model: int, n_heads: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__(d_model, n_heads, max_len)
        if n_heads < 1 or d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"RotaryPositions: d_model={d_model} / n_heads={n_heads} must give an even "
                             "head dimension")
        self.head_dim, self.base = d_model // n_heads, base
        cos, sin = self._tables(max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, length: int) -> tuple[Tensor, Tensor]:
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq   # (L, D/2)
        angles = torch.cat([angles, angles], dim=-1)                               # (L, D)
        return angles.cos().float(), angles.sin().float()

    def rotary(self, length: int, offset: int = 0) -> tuple[Tensor, Tensor]:
        end = offset + length
        if end > self.cos.shape[0]:
            cos, sin = self._tables(max(end, 2 * self.cos.shape[0]))
            self.cos, self.sin = cos.to(self.cos.device), sin.to(self.sin.device)
        return self.cos[offset:end], self.sin[offset:end]


def alibi_slopes(n_heads: int) -> Tensor:
    """Head slopes of ALiBi: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of two; otherwise
    those of the next lower power of two followed by every other slope of the next higher one (Press et al.)."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    lower = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(lower) + powers(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes)


class ALiBiPositions(Positions):
    """Attention with Linear Biases (Press et al. 2022): no position embeddings; head h adds
    -slope_h * |i - j| to the logit of query i for key j, which extrapolates to longer inputs.

    Causal models see only j <= i, where this is the paper's bias; bidirectional ones get the symmetric form.

    Args:
        d_model: width of the embeddings (unused).
        n_heads: query heads; each gets its own slope.
        max_len: unused bound; ALiBi has no table.
    """

    biases = True

    def __init__(self, d_model: int, n_heads: int, max_len: int = 4096) -> None:
        super().__init__(d_model, n_heads, max_len)
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def position_bias(self) -> Callable[[Tensor, Tensor], Tensor]:
        return self.bias

    def bias(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """(T,) query and (S,) key positions -> (H, T, S) logits -slope_h * |i - j|."""
        distance = (q_pos[:, None] - k_pos[None, :]).abs().to(self.slopes.device)    # (T, S)
        return -self.slopes[:, None, None] * distance                                 # (H, T, S)
