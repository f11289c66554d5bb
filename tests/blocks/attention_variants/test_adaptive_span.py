"""Adaptive span attention against the paper's renormalised weights written here densely, against full attention
at its limit, and through a decoder: causality, padding, windowed decoding, the span penalty and clamping."""

import math
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.attention_variants.adaptive_span import AdaptiveSpanAttention
from lightning_tfm.blocks.kv_cache import WindowCache
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions, NoPositions, RotaryPositions, apply_rotary
from lightning_tfm.models import DecoderOnly, EncoderOnly
from lightning_tfm.models.attention_contract import after_optimizer_step, auxiliary_losses
from lightning_tfm.tasks import LanguageModelModule

SMALL = dict(d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.0)


class EightBlocks(AdaptiveSpanAttention):
    """Blocks of 8 so that short test sequences span several blocks."""

    block = 8


def _set_spans(model, generator, high=0.5):
    with torch.no_grad():
        for block in model.modules():
            if isinstance(block, AdaptiveSpanAttention):
                block.span.copy_(torch.rand(block.span.shape, generator=generator) * high)


def _paper_reference(attn, x, key_mask=None, bias=None, rotary=None):
    """out(a v) with the paper's weights a (`_paper_weights`)."""
    a, v = _paper_weights(attn, x, key_mask, bias, rotary)
    B, T, C = x.shape
    return attn.out((a @ v).transpose(1, 2).reshape(B, T, C))


def _paper_weights(attn, x, key_mask=None, bias=None, rotary=None):
    """a_ij = m(i-j) exp(s_ij) / sum_k m(i-k) exp(s_ik), m(x) = clamp((R + z - x) / R, 0, 1) for x < max_span
    (Sukhbaatar et al. 2019, eq. 2-3), over causal, unpadded keys; dense (B, H, T, T), and v (B, H, T, D)."""
    B, T, C = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split([H * D, Hkv * D, Hkv * D], -1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k, v = (t.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)                                     # (B, H, T, T)
    pos = torch.arange(T)
    if bias is not None:
        s = s + bias(pos, pos)
    distance = pos[:, None] - pos[None, :]
    allowed = (distance >= 0)[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
    z = attn.span[:, None, None] * attn.max_span                                  # (H, 1, 1)
    m = ((attn.ramp + z - distance) / attn.ramp).clamp(0, 1) * (distance < attn.max_span)
    a = torch.softmax(s, -1) * m
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)      # a padded query may see no key with m > 0
    return a, v


def _outputs_and_grads(forward, params, real, g):
    y = forward()
    return [y[real]] + list(torch.autograd.grad((y[real] * g).sum(), params))


@pytest.mark.parametrize("T", [45, 48])
@pytest.mark.parametrize("case", ["plain", "padded_alibi", "rotary_gqa", "capped"])
def test_equals_the_papers_renormalised_weights_in_outputs_and_gradients(T, case):
    torch.manual_seed(0)
    n_kv_heads = 2 if case == "rotary_gqa" else None
    max_span = 12 if case == "capped" else 16
    attn = EightBlocks(16, 4, max_span=max_span, ramp=4, n_kv_heads=n_kv_heads)
    with torch.no_grad():      # spans that cut at different distances; the capped case sees max_span keys only
        attn.span.copy_(torch.full((4,), 1.0) if case == "capped" else torch.tensor([0.1, 0.37, 0.02, 0.6]))
    x = torch.randn(3, T, 16, requires_grad=True)
    real = torch.ones(3, T, dtype=torch.bool)
    bias, rotary = None, None
    if case == "padded_alibi":
        real[1, :5], real[2, T - 9:] = False, False                            # one left-, one right-padded row
        bias = ALiBiPositions(16, 4).position_bias()
    if case == "rotary_gqa":
        rotary = RotaryPositions(16, 4).rotary(T)
    mask = AttentionMask.build(real, causal=True, bias=bias)
    assert attn.plan(T, T).n_blocks > 1                                         # the banded path runs
    params = [x, attn.qkv.weight, attn.out.weight, attn.span]
    g = torch.randn(int(real.sum()), 16)
    got = _outputs_and_grads(lambda: attn(x, mask=mask, rotary=rotary), params, real, g)
    want = _outputs_and_grads(lambda: _paper_reference(attn, x, mask.key_mask, bias, rotary), params, real, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_spans_at_their_maximum_give_multi_head_attention(n_kv_heads):
    torch.manual_seed(0)
    attn = EightBlocks(16, 4, max_span=64, ramp=4, init_span=1.0, n_kv_heads=n_kv_heads)
    full = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads)
    full.load_state_dict(attn.state_dict(), strict=False)
    x = torch.randn(2, 37, 16, requires_grad=True)
    real = torch.ones(2, 37, dtype=torch.bool)
    real[1, 30:] = False
    mask = AttentionMask.build(real, causal=True)
    g = torch.randn(int(real.sum()), 16)
    got = _outputs_and_grads(lambda: attn(x, mask=mask), [x, attn.qkv.weight], real, g)
    want = _outputs_and_grads(lambda: full(x, mask=mask), [x, full.qkv.weight], real, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_short_spans_bound_the_keys_each_query_computes(monkeypatch):
    attn = AdaptiveSpanAttention(16, 2, max_span=1024, ramp=8).eval()          # paper's init: spans of the ramp
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append(tuple(k.shape))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    attn(torch.randn(1, 1000, 16), mask=AttentionMask(causal=True))
    plan = attn.plan(1000, 1000)
    assert (plan.window, plan.reach, plan.query_block, plan.n_blocks) == (8, 64, 64, 16)
    assert seen == [(1 * 16, 2, 128, 8)]           # 16 blocks of 64 queries, each over 128 keys, not 1000
    assert attn.new_state().window == 7
    with torch.no_grad():
        attn.span.fill_(0.5)
    assert attn.plan(1000, 1000).keys_per_block == 576 + 64        # 512 + 8 - 1 keys back, rounded up to 64
    with torch.no_grad():
        attn.span.fill_(1.0)
    assert attn.plan(1000, 1000).keys_per_block == 1000           # every key visible: one dense block


def _decoder(positions=RotaryPositions, seed=0):
    torch.manual_seed(seed)
    model = DecoderOnly(50, **SMALL, attention=partial(EightBlocks, max_span=16, ramp=4),
                        positions=partial(positions, max_len=64)).eval()
    _set_spans(model, torch.Generator().manual_seed(seed))
    return model


def test_a_later_token_never_changes_an_earlier_output():
    model = _decoder()
    ids = torch.randint(0, 50, (2, 40))
    changed = ids.clone()
    changed[:, 18:] = torch.randint(0, 50, (2, 22))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :18], b[:, :18], atol=1e-6, rtol=0)
    assert (a[:, 18:] - b[:, 18:]).abs().amax() > 1e-3


@pytest.mark.parametrize("positions", [RotaryPositions, ALiBiPositions, NoPositions])
def test_padding_on_either_side_leaves_real_positions_as_alone(positions):
    model = _decoder(positions)
    lengths = [30, 21, 26]
    seqs = [torch.randint(0, 50, (n,)) for n in lengths]
    alone = [model(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(3, 30, dtype=torch.long)
        real = torch.zeros(3, 30, dtype=torch.bool)
        for i, s in enumerate(seqs):
            where = slice(0, len(s)) if side == "right" else slice(30 - len(s), 30)
            ids[i, where], real[i, where] = s, True
        out = model(ids, mask=real)
        for i in range(3):
            torch.testing.assert_close(out[i][real[i]], alone[i], atol=1e-5, rtol=0)


@torch.no_grad()
def test_windowed_decoding_equals_the_full_forward_with_padding_beams_and_a_multi_token_step():
    model = _decoder()
    ids = torch.randint(0, 50, (3, 30))
    real = torch.ones(3, 30, dtype=torch.bool)
    real[1, :3] = False                                                       # a left-padded row
    full = model(ids, mask=real)
    perm = torch.tensor([2, 0, 1])
    full_perm = model(ids[perm], mask=real[perm])
    cache = model.new_cache()
    got = [model(ids[:, :11], mask=real[:, :11], cache=cache)]               # prefill
    for t in range(11, 20):
        got.append(model(ids[:, t:t + 1], mask=real[:, :t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(got, 1)[real[:, :20]], full[:, :20][real[:, :20]], atol=1e-5, rtol=0)
    cache.reorder(perm)                                                       # beam search picks parents
    ids, real = ids[perm], real[perm]
    after = [model(ids[:, 20:21], mask=real[:, :21], cache=cache),
             model(ids[:, 21:26], mask=real[:, :26], cache=cache)]            # five tokens in one step
    after += [model(ids[:, t:t + 1], mask=real[:, :t + 1], cache=cache) for t in range(26, 30)]
    torch.testing.assert_close(torch.cat(after, 1)[real[:, 20:]], full_perm[:, 20:][real[:, 20:]], atol=1e-5,
                               rtol=0)
    for state, layer in zip(cache.self_attn, model.stack.layers):
        window = layer.attention.window()
        assert isinstance(state, WindowCache) and state.k.shape[2] == window - 1 < 16


def test_the_span_penalty_enters_a_language_model_training_step_only():
    attention = partial(AdaptiveSpanAttention, max_span=32, ramp=4, init_span=0.25, span_penalty=0.01)
    module = LanguageModelModule(partial(DecoderOnly, **SMALL, attention=attention), vocab_size=24)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value.detach()))
    batch = {"ids": torch.randint(0, 24, (2, 9)), "mask": torch.ones(2, 9, dtype=torch.bool)}
    module.train()
    total = module.training_step(batch, 0)
    assert logged["train_span_penalty"] == pytest.approx(2 * 0.01 * 32 * 0.25)    # lambda * mean z, per layer
    assert float(total.detach()) == pytest.approx(logged["train_loss"] + logged["train_span_penalty"])
    penalty = auxiliary_losses(module.model)["span_penalty"]
    spans = [b.span for b in module.modules() if isinstance(b, AdaptiveSpanAttention)]
    for grad in torch.autograd.grad(penalty, spans):
        torch.testing.assert_close(grad, torch.full((4,), 0.01 * 32 / 4))
    module.eval()
    assert auxiliary_losses(module.model) == {}


def test_spans_are_clamped_to_their_range_after_each_optimizer_step(tmp_path):
    block = AdaptiveSpanAttention(16, 4, max_span=32)
    with torch.no_grad():
        block.span.copy_(torch.tensor([-0.3, 0.4, 1.7, 1.0]))
    after_optimizer_step(block)
    assert block.span.tolist() == pytest.approx([0.0, 0.4, 1.0, 1.0])
    # a real step: the penalty's gradient pushes every span far below 0, the clamp brings it back
    attention = partial(AdaptiveSpanAttention, max_span=32, ramp=4, init_span=0.5, span_penalty=10.0)
    module = LanguageModelModule(partial(DecoderOnly, **SMALL, attention=attention), vocab_size=24,
                                 optimizer=partial(torch.optim.SGD, lr=1.0))
    batches = [{"ids": torch.randint(0, 24, (2, 9)), "mask": torch.ones(2, 9, dtype=torch.bool)}]
    module.tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(24)}, unk_token="t0"))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    spans = [b.span for b in module.modules() if isinstance(b, AdaptiveSpanAttention)]
    assert all(s.tolist() == [0.0] * 4 for s in spans)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_span=0), r"max_span=0 and ramp=32 must be >= 1"),
    (dict(ramp=0), r"max_span=1024 and ramp=0 must be >= 1"),
    (dict(init_span=1.5), r"init_span=1.5, must be in \[0, 1\]"),
    (dict(span_penalty=-1.0), r"span_penalty=-1.0, must be >= 0"),
])
def test_impossible_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=f"AdaptiveSpanAttention: {message}"):
        AdaptiveSpanAttention(16, 4, **kwargs)


def test_what_it_cannot_do_is_refused():
    with pytest.raises(ValueError, match=r"AdaptiveSpanAttention \(at layers.0.attention\) cannot attend "
                                         "bidirectionally"):
        EncoderOnly(50, **SMALL, attention=AdaptiveSpanAttention)


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_keeps_the_papers_renormalised_weights(n_kv_heads):
    torch.manual_seed(0)
    attn = EightBlocks(16, 4, max_span=16, ramp=4, n_kv_heads=n_kv_heads)
    with torch.no_grad():
        attn.span.copy_(torch.tensor([0.1, 0.37, 0.02, 0.6]))
    x = torch.randn(3, 30, 16)
    real = torch.ones(3, 30, dtype=torch.bool)
    real[1, :5], real[2, 21:] = False, False                                   # one left-, one right-padded row
    bias = ALiBiPositions(16, 4).position_bias()
    mask = AttentionMask.build(real, causal=True, bias=bias)
    attn.keep_weights = True
    with torch.no_grad():
        got = attn(x, mask=mask)
        a, _ = _paper_weights(attn, x, real, bias)
        want = _paper_reference(attn, x, real, bias)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    rows = real[:, None].expand(-1, 4, -1)
    torch.testing.assert_close(attn.weights[rows], a[rows], atol=1e-6, rtol=0)
    distance = torch.arange(30)[:, None] - torch.arange(30)[None, :]
    beyond = (distance < 0) | (distance >= attn._reach()[:, None, None])       # (H, T, T): m = 0
    assert (attn.weights[beyond.expand(3, -1, -1, -1)] == 0).all()
