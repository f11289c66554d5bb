"""What a model asks of its attention blocks: at construction, that each can do what the model needs of it
(refused otherwise, naming the block, the model and the reason); while decoding, one state per block; in
training, their auxiliary losses and their once-per-optimizer-step updates."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_tfm.blocks.attention import Attention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import Positions


def attention_blocks(model: nn.Module) -> list[tuple[str, Attention]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, Attention)]


def check_attention(model: str, stack: nn.Module, positions: Positions) -> None:
    """Raise if a block of `stack` cannot do what `model` will ask of it with `positions`."""
    for name, block in attention_blocks(stack):
        place, supports = block.place, block.supports
        needs = []
        if place.cross:
            needs.append(("cross_attention", "attend to the encoder output"))
        elif place.causal:
            needs.append(("causal", "attend causally"))
        else:
            needs.append(("bidirectional", "attend bidirectionally"))
        if positions.rotates and not place.cross:
            needs.append(("rotary", f"take rotary positions ({type(positions).__name__})"))
        if positions.biases and not place.cross:
            needs.append(("position_bias", f"take a position bias ({type(positions).__name__})"))
        for capability, what in needs:
            if not getattr(supports, capability):
                raise ValueError(f"{model}: {type(block).__name__} (at {name}) cannot {what}; choose another "
                                 "attention block for this layer or another position scheme")


def check_padding(model: str, stack: nn.Module, mask: AttentionMask) -> None:
    """Raise if the input is padded and a block cannot honour a padding mask."""
    if mask.key_mask is None:
        return
    for name, block in attention_blocks(stack):
        if not block.supports.padding:
            raise ValueError(f"{model}: {type(block).__name__} (at {name}) cannot honour padding; give it "
                             "unpadded batches of equal length")


def decoding_states(model: str, blocks: list[Attention], max_len: int) -> list:
    """One empty decoding state per block, or an error naming a block that cannot decode step by step."""
    for block in blocks:
        if block.supports.decoding == "none":
            raise ValueError(f"{model}: {type(block).__name__} (layer {block.place.index}) cannot decode "
                             "incrementally; generate with a model whose attention blocks can")
    return [block.new_state(max_len) for block in blocks]


def auxiliary_losses(model: nn.Module) -> dict[str, Tensor]:
    """The auxiliary training losses of every block, summed over the blocks that share a name."""
    losses: dict[str, Tensor] = {}
    for _, block in attention_blocks(model):
        for name, loss in block.auxiliary_losses().items():
            losses[name] = losses[name] + loss if name in losses else loss
    return losses


def after_optimizer_step(model: nn.Module) -> None:
    """Let every block update itself once the optimizer has changed the weights (span clamping, centroids)."""
    for _, block in attention_blocks(model):
        block.after_optimizer_step()
