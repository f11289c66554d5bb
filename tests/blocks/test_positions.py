import math

import pytest
import torch

from lightning_tfm.blocks.positions import (
    ALiBiPositions,
    LearnedPositions,
    RotaryPositions,
    SinusoidalPositions,
    apply_rotary,
)


def test_sinusoidal_equals_the_papers_formula():
    d_model, length = 16, 50
    pe = SinusoidalPositions(d_model, max_len=length)
    got = pe(torch.zeros(1, length, d_model))[0]
    for pos in range(length):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)        # paper §3.5
            assert math.isclose(got[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(got[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_sinusoidal_split_layout_is_a_permutation_and_offset_continues_the_table():
    inter = SinusoidalPositions(8, max_len=20)(torch.zeros(1, 20, 8))[0]
    split = SinusoidalPositions(8, max_len=20, layout="split")(torch.zeros(1, 20, 8))[0]
    torch.testing.assert_close(split[:, :4], inter[:, 0::2])
    torch.testing.assert_close(split[:, 4:], inter[:, 1::2])
    pe = SinusoidalPositions(8, max_len=4)        # extends its table past max_len on the fly
    torch.testing.assert_close(pe(torch.zeros(1, 3, 8), offset=17)[0], inter[17:20])


def test_learned_positions_reject_positions_past_max_len():
    with pytest.raises(ValueError, match="position 10 is beyond max_len=10"):
        LearnedPositions(8, max_len=10)(torch.zeros(1, 11, 8))


def test_rotary_scores_depend_only_on_relative_offset():
    rope = RotaryPositions(d_model=16, n_heads=2)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        cos_q, sin_q = rope.rotary(1, offset=i)
        cos_k, sin_k = rope.rotary(1, offset=j)
        return (apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum().item()

    assert math.isclose(score(5, 2), score(103, 100), rel_tol=1e-4)
    assert not math.isclose(score(5, 2), score(5, 4), rel_tol=1e-3)
    # a rotation keeps norms
    cos, sin = rope.rotary(7)
    x = torch.randn(2, 2, 7, 8)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_alibi_slopes_and_bias_follow_press_et_al():
    alibi = ALiBiPositions(d_model=32, n_heads=8)
    torch.testing.assert_close(alibi.slopes, torch.tensor([2 ** -(i + 1) for i in range(8)]))
    bias = alibi.position_bias()(torch.tensor([3, 4]), torch.arange(5))      # queries at positions 3 and 4
    assert bias.shape == (8, 2, 5)
    torch.testing.assert_close(bias[0, 1], -0.5 * torch.tensor([4.0, 3, 2, 1, 0]))
    assert ALiBiPositions(32, n_heads=6).slopes.shape == (6,)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_model=7), "d_model=7, must be even"),
    (dict(d_model=8, max_len=0), "max_len=0"),
])
def test_sinusoidal_rejects_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SinusoidalPositions(**kwargs)


def test_rotary_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="d_model=12 / n_heads=4 must give an even head dimension"):
        RotaryPositions(12, 4)


def test_learned_positions_start_at_the_token_embeddings_scale():
    # with N(0, 1) positions (nn.Embedding's default) a pre-norm model sees mostly positions and learns
    # only unigram statistics
    std = LearnedPositions(128, max_len=1024).table.weight.std().item()
    assert 0.015 < std < 0.025


def test_without_positions_an_encoder_is_permutation_equivariant():
    """NoPositions: permuting the tokens permutes the hidden states, so pooled features see a bag of tokens."""
    from lightning_tfm.blocks import NoPositions
    from lightning_tfm.models import EncoderOnly

    torch.manual_seed(0)
    encoder = EncoderOnly(50, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, n_segments=0,
                          positions=NoPositions).eval()
    ids, order = torch.randint(5, 50, (2, 9)), torch.randperm(9)
    torch.testing.assert_close(encoder(ids[:, order]), encoder(ids)[:, order], atol=1e-5, rtol=0)
    learned = EncoderOnly(50, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, n_segments=0).eval()
    assert not torch.allclose(learned(ids[:, order]), learned(ids)[:, order], atol=1e-3)
