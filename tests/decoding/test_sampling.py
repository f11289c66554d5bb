import math

import pytest
import torch

from lightning_tfm.decoding import greedy_search, keep_top_k, keep_top_p, sample

EOS, PAD = 0, 9
NEG_INF = float("-inf")


def _kept(filtered: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in filtered]


def test_keep_top_k_keeps_exactly_the_k_largest_of_each_row():
    logits = torch.tensor([[0.1, 2.0, -1.0, 3.0, 0.5],
                           [5.0, 4.0, 3.0, 2.0, 1.0],
                           [-3.0, -1.0, -2.0, -0.5, -4.0]])
    assert _kept(keep_top_k(logits, 2)) == [{1, 3}, {0, 1}, {1, 3}]
    assert _kept(keep_top_k(logits, 1)) == [{3}, {0}, {3}]
    assert torch.equal(keep_top_k(logits, 5), logits)
    assert torch.equal(keep_top_k(logits, 7), logits)
    kept = keep_top_k(logits, 3)
    assert torch.equal(kept[kept > NEG_INF], logits[kept > NEG_INF])     # survivors are unchanged


def test_keep_top_k_keeps_ties_with_the_kth():
    assert _kept(keep_top_k(torch.tensor([[1.0, 3.0, 1.0, 0.0]]), 2)) == [{0, 1, 2}]


def test_keep_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3],           # ranked: 1 (.5), 3 (.3), 2 (.15), 0 (.05)
                          [0.1, 0.2, 0.3, 0.4]])            # ranked: 3 (.4), 2 (.3), 1 (.2), 0 (.1)
    logits = probs.log() + 1.7                              # any shift: the filter reads softmax(logits)
    assert _kept(keep_top_p(logits, 0.38)) == [{1}, {3}]
    assert _kept(keep_top_p(logits, 0.45)) == [{1}, {3, 2}]
    assert _kept(keep_top_p(logits, 0.75)) == [{1, 3}, {3, 2, 1}]
    assert _kept(keep_top_p(logits, 0.92)) == [{1, 3, 2}, {3, 2, 1, 0}]
    assert _kept(keep_top_p(logits, 0.01)) == [{1}, {3}]     # the most probable token always stays
    assert torch.equal(keep_top_p(logits, 1.0), logits)


def test_filters_reject_impossible_values():
    with pytest.raises(ValueError, match="top_k=0, must be >= 1"):
        keep_top_k(torch.zeros(1, 3), 0)
    with pytest.raises(ValueError, match=r"top_p=0.0, must be in \(0, 1\]"):
        keep_top_p(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match=r"top_p=1.5, must be in \(0, 1\]"):
        sample(lambda t: torch.zeros(1, 3), torch.tensor([1]), 2, top_p=1.5)
    with pytest.raises(ValueError, match="temperature=-1.0, must be >= 0"):
        sample(lambda t: torch.zeros(1, 3), torch.tensor([1]), 2, temperature=-1.0)


@pytest.mark.parametrize("temperature", [0.0, 1e-4])
def test_sampling_at_temperature_near_zero_is_greedy_search(table_model, temperature):
    prefix, max_len = torch.tensor([2, 3, 4, 1]), torch.tensor([5, 2, 4, 5])
    greedy = greedy_search(table_model(4, seed=5).step, prefix, EOS, max_len, pad_id=PAD)
    sampled = sample(table_model(4, seed=5).step, prefix, max_len, temperature=temperature,
                     generator=torch.Generator().manual_seed(0), eos_id=EOS, pad_id=PAD)
    assert torch.equal(sampled, greedy)


def test_top_k_of_one_is_greedy_search(table_model):
    prefix = torch.tensor([2, 3, 4])
    greedy = greedy_search(table_model(3, seed=6).step, prefix, EOS, 5, pad_id=PAD)
    sampled = sample(table_model(3, seed=6).step, prefix, 5, temperature=3.0, top_k=1,
                     generator=torch.Generator().manual_seed(0), eos_id=EOS, pad_id=PAD)
    assert torch.equal(sampled, greedy)


def test_sampling_is_reproducible_with_a_generator(table_model):
    def draw(seed: int) -> torch.Tensor:
        return sample(table_model(8, seed=7).step, torch.full((8,), 2), 5, top_k=4, top_p=0.9,
                      generator=torch.Generator().manual_seed(seed), eos_id=EOS, pad_id=PAD)

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


def test_sampling_pads_after_eos(table_model):
    out = sample(table_model(16, seed=8).step, torch.full((16,), 2), 5,
                 generator=torch.Generator().manual_seed(0), eos_id=EOS, pad_id=PAD)
    for row in out.tolist():
        if EOS in row:
            end = row.index(EOS)
            assert row[end + 1:] == [PAD] * (len(row) - end - 1)
        assert PAD not in row or EOS in row


def test_sampled_frequencies_follow_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    logits = probs.log().expand(20000, 5)
    out = sample(lambda tokens: logits, torch.zeros(20000, dtype=torch.long), 1, top_k=4, top_p=0.8,
                 generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.flatten(), minlength=5).double() / 20000
    # top-k drops token 0; renormalized, tokens 1, 3, 4 hold .89 >= .8, so the nucleus drops token 2
    want = torch.tensor([0.0, 0.4, 0.0, 0.25, 0.2], dtype=torch.float64) / 0.85
    assert counts[0] == 0 and counts[2] == 0
    torch.testing.assert_close(counts, want, atol=4 * math.sqrt(0.25 / 20000), rtol=0)
