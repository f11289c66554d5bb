"""Inducing-point attention against the Set Transformer's ISAB written out here (two explicit masked softmax
attentions, the first MAB's LayerNorms and row-wise feed-forward), padding on either side, and the refusals."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention_variants.inducing_points import InducingPointAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import NoPositions, RotaryPositions
from lightning_tfm.models import DecoderOnly, EncoderOnly

SMALL = dict(d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.0)


def _heads(t, n, D):
    """(B, L, n D) -> (B, n, L, D)."""
    return t.view(*t.shape[:-1], n, D).transpose(-3, -2)


def _reference(attn, x, real):
    """H0 = LN(I + softmax(I W_q (X W_k)^T / sqrt(D), pads masked) X W_v), H = LN(H0 + relu(H0 W_f + b_f)),
    out = softmax(X W_q (H W_hk)^T / sqrt(D)) H W_hv, then W_o (Lee et al. 2019, eq. 6-10)."""
    B, T, C = x.shape
    H, Hkv, D, m = attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.n_inducing
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = F.linear(x, w, b).split([H * D, Hkv * D, Hkv * D], -1)
    q = _heads(q, H, D)                                                               # (B, H, T, D)
    k, v = (_heads(t, Hkv, D).repeat_interleave(H // Hkv, 1) for t in (k, v))          # (B, H, T, D)
    points = attn.inducing_points                                                     # (m, C)
    q_points = _heads(F.linear(points, w[:H * D], b[:H * D]), H, D)                   # (H, m, D)
    logits = q_points @ k.transpose(-1, -2) / math.sqrt(D)                             # (B, H, m, T)
    weights = logits.masked_fill(~real[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    attended = (weights @ v).transpose(1, 2).reshape(B, m, C)
    norm0, norm1 = attn.summary_norm, attn.summary_ff_norm
    h0 = F.layer_norm(points + attended, (C,), norm0.weight, norm0.bias)
    h = F.layer_norm(h0 + F.relu(F.linear(h0, attn.summary_ff.weight, attn.summary_ff.bias)), (C,), norm1.weight,
                     norm1.bias)                                                      # (B, m, C)
    h_k, h_v = F.linear(h, attn.summary_kv.weight, attn.summary_kv.bias).split([Hkv * D, Hkv * D], -1)
    h_k, h_v = (_heads(t, Hkv, D).repeat_interleave(H // Hkv, 1) for t in (h_k, h_v))  # (B, H, m, D)
    out = (q @ h_k.transpose(-1, -2) / math.sqrt(D)).softmax(-1) @ h_v                 # (B, H, T, D)
    return F.linear(out.transpose(1, 2).reshape(B, T, C), attn.out.weight, attn.out.bias)


def _padded():
    real = torch.ones(4, 11, dtype=torch.bool)
    real[1, :4], real[2, 6:], real[3] = False, False, False     # left-, right- and fully padded rows
    return real


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_equals_the_two_explicit_attentions_in_outputs_and_gradients(n_kv_heads):
    torch.manual_seed(0)
    attn = InducingPointAttention(16, 4, n_inducing=5, n_kv_heads=n_kv_heads)
    with torch.no_grad():                # non-trivial norms and biases
        for p in (attn.summary_norm.weight, attn.summary_norm.bias, attn.summary_ff_norm.bias, attn.qkv.bias):
            p.add_(torch.randn_like(p) * 0.3)
    x, real = torch.randn(4, 11, 16, requires_grad=True), _padded()
    got = attn(x, mask=AttentionMask(key_mask=real))
    want = _reference(attn, x, real)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)   # every row: pads' outputs are defined too
    params = [x, attn.inducing_points, attn.qkv.weight, attn.summary_ff.weight, attn.summary_kv.weight,
              attn.summary_norm.weight]
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padding_on_either_side_leaves_real_positions_as_alone():
    torch.manual_seed(0)
    attn = InducingPointAttention(16, 4, n_inducing=3)
    x = torch.randn(1, 7, 16)
    alone = attn(x)
    for side in ("right", "left"):
        junk = torch.randn(1, 5, 16) * 10
        padded = torch.cat([x, junk] if side == "right" else [junk, x], 1)
        real = torch.tensor([[True] * 7 + [False] * 5])
        real = real if side == "right" else real.flip(1)
        torch.testing.assert_close(attn(padded, mask=AttentionMask(key_mask=real))[real], alone[0], atol=1e-5,
                                   rtol=0)


def test_padding_on_either_side_leaves_an_encoder_without_positions_unchanged():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, positions=partial(NoPositions, max_len=64),
                          attention=partial(InducingPointAttention, n_inducing=4)).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (20, 9, 14)]
    alone = [encoder(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(3, 20, dtype=torch.long)
        real = torch.zeros(3, 20, dtype=torch.bool)
        for i, s in enumerate(seqs):
            where = slice(0, len(s)) if side == "right" else slice(20 - len(s), 20)
            ids[i, where], real[i, where] = s, True
        out = encoder(ids, mask=real)
        for i in range(3):
            torch.testing.assert_close(out[i][real[i]], alone[i], atol=1e-5, rtol=0)


def test_gradients_are_finite_under_bf16_autocast():
    torch.manual_seed(0)
    attn = InducingPointAttention(16, 4, n_inducing=6, n_kv_heads=2)
    x, real = torch.randn(4, 11, 16, requires_grad=True), _padded()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, mask=AttentionMask(key_mask=real))
    grads = torch.autograd.grad(y.float().square().sum(), [x, attn.inducing_points, attn.qkv.weight])
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(g).all() for g in grads)


def test_refused_in_a_decoder_with_rotary_positions_and_for_bad_arguments():
    with pytest.raises(ValueError, match="InducingPointAttention.*cannot attend causally"):
        DecoderOnly(50, **SMALL, attention=InducingPointAttention)
    with pytest.raises(ValueError, match="InducingPointAttention.*cannot take rotary positions"):
        EncoderOnly(50, **SMALL, positions=RotaryPositions, attention=InducingPointAttention)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"InducingPointAttention: n_inducing={bad}, must be >= 1"):
            InducingPointAttention(16, 4, n_inducing=bad)
    attn = InducingPointAttention(16, 4, n_inducing=2)
    with pytest.raises(ValueError, match="InducingPointAttention is self-attention"):
        attn(torch.randn(1, 3, 16), context=torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="InducingPointAttention is bidirectional"):
        attn(torch.randn(1, 3, 16), mask=AttentionMask(causal=True))
