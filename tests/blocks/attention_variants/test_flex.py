"""The FlexAttention path (CUDA) builds the same mask as the pattern describes: checked on CPU, where
FlexAttention runs its eager reference (forward only), against the dense computation."""

import warnings

import pytest
import torch

from lightning_tfm.blocks.attention_variants import Band, BlockLocal, Dilated, Global, Strided
from lightning_tfm.blocks.attention_variants.flex import flex_available, flex_sparse_attention

PATTERNS = {"band": Band(9), "dilated": Dilated(5, 3), "strided": Strided(7), "block": BlockLocal(16),
            "block+global": BlockLocal(16) | Global(n_first=3), "band+strided": Band(5) | Strided(11)}


def _dense(q, k, v, pattern, causal, q_offset, k_start, key_mask):
    q_pos = torch.arange(q.shape[2])[:, None] + q_offset
    k_pos = torch.arange(k.shape[2])[None, :] + k_start
    allowed = pattern.allows(q_pos, k_pos) & key_mask[:, None, None, :]
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    logits = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("causal, q_offset", [(True, 0), (False, 0), (True, 37)])
def test_flex_attention_equals_the_dense_masked_computation(name, causal, q_offset):
    torch.manual_seed(0)
    T = 100 if q_offset == 0 else 5
    q, k, v = torch.randn(2, 4, T, 16), torch.randn(2, 2, q_offset + T, 16), torch.randn(2, 2, q_offset + T, 16)
    key_mask = torch.ones(2, q_offset + T, dtype=torch.bool)
    key_mask[1, :20] = False                                 # left padding: some rows see no key at all
    key_mask[1, 90:] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                      # "eager mode is for debugging"
        got = flex_sparse_attention(q, k, v, PATTERNS[name], causal=causal, q_offset=q_offset, key_mask=key_mask,
                                    compiled=False)
    want = _dense(q, k, v, PATTERNS[name], causal, q_offset, 0, key_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_flex_serves_cuda_inputs_without_dropout_or_bias_only():
    assert not flex_available(torch.zeros(1), 0.0, False)             # CPU: the blocked kernel trains there
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        assert flex_available(x, 0.0, False) and not flex_available(x, 0.1, False)
        assert not flex_available(x, 0.0, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's compiled kernel needs a GPU")
def test_on_cuda_a_sparse_block_trains_through_flex_attention_as_on_cpu():
    from lightning_tfm.blocks import AttentionMask, LayerPlace
    from lightning_tfm.blocks.attention_variants import BlockGlobalAttention

    torch.manual_seed(0)
    block = BlockGlobalAttention(64, 4, LayerPlace(causal=True), block=128, n_global=4)
    x = torch.randn(2, 1000, 64, requires_grad=True)
    lengths = torch.tensor([[1000], [700]])
    mask = AttentionMask(causal=True, key_mask=torch.arange(1000)[None, :].expand(2, -1) < lengths)
    want = block(x, mask=mask)
    want_grad, = torch.autograd.grad(want.square().sum(), x)
    x_cuda = x.detach().cuda().requires_grad_()
    cuda_mask = AttentionMask(causal=True, key_mask=mask.key_mask.cuda())
    got = block.cuda()(x_cuda, mask=cuda_mask)
    got_grad, = torch.autograd.grad(got.square().sum(), x_cuda)
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_grad.cpu(), want_grad, atol=1e-3, rtol=1e-3)
