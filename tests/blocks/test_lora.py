"""LoRALinear against the paper's formula (Hu et al. 2021, §4.1: h = W0 x + (alpha / r) B A x, B = 0 at the
start), its merge, and attention's sliced projections (cross-attention) through an adapted fused layer."""

import torch
from torch import nn

from lightning_tfm.blocks import LoRALinear, MultiHeadAttention


def adapted(seed: int = 0, rank: int = 4, alpha: float = 8.0, dropout: float = 0.0) -> tuple[nn.Linear, LoRALinear]:
    torch.manual_seed(seed)
    base = nn.Linear(16, 24)
    lora = LoRALinear.wrap(base, rank, alpha, dropout)
    with torch.no_grad():
        lora.lora_b.normal_()          # B starts at zero; give it values so the update shows
    return base, lora


def test_starts_as_the_layer_it_wraps_and_shares_its_frozen_weights():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    lora = LoRALinear.wrap(base, rank=4, alpha=8.0, dropout=0.1).eval()
    x = torch.randn(3, 5, 16)
    assert torch.equal(lora(x), base(x))
    assert lora.weight is base.weight and not lora.weight.requires_grad and not lora.bias.requires_grad
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]


def test_forward_is_the_papers_formula_and_merging_keeps_the_function():
    base, lora = adapted()
    x = torch.randn(3, 5, 16)
    want = x @ (base.weight + 8.0 / 4 * lora.lora_b @ lora.lora_a).T + base.bias
    torch.testing.assert_close(lora(x), want)
    merged = lora.merged()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), want)
    assert lora.lora_scale.item() == 2.0 and "lora_scale" in lora.state_dict()


def test_rows_are_the_matching_slice_of_the_output():
    _, lora = adapted()
    x = torch.randn(2, 16)
    torch.testing.assert_close(lora.rows(x, 8, 20), lora(x)[:, 8:20])
    torch.testing.assert_close(lora.rows(x, 16, None), lora(x)[:, 16:])


def test_only_the_adapters_get_gradients():
    _, lora = adapted()
    lora(torch.randn(4, 16)).sum().backward()
    assert lora.weight.grad is None and lora.bias.grad is None
    assert lora.lora_a.grad is not None and lora.lora_b.grad is not None


def test_cross_attention_through_an_adapted_fused_projection_equals_the_merged_one():
    """Cross-attention projects queries and keys/values with row slices of `qkv`: the adapter must follow."""
    torch.manual_seed(0)
    attention = MultiHeadAttention(32, 4).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    attention.qkv = LoRALinear.wrap(attention.qkv, rank=4, alpha=4.0, dropout=0.0)
    with torch.no_grad():
        attention.qkv.lora_b.normal_()
    adapted_out = attention(x, context)
    self_out = attention(x)
    attention.qkv = attention.qkv.merged()
    torch.testing.assert_close(adapted_out, attention(x, context))
    torch.testing.assert_close(self_out, attention(x))
