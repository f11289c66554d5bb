"""The task's decoding (`translate` over `EncoderDecoder.search_state`): cached beam search and greedy search equal
full recomputation, and equal a one-sentence-at-a-time reference on random models whatever the batch, the
padding, the beam and the cross-attention block; outputs never outgrow the positions."""

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.attention_variants import LinearAttention
from lightning_tfm.blocks.positions import LearnedPositions
from lightning_tfm.decoding import beam_search, greedy_search
from lightning_tfm.models import EncoderDecoder
from lightning_tfm.tasks.translation import TranslationModule, translate

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def task() -> TranslationModule:
    """A tiny translator trained for 80 steps to reverse its source, so hypotheses end at varied lengths."""
    torch.manual_seed(0)
    task = TranslationModule(partial(EncoderDecoder, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0),
                             vocab_size=12, max_extra_len=3)
    task.pad_id, task.bos_id, task.eos_id = PAD, BOS, EOS
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(task.parameters(), lr=1e-2)
    for _ in range(80):
        lengths = torch.randint(2, 8, (32,), generator=g)
        src_mask = torch.arange(8)[None, :] < lengths[:, None]
        src = torch.randint(3, 12, (32, 8), generator=g).masked_fill(~src_mask, PAD)
        tgt = torch.full((32, 10), PAD)
        tgt[:, 0] = BOS
        for i, n in enumerate(lengths.tolist()):
            tgt[i, 1:n + 1], tgt[i, n + 1] = src[i, :n].flip(0), EOS
        batch = {"src": src, "src_mask": src_mask, "tgt": tgt, "tgt_mask": tgt != PAD}
        loss, _ = task._loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task.eval()


def _sources():
    lengths = torch.tensor([7, 3, 5, 6])
    src_mask = torch.arange(7)[None, :] < lengths[:, None]
    src = torch.randint(3, 12, (4, 7), generator=torch.Generator().manual_seed(3)).masked_fill(~src_mask, PAD)
    return src, src_mask, lengths


def _uncached(model: EncoderDecoder, src, src_mask):
    """Recompute the whole decoder at every step; reorder rows of everything it holds."""
    state = {"memory": model.encode(src, src_mask), "mask": src_mask, "fed": None}

    def step(tokens):
        state["fed"] = tokens if state["fed"] is None else torch.cat([state["fed"], tokens], 1)
        return F.log_softmax(model.decode(state["fed"], state["memory"], state["mask"])[:, -1], -1)

    def reorder(index, beams):
        state["memory"], state["mask"] = state["memory"][index], state["mask"][index]
        if state["fed"] is not None:
            state["fed"] = state["fed"][index]

    return step, reorder


@torch.no_grad()
def test_cached_beam_search_of_the_task_equals_full_recomputation(task):
    src, src_mask, lengths = _sources()
    got = task(src, src_mask, beam_size=4)
    step, reorder = _uncached(task.model, src, src_mask)
    want = beam_search(step, reorder, torch.full((4,), BOS), EOS, lengths + 3, beam_size=4, alpha=0.6,
                       pad_id=PAD).tokens
    assert torch.equal(got, want)
    ends = (got == EOS).float().argmax(1)[(got == EOS).any(1)]
    assert len(set(ends.tolist())) >= 2                     # hypotheses really end, at different lengths


@torch.no_grad()
def test_beam_size_one_of_the_task_is_its_greedy_search(task):
    src, src_mask, lengths = _sources()
    greedy = task(src, src_mask, beam_size=1)
    step, _ = _uncached(task.model, src, src_mask)
    assert torch.equal(greedy, greedy_search(step, torch.full((4,), BOS), EOS, lengths + 3, PAD))
    state = task.model.search_state(src, src_mask)          # beam 1 = greedy holds without the length penalty
    one = beam_search(state.step, state.reorder, torch.full((4,), BOS), EOS, lengths + 3, beam_size=1, alpha=0.0,
                      pad_id=PAD).tokens
    assert torch.equal(one, greedy)


V = 40
CROSS = {"shared": MultiHeadAttention, "shared_gqa": partial(MultiHeadAttention, n_kv_heads=2),
         "per_row": LinearAttention}                  # LinearAttention does not declare supports.shared_memory


def _random_translator(cross_attention, **kwargs) -> EncoderDecoder:
    """An untrained model whose hypotheses end at varied steps: an untied output projection (N(0, 0.02), so
    next-token distributions are broad) whose EOS row is 3x larger, so EOS wins in some states only."""
    torch.manual_seed(0)
    model = EncoderDecoder(V, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, tie_embeddings=False,
                           cross_attention=cross_attention, norm_placement="pre", **kwargs)
    with torch.no_grad():
        model.output.weight[EOS] *= 3
    return model.eval()


def _random_sources(batch: int):
    lengths = torch.tensor([6]) if batch == 1 else torch.tensor([7, 3, 5, 6])
    src_mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    src = torch.randint(3, V, src_mask.shape, generator=torch.Generator().manual_seed(batch))
    return src.masked_fill(~src_mask, PAD), src_mask, lengths


def _reference_beam(model: EncoderDecoder, src, max_len: int, k: int, alpha: float) -> list:
    """The documented beam search for one unpadded source alone, over Python lists, rerunning the decoder over
    every live hypothesis at each step: no cache, no other sentences, nothing shared, nothing dropped. The k
    best extensions form the beam, those ending in EOS (all at the limit) finish; stop once the k-th best
    finished beats the best live / max(lp(n + 1), lp(max_len)). Sums are float32, like the search's."""
    memory = model.encode(src[None])                                                     # (1, S, C)

    def lp(n):                                                                           # Wu et al. 2016, §7
        return torch.tensor(((5 + n) / 6) ** alpha, dtype=torch.float64).float()

    live, scores, finished = [[]], torch.zeros(1), []
    for n in range(1, max_len + 1):
        fed = torch.tensor([[BOS, *y] for y in live])                                     # (h, n)
        log_probs = model.decode(fed, memory.expand(len(live), -1, -1))[:, -1].float().log_softmax(-1)
        candidates = (scores[:, None] + log_probs).flatten()                              # (h V,)
        order = candidates.argsort(descending=True, stable=True).tolist()
        finished += [(candidates[i] / lp(n), live[i // V] + [i % V]) for i in order[:k] if i % V == EOS or n == max_len]
        finished = sorted(finished, key=lambda f: -float(f[0]))[:k]
        go_on = [i for i in order if i % V != EOS][:k] if n < max_len else []
        live, scores = [live[i // V] + [i % V] for i in go_on], candidates[go_on]
        best_live = scores.max() if go_on else torch.tensor(-math.inf)
        if len(finished) == k and finished[-1][0] >= best_live / torch.maximum(lp(n + 1), lp(max_len)):
            return finished
    return finished


@torch.no_grad()
@pytest.mark.parametrize("cross", CROSS)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("beam_size,alpha", [(1, 0.0), (4, 0.0), (4, 0.6)])
def test_search_equals_one_sentence_at_a_time_without_cache(cross, batch, beam_size, alpha):
    model = _random_translator(CROSS[cross])
    src, src_mask, lengths = _random_sources(batch)
    state = model.search_state(src, src_mask)
    got = beam_search(state.step, state.reorder, torch.full((batch,), BOS), EOS, lengths + 3, beam_size=beam_size,
                      alpha=alpha, pad_id=PAD, n_best=beam_size)
    for b in range(batch):
        want = _reference_beam(model, src[b, :lengths[b]], int(lengths[b]) + 3, beam_size, alpha)
        rows = zip(got.n_best_tokens[b].tolist(), got.n_best_lengths[b].tolist())
        assert [row[:n] for row, n in rows] == [y for _, y in want]
        torch.testing.assert_close(got.n_best_scores[b], torch.stack([s for s, _ in want]), atol=1e-5, rtol=0)
    if batch > 1:
        assert len(set(got.lengths.tolist())) > 1                   # sentences finish at different steps
    tokens = translate(model, src, src_mask, BOS, EOS, PAD, beam_size=beam_size, alpha=alpha, max_extra_len=3)
    width = tokens.shape[1]                                          # beam 1: greedy search, rows leaving too
    assert torch.equal(tokens, got.tokens[:, :width]) and (got.tokens[:, width:] == PAD).all()


@torch.no_grad()
def test_outputs_stop_at_the_last_target_position():
    model = _random_translator(MultiHeadAttention, positions=partial(LearnedPositions, max_len=8), output_bias=True)
    with torch.no_grad():
        model.output.bias[EOS] = -100.0                              # never ends: only the limit stops it
    src, src_mask, _ = _random_sources(4)                            # sources of up to 7 tokens + 50 > 8 positions
    for beam_size in (1, 4):
        tokens = translate(model, src, src_mask, BOS, EOS, PAD, beam_size=beam_size, max_extra_len=50)
        assert tokens.shape == (4, 8) and not (tokens == EOS).any()
