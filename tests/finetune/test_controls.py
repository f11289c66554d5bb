"""Freezing, the backbone's own learning rate, and LoRA on a whole task (adapters merged = same function)."""

import pytest
import torch
from torch import nn

from lightning_tfm.blocks import LoRALinear
from lightning_tfm.finetune import FineTuning, LoRA, merge_adapters
from lightning_tfm.models.presets import TinyEncoder, TinyEncoderDecoder
from lightning_tfm.tasks import ClassificationModule


def trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_freeze_backbone_leaves_only_the_head():
    task = ClassificationModule(TinyEncoder, 50, finetune=FineTuning(freeze="backbone"))
    assert trainable(task) == {"head.classifier.weight", "head.classifier.bias"}


def test_freeze_k_freezes_the_embeddings_and_the_first_k_layers_of_each_stack():
    task = ClassificationModule(TinyEncoder, 50, finetune=FineTuning(freeze=1))
    names = trainable(task)
    assert not any(n.startswith(("model.embedding.", "model.stack.layers.0.")) for n in names)
    assert any(n.startswith("model.stack.layers.1.") for n in names) and "head.classifier.weight" in names
    seq2seq = TinyEncoderDecoder(50)              # post-norm, its output projection tied to the target embedding
    FineTuning(freeze=1).apply(seq2seq)
    assert {".".join(n.split(".")[:3]) for n in trainable(seq2seq)} == {"encoder.layers.1", "decoder.layers.1"}
    with pytest.raises(ValueError, match=r"freeze=3 but the backbone has only 2 layers per stack"):
        ClassificationModule(TinyEncoder, 50, finetune=FineTuning(freeze=3))


def test_backbone_lr_makes_two_groups_the_optimizer_respects():
    task = ClassificationModule(TinyEncoder, 50, finetune=FineTuning(backbone_lr=1e-5),
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    optimizer = task.configure_optimizers()
    backbone, head = optimizer.param_groups
    assert backbone["lr"] == 1e-5 and head["lr"] == 1e-3
    assert sum(p.numel() for p in backbone["params"]) == sum(p.numel() for p in task.model.parameters())
    assert {id(p) for p in head["params"]} == {id(p) for p in task.head.parameters()}


def test_lora_trains_adapters_and_head_only_and_merges_into_the_same_function():
    torch.manual_seed(0)
    lora = LoRA(rank=2, alpha=4.0, dropout=0.0, targets=("qkv", "out", "fc1"))
    task = ClassificationModule(TinyEncoder, 50, n_classes=3, finetune=FineTuning(lora=lora)).eval()
    adapted = [m for m in task.model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 2 * 3                                   # 2 layers x (qkv, out, fc1)
    assert all(n.startswith("head.") or ".lora_" in n for n in trainable(task))
    with torch.no_grad():
        for m in adapted:
            m.lora_b.normal_()
    ids = torch.randint(0, 50, (3, 11))
    want = task(ids)
    plain = ClassificationModule(TinyEncoder, 50, n_classes=3).eval()
    plain.load_state_dict(merge_adapters(task.state_dict()))
    torch.testing.assert_close(plain(ids), want)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"no linear layer named \['query'\] in TinyEncoder; its linear layers "
                                         r"are named \['fc1', 'fc2', 'out', 'qkv'\]"):
        ClassificationModule(TinyEncoder, 50, finetune=FineTuning(lora=LoRA(targets=("query",))))
    with pytest.raises(ValueError, match="lora already freezes"):
        FineTuning(freeze="backbone", lora=LoRA())
    with pytest.raises(ValueError, match=r"rank=0"):
        LoRA(rank=0)
