import pytest
import torch

from lightning_tfm.decoding import greedy_search

EOS, PAD = 0, 9           # PAD is outside the 5-token vocabulary so padding is visible


def _reference_greedy(model, sentence: int, prefix: list[int], max_len: int) -> list[int]:
    """Greedy search for one row, one token at a time, from the table without any state."""
    out: list[int] = []
    while len(out) < max_len and (not out or out[-1] != EOS):
        scores = [model.path_log_prob(sentence, prefix, out + [t]) for t in range(model.vocab_size)]
        out.append(max(range(model.vocab_size), key=scores.__getitem__))
    return out


def _padded(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [PAD] * (width - len(row)) for row in rows])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_takes_the_most_probable_token_and_pads_after_eos(table_model, seed):
    model = table_model(4, seed=seed)
    max_len = torch.tensor([3, 5, 1, 4])
    got = greedy_search(model.step, torch.tensor([2, 3, 4, 2]), EOS, max_len, pad_id=PAD)
    want = [_reference_greedy(model, b, [bos], int(n)) for b, (bos, n) in enumerate(zip([2, 3, 4, 2], max_len))]
    assert torch.equal(got, _padded(want))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rows_that_stop_leave_the_batch_without_changing_the_output(table_model, seed):
    bos, max_len = torch.tensor([2, 3, 4, 2]), torch.tensor([3, 5, 1, 4])
    want = greedy_search(table_model(4, seed=seed).step, bos, EOS, max_len, pad_id=PAD)
    model, fed = table_model(4, seed=seed), []
    got = greedy_search(lambda tokens: fed.append(len(tokens)) or model.step(tokens), bos, EOS, max_len, PAD,
                        reorder=model.reorder)
    assert torch.equal(got, want)
    assert fed[0] == 4 and fed[1] <= 3 and fed == sorted(fed, reverse=True)    # row 2 (limit 1) is fed once
    for index, beams in model.reorders:                          # the rows that go on, in their order
        assert beams == 1 and (index[1:] > index[:-1]).all()


def test_greedy_continues_a_longer_prefix(table_model):
    model = table_model(2, seed=3)
    prefix = torch.tensor([[2, 3, 1], [4, 4, 2]])
    got = greedy_search(model.step, prefix, EOS, 3, pad_id=PAD)
    want = [_reference_greedy(model, b, prefix[b].tolist(), 3) for b in range(2)]
    assert torch.equal(got, _padded(want))


def test_greedy_stops_when_every_row_has_ended(markov_model):
    log_probs = torch.full((3, 5, 5), -10.0)
    log_probs[:, 2, 3] = 0.0                        # BOS=2 -> 3 -> EOS, with certainty
    log_probs[:, 3, EOS] = 0.0
    model = markov_model(log_probs.log_softmax(-1))
    calls = []
    got = greedy_search(lambda tokens: calls.append(tokens) or model.step(tokens), torch.full((3,), 2), EOS, 50)
    assert torch.equal(got, torch.tensor([[3, EOS]] * 3))
    assert len(calls) == 2


def test_greedy_rejects_bad_limits_and_prefixes(table_model):
    model = table_model(2)
    with pytest.raises(ValueError, match=r"max_len=\[2, 0\]; every row must allow at least 1"):
        greedy_search(model.step, torch.tensor([1, 2]), EOS, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match=r"max_len has shape \(3,\); expected an int or \(2,\)"):
        greedy_search(model.step, torch.tensor([1, 2]), EOS, torch.tensor([2, 2, 2]))
    with pytest.raises(ValueError, match=r"prefix has shape \(2, 1, 1\)"):
        greedy_search(model.step, torch.ones(2, 1, 1, dtype=torch.long), EOS, 3)
    with pytest.raises(ValueError, match="prefix has dtype torch.float32; expected integer token ids"):
        greedy_search(model.step, torch.ones(2), EOS, 3)
