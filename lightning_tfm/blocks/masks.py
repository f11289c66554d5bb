"""Which keys each query may see, described rather than materialised.

A model builds one `AttentionMask` per forward and hands it to every layer. It states facts (causal or not,
which keys are padding, where the queries sit, the position bias as a function) and builds no (T, S) tensor.
Full attention turns it into what SDPA wants (`sdpa_mask`); a sparse or approximate variant reads only what it
needs, so none pays O(T^2) memory for a mask it does not use.

Positions are absolute: queries sit at `offset .. offset + T - 1`, the keys of self-attention at `0 .. S - 1`
(cached positions first). A variant whose decoding state keeps only some keys (a sliding window) knows which
positions it kept and slices `key_mask` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

PositionBias = Callable[[Tensor, Tensor], Tensor]   # (q_pos (T,), k_pos (S,)) -> (H, T, S) additive logits


@dataclass
class AttentionMask:
    """What a layer needs to know about its queries and keys.

    Attributes:
        causal: a query at position i sees keys at positions <= i only.
        key_mask: (B, S) bool over key positions 0..S-1, True for real tokens, False for padding; None if
            nothing is padded.
        offset: position of the first query: the number of positions cached before this step.
        bias: a function of query and key positions giving (H, T, S) logits added before the softmax (ALiBi);
            None for no bias.
    """

    causal: bool = False
    key_mask: Tensor | None = None
    offset: int = 0
    bias: PositionBias | None = None

    @classmethod
    def build(cls, key_mask: Tensor | None, causal: bool, offset: int = 0,
              bias: PositionBias | None = None) -> AttentionMask:
        """The mask for a forward, dropping a key mask that pads nothing (SDPA then keeps its causal kernels)."""
        if key_mask is not None and bool(key_mask.all()):
            key_mask = None
        return cls(causal, key_mask, offset, bias)

    def query_positions(self, n_queries: int, device: torch.device) -> Tensor:
        return torch.arange(self.offset, self.offset + n_queries, device=device)          # (T,)

    def allowed(self, n_queries: int, n_keys: int, device: torch.device, key_start: int = 0) -> Tensor | None:
        """Dense bool (T, S) or (B, 1, T, S), True = may attend, for keys at positions key_start..; None: all.

        Only full attention and references call this: it is the O(T x S) tensor the description avoids."""
        allowed = None
        if self.causal:
            q_pos = self.query_positions(n_queries, device)
            k_pos = torch.arange(key_start, key_start + n_keys, device=device)
            allowed = k_pos[None, :] <= q_pos[:, None]                                       # (T, S)
        if self.key_mask is not None:
            keys = self.key_mask[:, None, None, key_start:key_start + n_keys].to(device)    # (B, 1, 1, S)
            allowed = keys if allowed is None else keys & allowed                          # (B, 1, T, S)
        return allowed

    def bias_logits(self, n_queries: int, n_keys: int, device: torch.device, key_start: int = 0) -> Tensor | None:
        """(H, T, S) position-bias logits for these queries and keys, or None."""
        if self.bias is None:
            return None
        k_pos = torch.arange(key_start, key_start + n_keys, device=device)
        return self.bias(self.query_positions(n_queries, device), k_pos)

    def sdpa_mask(self, n_queries: int, n_keys: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for `scaled_dot_product_attention` over keys 0..S-1.

        Causal attention with nothing padded, no bias and no cache takes SDPA's own causal kernels; a single
        new query needs no mask at all. A bias folds the boolean mask in with the dtype's most negative finite
        value, so a row with no allowed key stays finite in half precision.
        """
        plain = self.key_mask is None and self.bias is None
        if self.causal and plain and n_queries == n_keys and n_queries > 1 and self.offset == 0:
            return None, True
        causal_needed = self.causal and not (n_queries == 1 and self.offset == n_keys - 1)
        allowed = AttentionMask(causal_needed, self.key_mask, self.offset).allowed(n_queries, n_keys, device)
        bias = self.bias_logits(n_queries, n_keys, device)
        if bias is None:
            return allowed, False
        bias = bias.to(dtype)
        if allowed is not None:
            bias = bias.masked_fill(~allowed, torch.finfo(dtype).min)
        return bias, False
