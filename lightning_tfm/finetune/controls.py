"""Fine-tuning controls chosen from YAML: freeze the backbone (or its embeddings and first k layers), give it
its own learning rate, or train low-rank adapters (LoRA) in place of its weights."""

from __future__ import annotations

from typing import Iterable, Literal

from torch import nn

from lightning_tfm.blocks.lora import LoRALinear


class LoRA:
    """Low-rank adapters (Hu et al. 2021) on the backbone's linear layers; everything else in the backbone is
    frozen, the task head still trains. Attention's fused query/key/value layer is `qkv` and its output `out`
    (the paper adapts W_q and W_v, §7.1; `qkv` adapts all three); the feed-forward layers are `fc1` and `fc2`
    (`gate`, `up`, `down` in SwiGLU).

    Args:
        rank: rank r of each update, >= 1.
        alpha: the update is scaled by alpha / rank.
        dropout: dropout on each adapter's input, in [0, 1).
        targets: names of the linear layers to adapt.
    """

    def __init__(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.05,
                 targets: tuple[str, ...] = ("qkv", "out")) -> None:
        if rank < 1:
            raise ValueError(f"LoRA: rank={rank}, must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout={dropout}, must be in [0, 1)")
        if not targets:
            raise ValueError("LoRA: targets is empty; name the linear layers to adapt, e.g. [qkv, out]")
        self.rank, self.alpha, self.dropout, self.targets = rank, alpha, dropout, tuple(targets)

    def apply(self, backbone: nn.Module) -> int:
        """Replace the target layers of `backbone` by `LoRALinear`s holding their weights, and freeze every
        other backbone weight. Returns the number of layers adapted.

        Raises:
            ValueError: no linear layer of the backbone has one of the target names (listing those it has).
        """
        found = [(parent, name, child) for parent in backbone.modules() for name, child in parent.named_children()
                 if name in self.targets and type(child) is nn.Linear]
        if not found:
            names = sorted({name for parent in backbone.modules() for name, child in parent.named_children()
                            if isinstance(child, nn.Linear)})
            raise ValueError(f"LoRA: no linear layer named {list(self.targets)} in {type(backbone).__name__}; its "
                             f"linear layers are named {names}")
        backbone.requires_grad_(False)
        for parent, name, child in found:
            setattr(parent, name, LoRALinear.wrap(child, self.rank, self.alpha, self.dropout))
        return len(found)


class FineTuning:
    """How a pretrained backbone (the task's `model`) trains; the task head always trains.

    Args:
        freeze: "backbone" freezes all of it (only the head learns: a linear probe); an int k freezes its
            embeddings and its first k layers (in each stack of an encoder-decoder); None trains everything.
        backbone_lr: learning rate of the backbone's trainable weights (adapters included); None gives them
            the optimizer's lr. A schedule scales both alike.
        lora: train low-rank adapters instead of the backbone's weights (then `freeze` must be None).
    """

    def __init__(self, freeze: Literal["backbone"] | int | None = None, backbone_lr: float | None = None,
                 lora: LoRA | None = None) -> None:
        if isinstance(freeze, int) and freeze < 0:
            raise ValueError(f"FineTuning: freeze={freeze}, must be 'backbone', a number of layers >= 0, or None")
        if lora is not None and freeze is not None:
            raise ValueError("FineTuning: lora already freezes the backbone's own weights; leave freeze unset")
        if backbone_lr is not None and backbone_lr <= 0:
            raise ValueError(f"FineTuning: backbone_lr={backbone_lr}, must be > 0")
        self.freeze, self.backbone_lr, self.lora = freeze, backbone_lr, lora

    def apply(self, backbone: nn.Module) -> None:
        """Freeze and/or add adapters to the backbone, in place."""
        if self.lora is not None:
            self.lora.apply(backbone)
        elif self.freeze == "backbone":
            backbone.requires_grad_(False)
        elif isinstance(self.freeze, int):
            freeze_bottom(backbone, self.freeze)

    def param_groups(self, backbone: nn.Module, params: Iterable[nn.Parameter]) -> list[dict]:
        """The optimizer's parameter groups: the backbone's at backbone_lr, the rest at the optimizer's lr."""
        params = list(params)
        if self.backbone_lr is None:
            return [{"params": params}]
        own = {id(p) for p in backbone.parameters()}
        groups = [{"params": [p for p in params if id(p) in own], "lr": self.backbone_lr},
                  {"params": [p for p in params if id(p) not in own]}]
        return [g for g in groups if g["params"]]


def freeze_bottom(backbone: nn.Module, k: int) -> None:
    """Freeze the embeddings and the first k layers of every stack (`.layers`) of `backbone`.

    Raises:
        ValueError: k is more than a stack has layers.
    """
    stacks = [m for m in backbone.modules() if isinstance(getattr(m, "layers", None), nn.ModuleList)]
    for stack in stacks:
        if k > len(stack.layers):
            raise ValueError(f"FineTuning: freeze={k} but the backbone has only {len(stack.layers)} layers per "
                             "stack; use freeze: backbone to freeze all of it")
        for layer in stack.layers[:k]:
            layer.requires_grad_(False)
    for name, module in backbone.named_children():
        if "embedding" in name:
            module.requires_grad_(False)
