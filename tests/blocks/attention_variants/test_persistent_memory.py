"""Persistent-memory attention against a dense reference that concatenates the memory written here, against
full attention with no memory, and through models: causality, padding, cached decoding, and the all-attention
decoder built from YAML."""

import math
from functools import partial
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.attention_variants.persistent_memory import PersistentMemoryAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions, NoPositions, RotaryPositions, apply_rotary
from lightning_tfm.models import DecoderOnly, EncoderDecoder

SMALL = dict(d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.0)


def _dense_reference(attn, x, key_mask=None, causal=False, bias=None, rotary=None):
    """softmax over [memory; keys] (Sukhbaatar et al. 2019, §4.1): the memory has no position (bias 0, and its
    logits take the query unrotated) and is never masked; the sequence's keys are masked and biased as usual."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split([H * D, Hkv * D, Hkv * D], -1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k, v = (t.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    q_seq, k_seq = (q, k) if rotary is None else (apply_rotary(q, *rotary), apply_rotary(k, *rotary))
    memory_keys = attn.memory_keys.repeat_interleave(H // Hkv, 0)                  # (H, N, D)
    s_memory = q @ memory_keys.transpose(-1, -2) / math.sqrt(D)                   # (B, H, T, N)
    s_seq = q_seq @ k_seq.transpose(-1, -2) / math.sqrt(D)                        # (B, H, T, T)
    pos = torch.arange(T)
    if bias is not None:
        s_seq = s_seq + bias(pos, pos)
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    a = torch.softmax(torch.cat([s_memory, s_seq.masked_fill(~allowed, float("-inf"))], -1), -1)
    v = torch.cat([attn.memory_values.repeat_interleave(H // Hkv, 0).expand(B, -1, -1, -1), v], 2)   # (B, H, N+T, D)
    return attn.out((a @ v).transpose(1, 2).reshape(B, T, C))


def _outputs_and_grads(forward, params, real, g):
    y = forward()
    return [y[real]] + list(torch.autograd.grad((y[real] * g).sum(), params))


@pytest.mark.parametrize("case", ["bidirectional_padded", "causal_padded_alibi", "causal_rotary_gqa"])
@pytest.mark.parametrize("explicit", [False, True])
def test_equals_a_dense_reference_with_concatenated_memory_in_outputs_and_gradients(case, explicit):
    torch.manual_seed(0)
    attn = PersistentMemoryAttention(16, 4, n_memory=6, n_kv_heads=2 if "gqa" in case else None)
    attn.keep_weights = explicit
    x = torch.randn(3, 13, 16, requires_grad=True)
    real = torch.ones(3, 13, dtype=torch.bool)
    if "padded" in case:
        real[1, :4], real[2, 9:] = False, False
    bias = ALiBiPositions(16, 4).position_bias() if "alibi" in case else None
    rotary = RotaryPositions(16, 4).rotary(13) if "rotary" in case else None
    causal = case.startswith("causal")
    mask = AttentionMask.build(real, causal=causal, bias=bias)
    params = [x, attn.qkv.weight, attn.memory_keys, attn.memory_values]
    g = torch.randn(int(real.sum()), 16)
    got = _outputs_and_grads(lambda: attn(x, mask=mask, rotary=rotary), params, real, g)
    want = _outputs_and_grads(lambda: _dense_reference(attn, x, mask.key_mask, causal, bias, rotary), params,
                              real, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    if explicit:
        assert attn.weights.shape == (3, 4, 13, 6 + 13)
        torch.testing.assert_close(attn.weights.sum(-1), torch.ones(3, 4, 13))


@pytest.mark.parametrize("cross", [False, True])
def test_no_memory_is_multi_head_attention(cross):
    torch.manual_seed(0)
    attn = PersistentMemoryAttention(16, 4, n_memory=0, n_kv_heads=2)
    full = MultiHeadAttention(16, 4, n_kv_heads=2)
    full.load_state_dict(attn.state_dict(), strict=False)
    x, memory = torch.randn(2, 7, 16, requires_grad=True), torch.randn(2, 9, 16)
    real = torch.ones(2, 9 if cross else 7, dtype=torch.bool)
    real[1, 5:] = False
    mask = AttentionMask.build(real, causal=not cross, bias=None if cross else ALiBiPositions(16, 4).position_bias())
    context = memory if cross else None
    rows = torch.ones(2, 7, dtype=torch.bool)
    g = torch.randn(14, 16)
    got = _outputs_and_grads(lambda: attn(x, context, mask), [x, attn.qkv.weight], rows, g)
    want = _outputs_and_grads(lambda: full(x, context, mask), [x, full.qkv.weight], rows, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_query_with_no_visible_key_still_reads_the_memory():
    torch.manual_seed(0)
    attn = PersistentMemoryAttention(16, 4, n_memory=5).eval()
    x = torch.randn(2, 6, 16)
    nothing = torch.zeros(2, 6, dtype=torch.bool)                 # every key padded
    got = attn(x, mask=AttentionMask(key_mask=nothing))
    q = F.linear(x, attn.qkv.weight[:16], attn.qkv.bias[:16]).view(2, 6, 4, 4).transpose(1, 2)
    a = torch.softmax(q @ attn.memory_keys.transpose(-1, -2) / 2.0, -1)            # (B, H, T, N)
    want = attn.out((a @ attn.memory_values).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the first causal position sees the memory and itself, not only itself
    causal = attn(x, mask=AttentionMask(causal=True))
    only_itself = MultiHeadAttention(16, 4)
    only_itself.load_state_dict(attn.state_dict(), strict=False)
    assert (causal[:, 0] - only_itself(x, mask=AttentionMask(causal=True))[:, 0]).abs().amax() > 1e-3


def _decoder(positions=RotaryPositions, n_memory=4):
    torch.manual_seed(0)
    return DecoderOnly(50, **SMALL, attention=partial(PersistentMemoryAttention, n_memory=n_memory),
                       positions=partial(positions, max_len=64)).eval()


def test_a_later_token_never_changes_an_earlier_output():
    model = _decoder()
    ids = torch.randint(0, 50, (2, 20))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(0, 50, (2, 12))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().amax() > 1e-3


@pytest.mark.parametrize("positions", [RotaryPositions, ALiBiPositions, NoPositions])
def test_padding_on_either_side_leaves_real_positions_as_alone(positions):
    model = _decoder(positions)
    seqs = [torch.randint(0, 50, (n,)) for n in (12, 7, 9)]
    alone = [model(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(3, 12, dtype=torch.long)
        real = torch.zeros(3, 12, dtype=torch.bool)
        for i, s in enumerate(seqs):
            where = slice(0, len(s)) if side == "right" else slice(12 - len(s), 12)
            ids[i, where], real[i, where] = s, True
        out = model(ids, mask=real)
        for i in range(3):
            torch.testing.assert_close(out[i][real[i]], alone[i], atol=1e-5, rtol=0)


@torch.no_grad()
def test_cached_decoding_equals_the_full_forward_with_padding_beams_and_a_multi_token_step():
    model = _decoder()
    ids = torch.randint(0, 50, (3, 16))
    real = torch.ones(3, 16, dtype=torch.bool)
    real[1, :3] = False
    full = model(ids, mask=real)
    perm = torch.tensor([2, 0, 1])
    full_perm = model(ids[perm], mask=real[perm])
    cache = model.new_cache()
    got = [model(ids[:, :5], mask=real[:, :5], cache=cache)]
    got += [model(ids[:, t:t + 1], mask=real[:, :t + 1], cache=cache) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(got, 1)[real[:, :9]], full[:, :9][real[:, :9]], atol=1e-5, rtol=0)
    cache.reorder(perm)
    ids, real = ids[perm], real[perm]
    after = [model(ids[:, 9:13], mask=real[:, :13], cache=cache)]              # four tokens in one step
    after += [model(ids[:, t:t + 1], mask=real[:, :t + 1], cache=cache) for t in range(13, 16)]
    torch.testing.assert_close(torch.cat(after, 1)[real[:, 9:]], full_perm[:, 9:][real[:, 9:]], atol=1e-5,
                               rtol=0)
    assert all(state.length == 16 for state in cache.self_attn)               # real keys only, no memory slots


@torch.no_grad()
def test_cross_attention_with_memory_decodes_as_it_runs_whole():
    torch.manual_seed(0)
    model = EncoderDecoder(50, **SMALL, cross_attention=partial(PersistentMemoryAttention, n_memory=3)).eval()
    src, tgt = torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (2, 6))
    src_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, src_mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache=cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


ALL_ATTENTION = """
model:
  class_path: lightning_tfm.models.DecoderOnly
  init_args:
    d_model: 16
    n_layers: 3
    n_heads: 4
    dropout: 0.0
    feedforward: null
    positions: {class_path: lightning_tfm.blocks.positions.RotaryPositions, init_args: {max_len: 32}}
    attention:
      class_path: lightning_tfm.blocks.attention_variants.persistent_memory.PersistentMemoryAttention
      init_args: {n_memory: 8}
"""


def test_the_all_attention_decoder_is_built_from_yaml():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=Callable[[int], DecoderOnly])
    config = parser.parse_object(yaml.safe_load(ALL_ATTENTION))
    model = parser.instantiate(config).model(50).eval()
    layers = model.stack.layers
    assert all(layer.feedforward is None and layer.feedforward_residual is None for layer in layers)
    assert all(isinstance(layer.attention, PersistentMemoryAttention) and layer.attention.n_memory == 8
               for layer in layers)
    assert not any("feedforward" in name for name, _ in model.named_parameters())
    ids = torch.randint(0, 50, (2, 10))
    cache = model.new_cache()
    steps = torch.cat([model(ids[:, t:t + 1], cache=cache) for t in range(10)], 1)
    torch.testing.assert_close(steps, model(ids), atol=1e-5, rtol=0)


def test_a_negative_memory_size_is_refused():
    with pytest.raises(ValueError, match=r"PersistentMemoryAttention: n_memory=-1, must be >= 0"):
        PersistentMemoryAttention(16, 4, n_memory=-1)
