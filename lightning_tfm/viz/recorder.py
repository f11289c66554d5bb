"""Attention weights of the layers and heads a caller names, and only those.

`AttentionRecorder` switches the named blocks to their explicit path (`keep_weights`) for the duration of a
`with` block and copies out the named heads after each forward; every other block stays on its fused path, so
asking for one layer costs one layer's explicit attention. `rollout` combines all layers' maps into one
(Abnar and Zuidema 2020).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_tfm.blocks.attention import Attention
from lightning_tfm.models.decoder_only import DecoderOnly
from lightning_tfm.models.encoder_decoder import EncoderDecoder
from lightning_tfm.models.encoder_only import EncoderOnly

Selection = Mapping[str, Sequence[int] | None]    # group -> layer indices (None: every layer)


def attention_groups(model: nn.Module) -> dict[str, list[Attention]]:
    """The model's attention blocks by group, one per layer: "encoder" (an encoder's self-attention),
    "decoder" (a causal stack's self-attention) and "cross" (decoder-to-encoder attention)."""
    if isinstance(model, EncoderDecoder):
        return {"encoder": [layer.attention for layer in model.encoder.layers],
                "decoder": [layer.self_attention for layer in model.decoder.layers],
                "cross": [layer.cross_attention for layer in model.decoder.layers]}
    if isinstance(model, EncoderOnly):
        return {"encoder": [layer.attention for layer in model.stack.layers]}
    if isinstance(model, DecoderOnly):
        return {"decoder": [layer.attention for layer in model.stack.layers]}
    raise ValueError(f"{type(model).__name__} is not an EncoderDecoder, EncoderOnly or DecoderOnly model")


class AttentionRecorder:
    """Keep the attention weights of chosen layers and heads while inside `with`.

    Example:
        with AttentionRecorder(model, {"cross": [2]}, heads=[0, 1]) as recorder:
            model(src, tgt)
        recorder.maps["cross"][2]          # (B, 2, T, S), the weights of the last forward

    Args:
        model: an `EncoderDecoder`, `EncoderOnly` or `DecoderOnly`.
        layers: group ("encoder", "decoder", "cross"; see `attention_groups`) -> layer indices, None for all.
        heads: query heads to keep, None for all.
    Raises:
        ValueError: a group, layer or head the model does not have, or a block that cannot keep weights
            (naming it and its class).
    """

    def __init__(self, model: nn.Module, layers: Selection, heads: Sequence[int] | None = None) -> None:
        groups = attention_groups(model)
        self.blocks: dict[tuple[str, int], Attention] = {}
        for group, indices in layers.items():
            if group not in groups:
                raise ValueError(f"{type(model).__name__} has no {group!r} attention; it has "
                                 f"{', '.join(groups)}")
            blocks = groups[group]
            for i in range(len(blocks)) if indices is None else indices:
                if not 0 <= i < len(blocks):
                    raise ValueError(f"{group} layer {i} does not exist: the model has {len(blocks)} "
                                     f"{group} layers (0..{len(blocks) - 1})")
                self.blocks[group, i] = _check_block(blocks[i], f"{group} layer {i}")
        n_heads = min((block.n_heads for block in self.blocks.values()), default=0)
        if heads is not None and any(not 0 <= h < n_heads for h in heads):
            raise ValueError(f"heads {list(heads)}: the attention blocks have {n_heads} heads (0..{n_heads - 1})")
        self.heads = None if heads is None else list(heads)
        self.maps: dict[str, dict[int, Tensor]] = {group: {} for group in layers}
        self._hooks: list = []
        self._kept: dict[tuple[str, int], bool] = {}

    def __enter__(self) -> AttentionRecorder:
        for (group, i), block in self.blocks.items():
            self._kept[group, i] = block.keep_weights
            block.keep_weights = True
            self._hooks.append(block.register_forward_hook(self._copier(group, i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        for key, block in self.blocks.items():
            block.keep_weights = self._kept[key]
            block.weights = None                   # do not hold a (B, H, T, S) tensor past the recording
        self._hooks.clear()

    def _copier(self, group: str, i: int):
        def copy(block: Attention, args: object, output: object) -> None:
            weights = block.weights
            if weights is not None:
                self.maps[group][i] = (weights if self.heads is None else weights[:, self.heads]).float().cpu()
        return copy


def _check_block(block: Attention, where: str) -> Attention:
    if not block.supports.weights:
        raise ValueError(f"{where}: {type(block).__name__} cannot keep attention weights (supports.weights is False)")
    return block


def rollout(maps: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Attention rollout (Abnar and Zuidema 2020, eq. 1): how much each position's output draws on each input
    token through all the layers. Each layer's weights are averaged over heads and mixed with the identity
    for the residual connection, A' = residual I + (1 - residual) A, rows renormalised; rollout is
    A'_L ... A'_1.

    Args:
        maps: (B, H, T, T) self-attention weights of layers 1..L, in order.
        residual: weight of the residual path (the paper: 0.5).
    Returns:
        (B, T, T) rows summing to 1 (over the real tokens when the maps gave pads zero weight).
    """
    if not maps:
        raise ValueError("rollout needs the maps of at least one layer")
    result = None
    for weights in maps:
        if weights.shape[-1] != weights.shape[-2]:
            raise ValueError(f"rollout needs self-attention maps (T x T), got {tuple(weights.shape)}")
        mixed = weights.float().mean(1)
        mixed = residual * torch.eye(mixed.shape[-1], device=mixed.device) + (1 - residual) * mixed
        mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(1e-12)
        result = mixed if result is None else mixed @ result
    return result
