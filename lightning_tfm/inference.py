"""The number format a trained model evaluates and predicts in: fp32, bf16 weights, or int8 linear maps
(`Int8Linear`). Chosen by the tasks' `inference_precision` at test and predict time. bf16 is refused, with the
reason, where the machine would emulate it, slower than fp32 (a CPU without AMX-BF16 or AVX512-BF16); int8 where
no int8 kernel runs. int8 is measured against fp32 on the machine, per layer shape and row count, when the
model is converted: a layer computes in int8 only from the row count where that is faster, and if it is
faster for none the model stays fp32 with a warning. Log-probabilities, top-k and beam scores stay fp32
whatever the weights are (`EncoderDecoder.search_state`, `DecoderOnly` steps)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from lightning_tfm.blocks.embeddings import OutputProjection
from lightning_tfm.blocks.int8_linear import Int8Linear, int8_kernel_problem
from lightning_tfm.precision import INT8_FLAGS, cpu_flags, native_bf16

InferencePrecision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def precision_problem(precision: str, device: torch.device, flags: frozenset[str] | None = None) -> str | None:
    """None where `device` runs `precision` natively, else why it does not, in words."""
    if precision not in PRECISIONS:
        return f"{precision!r} is not one of {', '.join(PRECISIONS)}"
    if precision == "bf16":
        native = native_bf16(device.type, flags)
        return None if native.bf16 else native.reason
    if precision == "int8":
        return int8_kernel_problem(device, activation_levels(device, flags))
    return None


def activation_levels(device: torch.device, flags: frozenset[str] | None = None) -> int:
    """uint8 activation levels the int8 kernel may use: 127 on an x86 CPU without VNNI or AMX (`Int8Linear`)."""
    if device.type != "cpu":
        return 255
    flags = cpu_flags() if flags is None else flags
    return 255 if any(f in flags for f in INT8_FLAGS) else 127


@dataclass
class Converted:
    """A model in an inference precision; `restore()` puts back the fp32 modules and tensors it replaced."""

    model: nn.Module
    precision: str
    quantized: int = 0                                    # linear maps now in int8 (from min_rows rows)
    kept_float: int = 0                                   # linear maps left in fp32: int8 measured no faster
    min_rows: dict[str, int] = field(default_factory=dict)  # "out x in" -> rows from which int8 is used
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def to_inference_precision(model: nn.Module, precision: str, flags: frozenset[str] | None = None,
                           measure: bool = True) -> Converted:
    """Convert `model` in place for inference in `precision`; a ValueError names the reason a machine cannot.

    bf16: every floating-point parameter and buffer becomes bf16 (halving the bytes read per token). int8: every
    `nn.Linear` and `OutputProjection` becomes an `Int8Linear`, used from the row count where `measure` found
    it faster than fp32 (always, without `measure`); other modules (norms, embeddings, LoRA adapters not yet
    merged) stay fp32."""
    device = next(model.parameters()).device
    problem = precision_problem(precision, device, flags)
    if problem:
        raise ValueError(f"inference_precision={precision}: {problem}; fp32 runs everywhere")
    converted = Converted(model, precision)
    if precision == "bf16":
        converted._undo.append(_cast_floats(model, torch.bfloat16))
    elif precision == "int8":
        _quantize_linears(model, converted, activation_levels(device, flags), measure)
        if converted.quantized == 0 and converted.kept_float:
            converted.precision = "fp32"                      # what the model now computes in
            warnings.warn(f"inference_precision=int8: no linear map of {type(model).__name__} ran faster in int8 "
                          "than in fp32 on this machine (measured at 1 to 256 rows), so it stays fp32", stacklevel=2)
    return converted


def _cast_floats(model: nn.Module, dtype: torch.dtype) -> Callable[[], None]:
    """Cast the floating-point tensors' data (tied ones once); the undo puts the original tensors back."""
    saved: list[tuple[Tensor, Tensor]] = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != dtype:
            saved.append((tensor, tensor.data))
            tensor.data = tensor.data.to(dtype)

    def undo() -> None:
        for tensor, data in saved:
            tensor.data = data
    return undo


def _quantize_linears(model: nn.Module, converted: Converted, levels: int, measure: bool) -> None:
    measured: dict[tuple[int, int, bool], int | None] = {}            # one measurement per layer shape
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (nn.Linear, OutputProjection):
                continue
            key = (*child.weight.shape, getattr(child, "bias", None) is not None)
            if key not in measured:
                measured[key] = _int8_from_rows(child, levels) if measure else 0
            if measured[key] is None:
                converted.kept_float += 1
                continue
            converted.min_rows[f"{key[0]} x {key[1]}"] = measured[key]
            setattr(parent, name, Int8Linear.from_float(child, levels, measured[key]))
            converted._undo.append(lambda parent=parent, name=name, child=child: setattr(parent, name, child))
            converted.quantized += 1


PROBE_ROWS = (1, 4, 16, 32, 64, 128, 256)   # 128: beam 4 over batches of 32


@torch.no_grad()
def _int8_from_rows(layer: nn.Module, levels: int) -> int | None:
    """The fewest rows from which int8 is at least 10% faster than fp32 for this layer (at every larger probed
    row count too), or None if it never is."""
    int8 = Int8Linear.from_float(layer, levels)
    faster = []
    for rows in PROBE_ROWS:
        x = torch.randn(rows, layer.weight.shape[1], device=layer.weight.device)
        faster.append(_best_seconds(int8, x) < 0.9 * _best_seconds(layer, x))
    for i, rows in enumerate(PROBE_ROWS):
        if all(faster[i:]):
            return rows
    return None


def _best_seconds(layer: nn.Module, x: Tensor, repeats: int = 7) -> float:
    """The fastest of `repeats` calls: other processes on the machine only ever add time (timeit's choice)."""
    layer(x)                                                   # warm-up: packing, oneDNN primitive creation
    times = []
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        layer(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)
