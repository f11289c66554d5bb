"""Inference in bf16 and int8 (`lightning_tfm.inference`, `Int8Linear`): the int8 kernel computes exactly the
quantized product (checked against the dequantized tensors), a converted model stays close to fp32 and comes
back bitwise, the search keeps fp32 scores, int8 is used only where it was measured faster, and a precision the
machine would emulate is refused with the reason. The CPU flags are passed in, so each case runs on any CPU."""

import warnings

import pytest
import torch
from torch import nn

import lightning_tfm.inference as inference
from lightning_tfm.blocks.attention import project_rows
from lightning_tfm.blocks.int8_linear import Int8Linear, quantize_rows, quantize_uint8
from lightning_tfm.inference import activation_levels, precision_problem, to_inference_precision
from lightning_tfm.models import EncoderDecoder

CPU = torch.device("cpu")
LEVELS = activation_levels(CPU)
BF16_CPU, PLAIN_CPU = frozenset({"avx2", "avx512_bf16", "avx512_vnni"}), frozenset({"avx2"})


def _model() -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(50, d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(3, 50, (3, 9), generator=g), torch.randint(3, 50, (3, 6), generator=g)
    return src, tgt, torch.arange(9)[None, :] < torch.tensor([9, 5, 7])[:, None]


@torch.no_grad()
def test_int8_linear_computes_the_product_of_its_dequantized_operands():
    torch.manual_seed(0)
    layer, x = nn.Linear(48, 40), torch.randn(2, 5, 48)
    q, scale, zero = quantize_uint8(x.reshape(-1, 48), LEVELS)
    w, w_scale = quantize_rows(layer.weight)
    expected = ((q.float() - zero) * scale) @ (w.float() * w_scale).T + layer.bias
    int8 = Int8Linear.from_float(layer, LEVELS)
    torch.testing.assert_close(int8(x), expected.view(2, 5, 40), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(int8.rows(x, 8, 24), int8(x)[..., 8:24], rtol=1e-4, atol=1e-4)
    assert (int8(x) - layer(x)).norm() / layer(x).norm() < 0.05                # what the quantization costs


@torch.no_grad()
def test_int8_linear_computes_in_float_below_its_minimum_rows():
    layer, x = nn.Linear(16, 8), torch.randn(3, 16)
    assert torch.equal(Int8Linear.from_float(layer, LEVELS, min_rows=4)(x), layer(x))
    assert not torch.equal(Int8Linear.from_float(layer, LEVELS, min_rows=3)(x), layer(x))


@torch.no_grad()
def test_an_int8_model_stays_close_to_fp32_and_restores_bitwise():
    model, (src, tgt, mask) = _model(), _batch()
    before = model(src, tgt, mask)
    converted = to_inference_precision(model, "int8", measure=False)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    assert not linears and converted.quantized == 2 * 4 + 2 * 6 + 1      # encoder, decoder layers; output
    after = model(src, tgt, mask)
    assert (after - before).norm() / before.norm() < 0.05
    state = model.search_state(src, mask, 8)                                    # cross-attention: project_rows
    assert state.step(torch.full((3, 1), 1)).dtype == torch.float32
    converted.restore()
    assert torch.equal(model(src, tgt, mask), before)


@torch.no_grad()
def test_bf16_keeps_the_search_scores_in_fp32_and_restores_bitwise():
    model, (src, tgt, mask) = _model(), _batch()
    before = model(src, tgt, mask)
    converted = to_inference_precision(model, "bf16", flags=BF16_CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    log_probs = model.search_state(src, mask, 8).step(torch.full((3, 1), 1))
    assert log_probs.dtype == torch.float32
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3), rtol=0, atol=1e-5)
    assert (model(src, tgt, mask).float() - before).norm() / before.norm() < 0.05
    converted.restore()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model(src, tgt, mask), before)


def test_bf16_on_a_cpu_without_it_is_refused_with_the_reason():
    reason = r"the CPU \(.*\) has neither amx_bf16 nor avx512_bf16: bf16 would be emulated, slower than fp32"
    with pytest.raises(ValueError, match=rf"inference_precision=bf16: {reason}; fp32 runs everywhere"):
        to_inference_precision(_model(), "bf16", flags=PLAIN_CPU)
    assert precision_problem("fp8", CPU) == "'fp8' is not one of fp32, bf16, int8"
    assert precision_problem("fp32", CPU, PLAIN_CPU) is None


def test_int8_saturation_safe_levels_on_x86_without_vnni():
    assert activation_levels(CPU, PLAIN_CPU) == 127 and activation_levels(CPU, BF16_CPU) == 255


def _timed(int8_faster_from: int | None):
    """A stand-in for the timing: int8 takes half fp32's time from `int8_faster_from` rows on, else twice."""
    def best_seconds(layer, x, repeats=7):
        faster = int8_faster_from is not None and x.shape[0] >= int8_faster_from
        return 1.0 if not isinstance(layer, Int8Linear) else 0.5 if faster else 2.0
    return best_seconds


def test_int8_is_used_from_the_rows_where_it_was_measured_faster(monkeypatch):
    monkeypatch.setattr(inference, "_best_seconds", _timed(16))
    model = _model()
    converted = to_inference_precision(model, "int8")
    assert set(converted.min_rows.values()) == {16} and converted.kept_float == 0
    assert all(m.min_rows == 16 for m in model.modules() if isinstance(m, Int8Linear))


def test_int8_that_is_never_faster_keeps_fp32_with_a_warning(monkeypatch):
    monkeypatch.setattr(inference, "_best_seconds", _timed(None))
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = to_inference_precision(model, "int8")
    assert converted.quantized == 0 and converted.kept_float == 21 and converted.precision == "fp32"
    assert any("no linear map of EncoderDecoder ran faster in int8" in str(w.message) for w in caught)
    assert not any(isinstance(m, Int8Linear) for m in model.modules())


def test_project_rows_reads_an_int8_layer_through_its_rows():
    layer = Int8Linear.from_float(nn.Linear(8, 12), LEVELS)
    x = torch.randn(4, 8)
    torch.testing.assert_close(project_rows(layer, x, 4, None), layer(x)[:, 4:])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._int_mm's CUDA kernel needs a GPU")


@CUDA
@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
def test_int8_linear_on_cuda_takes_any_rows_and_sizes(rows):
    """torch._int_mm wants sizes divisible by 8 and, for small layers, rows in multiples of 32; the layer pads
    and slices, so 1 row of a 50 x 37 layer computes the same quantized product as on the dequantized tensors."""
    torch.manual_seed(0)
    layer, x = nn.Linear(37, 50).cuda(), torch.randn(rows, 37, device="cuda")
    q, scale = quantize_rows(x)
    w, w_scale = quantize_rows(layer.weight)
    expected = (q.float() * scale) @ (w.float() * w_scale).T + layer.bias
    int8 = Int8Linear.from_float(layer)
    torch.testing.assert_close(int8(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(int8.rows(x, 8, 24), expected[:, 8:24], rtol=1e-4, atol=1e-4)


@CUDA
@torch.no_grad()
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_cuda_model_in_bf16_or_int8_stays_close_to_fp32_and_restores_bitwise(precision):
    model, (src, tgt, mask) = _model().cuda(), _batch()
    src, tgt, mask = src.cuda(), tgt.cuda(), mask.cuda()
    before = model(src, tgt, mask)
    assert precision_problem(precision, torch.device("cuda")) is None
    converted = to_inference_precision(model, precision, measure=False)
    after = model(src, tgt, mask).float()
    assert (after - before).norm() / before.norm() < 0.05
    converted.restore()
    assert torch.equal(model(src, tgt, mask), before)
