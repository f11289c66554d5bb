"""`EncoderDecoder.search_state`: the encoder side kept once per sentence when every cross-attention block
declares `supports.shared_memory`, copied per row otherwise, and the rows of finished sentences dropped."""

from typing import ClassVar

import pytest
import torch

from lightning_tfm.blocks.attention import MultiHeadAttention, Supports
from lightning_tfm.decoding import beam_search
from lightning_tfm.models import EncoderDecoder

PAD, BOS, EOS, V = 0, 1, 2, 40


class Undeclared(MultiHeadAttention):
    """Multi-head attention that does not say it can share: the model must copy the encoder side per row."""

    supports: ClassVar[Supports] = Supports()


def _model(cross_attention) -> EncoderDecoder:
    """Untrained, with a 3x larger EOS row in an untied output projection: hypotheses end at varied steps."""
    torch.manual_seed(0)
    model = EncoderDecoder(V, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0, tie_embeddings=False,
                           cross_attention=cross_attention)
    with torch.no_grad():
        model.output.weight[EOS] *= 3
    return model.eval()


def _sources():
    lengths = torch.tensor([7, 3, 5, 6])
    src_mask = torch.arange(7)[None, :] < lengths[:, None]
    return torch.randint(3, V, (4, 7), generator=torch.Generator().manual_seed(4)).masked_fill(~src_mask, PAD), src_mask


@torch.no_grad()
def test_decoding_beams_against_one_memory_row_per_sentence_equals_a_copy_per_row():
    model = _model(MultiHeadAttention)
    src, src_mask = _sources()
    memory, tgt = model.encode(src, src_mask), torch.randint(3, V, (12, 4))              # 4 sentences x 3 beams
    want = model.decode(tgt, memory.repeat_interleave(3, 0), src_mask.repeat_interleave(3, 0))
    torch.testing.assert_close(model.decode(tgt, memory, src_mask), want, atol=1e-5, rtol=0)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, :2], memory, src_mask, cache=cache), model.decode(tgt[:, 2:], memory, src_mask,
                                                                                   cache=cache)]
    torch.testing.assert_close(torch.cat(steps, 1), want, atol=1e-5, rtol=0)
    assert cache.cross_attn[0].k.shape[0] == 4


def test_a_block_that_does_not_declare_sharing_is_refused_fewer_memory_rows():
    model = _model(Undeclared)
    assert not model.shares_memory and _model(MultiHeadAttention).shares_memory
    src, src_mask = _sources()
    with pytest.raises(ValueError, match=r"memory has 4 rows for 8 target rows.*supports.shared_memory is False"):
        model.decode(torch.randint(3, V, (8, 1)), model.encode(src, src_mask), src_mask)


@torch.no_grad()
@pytest.mark.parametrize("cross_attention", [MultiHeadAttention, Undeclared])
def test_the_encoder_side_has_a_row_per_sentence_or_per_row_and_finished_sentences_leave(cross_attention):
    model = _model(cross_attention)
    src, src_mask = _sources()
    state = model.search_state(src, src_mask)
    fed, cross_rows = [], []

    def step(tokens):
        log_probs = state.step(tokens)
        fed.append(len(tokens))
        cross_rows.append(state.cache.cross_attn[0].k.shape[0])
        return log_probs

    result = beam_search(step, state.reorder, torch.full((4,), BOS), EOS, 10, beam_size=3, pad_id=PAD)
    assert fed[:2] == [4, 12] and fed[-1] < 12 and fed[1:] == sorted(fed[1:], reverse=True)
    if model.shares_memory:
        assert cross_rows == [4] + [rows // 3 for rows in fed[1:]]      # one per sentence still searching
    else:
        assert cross_rows == fed                                        # one per row
    assert state.memory.shape[0] == cross_rows[-1] and state.src_mask.shape[0] == cross_rows[-1]
    for b in range(4):                                                  # each sentence alone
        one = model.search_state(src[b:b + 1], src_mask[b:b + 1])
        alone = beam_search(one.step, one.reorder, torch.tensor([BOS]), EOS, 10, beam_size=3, pad_id=PAD)
        width = alone.tokens.shape[1]
        assert torch.equal(result.tokens[b, :width], alone.tokens[0]) and (result.tokens[b, width:] == PAD).all()
