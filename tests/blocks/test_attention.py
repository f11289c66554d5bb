
import pytest
import torch
from torch import nn

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.kv_cache import KVCache, MemoryCache
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions

torch.manual_seed(0)


def _padding(B=3, S=6):
    real = torch.ones(B, S, dtype=torch.bool)
    real[1, 4:] = False
    real[2, 2:] = False
    return real


def test_self_attention_equals_torch_multihead_attention_with_padding_and_causal_masks():
    ours = MultiHeadAttention(16, 4).eval()
    theirs = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        theirs.in_proj_weight.copy_(ours.qkv.weight)
        theirs.in_proj_bias.copy_(ours.qkv.bias)
        theirs.out_proj.weight.copy_(ours.out.weight)
        theirs.out_proj.bias.copy_(ours.out.bias)
    x, real = torch.randn(3, 6, 16), _padding()
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)                   # torch's convention: True = blocked
    want, _ = theirs(x, x, x, key_padding_mask=~real, attn_mask=future)
    got = ours(x, mask=AttentionMask.build(real, causal=True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    want_bidirectional, _ = theirs(x, x, x, key_padding_mask=~real)
    torch.testing.assert_close(ours(x, mask=AttentionMask.build(real, causal=False)), want_bidirectional,
                               atol=1e-5, rtol=0)


def test_cross_attention_uses_the_two_slices_of_the_fused_projection():
    attn = MultiHeadAttention(16, 4).eval()
    x, memory, real = torch.randn(3, 5, 16), torch.randn(3, 6, 16), _padding()
    W, b = attn.qkv.weight, attn.qkv.bias
    q = (x @ W[:16].T + b[:16]).view(3, 5, 4, 4).transpose(1, 2)
    k = (memory @ W[16:32].T + b[16:32]).view(3, 6, 4, 4).transpose(1, 2)
    v = (memory @ W[32:].T + b[32:]).view(3, 6, 4, 4).transpose(1, 2)
    logits = (q @ k.transpose(-1, -2)) / 2.0 + torch.where(real[:, None, None, :], 0.0, float("-inf"))
    want = attn.out((logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 16))
    got = attn(x, context=memory, mask=AttentionMask.build(real, causal=False))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_beams_sharing_a_context_row_equal_per_row_copies(n_kv_heads):
    attn = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads).eval()
    assert attn.supports.shared_memory
    x, memory, real = torch.randn(6, 2, 16), torch.randn(3, 6, 16), _padding()    # 3 sentences x 2 beams
    copies = AttentionMask.build(real.repeat_interleave(2, 0), causal=False)
    want = attn(x, context=memory.repeat_interleave(2, 0), mask=copies)
    state, shared = MemoryCache(), AttentionMask.build(real, causal=False)
    first = attn(x, context=memory, mask=shared, state=state)                    # projects and keeps 3 rows
    again = attn(x, context=memory, mask=shared, state=state)                    # reads the kept ones
    assert state.k.shape[0] == 3
    torch.testing.assert_close(first, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="5 query rows cannot share a context of 3 rows"):
        attn(torch.randn(5, 1, 16), context=memory)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("case", ["none", "padding", "causal", "causal_padding", "alibi"])
def test_fused_and_weights_returning_paths_agree(n_kv_heads, case):
    attn = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads).eval()
    x, real = torch.randn(3, 6, 16), _padding()
    bias = ALiBiPositions(16, 4).position_bias() if case == "alibi" else None
    mask = AttentionMask.build(real if "padding" in case or case == "alibi" else None,
                               causal=case.startswith("causal") or case == "alibi", bias=bias)
    fused = attn(x, mask=mask)
    attn.keep_weights = True
    explicit = attn(x, mask=mask)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    weights = attn.weights
    assert weights.shape == (3, 4, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 6))
    if case.startswith("causal"):
        assert (weights.triu(1) == 0).all()
    if "padding" in case:
        assert (weights[2, :, :, 2:] == 0).all()


def test_grouped_query_attention_equals_multi_head_with_repeated_key_value_heads():
    gqa = MultiHeadAttention(16, 4, n_kv_heads=2).eval()
    mha = MultiHeadAttention(16, 4).eval()
    W, b = gqa.qkv.weight, gqa.qkv.bias
    k_rows, v_rows = W[16:24].view(2, 4, 16), W[24:32].view(2, 4, 16)
    kb, vb = b[16:24].view(2, 4), b[24:32].view(2, 4)
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([W[:16], k_rows.repeat_interleave(2, 0).reshape(16, 16),
                                        v_rows.repeat_interleave(2, 0).reshape(16, 16)]))
        mha.qkv.bias.copy_(torch.cat([b[:16], kb.repeat_interleave(2, 0).flatten(),
                                      vb.repeat_interleave(2, 0).flatten()]))
        mha.out.load_state_dict(gqa.out.state_dict())
    x = torch.randn(2, 5, 16)
    mask = AttentionMask(causal=True)
    torch.testing.assert_close(gqa(x, mask=mask), mha(x, mask=mask), atol=1e-5, rtol=0)
    assert gqa.qkv.weight.shape == (32, 16)          # fewer key/value parameters


def test_kv_cache_step_by_step_equals_full_causal_attention():
    attn = MultiHeadAttention(16, 4, n_kv_heads=2).eval()
    x = torch.randn(2, 7, 16)
    full = attn(x, mask=AttentionMask(causal=True))
    cache = KVCache(max_len=3)                       # grows past its preallocation
    first = attn(x[:, :3], mask=AttentionMask(causal=True), state=cache)
    steps = [attn(x[:, t:t + 1], mask=AttentionMask(causal=True, offset=t), state=cache) for t in range(3, 5)]
    # a multi-token step after the prefill (speculative decoding, chunked prompts)
    last = attn(x[:, 5:], mask=AttentionMask(causal=True, offset=5), state=cache)
    torch.testing.assert_close(torch.cat([first, *steps, last], dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fully_masked_rows_stay_finite_in_half_precision(dtype):
    attn = MultiHeadAttention(16, 4).eval().to(dtype)
    x = torch.randn(2, 4, 16, dtype=dtype)
    real = torch.tensor([[True, True, False, False], [False, False, False, False]])
    for bias in (None, ALiBiPositions(16, 4).position_bias()):
        out = attn(x, mask=AttentionMask(causal=True, key_mask=real, bias=bias))
        assert torch.isfinite(out).all()
        attn.keep_weights = True
        assert torch.isfinite(attn(x, mask=AttentionMask(causal=True, key_mask=real, bias=bias))).all()
        attn.keep_weights = False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_causal_mask_in_half_precision_stays_close_to_float32(dtype):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4).eval()
    x = torch.randn(2, 1024, 32)
    real = torch.ones(2, 1024, dtype=torch.bool)
    real[1, 700:] = False                                             # padding too
    with torch.no_grad():
        want = attn(x, mask=AttentionMask.build(real, causal=True))
        got = attn.to(dtype)(x.to(dtype), mask=AttentionMask.build(real, causal=True))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=10, n_heads=4), "d_model=10 is not divisible by n_heads=4"),
    (dict(d_model=16, n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
    (dict(d_model=16, n_heads=4, dropout=-0.1), r"dropout=-0.1, must be in \[0, 1\)"),
])
def test_bad_configuration_fails_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiHeadAttention(**kwargs)
