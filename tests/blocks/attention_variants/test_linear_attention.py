"""Linear attention (elu + 1) and the Performer against the kernel formula written out here (A = phi(q) phi(k)^T,
masked, out = A v / A 1), the Performer's features against the softmax kernel they estimate, and through models:
causality across chunk boundaries, padding, recurrent decoding = the parallel form (after beam reordering and
multi-token steps too), fp32 state under bf16 autocast, no (T, T) intermediate, refused rotary positions,
deterministic redraws."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants.linear_attention import LinearAttention, LinearAttentionState
from lightning_tfm.blocks.attention_variants.performer import PerformerAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions, NoPositions, RotaryPositions, SinusoidalPositions
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly

D, H = 32, 4
CLASSES = {"elu": partial(LinearAttention, chunk=16), "performer": partial(PerformerAttention, chunk=16,
                                                                           n_features=32)}
SMALL = dict(d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0)


def _elu_features(x):
    return F.elu(x) + 1


def _reference(block, x, allowed, phi):
    """out = (A v) / (A 1), A = phi(q) phi(k)^T where allowed, 0 elsewhere, with the block's own projections."""
    B, T, _ = x.shape
    Hkv, E = block.n_kv_heads, D // H
    q, k, v = block.qkv(x).split([D, Hkv * E, Hkv * E], -1)
    q = q.view(B, T, H, E).transpose(1, 2)
    k, v = (t.view(B, T, Hkv, E).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    A = (phi(q, True) @ phi(k, False).transpose(-1, -2)) * allowed                  # (B, H, T, T)
    return block.out(((A @ v) / A.sum(-1, keepdim=True)).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_equals_the_kernel_formula_with_padding_outputs_and_gradients(name, causal, n_kv_heads):
    torch.manual_seed(0)
    block = CLASSES[name](D, H, LayerPlace(causal=causal), n_kv_heads=n_kv_heads)
    x = torch.randn(2, 100, D, requires_grad=True)        # 100 = 6 chunks of 16 and 4: boundaries are crossed
    real = torch.ones(2, 100, dtype=torch.bool)
    real[1, 83:] = False                                   # right padding
    got = block(x, mask=AttentionMask(causal, real))
    pos = torch.arange(100)
    allowed = real[:, None, None, :] & ((pos[None, :] <= pos[:, None]) if causal else True)
    phis = [block.features] + ([lambda t, _: _elu_features(t)] if name == "elu" else [])
    for phi in phis:
        want = _reference(block, x, allowed, phi)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        params = [x, block.qkv.weight]
        grads = torch.autograd.grad(got.square().sum(), params, retain_graph=True)
        for g, e in zip(grads, torch.autograd.grad(want.square().sum(), params)):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CLASSES)
def test_causal_queries_after_cached_keys_see_them_all(name):
    torch.manual_seed(0)
    block = CLASSES[name](D, H, LayerPlace(causal=True))
    q = torch.randn(2, H, 20, D // H)
    k, v = torch.randn(2, 2, H, 50, D // H).unbind(0)            # 50 keys, the last 20 the queries' own
    real = torch.ones(2, 50, dtype=torch.bool)
    real[0, 5:9] = False
    got = block.attend(q, k, v, AttentionMask(True, real, offset=30))
    allowed = real[:, None, None, :] & (torch.arange(50)[None, :] <= torch.arange(30, 50)[:, None])
    A = (block.features(q, True) @ block.features(k, False).transpose(-1, -2)) * allowed
    torch.testing.assert_close(got, (A @ v) / A.sum(-1, keepdim=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CLASSES)
def test_a_query_that_sees_no_key_outputs_zeros(name):
    block = CLASSES[name](D, H).eval()
    nothing = torch.zeros(2, 7, dtype=torch.bool)
    for causal in (False, True):
        y = block(torch.randn(2, 7, D), mask=AttentionMask(causal, nothing))
        torch.testing.assert_close(y, block.out.bias.expand(2, 7, D))          # out(0) = its bias


def test_performer_features_estimate_the_softmax_kernel():
    torch.manual_seed(0)
    E, m = 16, 8192
    block = PerformerAttention(E * 2, 2, n_features=m)
    W = block.projection                                                          # (m, E)
    q, k = torch.randn(1, 1, 6, E) * 0.5, torch.randn(1, 1, 5, E) * 0.5

    def phi(x):   # Lemma 1, written out without stabilisers
        x = x / E ** 0.25
        return torch.exp(x @ W.T - x.square().sum(-1, keepdim=True) / 2) / math.sqrt(m)

    kernel = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(E))
    estimate = phi(q) @ phi(k).transpose(-1, -2)
    error = (estimate / kernel - 1).abs()            # relative; with unit-norm rows it would be about 0.6
    assert error.mean() < 0.03 and error.amax() < 0.1
    # the block's features are these, up to one factor per query and one for all keys (which cancel)
    for x, is_query in ((q, True), (k, False)):
        ratio = block.features(x, is_query) / phi(x)
        torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=0)
        if not is_query:
            torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4, atol=0)
    # orthogonal within a block of E rows, norms not all equal (drawn from chi(E))
    block_rows = W[:E] / W[:E].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block_rows @ block_rows.T, torch.eye(E), atol=1e-5, rtol=0)
    assert W.norm(dim=1).std() > 0.1


def test_performer_key_features_never_overflow_and_read_no_other_key():
    block = PerformerAttention(D, H, n_features=64)
    k = torch.randn(1, H, 20, D // H) * 100.0
    k[:, :, 7] = block.projection[0] * (D // H) ** 0.25         # the key that maximises feature 0
    phi = block.features(k, is_query=False)
    assert torch.isfinite(phi).all() and phi.amax() <= math.exp(block.headroom) / 8 * (1 + 1e-5)
    torch.testing.assert_close(block.features(k[:, :, :5], is_query=False), phi[:, :, :5])


def _decoder(name, positions=SinusoidalPositions, pattern=None):
    torch.manual_seed(0)
    return DecoderOnly(50, **SMALL, positions=positions,
                       attention_pattern=pattern or [CLASSES[name], CLASSES[name]]).eval()


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("start", [48, 53])                  # a chunk boundary (3 x 16) and inside a chunk
def test_later_tokens_never_change_earlier_outputs(name, start):
    model = _decoder(name)
    ids = torch.randint(0, 50, (2, 90))
    changed = ids.clone()
    changed[:, start:] = torch.randint(0, 50, (2, 90 - start))
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :start], b[:, :start], atol=1e-5, rtol=0)
    assert (a[:, start] - b[:, start]).abs().amax() > 1e-3


@pytest.mark.parametrize("name", CLASSES)
def test_padding_never_changes_real_positions(name):
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, positions=SinusoidalPositions, attention=CLASSES[name]).eval()
    ids, junk = torch.randint(1, 50, (1, 70)), torch.randint(1, 50, (1, 23))
    right = torch.tensor([[True] * 70 + [False] * 23])
    torch.testing.assert_close(encoder(torch.cat([ids, junk], 1), mask=right)[:, :70], encoder(ids), atol=1e-5,
                               rtol=0)
    decoder = _decoder(name)
    torch.testing.assert_close(decoder(torch.cat([ids, junk], 1), mask=right)[:, :70], decoder(ids), atol=1e-5,
                               rtol=0)
    # left padding moves absolute positions; without positions, padded keys drop out exactly
    bag = _decoder(name, positions=NoPositions)
    torch.testing.assert_close(bag(torch.cat([junk, ids], 1), mask=right.flip(1))[:, 23:], bag(ids), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", CLASSES)
@torch.no_grad()
def test_recurrent_decoding_equals_the_parallel_form_after_reordering_and_multi_token_steps(name):
    model = _decoder(name, pattern=[CLASSES[name], MultiHeadAttention])
    ids = torch.randint(0, 50, (3, 70))
    cache = model.new_cache()
    steps = [model(ids[:, :37], cache=cache)]                          # prefill: chunked form from an empty state
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(37, 45)]
    steps.append(model(ids[:, 45:60], cache=cache))                     # a multi-token step from a state
    torch.testing.assert_close(torch.cat(steps, 1), model(ids[:, :60]), atol=1e-4, rtol=0)
    state = cache.self_attn[0]
    assert isinstance(state, LinearAttentionState)
    F_ = D // H if name == "elu" else 32
    assert state.S.shape == (3, H, F_, D // H) and state.z.shape == (3, H, F_)   # O(1) in the length
    order = torch.tensor([2, 0, 0])                                     # beam search picks parents
    cache.reorder(order)
    rest = torch.cat([model(ids[order, t:t + 1], cache=cache) for t in range(60, 70)], 1)
    torch.testing.assert_close(rest, model(ids[order])[:, 60:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CLASSES)
@torch.no_grad()
def test_recurrent_decoding_with_padding_and_cross_attention(name):
    torch.manual_seed(0)
    model = EncoderDecoder(50, **SMALL, positions=SinusoidalPositions, attention=CLASSES[name],
                           cross_attention=CLASSES[name]).eval()
    src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 20))
    src_mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    tgt_mask = torch.ones(2, 20, dtype=torch.bool)
    tgt_mask[1, 3] = False                                                # a padded key in the middle
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, src_mask, tgt_mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, :6], memory, src_mask, tgt_mask[:, :6], cache=cache)]
    steps += [model.decode(tgt[:, t:t + 1], memory, src_mask, tgt_mask[:, :t + 1], cache=cache) for t in range(6, 20)]
    torch.testing.assert_close(torch.cat(steps, 1)[tgt_mask], full[tgt_mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CLASSES)
def test_state_stays_fp32_and_gradients_are_finite_under_bf16_autocast(name):
    model = _decoder(name).train()
    ids = torch.randint(0, 50, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    cache = model.new_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[:, :20], cache=cache)
        y = model(ids[:, 20:21], cache=cache)
    assert torch.isfinite(y).all()
    assert all(s.S.dtype == torch.float32 and s.z.dtype == torch.float32 for s in cache.self_attn)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator produces (forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", CLASSES)
def test_causal_memory_is_linear_in_the_length(name):
    T = 2048
    block = CLASSES[name](16, 2, LayerPlace(causal=True), chunk=32)
    x = torch.randn(1, T, 16, requires_grad=True)
    with _LargestTensor() as probe:
        block(x, mask=AttentionMask(causal=True)).sum().backward()
    # 2 heads x T x 32 (chunk and Performer's features are 32): the (chunk, chunk) blocks and the features; a
    # (T, T) intermediate would hold 2048 x 2048
    assert probe.largest <= 2 * T * 32


@pytest.mark.parametrize("positions", [RotaryPositions, ALiBiPositions])
@pytest.mark.parametrize("cls", [LinearAttention, PerformerAttention])
def test_relative_positions_are_refused_naming_the_block(cls, positions):
    with pytest.raises(ValueError, match=cls.__name__):
        DecoderOnly(50, **SMALL, positions=positions, attention=cls)


def test_bad_arguments_are_refused():
    for kwargs, message in [({"chunk": 0}, "chunk=0"), ({"eps": 0.0}, "eps=0.0"), ({"dropout": 0.1}, "dropout=0.1")]:
        with pytest.raises(ValueError, match=f"LinearAttention: {message}"):
            LinearAttention(D, H, **kwargs)
    for kwargs, message in [({"n_features": 0}, "n_features=0"), ({"redraw_interval": -1}, "redraw_interval=-1")]:
        with pytest.raises(ValueError, match=f"PerformerAttention: {message}"):
            PerformerAttention(D, H, **kwargs)


def test_performer_redraws_identically_across_ranks_and_keeps_its_matrix_in_checkpoints():
    a, b = (PerformerAttention(D, H, LayerPlace(index=1), n_features=20, redraw_interval=3, seed=7) for _ in "ab")
    other_layer = PerformerAttention(D, H, LayerPlace(index=0), n_features=20, redraw_interval=3, seed=7)
    first = a.projection.clone()
    assert not torch.equal(first, other_layer.projection)
    for step in range(1, 7):
        a.after_optimizer_step()
        b.after_optimizer_step()
        torch.testing.assert_close(a.projection, b.projection, atol=0, rtol=0)
        assert torch.equal(a.projection, first) == (step < 3)
    resumed = PerformerAttention(D, H, LayerPlace(index=1), n_features=20, redraw_interval=3, seed=7)
    assert not torch.equal(resumed.projection, a.projection)           # the run has redrawn twice since
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(resumed.projection, a.projection) and int(resumed.steps) == 6
    for _ in range(3):
        resumed.after_optimizer_step()
        a.after_optimizer_step()
    torch.testing.assert_close(resumed.projection, a.projection, atol=0, rtol=0)
