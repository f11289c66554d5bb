"""Every attention variant, through the models that use it: it reduces to full attention at its limit, equals a
dense reference under the explicit mask (outputs and gradients), is causal, ignores padding, and decodes
incrementally exactly as the full forward computes, after beam reordering and multi-token steps too."""

from functools import partial

import pytest
import torch

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants import (
    Band,
    BandStridedAttention,
    BlockGlobalAttention,
    BlockLocal,
    BlockLocalAttention,
    Dilated,
    DilatedWindowAttention,
    Global,
    SlidingWindowAttention,
    Strided,
    StridedAttention,
)
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions, RotaryPositions
from lightning_tfm.models import DecoderOnly, EncoderOnly

D, H = 32, 4
# name -> (factory with block 16, its pattern, whether it is shift-invariant (left padding keeps it))
VARIANTS = {
    "window": (partial(SlidingWindowAttention, window=9, block=16), Band(9), True),
    "dilated": (partial(DilatedWindowAttention, window=5, dilation=3, block=16), Dilated(5, 3), True),
    "strided": (partial(StridedAttention, stride=7, block=16), Strided(7), True),
    "band+strided": (partial(BandStridedAttention, window=5, stride=11, block=16), Band(5) | Strided(11), True),
    "block": (partial(BlockLocalAttention, block=16), BlockLocal(16), False),
    "block+global": (partial(BlockGlobalAttention, block=16, n_global=3), BlockLocal(16) | Global(n_first=3), False),
}
LIMITS = {   # each variant at the limit where it must be full attention, for T <= 100
    "window": partial(SlidingWindowAttention, window=100, block=16),
    "dilated": partial(DilatedWindowAttention, window=100, dilation=1, block=16),
    "strided": partial(StridedAttention, stride=1, block=16),
    "band+strided": partial(BandStridedAttention, window=100, stride=50, block=16),
    "block": partial(BlockLocalAttention, block=128),
    "block+global": partial(BlockGlobalAttention, block=128, n_global=1),
}


def _dense_reference(block, x, allowed, bias=None):
    """softmax(q k^T / sqrt(D) + bias, masked) v with the block's own projections, written out."""
    B, T, _ = x.shape
    q, k, v = block.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / (D // H) ** 0.5
    if bias is not None:
        logits = logits + bias
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return block.out((weights @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("causal", [True, False])
def test_equals_the_dense_reference_with_padding_and_alibi_outputs_and_gradients(name, causal):
    factory, pattern, _ = VARIANTS[name]
    torch.manual_seed(0)
    block = factory(D, H, LayerPlace(causal=causal))
    x = torch.randn(2, 100, D, requires_grad=True)               # 100: not a multiple of the block
    real = torch.ones(2, 100, dtype=torch.bool)
    real[1, 83:] = False
    alibi = ALiBiPositions(D, H).position_bias()
    got = block(x, mask=AttentionMask(causal, real, bias=alibi))
    pos = torch.arange(100)
    allowed = pattern.allows(pos[:, None], pos[None, :]) & real[:, None, None, :]
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    want = _dense_reference(block, x, allowed, alibi(pos, pos))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    grads = torch.autograd.grad(got.square().sum(), [x, block.qkv.weight])
    expected = torch.autograd.grad(want.square().sum(), [x, block.qkv.weight])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_at_its_limit_it_is_full_attention(name):
    torch.manual_seed(0)
    full = MultiHeadAttention(D, H)
    for causal in (True, False):
        variant = LIMITS[name](D, H, LayerPlace(causal=causal))
        variant.load_state_dict(full.state_dict())
        x = torch.randn(2, 100, D)
        torch.testing.assert_close(variant(x, mask=AttentionMask(causal)), full(x, mask=AttentionMask(causal)),
                                   atol=1e-5, rtol=0)


def _decoder(name, positions=RotaryPositions):
    torch.manual_seed(0)
    return DecoderOnly(50, d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0, positions=positions,
                       attention_pattern=[VARIANTS[name][0], MultiHeadAttention]).eval()


@pytest.mark.parametrize("name", VARIANTS)
def test_future_tokens_never_change_earlier_outputs(name):
    model = _decoder(name)
    ids = torch.randint(0, 50, (2, 90))
    changed = ids.clone()
    changed[:, 61:] = torch.randint(0, 50, (2, 29))
    torch.testing.assert_close(model(ids)[:, :61], model(changed)[:, :61], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_padding_never_changes_real_positions(name):
    torch.manual_seed(0)
    encoder = EncoderOnly(50, d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0, positions=RotaryPositions,
                          attention=VARIANTS[name][0]).eval()
    decoder = _decoder(name)
    ids = torch.randint(1, 50, (1, 70))
    junk = torch.randint(1, 50, (1, 23))
    right = torch.tensor([[True] * 70 + [False] * 23])
    torch.testing.assert_close(encoder(torch.cat([ids, junk], 1), mask=right)[:, :70], encoder(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder(torch.cat([ids, junk], 1), mask=right)[:, :70], decoder(ids), atol=1e-5, rtol=0)
    if VARIANTS[name][2]:            # block-aligned patterns sit at absolute positions, which left padding moves
        left = right.flip(1)
        torch.testing.assert_close(decoder(torch.cat([junk, ids], 1), mask=left)[:, 23:], decoder(ids), atol=1e-5,
                                   rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_incremental_decoding_equals_the_full_forward_after_reordering_and_multi_token_steps(name):
    model = _decoder(name, positions=ALiBiPositions)
    ids = torch.randint(0, 50, (3, 110))
    cache = model.new_cache()
    steps = [model(ids[:, :80], cache=cache)]                          # prefill: the blocked kernel
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(80, 95)]
    steps.append(model(ids[:, 95:100], cache=cache))                    # a multi-token step
    torch.testing.assert_close(torch.cat(steps, 1), model(ids[:, :100]), atol=1e-4, rtol=0)
    order = torch.tensor([2, 0, 0])                                     # beam search picks parents
    cache.reorder(order)
    rest = torch.cat([model(ids[order, t:t + 1], cache=cache) for t in range(100, 110)], 1)
    torch.testing.assert_close(rest, model(ids[order])[:, 100:], atol=1e-4, rtol=0)


def test_bounded_patterns_decode_with_a_window_of_keys_and_unbounded_ones_with_the_whole_cache():
    model = DecoderOnly(50, d_model=D, n_layers=3, n_heads=H, d_ff=64, attention_pattern=[
        partial(SlidingWindowAttention, window=9), partial(DilatedWindowAttention, window=5, dilation=3),
        partial(BlockGlobalAttention, block=16, n_global=2)])
    cache = model.new_cache()
    model.eval()(torch.randint(0, 50, (1, 60)), cache=cache)
    assert [state.k.shape[2] for state in cache.self_attn] == [8, 12, 60]
