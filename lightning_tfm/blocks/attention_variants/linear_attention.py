"""Linearized attention (Katharopoulos et al. 2020, "Transformers are RNNs"): a feature map phi replaces
exp(q . k), so attention is phi(q_i)^T S_i / phi(q_i)^T z_i with S_i = sum_j phi(k_j) v_j^T and z_i = sum_j phi(k_j)
over the keys query i sees. Time and memory grow linearly with the length, and a causal model decodes with the
fixed-size state (S, z) instead of a key/value cache. `PerformerAttention` (performer.py) changes only phi.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.kv_cache import DecodingState, MemoryCache
from lightning_tfm.blocks.masks import AttentionMask


def fp32(x: Tensor) -> AbstractContextManager:
    """A region where autocast leaves matmuls in float32 (feature sums must not run in bf16)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class LinearAttentionState:
    """The recurrent decoding state of one causal linear-attention block: everything the past contributes.

    Attributes:
        S: (B, H, F, D) float32, sum over the past keys of phi(k_j) v_j^T; None before the first step.
        z: (B, H, F) float32, sum over the past keys of phi(k_j); None before the first step.
    """

    def __init__(self) -> None:
        self.S: Tensor | None = None
        self.z: Tensor | None = None

    def select(self, index: Tensor) -> None:
        """Keep or repeat batch rows `index` (beam reordering)."""
        if self.S is not None:
            self.S, self.z = self.S.index_select(0, index), self.z.index_select(0, index)


class LinearAttention(MultiHeadAttention):
    """Attention with the feature map phi(x) = elu(x) + 1 in place of the softmax (Katharopoulos et al. 2020, §3.2).

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i), S_i = sum_j phi(k_j) v_j^T, z_i = sum_j phi(k_j), summed over the
    keys query i may see: all real keys (bidirectional and cross-attention), or those at positions <= i (causal).
    Padded keys get zero features, so they drop out exactly; a query that sees no key outputs zeros. There is
    no 1/sqrt(D) scale: phi replaces exp(q . k / sqrt(D)) as a whole.

    Causal training and prefill use the chunked parallel form: within a chunk of `chunk` positions the masked
    quadratic form, across chunks the (S, z) of all earlier chunks (an exclusive cumulative sum of per-chunk
    states). Memory is O(T (chunk + F D / chunk)) per head, never (T, T). Decoding keeps only (S, z)
    (`LinearAttentionState`): O(F D) memory per head whatever the length; a multi-token step runs the chunked
    form starting from the state. Features and all sums are float32, even under bf16 autocast; the output is
    cast back to the values' dtype. Grouped-query attention repeats keys and values to the query heads.

    Positions must be absolute (added to the embeddings): rotary positions and position biases are not
    supported. There are no attention weights to drop out, so `dropout` must be 0.

    `keep_weights` takes an explicit O(T S) path and keeps the implied weights
    A_ts = phi(q_t) . phi(k_s) / sum_s' phi(q_t) . phi(k_s') over the keys query t sees (causal: s <= t), the
    (B, H, T, S) matrix with out = A V exactly. Only where the keys are given: a step that reads a recurrent
    `LinearAttentionState` has no keys left to weigh and refuses `keep_weights`.

    Args:
        d_model: width of the residual stream.
        n_heads: query heads; must divide d_model.
        place: where the block sits; given by the model.
        chunk: positions per chunk of the causal parallel form, >= 1 (it trades the (chunk, chunk) blocks
            against the per-chunk (F, D) states).
        eps: floor of the denominator phi(q)^T z, > 0. It only keeps 0 / 0 from NaN for a query that sees no
            key; kept far below any real sum (Performer's key features are scaled by a constant that can be small).
        n_kv_heads: key/value heads (grouped- or multi-query attention); None means n_heads.
        dropout: must be 0 (there are no attention weights to drop); accepted for the common signature.
        bias: add biases to the projections.
    """

    supports: ClassVar[Supports] = Supports(rotary=False, position_bias=False, decoding="recurrent")

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace(), chunk: int = 64,
                 eps: float = 1e-30, n_kv_heads: int | None = None, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__(d_model, n_heads, place, n_kv_heads, dropout, bias)
        name = type(self).__name__
        if chunk < 1:
            raise ValueError(f"{name}: chunk={chunk}, must be >= 1")
        if not eps > 0:
            raise ValueError(f"{name}: eps={eps}, must be > 0")
        if dropout != 0:
            raise ValueError(f"{name}: dropout={dropout}, must be 0: linear attention has no attention weights "
                             "to drop (use the model's residual dropout)")
        self.chunk, self.eps = chunk, eps

    def features(self, x: Tensor, is_query: bool) -> Tensor:
        """phi: (B, H, T, D) queries or keys -> (B, H, T, F) float32 non-negative features."""
        return F.elu(x.float()) + 1.0

    def new_state(self, max_len: int = 0) -> DecodingState:
        """(S, z) for causal self-attention (max_len is not needed); the projected encoder output for
        cross-attention."""
        return MemoryCache() if self.place.cross else LinearAttentionState()

    def forward(self, x: Tensor, context: Tensor | None = None, mask: AttentionMask | None = None,
                state: DecodingState | None = None, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """As `MultiHeadAttention.forward`; self-attention with a `LinearAttentionState` reads and advances the
        state instead of caching keys (causal only: its new queries and keys sit at mask.offset onwards).

        Args:
            x: (B, T, C) queries' inputs.
            context: (B, S, C) keys' and values' inputs for cross-attention; None for self-attention.
            mask: which keys each query sees; None for all.
            state: this block's decoding state (`new_state`).
            rotary: must be None (rotary positions are not supported).
        Returns:
            (B, T, C).
        """
        if rotary is not None:
            raise ValueError(f"{type(self).__name__} cannot take rotary positions (supports.rotary is False); "
                             "use absolute positions")
        if context is not None or not isinstance(state, LinearAttentionState):
            return super().forward(x, context, mask, state)
        mask = mask or AttentionMask(causal=True)
        self._check(mask)
        if self.keep_weights:
            raise ValueError(f"{type(self).__name__} cannot keep attention weights while decoding with a recurrent "
                             "state (it keeps no keys); keep them in a forward without a state")
        if not mask.causal:
            raise ValueError(f"{type(self).__name__}: a recurrent state decodes causally only; got a non-causal mask")
        B, T, _ = x.shape
        q, k, v = self._split(self.qkv(x), B, T)
        real = None if mask.key_mask is None else mask.key_mask[:, mask.offset:mask.offset + T]
        with fp32(x):
            phi_q, phi_k, v32 = self._features(q, k, v, real)
            y, state.S, state.z = self._causal(phi_q, phi_k, v32, state.S, state.z)
        return self.out(y.to(v.dtype).transpose(1, 2).reshape(B, T, self.q_width))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask | None) -> Tensor:
        """Linear attention; q (B, H, T, D), k and v (B, Hkv, S, D), keys at positions 0..S-1 ending at the newest
        (causal: the keys before the last T are seen by every query)."""
        mask = mask or AttentionMask()
        self._check(mask)
        T, S = q.shape[2], k.shape[2]
        if mask.causal and S < T:
            raise ValueError(f"{type(self).__name__}: causal attention needs the queries' own keys; "
                             f"got {T} queries and {S} keys")
        real = None if mask.key_mask is None else mask.key_mask[:, :S]
        with fp32(q):
            phi_q, phi_k, v32 = self._features(q, k, v, real)
            if self.keep_weights:
                y = self._attend_keeping_weights(phi_q, phi_k, v32, mask.causal)
            elif not mask.causal:
                y = self._read(phi_q, phi_k.transpose(-2, -1) @ v32, phi_k.sum(2))
            else:
                before = S - T                        # cached keys: every query sees them
                S0 = phi_k[:, :, :before].transpose(-2, -1) @ v32[:, :, :before]
                y, _, _ = self._causal(phi_q, phi_k[:, :, before:], v32[:, :, before:], S0, phi_k[:, :, :before].sum(2))
        return y.to(v.dtype)

    def _check(self, mask: AttentionMask) -> None:
        name = type(self).__name__
        if mask.bias is not None:
            raise ValueError(f"{name} cannot take a position bias (supports.position_bias is False); use absolute "
                             "positions")

    def _features(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """phi(q) (B, H, T, F), phi(k) (B, H, S, F) zero at padded keys, and v (B, H, S, D), all float32."""
        group = self.n_heads // self.n_kv_heads
        phi_k = self.features(k, is_query=False)
        if real is not None:
            phi_k = phi_k * real[:, None, :, None].to(phi_k.device, phi_k.dtype)
        return (self.features(q, is_query=True), phi_k.repeat_interleave(group, dim=1),
                v.float().repeat_interleave(group, dim=1))

    def _attend_keeping_weights(self, phi_q: Tensor, phi_k: Tensor, v: Tensor, causal: bool) -> Tensor:
        """The implied weights written out, (B, H, T, S), kept; phi(q) (B, H, T, F), phi(k) (B, H, S, F) zero at
        padded keys, v (B, H, S, D), float32; causal queries are the last T keys' own -> (B, H, T, D)."""
        T, S = phi_q.shape[2], phi_k.shape[2]
        scores = phi_q @ phi_k.transpose(-2, -1)                                     # (B, H, T, S)
        if causal:       # query t is key S - T + t
            scores = scores.tril(S - T)
        weights = scores / scores.sum(-1, keepdim=True).clamp_min(self.eps)
        self.weights = weights.detach()
        return weights @ v

    def _read(self, phi_q: Tensor, S: Tensor, z: Tensor) -> Tensor:
        """phi(q)^T S / phi(q)^T z: (B, H, T, F), (B, H, F, D), (B, H, F) -> (B, H, T, D)."""
        den = (phi_q @ z.unsqueeze(-1)).clamp_min(self.eps)
        return (phi_q @ S) / den

    def _causal(self, phi_q: Tensor, phi_k: Tensor, v: Tensor, S0: Tensor | None,
                z0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Causal linear attention of T queries over their own T keys after a prefix summarised by (S0, z0)
        (None: nothing before), in chunks. Returns the output (B, H, T, D) and the final (S, z)."""
        B, H, T, Fd = phi_q.shape
        D = v.shape[-1]
        C = min(self.chunk, T)
        n = -(-T // C)
        pad = n * C - T                             # zero keys and values: they add nothing
        q, k, vv = (F.pad(t, (0, 0, 0, pad)).view(B, H, n, C, t.shape[-1]) for t in (phi_q, phi_k, v))
        within = (q @ k.transpose(-2, -1)).tril()                                   # (B, H, n, C, C)
        chunk_S = k.transpose(-2, -1) @ vv                                          # (B, H, n, F, D)
        chunk_z = k.sum(3)                                                          # (B, H, n, F)
        # (S, z) of everything before each chunk: an exclusive cumulative sum, plus the prefix
        S_before = F.pad(chunk_S[:, :, :-1], (0, 0, 0, 0, 1, 0)).cumsum(2)
        z_before = F.pad(chunk_z[:, :, :-1], (0, 0, 1, 0)).cumsum(2)
        if S0 is not None:
            S_before, z_before = S_before + S0[:, :, None], z_before + z0[:, :, None]
        num = within @ vv + q @ S_before                                            # (B, H, n, C, D)
        den = within.sum(-1, keepdim=True) + q @ z_before.unsqueeze(-1)             # (B, H, n, C, 1)
        y = (num / den.clamp_min(self.eps)).view(B, H, n * C, D)[:, :, :T]
        return y, S_before[:, :, -1] + chunk_S[:, :, -1], z_before[:, :, -1] + chunk_z[:, :, -1]
