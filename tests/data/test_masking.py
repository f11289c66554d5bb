import pytest
import torch

from lightning_tfm.data.masking import IGNORE_INDEX, mask_tokens

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = [PAD, CLS, SEP, MASK]
VOCAB = 1000


@pytest.fixture(scope="module")
def batch():
    """400 rows of cls + ordinary tokens + sep + padding: about 100k ordinary tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (400, 300), generator=g)
    lengths = torch.randint(150, 299, (400,), generator=g)
    ids[:, 0] = CLS
    for row, n in enumerate(lengths.tolist()):
        ids[row, n] = SEP
        ids[row, n + 1:] = PAD
    return ids


def test_proportions_match_bert_within_tolerance(batch):
    inputs, labels = mask_tokens(batch, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(1))
    ordinary = ~torch.isin(batch, torch.tensor(SPECIALS))
    chosen = labels != IGNORE_INDEX
    n_ordinary, n_chosen = int(ordinary.sum()), int(chosen.sum())
    assert n_ordinary > 80_000
    # 5 standard deviations: sqrt(.15 * .85 / 80k) = 0.0013, sqrt(.8 * .2 / 12k) = 0.0037, sqrt(.09 / 12k) = 0.0027
    assert abs(n_chosen / n_ordinary - 0.15) < 0.0065
    masked = chosen & (inputs == MASK)
    kept = chosen & (inputs == batch)
    replaced = chosen & (inputs != MASK) & (inputs != batch)
    assert abs(masked.sum() / n_chosen - 0.8) < 0.019
    # a random draw equals the original with chance 1/996, which moves 0.01% from "replaced" to "kept"
    assert abs(replaced.sum() / n_chosen - 0.1) < 0.014
    assert abs(kept.sum() / n_chosen - 0.1) < 0.014
    assert torch.equal(labels[chosen], batch[chosen])
    assert torch.equal(inputs[~chosen], batch[~chosen])


def test_specials_are_never_chosen_and_never_drawn(batch):
    inputs, labels = mask_tokens(batch, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(2), mask_prob=0.9,
                                 replace_prob=0.0, random_prob=1.0)
    special = torch.isin(batch, torch.tensor(SPECIALS))
    assert (labels[special] == IGNORE_INDEX).all() and torch.equal(inputs[special], batch[special])
    chosen = labels != IGNORE_INDEX
    assert not torch.isin(inputs[chosen], torch.tensor(SPECIALS)).any()
    assert inputs[chosen].unique().numel() > 900  # uniform over the 996 ordinary ids


def test_reproducible_with_a_generator_and_input_untouched(batch):
    copy = batch.clone()
    a = mask_tokens(batch, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(7))
    b = mask_tokens(batch, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(7))
    c = mask_tokens(batch, SPECIALS, MASK, VOCAB, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert torch.equal(batch, copy)


def test_probability_errors(batch):
    with pytest.raises(ValueError, match=r"mask_prob=1\.5, must be in \[0, 1\]"):
        mask_tokens(batch, SPECIALS, MASK, VOCAB, mask_prob=1.5)
    with pytest.raises(ValueError, match=r"replace_prob=0\.8, random_prob=0\.3; both must be >= 0 with a sum <= 1"):
        mask_tokens(batch, SPECIALS, MASK, VOCAB, random_prob=0.3)
