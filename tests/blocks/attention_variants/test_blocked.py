import math

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention_variants import (
    Band,
    BlockLocal,
    Dilated,
    Everything,
    Global,
    Strided,
    plan_attention,
    sparse_attention,
)

PATTERNS = [Band(5), Dilated(3, 2), Strided(6), BlockLocal(8), Global(n_first=2, positions=(9,)), Everything(),
            Band(4) | Strided(6), BlockLocal(8) | Global(n_first=3)]
H, HKV, D = 4, 2, 8                          # grouped-query: two query heads per key/value head
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def _alibi(q_pos, k_pos):
    """ALiBi (Press et al. 2022) plus a query-only term, so a swapped q/k would show: (T,), (S,) -> (H, T, S)."""
    distance = (q_pos[:, None] - k_pos[None, :]).abs()
    return -SLOPES[:, None, None] * distance + 0.01 * q_pos[None, :, None]


def _dense_reference(q, k, v, pattern, causal, q_offset=0, k_start=0, key_mask=None, bias=None):
    """softmax(q k^T / sqrt(D) + bias) v with the explicit (T, S) mask; rows with no key give 0."""
    T, S = q.shape[2], k.shape[2]
    q_pos = torch.arange(q_offset, q_offset + T)[:, None]
    k_pos = torch.arange(k_start, k_start + S)[None, :]
    allowed = pattern.allows(q_pos, k_pos)                                       # (T, S)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]                           # (B, 1, T, S)
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias(q_pos[:, 0], k_pos[0])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


def _inputs(B, T, S, Hkv=HKV, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=g).requires_grad_() for h, n in ((H, T), (Hkv, S), (Hkv, S)))
    return q, k, v, torch.randn(B, H, T, D, generator=g)


def _padding(S):
    """Row 0 all real; row 1 left-padded by 3 and right-padded by 2; row 2 all padding."""
    key_mask = torch.ones(3, S, dtype=torch.bool)
    key_mask[1, :3] = key_mask[1, S - 2:] = False
    key_mask[2] = False
    return key_mask


def _assert_matches_reference(pattern, causal, T, S, q_offset=0, k_start=0, padded=False, biased=False,
                              block=16, Hkv=HKV):
    key_mask = _padding(S) if padded else None
    bias = _alibi if biased else None
    q, k, v, grad = _inputs(3, T, S, Hkv)
    got = sparse_attention(q, k, v, pattern, causal=causal, q_offset=q_offset, k_start=k_start,
                           key_mask=key_mask, bias=bias, block=block)
    want = _dense_reference(q, k, v, pattern, causal, q_offset, k_start, key_mask, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("T", [1, 7, 64, 100])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_outputs_and_gradients_equal_the_dense_masked_reference(pattern, causal, T):
    for padded, biased in [(False, False), (True, False), (False, True), (True, True)]:
        _assert_matches_reference(pattern, causal, T, T, padded=padded, biased=biased)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_cached_decoding_queries_at_the_end_of_longer_keys(pattern, causal, T):
    S = 45
    _assert_matches_reference(pattern, causal, T, S, q_offset=S - T, padded=True, biased=True)
    _assert_matches_reference(pattern, causal, T, S, q_offset=S - T, Hkv=1)              # multi-query


@pytest.mark.parametrize("pattern", [Band(6), Dilated(3, 2) | Global(n_first=2), BlockLocal(8)], ids=repr)
def test_keys_that_start_late_like_a_sliding_window_cache(pattern):
    _assert_matches_reference(pattern, True, 3, 20, q_offset=37, k_start=20, padded=True, biased=True)


def test_a_sliding_window_decoder_needs_only_its_last_window_keys():
    q, k, v, _ = _inputs(2, 1, 50)
    full = sparse_attention(q, k, v, Band(8), causal=True, q_offset=49)
    last = sparse_attention(q, k[:, :, -8:], v[:, :, -8:], Band(8), causal=True, q_offset=49, k_start=42)
    torch.testing.assert_close(last, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pattern", [Everything(), Band(2 * 37), Band(37)], ids=repr)
def test_a_pattern_that_allows_everything_is_full_attention(pattern, causal):
    q, k, v, grad = _inputs(2, 37, 37)
    got = sparse_attention(q, k, v, pattern, causal=causal, block=16)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          is_causal=causal)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_the_work_grows_with_the_window_not_with_t_times_s():
    T, window, block = 4096, 32, 16
    (causal,) = plan_attention(Band(window), T, T, causal=True, block=block)
    assert causal.k_index.shape[1] <= block + window - 1                        # keys gathered per query group
    (both,) = plan_attention(Band(window), T, T, causal=False, block=block)
    assert both.k_index.shape[1] <= block + 2 * (window - 1)
    assert both.mask.numel() <= T * (block + 2 * window)                         # no (T, S) mask anywhere
    (dilated,) = plan_attention(Dilated(window, 4), T, T, causal=True, block=block)
    assert dilated.k_index.shape[1] <= block + window - 1                        # residue classes, not 4x the span
    local, global_keys, global_rows = plan_attention(BlockLocal(64) | Global(n_first=2), T, T, causal=False,
                                                     block=block)
    assert local.k_index.shape[1] <= 64 and global_keys.k_index.shape[1] == 2
    assert global_rows.q_index.numel() == 2                                      # only the global rows are dense
    band, strided = plan_attention(Band(64) | Strided(64), T, T, causal=True, block=block)
    assert strided.k_index.shape[1] <= T // 64                                   # O(T / stride) keys per query


def test_the_bias_is_evaluated_on_gathered_blocks_only():
    seen = []

    def bias(q_pos, k_pos):
        seen.append((q_pos.shape[-1], k_pos.shape[-1]))
        return _alibi(q_pos, k_pos)

    q, k, v, _ = _inputs(1, 256, 256)
    sparse_attention(q, k, v, Band(8), causal=True, bias=bias, block=16)
    assert seen == [(16, 16 + 8 - 1)]                                             # one (vmapped) call per piece


def test_plans_are_cached_per_shape_and_offset():
    first = plan_attention(Band(8), 100, 100, causal=True, block=16)
    assert plan_attention(Band(8), 100, 100, causal=True, block=16) is first
    assert plan_attention(Band(8), 1, 100, causal=True, q_offset=99, block=16) is not first


def test_dropout_drops_the_merged_weights_once_in_training_only():
    """With identity values the output row is the weight row itself: each weight is dropped or scaled by 2."""
    pattern = Band(3) | Strided(5) | Global(n_first=1)
    q, k, _, _ = _inputs(1, 16, 16)
    q, k = q.detach(), k.detach()
    v = torch.eye(16).expand(1, HKV, 16, 16)                                    # value j = e_j (Dv = S = 16)
    weights = sparse_attention(q, k, v, pattern, causal=True)                   # (1, H, T, S) merged weights
    torch.testing.assert_close(weights, _dense_reference(q, k, v, pattern, True))
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, causal=True, dropout=0.5), weights)
    torch.manual_seed(0)
    dropped = sparse_attention(q, k, v, pattern, causal=True, dropout=0.5, training=True)
    kept = torch.isclose(dropped, 2 * weights, atol=1e-6, rtol=0)
    assert bool((kept | (dropped == 0)).all())
    assert bool((kept & (weights > 0)).any()) and bool(((dropped == 0) & (weights > 0)).any())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_their_dtype_and_stay_close(dtype):
    pattern = BlockLocal(8) | Global(n_first=2)
    q, k, v, _ = _inputs(3, 40, 40)
    q, k, v = (x.detach().to(dtype) for x in (q, k, v))
    got = sparse_attention(q, k, v, pattern, causal=True, key_mask=_padding(40), bias=_alibi)
    assert got.dtype == dtype
    want = _dense_reference(q.float(), k.float(), v.float(), pattern, True, key_mask=_padding(40), bias=_alibi)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("shapes, key_mask, message", [
    (((1, 4, 5, 8), (1, 3, 5, 8), (1, 3, 5, 8)), None, r"q \(1, 4, 5, 8\), k \(1, 3, 5, 8\).*Hkv dividing H"),
    (((1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 6, 8)), None, r"v \(1, 2, 6, 8\); want q \(B, H, T, D\)"),
    (((1, 4, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)), torch.ones(1, 4, dtype=torch.bool),
     r"key_mask \(1, 4\), want \(B, S\) = \(1, 5\)"),
])
def test_wrong_shapes_are_named(shapes, key_mask, message):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        sparse_attention(q, k, v, Band(2), causal=True, key_mask=key_mask)


def test_a_block_below_one_is_refused():
    with pytest.raises(ValueError, match=r"plan_attention: block=0, must be >= 1"):
        plan_attention(Band(2), 4, 4, causal=True, block=0)
