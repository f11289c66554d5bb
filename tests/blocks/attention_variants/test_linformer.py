"""Linformer against its formula written out here, against full attention when E = F = identity, and through
models: right padding changes nothing, and decoders, cross-attention and too-long inputs are refused by name."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants.linformer import LinformerAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import LearnedPositions, RotaryPositions
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly

D, H = 32, 4
SMALL = dict(d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0)


def _formula(block, x, real):
    """softmax(q (E k)^T / sqrt(Dh)) (F v) per head, E and F cut to the first S columns, pads' k and v zeroed."""
    B, S, C = x.shape
    Hkv, Dh = block.n_kv_heads, block.head_dim
    q, k, v = F.linear(x, block.qkv.weight, block.qkv.bias).split([H * Dh, Hkv * Dh, Hkv * Dh], -1)
    q = q.view(B, S, H, Dh).transpose(1, 2)
    k, v = ((t * real[..., None]).view(B, S, Hkv, Dh).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    E = block.project_k[:, :S]
    F_ = E if block.share_kv else block.project_v[:, :S]
    weights = torch.softmax(q @ (E @ k).transpose(-1, -2) / Dh ** 0.5, -1)               # (B, H, S, k)
    return block.out((weights @ (F_ @ v)).transpose(1, 2).reshape(B, S, C))


@pytest.mark.parametrize("share_kv,n_kv_heads", [(False, None), (True, 2)])
def test_equals_the_formula_with_padding_outputs_and_gradients(share_kv, n_kv_heads):
    torch.manual_seed(0)
    block = LinformerAttention(D, H, LayerPlace(max_len=64), projected_len=12, share_kv=share_kv,
                               n_kv_heads=n_kv_heads)
    x = torch.randn(2, 50, D, requires_grad=True)             # shorter than max_len: E's first 50 columns
    real = torch.ones(2, 50, dtype=torch.bool)
    real[1, 37:] = False
    got, want = block(x, mask=AttentionMask(False, real)), _formula(block, x, real)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    params = [x, block.qkv.weight, block.project_k] + ([] if share_kv else [block.project_v])
    for a, e in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_identity_projections_of_the_full_length_are_full_attention():
    torch.manual_seed(0)
    full = MultiHeadAttention(D, H)
    block = LinformerAttention(D, H, LayerPlace(max_len=40), projected_len=40)
    block.load_state_dict(full.state_dict(), strict=False)
    with torch.no_grad():
        block.project_k.copy_(torch.eye(40))
        block.project_v.copy_(torch.eye(40))
    x = torch.randn(2, 40, D)
    torch.testing.assert_close(block(x), full(x), atol=1e-5, rtol=0)


def test_initialisation_is_the_papers_random_projection():
    torch.manual_seed(0)
    block = LinformerAttention(D, H, LayerPlace(max_len=2048), projected_len=64)
    assert block.project_k.shape == block.project_v.shape == (64, 2048)
    assert abs(block.project_k.std().item() - 64 ** -0.5) < 0.01 and abs(block.project_k.mean().item()) < 0.01
    assert LinformerAttention(D, H, projected_len=8, share_kv=True).project_v is None


def test_right_padding_never_changes_real_positions():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, positions=partial(LearnedPositions, max_len=128),
                          attention=partial(LinformerAttention, projected_len=16)).eval()
    ids, junk = torch.randint(1, 50, (1, 70)), torch.randint(1, 50, (1, 23))
    right = torch.tensor([[True] * 70 + [False] * 23])
    torch.testing.assert_close(encoder(torch.cat([ids, junk], 1), mask=right)[:, :70], encoder(ids), atol=1e-5, rtol=0)


def test_models_refuse_it_where_it_cannot_work_naming_it():
    with pytest.raises(ValueError, match="LinformerAttention .* cannot attend causally"):
        DecoderOnly(50, **SMALL, attention=LinformerAttention)
    with pytest.raises(ValueError, match="LinformerAttention .* cannot attend to the encoder output"):
        EncoderDecoder(50, **SMALL, cross_attention=LinformerAttention)
    with pytest.raises(ValueError, match="LinformerAttention .* cannot take rotary positions"):
        EncoderOnly(50, **SMALL, positions=RotaryPositions, attention=LinformerAttention)
    # as the encoder's self-attention of a translation model it is fine
    EncoderDecoder(50, **SMALL, attention=partial(LinformerAttention, projected_len=8),
                   decoder_attention=MultiHeadAttention)


def test_refuses_too_long_inputs_and_bad_arguments():
    block = LinformerAttention(D, H, LayerPlace(max_len=20), projected_len=4)
    with pytest.raises(ValueError, match="21 positions is longer than max_len=20"):
        block(torch.randn(1, 21, D))
    with pytest.raises(ValueError, match="LinformerAttention: projected_len=0"):
        LinformerAttention(D, H, projected_len=0)
    with pytest.raises(ValueError, match="cannot attend causally"):
        block(torch.randn(1, 5, D), mask=AttentionMask(causal=True))


def test_gradients_are_finite_under_bf16_autocast():
    torch.manual_seed(0)
    block = LinformerAttention(D, H, LayerPlace(max_len=64), projected_len=16)
    x = torch.randn(2, 50, D, requires_grad=True)
    real = torch.ones(2, 50, dtype=torch.bool)
    real[1, 30:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x, mask=AttentionMask(False, real))
    grads = torch.autograd.grad(y.float().square().sum(), [x, block.qkv.weight, block.project_k, block.project_v])
    assert all(bool(g.isfinite().all()) for g in grads)
