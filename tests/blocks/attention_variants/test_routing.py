"""Routing attention against a dense reference written here (softmax over the pairs that share a cluster of the
module's centroids or lie within the window), against full attention with one cluster, and through models:
causality, padding, incremental decoding; the online k-means (pads left out, one update per optimizer step over
every micro-batch, checkpointed centroids), the commitment loss, bf16 autocast and a training step."""

from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention
from lightning_tfm.blocks.attention_variants.kmeans import OnlineKMeans, cluster_chunks
from lightning_tfm.blocks.attention_variants.routing import RoutingAttention, RoutingCache
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions, RotaryPositions, apply_rotary
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly
from lightning_tfm.models.attention_contract import after_optimizer_step
from lightning_tfm.tasks import LanguageModelModule

D, H = 32, 4
SMALL = dict(d_model=D, n_layers=2, n_heads=H, d_ff=64, dropout=0.0)
ROUTING = partial(RoutingAttention, n_clusters=4, window=8, chunk=16)


def _clusters(x, centroids):
    """(B, H, T, Dh) vectors -> (B, H, T) index of the centroid (H, K, Dh) of highest cosine similarity."""
    return torch.einsum("bhtd,hkd->bhtk", x / x.norm(dim=-1, keepdim=True), centroids).argmax(-1)


def _projections(attn, x):
    """q (B, H, T, Dh), and k, v repeated to the query heads, from the block's own weights."""
    B, T, _ = x.shape
    Hq, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split([Hq * Dh, Hkv * Dh, Hkv * Dh], -1)
    q = q.view(B, T, Hq, Dh).transpose(1, 2)
    k, v = (t.view(B, T, Hkv, Dh).transpose(1, 2).repeat_interleave(Hq // Hkv, 1) for t in (k, v))
    return q, k, v


def _reference(attn, x, real=None, causal=False, rotary=None):
    """softmax(q k^T / sqrt(Dh)) v over the pairs (same cluster, routed before rotation, or |i - j| < window)
    that the mask allows (causal, real keys); dense. Returns the output and the (B, H, T, T) weights."""
    B, T, C = x.shape
    q, k, v = _projections(attn, x)
    centroids = attn.kmeans.centroids
    allowed = _clusters(q, centroids)[..., :, None] == _clusters(k, centroids)[..., None, :]
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    pos = torch.arange(T)
    allowed = allowed | ((pos[:, None] - pos[None, :]).abs() < attn.window)
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    if real is not None:
        allowed = allowed & real[:, None, None, :]
    logits = q @ k.transpose(-1, -2) / attn.head_dim ** 0.5
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return attn.out((weights @ v).transpose(1, 2).reshape(B, T, C)), weights


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("case", ["padded", "rotary_gqa"])
def test_equals_the_dense_reference_in_outputs_gradients_and_kept_weights(causal, case):
    torch.manual_seed(0)
    gqa = case == "rotary_gqa"
    attn = ROUTING(D, H, LayerPlace(causal=causal), n_kv_heads=2 if gqa else None).eval()
    x = torch.randn(2, 100, D, requires_grad=True)                     # 100: not a multiple of the chunk
    real = torch.ones(2, 100, dtype=torch.bool)
    real[1, 83:] = False
    rotary = RotaryPositions(D, H).rotary(100) if gqa else None
    mask = AttentionMask.build(None if gqa else real, causal)
    assert 100 * 100 > attn.dense_pairs                                 # the sorted computation runs
    got = attn(x, mask=mask, rotary=rotary)
    want, weights = _reference(attn, x, mask.key_mask, causal, rotary)
    seen = weights > 0
    near = (torch.arange(100)[:, None] - torch.arange(100)).abs() < 8
    assert seen.float().mean() < 0.5 and (seen & ~near).any()         # sparse, and clusters reach far
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    params = [x, attn.qkv.weight, attn.out.weight]
    for g, e in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    attn.keep_weights = True                                            # the explicit path: same numbers
    torch.testing.assert_close(attn(x, mask=mask, rotary=rotary), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(attn.weights, weights, atol=1e-6, rtol=0)


def test_chunks_hold_one_cluster_each_and_every_query_once():
    q_ids = torch.tensor([[[2, 0, 2, 2, 1, 0, 2, 2]]])
    k_ids = torch.tensor([[[0, 2, 2, 1, 2]]])
    slot, members, chunk_cluster, cluster_keys = cluster_chunks(q_ids, k_ids, n_clusters=3, chunk=2)
    # cluster 0: queries 1, 5 (one chunk); cluster 1: query 4; cluster 2: queries 0, 2, 3, 6, 7 (three chunks)
    assert members.tolist() == [[[1, 5, 4, 8, 0, 2, 3, 6, 7, 8]]]
    assert chunk_cluster.tolist() == [[[0, 1, 2, 2, 2]]]
    assert slot.tolist() == [[[4, 0, 5, 6, 2, 1, 7, 8]]]
    assert cluster_keys.tolist() == [[[[0, 5, 5], [3, 5, 5], [1, 2, 4]]]]   # 5: no key


@pytest.mark.parametrize("causal", [True, False])
def test_one_cluster_is_multi_head_attention(causal):
    torch.manual_seed(0)
    full = MultiHeadAttention(D, H)
    attn = RoutingAttention(D, H, LayerPlace(causal=causal), n_clusters=1, window=3, chunk=16).eval()
    assert attn.load_state_dict(full.state_dict(), strict=False).missing_keys == ["kmeans.centroids"]
    x = torch.randn(2, 100, D)
    real = torch.ones(2, 100, dtype=torch.bool)
    real[0, 70:] = False
    mask = AttentionMask.build(real, causal)
    torch.testing.assert_close(attn(x, mask=mask), full(x, mask=mask), atol=1e-5, rtol=0)


def _decoder(seed=0):
    torch.manual_seed(seed)
    return DecoderOnly(50, **SMALL, attention=ROUTING, positions=RotaryPositions).eval()


def _first_of_a_later_chunk(model, ids):
    """A position whose query (layer 0, row 0, head 0) starts a chunk of the sorted computation, not the first."""
    block = model.stack.layers[0].attention
    routed = []
    block.route = lambda q, k, mask, route=block.route: routed.append(route(q, k, mask)) or routed[-1]
    model(ids)
    del block.route
    slot = cluster_chunks(*routed[0], block.kmeans.n_clusters, block.chunk)[0][0, 0]
    return int(torch.nonzero((slot % block.chunk == 0) & (slot > 0) & (torch.arange(len(slot)) > 20))[0])


def test_a_later_token_never_changes_an_earlier_output():
    model = _decoder()
    ids = torch.randint(0, 50, (2, 90))
    base = model(ids)
    # the first query of a sorted chunk; a window block's first query (a multiple of the chunk); its window edge
    for p in (_first_of_a_later_chunk(model, ids), 48, 48 + 8):
        changed = ids.clone()
        changed[:, p:] = torch.randint(0, 50, (2, 90 - p))
        out = model(changed)
        torch.testing.assert_close(out[:, :p], base[:, :p], atol=1e-5, rtol=0)
        assert (out[:, p:] - base[:, p:]).abs().amax() > 1e-3


def test_padding_on_either_side_never_changes_real_positions():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, attention=ROUTING, positions=RotaryPositions).eval()
    decoder = _decoder()
    ids = torch.randint(1, 50, (1, 70))
    junk = torch.randint(1, 50, (1, 23))
    right = torch.tensor([[True] * 70 + [False] * 23])
    torch.testing.assert_close(encoder(torch.cat([ids, junk], 1), mask=right)[:, :70], encoder(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder(torch.cat([ids, junk], 1), mask=right)[:, :70], decoder(ids), atol=1e-5, rtol=0)
    # left padding shifts the positions: rotary keeps relative ones, routing sees the unrotated vectors
    torch.testing.assert_close(decoder(torch.cat([junk, ids], 1), mask=right.flip(1))[:, 23:], decoder(ids),
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_incremental_decoding_equals_the_full_forward_after_reordering_and_multi_token_steps():
    model = _decoder()
    ids = torch.randint(0, 50, (3, 140))
    cache = model.new_cache()
    assert all(isinstance(state, RoutingCache) for state in cache.self_attn)
    steps = [model(ids[:, :80], cache=cache)]                           # prefill: the sorted computation
    steps += [model(ids[:, t:t + 1], cache=cache) for t in range(80, 88)]
    steps.append(model(ids[:, 88:93], cache=cache))                      # a short multi-token step: explicit
    steps.append(model(ids[:, 93:133], cache=cache))                     # a long one: sorted, after 93 keys
    torch.testing.assert_close(torch.cat(steps, 1), model(ids[:, :133]), atol=1e-4, rtol=0)
    order = torch.tensor([2, 0, 0])                                      # beam search picks parents
    cache.reorder(order)
    rest = torch.cat([model(ids[order, t:t + 1], cache=cache) for t in range(133, 140)], 1)
    torch.testing.assert_close(rest, model(ids[order])[:, 133:], atol=1e-4, rtol=0)


def _expected_update(attn, xs, decay):
    """The EMA written out: c <- normalise(decay c + (1 - decay) mean of the queries and keys assigned to c)."""
    c = attn.kmeans.centroids.clone()
    vectors = []
    for x in xs:
        q, k, _ = _projections(attn, x)
        vectors += [q, k]
    unit = torch.cat([F.normalize(t, dim=-1) for t in vectors], 2)      # (B, H, N, Dh)
    ids = _clusters(unit, c)
    out = c.clone()
    for h in range(c.shape[0]):
        for j in range(c.shape[1]):
            members = unit[:, h][ids[:, h] == j]
            if len(members):
                out[h, j] = F.normalize(decay * c[h, j] + (1 - decay) * members.mean(0), dim=0)
    return out


def test_centroids_move_once_per_optimizer_step_with_every_micro_batch_and_never_with_pads():
    torch.manual_seed(0)
    attn = RoutingAttention(D, H, n_clusters=3, window=2, decay=0.5).train()
    twin = RoutingAttention(D, H, n_clusters=3, window=2, decay=0.5).train()
    twin.load_state_dict(attn.state_dict())
    start = attn.kmeans.centroids.clone()
    x1, x2 = torch.randn(2, 30, D), torch.randn(2, 30, D)
    expected = _expected_update(twin, [x1, x2], 0.5)
    attn(x1)
    attn(x2)                                                             # two micro-batches
    torch.testing.assert_close(attn.kmeans.centroids, start, atol=0, rtol=0)
    after_optimizer_step(attn)
    torch.testing.assert_close(attn.kmeans.centroids, expected, atol=1e-6, rtol=0)
    assert (attn.kmeans.centroids - start).abs().amax() > 0.1
    moved = attn.kmeans.centroids.clone()
    after_optimizer_step(attn)                                           # no forward since: nothing to add
    assert torch.equal(attn.kmeans.centroids, moved)
    twin(torch.cat([x1, x2]))                                            # one forward of the concatenation
    after_optimizer_step(twin)
    torch.testing.assert_close(twin.kmeans.centroids, moved, atol=1e-6, rtol=0)
    # pads add nothing: padded rows update as the real tokens alone do; all pads leave the centroids
    padded, alone = (RoutingAttention(D, H, n_clusters=3, window=2, decay=0.5).train() for _ in range(2))
    alone.load_state_dict(padded.state_dict())
    real = torch.ones(2, 30, dtype=torch.bool)
    real[:, 20:] = False
    padded(x1, mask=AttentionMask.build(real, causal=False))
    alone(x1[:, :20])
    padded.after_optimizer_step()
    alone.after_optimizer_step()
    torch.testing.assert_close(padded.kmeans.centroids, alone.kmeans.centroids, atol=1e-6, rtol=0)
    assert (padded.kmeans.centroids - start).abs().amax() > 0.1
    padded(x2, mask=AttentionMask(key_mask=torch.zeros(2, 30, dtype=torch.bool)))
    before = padded.kmeans.centroids.clone()
    padded.after_optimizer_step()
    assert torch.equal(padded.kmeans.centroids, before)


def test_the_commitment_loss_trains_the_projections_in_training_only():
    torch.manual_seed(0)
    attn = RoutingAttention(D, H, LayerPlace(causal=True), n_clusters=3, window=2, commitment=0.5).train()
    x = torch.randn(2, 30, D)
    real = torch.ones(2, 30, dtype=torch.bool)
    real[1, 25:] = False
    attn(x, mask=AttentionMask.build(real, causal=True))
    loss = attn.auxiliary_losses()["routing_commitment"]
    q, k, _ = _projections(attn, x)
    distances = []
    for t in (q, k):                                                     # ||x - c(x)||^2 of real tokens
        unit = F.normalize(t, dim=-1)
        nearest = attn.kmeans.centroids[torch.arange(H)[:, None], _clusters(unit, attn.kmeans.centroids)]
        distances.append((unit - nearest).square().sum(-1).transpose(1, 2)[real])          # (N, H)
    torch.testing.assert_close(loss, 0.5 * torch.cat(distances).mean(), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(loss, attn.qkv.weight)
    assert grad[:2 * D].abs().amax() > 0 and grad[2 * D:].abs().amax() == 0     # queries and keys, not values
    assert "kmeans.centroids" not in dict(attn.named_parameters())
    attn.eval()
    assert attn.auxiliary_losses() == {}
    silent = RoutingAttention(D, H, commitment=0.0).train()
    silent(x)
    assert silent.auxiliary_losses() == {}


def test_centroids_are_checkpointed_and_a_loaded_block_routes_identically():
    torch.manual_seed(0)
    attn = RoutingAttention(D, H, n_clusters=4, window=2, chunk=16, decay=0.5).train()
    attn(torch.randn(2, 80, D))
    attn.after_optimizer_step()
    state = attn.state_dict()
    assert set(state) == {"qkv.weight", "qkv.bias", "out.weight", "out.bias", "kmeans.centroids"}
    other = RoutingAttention(D, H, n_clusters=4, window=2, chunk=16, seed=7)
    assert not torch.equal(other.kmeans.centroids, state["kmeans.centroids"])
    other.load_state_dict(state)
    x = torch.randn(2, 80, D)
    assert torch.equal(other.eval()(x), attn.eval()(x))


@pytest.mark.parametrize("T", [70, 20])                                  # sorted and explicit paths
def test_gradients_are_finite_under_bf16_autocast(T):
    torch.manual_seed(0)
    attn = ROUTING(D, H, LayerPlace(causal=True), n_kv_heads=2).train()
    x = torch.randn(2, T, D, requires_grad=True)
    real = torch.ones(2, T, dtype=torch.bool)
    real[1, T - 7:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, mask=AttentionMask.build(real, causal=True))
        loss = y.float().square().mean() + attn.auxiliary_losses()["routing_commitment"]
    assert y.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(attn.qkv.weight.grad).all()


def test_a_language_model_training_step_logs_the_commitment_and_updates_centroids_once_per_step(tmp_path,
                                                                                                monkeypatch):
    attention = partial(RoutingAttention, n_clusters=2, window=2, commitment=0.5)
    module = LanguageModelModule(partial(DecoderOnly, **SMALL, attention=attention), vocab_size=24)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, float(value.detach()))
    batch = {"ids": torch.randint(0, 24, (2, 9)), "mask": torch.ones(2, 9, dtype=torch.bool)}
    total = module.train().training_step(batch, 0)
    assert logged["train_routing_commitment"] > 0                       # summed over the two layers
    assert float(total.detach()) == pytest.approx(logged["train_loss"] + logged["train_routing_commitment"])
    updates = []
    monkeypatch.setattr(OnlineKMeans, "update", lambda self: updates.append(self))
    module.tokenizer = Tokenizer(WordLevel({f"t{i}": i for i in range(24)}, unk_token="t0"))
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader([batch] * 3, batch_size=None))
    assert len(updates) == 2                                             # once per layer, not per micro-batch


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_clusters=0), r"n_clusters=0, must be >= 1"),
    (dict(window=-1), r"window=-1, must be >= 0"),
    (dict(chunk=0), r"chunk=0, must be >= 1"),
    (dict(commitment=-1.0), r"commitment=-1.0, must be >= 0"),
    (dict(decay=1.0), r"decay=1.0, must be in \(0, 1\)"),
])
def test_impossible_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=f"RoutingAttention: {message}"):
        RoutingAttention(D, H, **kwargs)


def test_what_it_cannot_do_is_refused():
    with pytest.raises(ValueError, match=r"RoutingAttention \(at layers.0.attention\) cannot take a position bias"):
        DecoderOnly(50, **SMALL, attention=RoutingAttention, positions=ALiBiPositions)
    with pytest.raises(ValueError, match=r"RoutingAttention \(at .*cross_attention\) cannot attend to the encoder"):
        EncoderDecoder(50, **SMALL, cross_attention=RoutingAttention)
