"""Clustered attention against references written here: k-means by hand (seeds evenly spaced by rank among the
real queries, Lloyd steps), the centroids' attention with an explicit masked softmax, one cluster, and full
attention when every query is its own cluster; padding on either side through an encoder; refused in a
decoder."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.attention_variants.clustered import ClusteredAttention
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import RotaryPositions, apply_rotary
from lightning_tfm.models import DecoderOnly, EncoderOnly

SMALL = dict(d_model=16, n_layers=2, n_heads=4, d_ff=32, dropout=0.0)


def _projections(attn, x, rotary=None):
    """q (B, H, T, D) and k, v repeated to the H query heads, with the block's own weights."""
    B, T, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split([H * D, Hkv * D, Hkv * D], -1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k, v = (t.view(B, T, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, 1) for t in (k, v))
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    return q, k, v


def _kmeans_by_hand(q, real, n_clusters, iterations):
    """Lloyd's k-means of one (batch row, head)'s real queries q (T, D): seeds the real queries of ranks
    floor(c n / k), k = min(n_clusters, n); returns each real query's cluster {position: cluster}."""
    index = real.nonzero()[:, 0].tolist()
    n = len(index)
    k = min(n_clusters, n)
    centroids = [q[index[c * n // k]] for c in range(k)]

    def nearest(i):
        return min(range(k), key=lambda c: float(((q[i] - centroids[c]) ** 2).sum()))

    for _ in range(iterations):
        members = {c: [i for i in index if nearest(i) == c] for c in range(k)}
        centroids = [q[members[c]].mean(0) if members[c] else centroids[c] for c in range(k)]
    return {i: nearest(i) for i in index}


def _reference(attn, x, real, assign, rotary=None):
    """Each real query returns softmax(c k^T / sqrt(D)) v of its cluster's centroid c, the mean of the cluster's
    real queries, over the real keys (Vyas et al. 2020, eq. 5-6), for the given assignment (B, H, T)."""
    B, T, C = x.shape
    q, k, v = _projections(attn, x, rotary)
    n_clusters = int(assign.max()) + 1
    members = F.one_hot(assign, n_clusters).float() * real[:, None, :, None]            # (B, H, T, K)
    centroids = members.transpose(-1, -2) @ q / members.sum(2)[..., None].clamp_min(1)   # (B, H, K, D)
    logits = centroids @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)                  # (B, H, K, T)
    weights = logits.masked_fill(~real[:, None, None, :], float("-inf")).softmax(-1)
    per_query = F.one_hot(assign, n_clusters).float() @ (weights @ v)                    # (B, H, T, D)
    return attn.out(per_query.transpose(1, 2).reshape(B, T, C))


def _padded(T=13):
    real = torch.ones(3, T, dtype=torch.bool)
    real[1, :4], real[2, 8:] = False, False                  # one left-, one right-padded row
    return real


@pytest.mark.parametrize("case", ["plain", "gqa", "rotary"])
def test_the_clusters_are_k_means_written_by_hand(case):
    torch.manual_seed(0)
    attn = ClusteredAttention(16, 4, n_clusters=3, iterations=4, n_kv_heads=2 if case == "gqa" else None)
    x, real = torch.randn(3, 13, 16), _padded()
    rotary = RotaryPositions(16, 4).rotary(13) if case == "rotary" else None
    with torch.no_grad():
        q = _projections(attn, x, rotary)[0]
    assign = attn.clusters(q, real)
    for b in range(3):
        for h in range(4):
            want = _kmeans_by_hand(q[b, h], real[b], 3, 4)
            assert {i: int(assign[b, h, i]) for i in want} == want


@pytest.mark.parametrize("case", ["plain", "gqa", "rotary", "no_iterations"])
def test_equals_the_centroids_explicit_softmax_in_outputs_and_gradients(case):
    torch.manual_seed(0)
    attn = ClusteredAttention(16, 4, n_clusters=4, iterations=0 if case == "no_iterations" else 5,
                              n_kv_heads=2 if case == "gqa" else None)
    x, real = torch.randn(3, 13, 16, requires_grad=True), _padded()
    rotary = RotaryPositions(16, 4).rotary(13) if case == "rotary" else None
    got = attn(x, mask=AttentionMask(key_mask=real), rotary=rotary)
    with torch.no_grad():
        assign = attn.clusters(_projections(attn, x, rotary)[0], real)
    want = _reference(attn, x, real, assign, rotary)
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    g = torch.randn_like(got[real])
    params = [x, attn.qkv.weight, attn.out.weight]
    grads = torch.autograd.grad((got[real] * g).sum(), params)
    expected = torch.autograd.grad((want[real] * g).sum(), params)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_one_cluster_gives_every_query_the_mean_querys_attention():
    torch.manual_seed(0)
    attn = ClusteredAttention(16, 4, n_clusters=1)
    x, real = torch.randn(3, 13, 16), _padded()
    got = attn(x, mask=AttentionMask(key_mask=real))
    q, k, v = _projections(attn, x)
    mean = (q * real[:, None, :, None]).sum(2, keepdim=True) / real.sum(1)[:, None, None, None]   # (B, H, 1, D)
    weights = (mean @ k.transpose(-1, -2) / 2.0).masked_fill(~real[:, None, None, :], float("-inf")).softmax(-1)
    want = attn.out((weights @ v).transpose(1, 2).reshape(3, 1, 16))                      # (B, 1, C)
    torch.testing.assert_close(got[real], want.expand(-1, 13, -1)[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_as_many_clusters_as_real_queries_is_full_attention(n_kv_heads):
    torch.manual_seed(0)
    attn = ClusteredAttention(16, 4, n_clusters=9, n_kv_heads=n_kv_heads)
    full = MultiHeadAttention(16, 4, n_kv_heads=n_kv_heads)
    full.load_state_dict(attn.state_dict())
    x, real = torch.randn(3, 13, 16), _padded()
    mask = AttentionMask(key_mask=real)
    got, want = attn(x, mask=mask), full(x, mask=mask)
    exact = real.sum(1) <= 9                   # rows 1 and 2 (9 and 8 real tokens); row 0 has 13 > 9 clusters
    assert exact.tolist() == [False, True, True]
    torch.testing.assert_close(got[exact][real[exact]], want[exact][real[exact]], atol=1e-6, rtol=0)
    assert (got[0] - want[0]).abs().amax() > 1e-3
    attn.n_clusters = 13                       # >= T: every row
    torch.testing.assert_close(attn(x, mask=mask)[real], want[real], atol=1e-6, rtol=0)


def test_padding_on_either_side_leaves_real_positions_as_alone_in_an_encoder():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, positions=partial(RotaryPositions, max_len=64),
                          attention=partial(ClusteredAttention, n_clusters=4, iterations=3)).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (30, 19, 24)]
    alone = [encoder(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(3, 30, dtype=torch.long)
        real = torch.zeros(3, 30, dtype=torch.bool)
        for i, s in enumerate(seqs):
            where = slice(0, len(s)) if side == "right" else slice(30 - len(s), 30)
            ids[i, where], real[i, where] = s, True
        out = encoder(ids, mask=real)
        for i in range(3):
            torch.testing.assert_close(out[i][real[i]], alone[i], atol=1e-5, rtol=0)


def test_gradients_are_finite_under_bf16_autocast():
    torch.manual_seed(0)
    attn = ClusteredAttention(16, 4, n_clusters=3, n_kv_heads=2)
    x, real = torch.randn(3, 13, 16, requires_grad=True), _padded()
    real[0] = False                            # a row with no real token at all
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, mask=AttentionMask(key_mask=real), rotary=RotaryPositions(16, 4).rotary(13))
    grads = torch.autograd.grad(y.float().square().sum(), [x, attn.qkv.weight])
    assert torch.isfinite(y.float()).all() and all(torch.isfinite(g).all() for g in grads)


def test_refused_in_a_decoder_and_for_bad_arguments():
    with pytest.raises(ValueError, match="ClusteredAttention.*cannot attend causally"):
        DecoderOnly(50, **SMALL, attention=ClusteredAttention)
    with pytest.raises(ValueError, match="ClusteredAttention: n_clusters=0, must be >= 1"):
        ClusteredAttention(16, 4, n_clusters=0)
    with pytest.raises(ValueError, match="ClusteredAttention: iterations=-1, must be >= 0"):
        ClusteredAttention(16, 4, iterations=-1)
    attn = ClusteredAttention(16, 4)
    with pytest.raises(ValueError, match="ClusteredAttention is bidirectional"):
        attn(torch.randn(1, 5, 16), mask=AttentionMask(causal=True))
