"""The tasks' default optimizers: the documented hyperparameters, the fused kernel, and the same update as
torch's reference (per-parameter loop) implementation."""

import copy

import pytest
import torch

from lightning_tfm.models.presets import TinyDecoder, TinyEncoder, TinyEncoderDecoder
from lightning_tfm.tasks import ClassificationModule, LanguageModelModule, MaskedLanguageModelModule, TranslationModule

TASKS = {
    "translation": (lambda: TranslationModule(TinyEncoderDecoder, vocab_size=40),
                    torch.optim.Adam, {"lr": 1.0, "betas": (0.9, 0.98), "eps": 1e-9}),
    "language_model": (lambda: LanguageModelModule(TinyDecoder, vocab_size=40),
                       torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1}),
    "classification": (lambda: ClassificationModule(TinyEncoder, vocab_size=40, n_classes=3),
                       torch.optim.AdamW, {"lr": 1e-4, "weight_decay": 0.01}),
    "masked_lm": (lambda: MaskedLanguageModelModule(TinyEncoder, vocab_size=40),
                  torch.optim.AdamW, {"lr": 1e-4, "betas": (0.9, 0.999), "weight_decay": 0.01}),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_default_optimizer_is_fused_with_the_documented_hyperparameters(name):
    build, kind, expected = TASKS[name]
    optimizer = build().configure_optimizers()
    assert type(optimizer) is kind
    assert optimizer.defaults["fused"] is True
    assert {key: optimizer.defaults[key] for key in expected} == expected


@pytest.mark.parametrize("name", list(TASKS))
def test_fused_steps_match_the_per_parameter_loop(name):
    """Three steps on the same gradients move every weight as torch's for-loop implementation does."""
    build, kind, _ = TASKS[name]
    torch.manual_seed(0)
    task = build()
    reference = copy.deepcopy(task)
    fused = task.configure_optimizers()
    loop = kind(reference.parameters(), **{k: v for k, v in fused.defaults.items()
                                           if k in ("lr", "betas", "eps", "weight_decay")},
                foreach=False, fused=False)
    if kind is torch.optim.Adam:       # lr 1 is the schedule's scale, far too large for a raw step
        for optimizer in (fused, loop):
            optimizer.param_groups[0]["lr"] = 1e-3
    for step in range(3):
        for a, b in zip(task.parameters(), reference.parameters()):
            a.grad = torch.randn_like(a, generator=torch.Generator().manual_seed(step))
            b.grad = a.grad.clone()
        fused.step(), loop.step()
    for (key, a), b in zip(task.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=key)


def test_fp16_clipping_gets_the_unfused_optimizer_with_the_same_groups():
    """Lightning unscales fp16 gradients before clipping, which a fused kernel would do a second time."""
    from lightning_tfm.tasks.base import _unfused

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    fused = torch.optim.AdamW([{"params": [a], "lr": 1e-4}, {"params": [b]}], lr=1e-3, betas=(0.9, 0.95),
                              weight_decay=0.1, fused=True)
    plain = _unfused(fused)
    assert type(plain) is torch.optim.AdamW and plain.defaults["fused"] is False
    assert not getattr(plain, "_step_supports_amp_scaling", False)
    assert [g["lr"] for g in plain.param_groups] == [1e-4, 1e-3]
    assert [g["params"] for g in plain.param_groups] == [[a], [b]]
    assert all(g["betas"] == (0.9, 0.95) and g["weight_decay"] == 0.1 and not g["fused"] for g in plain.param_groups)
