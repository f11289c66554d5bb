"""The task's own step/reorder closures: cached beam search and greedy search equal full recomputation."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.decoding import beam_search, greedy_search
from lightning_tfm.models import EncoderDecoder
from lightning_tfm.tasks.translation import TranslationModule

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

    def reorder(index):
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
    task.length_penalty = 0.0                               # beam 1 = greedy holds without the length penalty
    try:
        step, reorder = task._incremental(src, src_mask)
        one = beam_search(step, reorder, torch.full((4,), BOS), EOS, lengths + 3, beam_size=1, alpha=0.0,
                          pad_id=PAD).tokens
    finally:
        task.length_penalty = 0.6
    assert torch.equal(one, greedy)
