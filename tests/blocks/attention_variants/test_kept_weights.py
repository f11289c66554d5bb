"""Every attention block keeps its weights (`keep_weights`): the explicit path gives the fast path's output, the
weights are (B, H, T, S), rows sum to 1 over the real keys, pads and (causal) later keys get exactly 0, out = A V
where the variant's definition says so, nothing lies outside the variant's structure, and a decoding step keeps
the rows the whole forward keeps. The head dimension (32) is at least the number of keys, so V has full row rank
and out = A V pins A down."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants import (
    AdaptiveSpanAttention,
    ClusteredAttention,
    InducingPointAttention,
    LinearAttention,
    LinformerAttention,
    MemoryCompressedAttention,
    PerformerAttention,
    PersistentMemoryAttention,
    PoolingformerAttention,
    RoutingAttention,
    SlidingWindowAttention,
)
from lightning_tfm.blocks.masks import AttentionMask

C, H, T = 64, 2, 21
BOTH, BIDIRECTIONAL, CAUSAL = (False, True), (False,), (True,)
# name -> (factory, causal forms, whether out = A V exactly, rows sum to 1)
VARIANTS = {
    "full": (partial(MultiHeadAttention, n_kv_heads=1), BOTH, True, True),
    "window": (partial(SlidingWindowAttention, window=5), BOTH, True, True),
    "routing": (partial(RoutingAttention, n_clusters=3, window=3), BOTH, True, True),
    "memory": (partial(PersistentMemoryAttention, n_memory=4), BOTH, True, True),
    "span": (partial(AdaptiveSpanAttention, max_span=12, ramp=3), CAUSAL, True, True),
    "clustered": (partial(ClusteredAttention, n_clusters=4, iterations=3), BIDIRECTIONAL, True, True),
    "linear": (partial(LinearAttention, chunk=6), BOTH, True, True),
    "performer": (partial(PerformerAttention, n_features=64, chunk=6), BOTH, True, True),
    "compressed": (partial(MemoryCompressedAttention, compression=3, n_kv_heads=1), BOTH, True, True),
    "linformer": (partial(LinformerAttention, projected_len=8), BIDIRECTIONAL, True, False),
    "inducing": (partial(InducingPointAttention, n_inducing=4), BIDIRECTIONAL, False, True),
    "pooling": (partial(PoolingformerAttention, window=2, pool_window=5, pool=3), BIDIRECTIONAL, False, True),
}
CASES = [(name, causal) for name, (_, forms, _, _) in VARIANTS.items() for causal in forms]


def _block(name, causal):
    torch.manual_seed(0)
    block = VARIANTS[name][0](C, H, LayerPlace(causal=causal, max_len=64)).eval()
    if name in ("span", "pooling"):
        block.block = 8                       # several query blocks in the fast path
    if name == "span":
        with torch.no_grad():
            block.span.copy_(torch.tensor([0.1, 0.4]))      # heads see 3 + 1.2 and 3 + 4.8 positions back
    return block


def _real(padding):
    """(2, T): row 1 padded on the left or the right. Both rows' real tokens fill whole slots of 3 (21 and 15)."""
    real = torch.ones(2, T, dtype=torch.bool)
    if padding == "right":
        real[1, 15:] = False
    else:
        real[1, :T - 15] = False
    return real


def _run(block, x, mask, keep):
    """The block's output and the per-head output before `block.out` (B, H, T, D), keeping weights or not."""
    captured = []
    hook = block.out.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    block.keep_weights = keep
    with torch.no_grad():
        y = block(x, mask=mask)
    hook.remove()
    B, Tq, _ = x.shape
    return y, captured[0].view(B, Tq, H, -1).transpose(1, 2)


def _values(block, x):
    """V (B, H, S, D) from the block's own projection, repeated to the query heads; memory slots first."""
    B, S, _ = x.shape
    with torch.no_grad():
        v = block.qkv(x)[..., block.q_width + block.n_kv_heads * block.head_dim:]
        v = v.view(B, S, block.n_kv_heads, block.head_dim).transpose(1, 2)             # (B, Hkv, S, D)
        if isinstance(block, PersistentMemoryAttention):
            v = torch.cat([block.memory_values.expand(B, -1, -1, -1), v], 2)
    return v.repeat_interleave(H // block.n_kv_heads, dim=1)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name, causal", CASES)
def test_kept_weights_are_the_weights_the_block_attends_with(name, causal, padding):
    _, _, exact, normalised = VARIANTS[name]
    block = _block(name, causal)
    x, real = torch.randn(2, T, C), _real(padding)
    mask = AttentionMask(causal, real)
    fast, _ = _run(block, x, mask, keep=False)
    assert block.weights is None
    explicit, heads = _run(block, x, mask, keep=True)
    torch.testing.assert_close(explicit[real], fast[real], atol=1e-5, rtol=0)                          # (a)
    n_memory = getattr(block, "n_memory", 0)
    w = block.weights
    assert w.shape == (2, H, T, n_memory + T)                                                          # (b)
    tokens = w[..., n_memory:]                                                                         # (B, H, T, S)
    assert (tokens[1][..., ~real[1]] == 0).all()                                                       # (c)
    if causal:
        assert (tokens.triu(1) == 0).all()
    if normalised:
        rows = w[real[:, None].expand(-1, H, -1)]                                                       # real queries
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]), atol=1e-5, rtol=0)
    if exact:                                                                                          # (d)
        torch.testing.assert_close(heads, w.to(heads.dtype) @ _values(block, x), atol=1e-5, rtol=0)
    outside = _outside(block, name, causal, real)                                                      # (e)
    if outside is not None:
        assert (tokens[outside.expand_as(tokens)] == 0).all()
        assert (tokens[~outside.expand_as(tokens)] != 0).any()


def _outside(block, name, causal, real):
    """Bool (B or 1, H or 1, T, S): pairs the variant's structure excludes, or None if it has none."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if name == "window":
        return (i - j >= 5) | (j - i >= (1 if causal else 5))
    if name == "span":     # m(x) = 0 from x >= R + z_h on
        return (i - j < 0) | (i - j >= block._reach().detach()[:, None, None])
    if name == "pooling":
        p = j // block.pool
        return ((i - j).abs() > block.window) & ((p < (i - block.pool_window) // block.pool) |
                                                 (p > (i + block.pool_window) // block.pool))
    return None


def test_clustered_queries_of_one_cluster_share_a_row():
    block = _block("clustered", False)
    x, real = torch.randn(2, T, C), _real("left")
    _run(block, x, AttentionMask(False, real), keep=True)
    with torch.no_grad():
        q = block.qkv(x)[..., :block.q_width].view(2, T, H, -1).transpose(1, 2)
    assign = block.clusters(q, real)                                                  # (B, H, T)
    same = assign[..., :, None] == assign[..., None, :]                               # (B, H, T, T)
    equal = (block.weights[..., :, None, :] == block.weights[..., None, :, :]).all(-1)
    assert (equal == same).all() and bool((~same).any())


@pytest.mark.parametrize("padding", ["right", "left"])
def test_compressed_slots_share_their_weight_evenly_in_the_causal_form(padding):
    """A complete block of r real tokens in a query's past: one weight for all r; its own incomplete block: raw."""
    block = _block("compressed", True)
    real, r = _real(padding), block.compression
    _run(block, torch.randn(2, T, C), AttentionMask(True, real), keep=True)
    for b in range(2):
        w = block.weights[b][..., real[b]]                                            # (H, T, n) real keys only
        for i, t in enumerate(real[b].nonzero().flatten()):                           # compacted i, position t
            full = r * ((i + 1) // r)                                                 # its complete blocks end here
            blocks = w[:, t, :full].view(H, -1, r)
            assert (blocks == blocks[..., :1]).all()
            assert (w[:, t, full:i + 1] > 0).all() and (w[:, t, i + 1:] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_compression_one_keeps_the_weights_of_full_attention(causal):
    block = MemoryCompressedAttention(C, H, compression=1, n_kv_heads=1)
    full = MultiHeadAttention(C, H, n_kv_heads=1)
    full.load_state_dict(block.state_dict(), strict=False)
    x, real = torch.randn(2, T, C), _real("left")
    _run(block, x, AttentionMask(causal, real), keep=True)
    _run(full, x, AttentionMask(causal, real), keep=True)
    rows = real[:, None].expand(-1, H, -1)
    torch.testing.assert_close(block.weights[rows], full.weights[rows], atol=1e-6, rtol=0)


def test_linear_weights_are_the_normalised_feature_products():
    block = _block("linear", True)
    x = torch.randn(2, T, C)
    _run(block, x, AttentionMask(True), keep=True)
    with torch.no_grad():
        q, k, _ = block._split(block.qkv(x), 2, T)
    scores = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)).tril()                       # phi(q) . phi(k)
    torch.testing.assert_close(block.weights, scores / scores.sum(-1, keepdim=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["full", "compressed", "span", "memory"])
def test_a_decoding_step_keeps_the_rows_of_the_whole_forward(name):
    """Prefill 12 positions, then steps of 1 and 3 tokens: each keeps the whole forward's rows over the keys it
    sees (a window cache: the last ones)."""
    block = _block(name, True)
    x, real = torch.randn(2, T, C), _real("left")
    _run(block, x, AttentionMask(True, real), keep=True)
    whole, n_memory = block.weights, getattr(block, "n_memory", 0)
    state = block.new_state(T)
    for start, end in ((0, 12), (12, 13), (13, 16)):
        block.keep_weights = True
        with torch.no_grad():
            block(x[:, start:end], mask=AttentionMask(True, real[:, :end], offset=start), state=state)
        step = block.weights
        first = n_memory + end - (step.shape[-1] - n_memory)          # the whole forward's column of its first key
        want = torch.cat([whole[:, :, start:end, :n_memory], whole[:, :, start:end, first:n_memory + end]], -1)
        rows = real[:, None, start:end].expand(-1, H, -1)
        torch.testing.assert_close(step[rows], want[rows], atol=1e-5, rtol=0)


def test_linear_attention_refuses_to_keep_weights_with_a_recurrent_state():
    block = _block("linear", True)
    block.keep_weights = True
    with pytest.raises(ValueError, match="LinearAttention cannot keep attention weights while decoding"):
        block(torch.randn(1, 3, C), mask=AttentionMask(True), state=block.new_state())


def test_inducing_weights_compose_the_two_attentions():
    """A2 (tokens over slots) @ A1 (slots over tokens, averaged over heads), each written out here."""
    block = _block("inducing", False)
    x, real = torch.randn(2, T, C), _real("left")
    _run(block, x, AttentionMask(False, real), keep=True)
    kept, block.keep_weights, D = block.weights, False, block.head_dim
    with torch.no_grad():
        q, k, v = block._split(block.qkv(x), 2, T)
        points = block._heads(block.qkv(block.inducing_points)[:, :block.q_width], 1, 4, H)        # (1, H, m, D)
        a1 = (points @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~real[:, None, None], float("-inf")).softmax(-1)
        h_k, _ = block._heads(block.summary_kv(block.summarise(k, v, real)), 2, 4, 2 * H).chunk(2, dim=1)
        a2 = (q @ h_k.transpose(-1, -2) / D ** 0.5).softmax(-1)                                      # (B, H, T, m)
    torch.testing.assert_close(kept, a2 @ a1.mean(1, keepdim=True), atol=1e-6, rtol=0)


def test_pooling_weights_average_the_window_and_the_spread_pooled_weights():
    """(A1 + A2')/2 with A1 the window softmax and A2' the pooled softmax shared by each slot's real positions,
    both written out here (mean pooling over a slot's real positions)."""
    block = _block("pooling", False)
    x, real = torch.randn(2, T, C), _real("right")
    real[1, 14] = False                                       # slot 4 holds 2 real positions
    _run(block, x, AttentionMask(False, real), keep=True)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    s, D = block.pool, block.head_dim
    slot = torch.arange(-(-T // s))[:, None] == j // s                                          # (P, T)
    member = (slot & real[:, None, :]).float()                                                   # (B, P, T)
    with torch.no_grad():
        q, k, v = block._split(block.qkv(x), 2, T)
        near = ((i - j).abs() <= block.window) & real[:, None, None]
        a1 = (q @ k.transpose(-1, -2) / D ** 0.5).masked_fill(~near, float("-inf")).softmax(-1).nan_to_num(0.0)
        y = block.out((a1 @ v).transpose(1, 2).reshape(2, T, C))
        q2, k2, _ = block._split(block.pool_qkv(y), 2, T)
        pooled = member[:, None] @ k2 / member.sum(-1)[:, None, :, None].clamp_min(1)           # (B, H, P, D)
        p = torch.arange(slot.shape[0])[None, :]
        seen = ((i - block.pool_window) // s <= p) & (p <= (i + block.pool_window) // s)          # (T, P)
        seen = seen & (member.sum(-1) > 0)[:, None, None]
        a2 = (q2 @ pooled.transpose(-1, -2) / D ** 0.5).masked_fill(~seen, float("-inf")).softmax(-1)
        spread = a2 @ (member / member.sum(-1, keepdim=True).clamp_min(1))[:, None]            # (B, H, T, T)
    rows = real[:, None].expand(-1, H, -1)
    torch.testing.assert_close(block.weights[rows], ((a1 + spread) / 2)[rows], atol=1e-6, rtol=0)
