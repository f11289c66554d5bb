"""Memory-compressed attention against a dense reference written out here (conv1d of each row's real tokens, the
allowed mask of the causal rule, one softmax), against full attention at compression 1, and through models:
causality, padding on either side, and incremental decoding equal to the full forward."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants.compressed import MemoryCompressedAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import RotaryPositions, apply_rotary
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly

D, H = 32, 4


def _compress(x, conv, r):
    """(Hkv, n, Dh) -> (Hkv, ceil(n / r), Dh): F.conv1d over all heads' channels of the zero-padded sequence."""
    Hkv, n, Dh = x.shape
    channels = F.pad(x.transpose(1, 2).reshape(1, Hkv * Dh, n), (0, -n % r))
    return F.conv1d(channels, conv.weight, conv.bias, stride=r).view(Hkv, Dh, -1).transpose(1, 2)


def _reference(block, x, real, causal, rotary=None):
    """Row by row over its real tokens only (so indices count real tokens): compressed keys and values by conv1d,
    then softmax over [compressed; raw] with the rule's mask. Zeros at padding. Also returns the weights over
    tokens (B, H, T, T): a slot's shared evenly by the real tokens it holds, a raw key's its own."""
    B, T, C = x.shape
    Hkv, Dh, r = block.n_kv_heads, block.head_dim, block.compression
    q, k, v = F.linear(x, block.qkv.weight, block.qkv.bias).split([H * Dh, Hkv * Dh, Hkv * Dh], -1)
    q, k, v = (t.view(B, T, -1, Dh).transpose(1, 2) for t in (q, k, v))
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    out, weights = [], x.new_zeros(B, H, T, T)
    for b in range(B):
        idx = real[b].nonzero().squeeze(1)
        n = len(idx)
        kb, vb = k[b][:, idx], v[b][:, idx]                                       # (Hkv, n, Dh)
        kc, vc = _compress(kb, block.compress_k, r), _compress(vb, block.compress_v, r)
        keys = torch.cat([kc, kb], 1).repeat_interleave(H // Hkv, 0)              # (H, M + n, Dh)
        values = torch.cat([vc, vb], 1).repeat_interleave(H // Hkv, 0)
        i, m, j = torch.arange(n)[:, None], torch.arange(kc.shape[1])[None, :], torch.arange(n)[None, :]
        if causal:
            allowed = torch.cat([(m + 1) * r - 1 <= i, (j >= r * ((i + 1) // r)) & (j <= i)], 1)
        else:
            allowed = torch.cat([torch.ones(n, kc.shape[1], dtype=torch.bool), torch.zeros(n, n, dtype=torch.bool)], 1)
        logits = q[b][:, idx] @ keys.transpose(1, 2) / Dh ** 0.5                     # (H, n, M + n)
        a = logits.masked_fill(~allowed, float("-inf")).softmax(-1)                # (H, n, M + n)
        y = a @ values                                                             # (H, n, Dh)
        row = x.new_zeros(T, C).index_copy(0, idx, block.out(y.transpose(0, 1).reshape(n, C)))
        out.append(row)
        size = (n - torch.arange(kc.shape[1]) * r).clamp(max=r)                     # real tokens of each slot
        shared = (a[..., :kc.shape[1]] / size)[..., torch.arange(n) // r] + a[..., kc.shape[1]:]   # (H, n, n)
        weights[b, :, idx[:, None], idx[None, :]] = shared.detach()
    return torch.stack(out), weights


def _block(r, causal, n_kv_heads=None):
    torch.manual_seed(0)
    block = MemoryCompressedAttention(D, H, LayerPlace(causal=causal), compression=r, n_kv_heads=n_kv_heads)
    with torch.no_grad():    # away from mean pooling, so the test sees the convolution's weights
        for conv in (block.compress_k, block.compress_v):
            conv.weight.add_(0.1 * torch.randn_like(conv.weight))
            conv.bias.normal_(0.0, 0.1)
    return block


@pytest.mark.parametrize("r,causal,gqa,rotate", [(3, True, False, False), (4, True, True, True),
                                                 (3, False, False, True), (4, False, True, False)])
def test_equals_the_dense_reference_with_left_and_right_padding_outputs_and_gradients(r, causal, gqa, rotate):
    block = _block(r, causal, n_kv_heads=2 if gqa else None)
    x = torch.randn(3, 100, D, requires_grad=True)            # 100: not a multiple of r
    real = torch.ones(3, 100, dtype=torch.bool)
    real[1, 83:], real[2, :11] = False, False                 # right and left padding
    rotary = RotaryPositions(D, H).rotary(100) if rotate else None
    got = block(x, mask=AttentionMask(causal, real), rotary=rotary)
    want, _ = _reference(block, x, real, causal, rotary)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    params = [x, block.qkv.weight, block.compress_k.weight, block.compress_v.bias]
    g = torch.randn_like(got[real])
    grads = torch.autograd.grad((got[real] * g).sum(), params)
    expected = torch.autograd.grad((want[real] * g).sum(), params)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_compression_one_is_full_attention(causal):
    torch.manual_seed(0)
    full = MultiHeadAttention(D, H)
    block = MemoryCompressedAttention(D, H, LayerPlace(causal=causal), compression=1)
    loaded = block.load_state_dict(full.state_dict(), strict=False)      # the convolutions stay mean pooling
    assert sorted(loaded.missing_keys) == ["compress_k.bias", "compress_k.weight", "compress_v.bias",
                                           "compress_v.weight"]
    x = torch.randn(2, 37, D)
    torch.testing.assert_close(block(x, mask=AttentionMask(causal)), full(x, mask=AttentionMask(causal)),
                               atol=1e-5, rtol=0)


def _decoder(r=3):
    torch.manual_seed(0)
    return DecoderOnly(50, d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0, positions=RotaryPositions,
                       attention=partial(MemoryCompressedAttention, compression=r)).eval()


@pytest.mark.parametrize("at", [60, 61])                     # a block boundary (r = 3) and inside a block
def test_future_tokens_never_change_earlier_outputs(at):
    model = _decoder()
    ids = torch.randint(0, 50, (2, 90))
    changed = ids.clone()
    changed[:, at:] = (ids[:, at:] + 1) % 50
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :at], after[:, :at], atol=1e-5, rtol=0)
    assert (before[:, at] - after[:, at]).abs().max() > 1e-3


def test_padding_on_either_side_never_changes_real_positions():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0, positions=RotaryPositions,
                          attention=MemoryCompressedAttention).eval()
    decoder = _decoder()
    ids, junk = torch.randint(1, 50, (1, 70)), torch.randint(1, 50, (1, 23))
    right = torch.tensor([[True] * 70 + [False] * 23])
    torch.testing.assert_close(encoder(torch.cat([ids, junk], 1), mask=right)[:, :70], encoder(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder(torch.cat([ids, junk], 1), mask=right)[:, :70], decoder(ids), atol=1e-5, rtol=0)
    # left padding moves every position by 23: rotary positions are relative, and blocks count real tokens
    left = right.flip(1)
    torch.testing.assert_close(decoder(torch.cat([junk, ids], 1), mask=left)[:, 23:], decoder(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder(torch.cat([junk, ids], 1), mask=left)[:, 23:], encoder(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [3, 4])
@torch.no_grad()
def test_incremental_decoding_equals_the_full_forward_after_reordering_and_multi_token_steps(r):
    model = _decoder(r)
    ids = torch.randint(0, 50, (3, 110))
    cache = model.new_cache()
    steps = [model(ids[:, :80], cache=cache)]
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(80, 95)]
    steps.append(model(ids[:, 95:100], cache=cache))                    # a multi-token step
    torch.testing.assert_close(torch.cat(steps, 1), model(ids[:, :100]), atol=1e-4, rtol=0)
    state = cache.self_attn[0]
    assert state.k.shape[2] == 100 // r and state.tail_k.shape[2] == r - 1     # O(S / r) memory
    order = torch.tensor([2, 0, 0])                                     # beam search picks parents
    cache.reorder(order)
    rest = torch.cat([model(ids[order, t:t + 1], cache=cache) for t in range(100, 110)], 1)
    torch.testing.assert_close(rest, model(ids[order])[:, 100:], atol=1e-4, rtol=0)


@torch.no_grad()
def test_decoding_left_padded_prompts_equals_the_full_forward():
    model = _decoder()
    ids = torch.randint(1, 50, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :7] = False                                                  # a shorter prompt, padded on the left
    cache = model.new_cache()
    steps = [model(ids[:, :25], mask=mask[:, :25], cache=cache)]
    steps += [model(ids[:, t:t + 1], mask=mask[:, :t + 1], cache=cache) for t in range(25, 33)]
    steps.append(model(ids[:, 33:40], mask=mask, cache=cache))
    got = torch.cat(steps, 1)
    torch.testing.assert_close(got[mask], model(ids, mask=mask)[mask], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1:, 7:], model(ids[1:, 7:]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_are_finite_under_bf16_autocast(causal):
    block = _block(3, causal)
    x = torch.randn(2, 50, D, requires_grad=True)
    real = torch.ones(2, 50, dtype=torch.bool)
    real[1, :9] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x, mask=AttentionMask(causal, real))
    grads = torch.autograd.grad(y[real].float().square().sum(), [x, block.qkv.weight, block.compress_k.weight])
    assert all(bool(g.isfinite().all()) for g in grads)


def test_refuses_bad_arguments_and_cross_attention():
    with pytest.raises(ValueError, match="MemoryCompressedAttention: compression=0"):
        MemoryCompressedAttention(D, H, compression=0)
    with pytest.raises(ValueError, match="MemoryCompressedAttention"):
        EncoderDecoder(50, d_model=D, n_layers=1, n_heads=H, d_ff=64, cross_attention=MemoryCompressedAttention)


@pytest.mark.parametrize("r,causal,gqa", [(3, True, False), (4, True, True), (3, False, True), (4, False, False)])
def test_keeps_the_references_weights_shared_by_the_tokens_of_each_slot(r, causal, gqa):
    block = _block(r, causal, n_kv_heads=2 if gqa else None)
    x = torch.randn(3, 50, D)                                 # 50: a partial last slot in rows 0 and 2
    real = torch.ones(3, 50, dtype=torch.bool)
    real[1, 42:], real[2, :7] = False, False                  # right and left padding
    block.keep_weights = True
    with torch.no_grad():
        got = block(x, mask=AttentionMask(causal, real))
        want, weights = _reference(block, x, real, causal)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    assert block.weights.shape == (3, H, 50, 50)
    rows = real[:, None].expand(-1, H, -1)                    # real queries; pads' own rows are not defined
    torch.testing.assert_close(block.weights[rows], weights[rows], atol=1e-6, rtol=0)
    torch.testing.assert_close(block.weights[rows].sum(-1), torch.ones(int(rows.sum())), atol=1e-5, rtol=0)
