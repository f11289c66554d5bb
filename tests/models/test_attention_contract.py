"""The interface every attention variant plugs into: per-layer factories told where they sit, declared
capabilities refused by the model, per-layer decoding states, initialisation by role, and masks built on
the input's device."""

from dataclasses import replace
from functools import partial
from typing import ClassVar

import pytest
import torch
from torch import nn

from lightning_tfm.blocks.attention import LayerPlace, MultiHeadAttention, Supports
from lightning_tfm.blocks.masks import AttentionMask
from lightning_tfm.blocks.positions import ALiBiPositions, LearnedPositions, RotaryPositions
from lightning_tfm.models import DecoderOnly, EncoderDecoder, EncoderOnly

SMALL = dict(d_model=32, n_layers=4, n_heads=4, d_ff=64, dropout=0.0)


class NoRotary(MultiHeadAttention):
    supports: ClassVar[Supports] = Supports(rotary=False)


class EncoderOnlyBlock(MultiHeadAttention):
    supports: ClassVar[Supports] = Supports(causal=False, decoding="none")


class RenamedOutput(MultiHeadAttention):
    """A variant that calls its output projection something else and says so by its role."""

    def __init__(self, d_model: int, n_heads: int, place: LayerPlace = LayerPlace()) -> None:
        super().__init__(d_model, n_heads, place)
        self.proj_back = self.out
        del self.out

    def residual_projections(self) -> list[nn.Linear]:
        return [self.proj_back]

    def forward(self, x, context=None, mask=None, state=None, rotary=None):
        self.out = self.proj_back
        return super().forward(x, context, mask, state, rotary)


def test_each_layer_is_told_where_it_sits_and_a_pattern_tiles_over_the_layers():
    local = partial(MultiHeadAttention, n_kv_heads=1)
    model = DecoderOnly(50, **SMALL, attention_pattern=[local, local, local, MultiHeadAttention])
    blocks = [layer.attention for layer in model.stack.layers]
    assert [b.n_kv_heads for b in blocks] == [1, 1, 1, 4]
    assert [b.place.index for b in blocks] == [0, 1, 2, 3]
    assert all(b.place.causal and b.place.n_layers == 4 and b.place.max_len == 1024 for b in blocks)
    encoder = EncoderOnly(50, **SMALL)
    assert not any(layer.attention.place.causal for layer in encoder.stack.layers)


def test_encoder_decoder_gives_its_decoder_its_own_self_attention_and_tells_cross_attention_apart():
    model = EncoderDecoder(50, **SMALL, decoder_attention=partial(MultiHeadAttention, n_kv_heads=2))
    assert all(layer.attention.n_kv_heads == 4 and not layer.attention.place.causal for layer in model.encoder.layers)
    for layer in model.decoder.layers:
        assert layer.self_attention.n_kv_heads == 2 and layer.self_attention.place.causal
        assert layer.cross_attention.place.cross and not layer.cross_attention.place.causal


@pytest.mark.parametrize("build, message", [
    (lambda: DecoderOnly(50, **SMALL, attention=NoRotary, positions=RotaryPositions),
     r"DecoderOnly: NoRotary \(at layers.0.attention\) cannot take rotary positions \(RotaryPositions\)"),
    (lambda: DecoderOnly(50, **SMALL, attention=EncoderOnlyBlock),
     r"DecoderOnly: EncoderOnlyBlock \(at layers.0.attention\) cannot attend causally"),
    (lambda: EncoderDecoder(50, **SMALL, cross_attention=partial(_refusing, cross_attention=False)),
     r"EncoderDecoder: MultiHeadAttention \(at layers.0.cross_attention\) cannot attend to the encoder output"),
    (lambda: EncoderOnly(50, **SMALL, attention=partial(_refusing, position_bias=False), positions=ALiBiPositions),
     r"cannot take a position bias \(ALiBiPositions\)"),
])
def test_a_model_refuses_a_block_that_cannot_do_what_it_needs(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _refusing(d_model, n_heads, place=LayerPlace(), **unsupported):
    block = MultiHeadAttention(d_model, n_heads, place)
    block.supports = replace(Supports(), **unsupported)
    return block


def test_padding_and_incremental_decoding_are_refused_where_a_block_cannot_do_them():
    model = EncoderOnly(50, **SMALL, attention=partial(_refusing, padding=False)).eval()
    ids = torch.randint(0, 50, (2, 5))
    model(ids, mask=torch.ones(2, 5, dtype=torch.bool))                  # nothing padded: fine
    with pytest.raises(ValueError, match=r"EncoderOnly: MultiHeadAttention \(at layers.0.attention\) cannot "
                                         "honour padding"):
        model(ids, mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))
    decoder = DecoderOnly(50, **SMALL, attention_pattern=[MultiHeadAttention, partial(_refusing, decoding="none")])
    with pytest.raises(ValueError, match=r"DecoderOnly: MultiHeadAttention \(layer 1\) cannot decode incrementally"):
        decoder.new_cache()


def test_residual_projections_are_found_by_role_not_by_name():
    torch.manual_seed(0)
    model = DecoderOnly(50, d_model=256, n_layers=8, n_heads=4, d_ff=256, attention=RenamedOutput)
    scaled = 0.02 / (2 * 8) ** 0.5
    for layer in model.stack.layers:
        assert abs(layer.attention.proj_back.weight.std().item() - scaled) < 0.1 * scaled
        assert abs(layer.attention.qkv.weight.std().item() - 0.02) < 0.002
        assert abs(layer.feedforward.fc2.weight.std().item() - scaled) < 0.1 * scaled


def test_decoding_states_belong_to_the_layers_and_the_model_counts_positions():
    model = EncoderDecoder(50, **SMALL).eval()
    cache = model.new_cache(max_len=4)
    assert len(cache.self_attn) == len(cache.cross_attn) == 4
    memory = model.encode(torch.randint(0, 50, (2, 6)))
    model.decode(torch.randint(0, 50, (2, 3)), memory, cache=cache)
    model.decode(torch.randint(0, 50, (2, 1)), memory, cache=cache)
    assert cache.length == 4
    assert cache.self_attn[0].length == 4 and cache.cross_attn[0].k.shape[2] == 6


def test_a_multi_token_step_after_a_prefill_equals_the_full_forward_with_padding():
    torch.manual_seed(0)
    model = DecoderOnly(50, **SMALL, positions=partial(LearnedPositions, max_len=64)).eval()
    ids = torch.randint(0, 50, (2, 9))
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, :2] = False                                                  # left-padded row
    full = model(ids, mask=real)
    cache = model.new_cache()
    first = model(ids[:, :4], mask=real[:, :4], cache=cache)
    rest = model(ids[:, 4:], mask=real, cache=cache)                     # 5 tokens at once, after the prefill
    torch.testing.assert_close(torch.cat([first, rest], 1)[real], full[real], atol=1e-5, rtol=0)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("padded", [False, True])
def test_every_mask_tensor_is_built_on_the_input_device(device, padded):
    key_mask = torch.ones(2, 7, dtype=torch.bool, device=device)
    if padded:
        key_mask[0, 0] = False
    mask = AttentionMask.build(key_mask, causal=True, offset=4, bias=ALiBiPositions(16, 4).to(device).position_bias())
    attn_mask, is_causal = mask.sdpa_mask(3, 7, torch.float32, torch.device(device))    # 3 queries after 4 cached
    assert not is_causal and attn_mask.device.type == device
    plain = AttentionMask.build(None, causal=True, offset=4).allowed(3, 7, torch.device(device))
    assert plain.device.type == device and plain.tolist() == [[True] * 5 + [False] * 2, [True] * 6 + [False],
                                                              [True] * 7]
