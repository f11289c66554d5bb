from functools import partial

import pytest
import torch

from lightning_tfm.blocks.attention import MultiHeadAttention
from lightning_tfm.blocks.feedforward import SwiGLU
from lightning_tfm.blocks.norms import RMSNorm
from lightning_tfm.blocks.positions import ALiBiPositions, LearnedPositions, RotaryPositions, SinusoidalPositions
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly
from lightning_tfm.models.presets import BertBaseLike, GPT2SmallLike, TransformerBase, TransformerBig

SMALL = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
DECODER_VARIANTS = {
    "learned": dict(positions=partial(LearnedPositions, max_len=64)),
    "gqa_rotary_rms_swiglu": dict(attention=partial(MultiHeadAttention, n_kv_heads=2), positions=RotaryPositions,
                                  norm=RMSNorm, feedforward=SwiGLU),
    "mqa_alibi": dict(attention=partial(MultiHeadAttention, n_kv_heads=1), positions=ALiBiPositions),
    "sinusoidal_post_norm": dict(positions=SinusoidalPositions, norm_placement="post"),
}


def _decoder(variant: str) -> DecoderOnly:
    torch.manual_seed(0)
    return DecoderOnly(50, **SMALL, **DECODER_VARIANTS[variant]).eval()


@pytest.mark.parametrize("variant", DECODER_VARIANTS)
def test_future_tokens_never_change_earlier_outputs(variant):
    model = _decoder(variant)
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(model(ids)[:, :7], model(changed)[:, :7], atol=1e-5, rtol=0)
    assert not torch.allclose(model(ids)[:, 7:], model(changed)[:, 7:])


@pytest.mark.parametrize("variant", DECODER_VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation_for_20_steps(variant):
    model = _decoder(variant)
    ids = torch.randint(0, 50, (3, 24))
    full = model(ids)
    cache = model.new_cache(max_len=8)
    logits = [model(ids[:, :4], cache=cache)]
    for t in range(4, 24):                                # 20 incremental steps
        logits.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-4, rtol=0)


def test_padding_never_changes_real_positions():
    torch.manual_seed(0)
    encoder = EncoderOnly(50, **SMALL, positions=partial(LearnedPositions, max_len=64)).eval()
    decoder = _decoder("gqa_rotary_rms_swiglu")
    seq2seq = EncoderDecoder(50, **SMALL).eval()
    ids = torch.randint(1, 50, (1, 6))
    padded = torch.cat([ids, torch.randint(1, 50, (1, 4))], dim=1)      # 4 junk tokens marked as padding
    real = torch.tensor([[True] * 6 + [False] * 4])
    torch.testing.assert_close(encoder(padded, mask=real)[:, :6], encoder(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(decoder(padded, mask=real)[:, :6], decoder(ids), atol=1e-5, rtol=0)
    tgt = torch.randint(1, 50, (1, 5))
    torch.testing.assert_close(seq2seq(padded, tgt, src_mask=real), seq2seq(ids, tgt), atol=1e-5, rtol=0)


def test_encoder_decoder_cached_decoding_equals_teacher_forcing():
    torch.manual_seed(0)
    model = EncoderDecoder(50, **SMALL, attention=partial(MultiHeadAttention, n_kv_heads=2)).eval()
    src = torch.randint(1, 50, (2, 9))
    src_mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    tgt = torch.randint(1, 50, (2, 21))
    full = model(src, tgt, src_mask)
    memory = model.encode(src, src_mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache=cache) for t in range(21)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


def test_shared_and_tied_embeddings_are_one_tensor():
    model = EncoderDecoder(50, **SMALL)
    assert model.src_embedding.tokens.weight is model.tgt_embedding.tokens.weight is model.output.weight
    separate = EncoderDecoder(50, **SMALL, tgt_vocab_size=40, share_embeddings=False, tie_embeddings=False)
    assert separate.output.weight.shape == (40, 32)
    assert separate.output.weight is not separate.tgt_embedding.tokens.weight


def _count(build) -> int:
    """The parameters of the model `build()` returns, built on the meta device: a count needs no values, and
    initialising TransformerBig's 214M weights takes seconds."""
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("build, paper_count", [(TransformerBase, 65e6), (TransformerBig, 213e6)])
def test_paper_presets_count_within_5_percent_of_table_3(build, paper_count):
    count = _count(partial(build, vocab_size=37000))
    assert abs(count - paper_count) / paper_count < 0.05, count


def test_bert_and_gpt2_presets_count_like_the_published_models():
    assert abs(_count(GPT2SmallLike) - 124.44e6) / 124.44e6 < 0.001              # GPT-2 small: 124,439,808
    bert = _count(BertBaseLike)                                                   # BERT-base without pooler
    assert abs(bert - 108.89e6) / 108.89e6 < 0.001


@pytest.mark.parametrize("build, message", [
    (lambda: DecoderOnly(50, d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
    (lambda: EncoderOnly(50, dropout=1.5), r"dropout=1.5, must be in \[0, 1\)"),
    (lambda: EncoderDecoder(0), "vocab_size=0"),
    (lambda: EncoderDecoder(50, tgt_vocab_size=40), "share_embeddings=True needs one vocabulary"),
    (lambda: DecoderOnly(50, norm_placement="middle"), "norm_placement='middle'"),
    (lambda: DecoderOnly(50, **SMALL, attention=partial(MultiHeadAttention, n_kv_heads=3)),
     "n_heads=4 is not divisible by n_kv_heads=3"),
])
def test_bad_configuration_fails_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()
