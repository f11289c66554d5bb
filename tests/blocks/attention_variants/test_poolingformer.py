"""Poolingformer against a dense reference written here with both levels' allowed masks and the pooled slots
spelled out, at its limits (full attention at level 1; full attention at both with pool 1), under padding, and
the refusals."""

import math
from functools import partial

import pytest
import torch

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.attention_variants.poolingformer import PoolingformerAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import RotaryPositions, apply_rotary
from lightning_tfm.models import DecoderOnly, EncoderOnly

SMALL = dict(d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.0)


class EightBlocks(PoolingformerAttention):
    """Blocks of 8 queries (level 2: 6 with pool 3) so short sequences span several blocks."""

    block = 8


def _attention(x, qkv, out, H, Hkv, allowed_or_none, rotary=None, keys=None, values=None):
    """out(softmax(q k^T / sqrt(D), masked) v) with q, k, v from the fused projection `qkv` of x, unless keys and
    values are given (then from those, already (B, H, S, D))."""
    B, T, C = x.shape
    D = C // H
    q, k, v = qkv(x).split([H * D, Hkv * D, Hkv * D], -1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k, v = (t.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    if keys is not None:
        k, v = keys(k), values(v)
    logits = q @ k.transpose(-1, -2) / math.sqrt(D)
    if allowed_or_none is not None:
        logits = logits.masked_fill(~allowed_or_none, float("-inf"))
    return out((logits.softmax(-1).nan_to_num(0.0) @ v).transpose(1, 2).reshape(B, T, C))


def _reference(attn, x, real, rotary=None):
    """y: query i sees real keys j with |i - j| <= window. z: from y, keys and values pooled (mean or max over
    the real positions j with j // pool = p) into slots p; query i sees slot p iff some position j of slot p has
    |i - j| <= pool_window and slot p holds a real position. Returns y + z."""
    B, T, _ = x.shape
    H, Hkv, s = attn.n_heads, attn.n_kv_heads, attn.pool
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed1 = ((i - j).abs() <= attn.window) & real[:, None, None, :]                  # (B, 1, T, T)
    y = _attention(x, attn.qkv, attn.out, H, Hkv, allowed1, rotary)
    P = -(-T // s)
    member = torch.arange(P)[:, None] == j // s                                         # (P, T)
    member_real = member & real[:, None, :]                                             # (B, P, T)
    count = member_real.sum(-1)                                                         # (B, P)

    def pooled(t):                                                                      # (B, H, T, D) -> (B, H, P, D)
        if attn.pooling == "mean":
            return member_real[:, None].float() @ t / count[:, None, :, None].clamp_min(1)
        spread = t[:, :, None].masked_fill(~member_real[:, None, :, :, None], float("-inf"))   # (B, H, P, T, D)
        return spread.amax(3).masked_fill(count[:, None, :, None] == 0, 0.0)

    near = ((i - j).abs() <= attn.pool_window)[:, None, :] & member[None]              # (T, P, T)
    allowed2 = near.any(-1) & (count > 0)[:, None, None, :]                             # (B, 1, T, P)
    z = _attention(y, attn.pool_qkv, attn.pool_out, H, Hkv, allowed2, keys=pooled, values=pooled)
    return y + z


def _padded(T):
    real = torch.ones(3, T, dtype=torch.bool)
    real[1, :5], real[2, T - 11:] = False, False             # one left-, one right-padded row
    return real


@pytest.mark.parametrize("case", ["mean", "max", "gqa_rotary", "window_0", "default_block"])
def test_equals_the_dense_reference_of_both_levels_in_outputs_and_gradients(case):
    torch.manual_seed(0)
    T = 100 if case == "default_block" else 37               # not a multiple of the blocks or of the pool
    cls = PoolingformerAttention if case == "default_block" else EightBlocks
    attn = cls(16, 4, window=0 if case == "window_0" else 3, pool_window=9, pool=3,
               pooling="max" if case == "max" else "mean", n_kv_heads=2 if case == "gqa_rotary" else None)
    x, real = torch.randn(3, T, 16, requires_grad=True), _padded(T)
    rotary = RotaryPositions(16, 4).rotary(T) if case == "gqa_rotary" else None
    got = attn(x, mask=AttentionMask(key_mask=real), rotary=rotary)
    want = _reference(attn, x, real, rotary)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.randn_like(got)
    params = [x, attn.qkv.weight, attn.pool_qkv.weight, attn.pool_out.weight]
    for a, b in zip(torch.autograd.grad((got * g).sum(), params), torch.autograd.grad((want * g).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _full(attn, qkv, out):
    full = MultiHeadAttention(16, 4, n_kv_heads=attn.n_kv_heads)
    full.qkv.load_state_dict(qkv.state_dict())
    full.out.load_state_dict(out.state_dict())
    return full


def test_limits_a_window_over_everything_is_full_attention_and_pool_one_makes_both_levels_full():
    """window >= T - 1: level 1 is MultiHeadAttention with the qkv/out weights (so the block is, when the
    level-2 output projection is zero). pool = 1 and pool_window >= T - 1 as well: the block is
    full(x) + full2(full(x)), full2 the MultiHeadAttention with the level-2 weights."""
    torch.manual_seed(0)
    attn = EightBlocks(16, 4, window=36, pool_window=40, pool=1, n_kv_heads=2)
    x, real = torch.randn(3, 37, 16), _padded(37)
    mask = AttentionMask(key_mask=real)
    level1, level2 = _full(attn, attn.qkv, attn.out), _full(attn, attn.pool_qkv, attn.pool_out)
    y = level1(x, mask=mask)
    torch.testing.assert_close(attn(x, mask=mask), y + level2(y, mask=mask), atol=1e-5, rtol=0)
    with torch.no_grad():
        attn.pool_out.weight.zero_()
        attn.pool_out.bias.zero_()
    attn.pool = 4
    torch.testing.assert_close(attn(x, mask=mask), y, atol=1e-5, rtol=0)


def test_right_padding_leaves_real_positions_unchanged_and_left_padding_regroups_the_slots():
    torch.manual_seed(0)
    attn = EightBlocks(16, 4, window=3, pool_window=9, pool=4)
    x = torch.randn(1, 30, 16)
    rotary = RotaryPositions(16, 4)
    alone = attn(x, rotary=rotary.rotary(30))

    def padded(n, side):
        junk = torch.randn(1, n, 16) * 10
        real = torch.tensor([[True] * 30 + [False] * n])
        real = real if side == "right" else real.flip(1)
        seq = torch.cat([x, junk] if side == "right" else [junk, x], 1)
        return attn(seq, mask=AttentionMask(key_mask=real), rotary=rotary.rotary(30 + n))[real]

    torch.testing.assert_close(padded(13, "right"), alone[0], atol=1e-5, rtol=0)
    # slots sit at absolute positions: a left shift by whole slots keeps them, any other shift regroups them
    torch.testing.assert_close(padded(8, "left"), alone[0], atol=1e-5, rtol=0)
    assert (padded(5, "left") - alone[0]).abs().amax() > 1e-3


def test_right_padding_leaves_an_encoder_unchanged():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, positions=partial(RotaryPositions, max_len=128),
                          attention=partial(EightBlocks, window=4, pool_window=12, pool=3)).eval()
    ids = torch.randint(1, 50, (1, 50))
    junk = torch.randint(1, 50, (1, 23))
    right = torch.tensor([[True] * 50 + [False] * 23])
    torch.testing.assert_close(encoder(torch.cat([ids, junk], 1), mask=right)[:, :50], encoder(ids), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_gradients_are_finite_under_bf16_autocast(pooling):
    torch.manual_seed(0)
    attn = EightBlocks(16, 4, window=3, pool_window=9, pool=3, pooling=pooling, n_kv_heads=2)
    x, real = torch.randn(3, 37, 16, requires_grad=True), _padded(37)
    real[0] = False                                          # a row with no real token at all
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, mask=AttentionMask(key_mask=real), rotary=RotaryPositions(16, 4).rotary(37))
    grads = torch.autograd.grad(y.float().square().sum(), [x, attn.qkv.weight, attn.pool_qkv.weight])
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(g).all() for g in grads)


def test_refused_in_a_decoder_and_for_bad_arguments():
    with pytest.raises(ValueError, match="PoolingformerAttention.*cannot attend causally"):
        DecoderOnly(50, **SMALL, attention=PoolingformerAttention)
    with pytest.raises(ValueError, match="PoolingformerAttention: window=-1 and pool_window=4 must be >= 0"):
        PoolingformerAttention(16, 4, window=-1, pool_window=4)
    with pytest.raises(ValueError, match="PoolingformerAttention: pool=0, must be >= 1"):
        PoolingformerAttention(16, 4, pool=0)
    with pytest.raises(ValueError, match="PoolingformerAttention: pooling='sum', must be 'mean' or 'max'"):
        PoolingformerAttention(16, 4, pooling="sum")
    with pytest.raises(ValueError, match="PoolingformerAttention is bidirectional"):
        PoolingformerAttention(16, 4)(torch.randn(1, 5, 16), mask=AttentionMask(causal=True))
