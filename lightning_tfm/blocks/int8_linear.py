"""Linear maps in int8 for inference: weights quantized once per output feature (symmetric, scale = max |w| /
127), activations quantized when they arrive (dynamic), the product accumulated in int32 and rescaled to
float32 with the bias added in float32: the scheme of CTranslate2's int8 and of LLM.int8's vector-wise
quantization without its outlier split.

The kernel is oneDNN's quantized matmul on CPU (`torch.ops.onednn.qlinear_pointwise`, the one torch's own x86
int8 path lowers to; it uses AVX2, AVX512-VNNI or AMX, whichever the CPU has, with uint8 activations and one
scale per call) and `torch._int_mm` on CUDA (int8 activations, one scale per row). `torch._int_mm` on CPU is a
reference loop on CPUs without AMX, 30-50x slower than fp32 (measured on an AVX2 EPYC), so it is not used
there."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QMAX = 127                       # symmetric weights: -127 .. 127, so negating a value never overflows


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., n) float -> ((..., n) int8, (..., 1) float32 scales) with x ~ q * scale, one scale per row."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / QMAX
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def quantize_uint8(x: Tensor, levels: int = 255) -> tuple[Tensor, Tensor, Tensor]:
    """float x -> (uint8 q in 0 .. levels, scale, zero point) with x ~ (q - zero point) * scale over the whole
    tensor; zero is exactly representable (padding and ReLU zeros stay zeros)."""
    low, high = torch.aminmax(x.float())
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = (high - low).clamp_min(1e-12) / levels
    zero = torch.round(-low / scale)
    q = torch.round(x / scale).add_(zero).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero.to(torch.int32)


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 and per-output-feature scales; built from a float layer by `from_float`.

    `rows(x, start, end)` computes output features start:end only, as `LoRALinear.rows` does, for the attention
    blocks that project queries and keys/values with slices of one fused layer.

    Below `min_rows` rows per call the layer computes in float with the weight it was built from: quantizing
    the activations and the kernel's fixed cost outweigh the cheaper multiply for a few rows (greedy decoding of
    one sentence feeds one row a step). `lightning_tfm.inference` measures where that is on the machine.

    Args:
        weight: (out, in) float weight to quantize; kept, unchanged, for calls under `min_rows` rows.
        bias: (out,) float bias, or None.
        activation_levels: 255 (uint8), or 127 on x86 CPUs without VNNI or AMX, whose u8 x s8 multiply-add
            (AVX2's vpmaddubsw) saturates int16 pair sums: 8% output error at 255 levels, 2% at 127 (measured).
        min_rows: calls with fewer rows than this compute in float.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, activation_levels: int = 255, min_rows: int = 0) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.activation_levels, self.min_rows = activation_levels, min_rows
        self.float_weight, self.float_bias = weight.detach(), None if bias is None else bias.detach()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale.view(-1))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._kernels: dict[tuple[int, int], _Kernel] = {}

    @classmethod
    def from_float(cls, layer: nn.Module, activation_levels: int = 255, min_rows: int = 0) -> Int8Linear:
        """From any module with `weight` (out, in) and `bias`: nn.Linear or `OutputProjection` (whose weight
        may be tied to the token embedding)."""
        return cls(layer.weight, getattr(layer, "bias", None), activation_levels, min_rows)

    def forward(self, x: Tensor) -> Tensor:
        return self.rows(x, 0, None)

    def rows(self, x: Tensor, start: int, end: int | None) -> Tensor:
        """Output features start:end only; (..., in) -> (..., end - start)."""
        end = self.out_features if end is None else end
        shape = x.shape
        if x.numel() < self.min_rows * shape[-1]:
            bias = None if self.float_bias is None else self.float_bias[start:end]
            return F.linear(x, self.float_weight[start:end], bias)
        kernel = self._kernels.get((start, end))
        if kernel is None:                  # the weight packed for the device's kernel, once per slice
            bias = None if self.bias is None else self.bias[start:end]
            kernel = _Kernel(self.weight_int8[start:end], self.weight_scale[start:end], bias, self.activation_levels)
            self._kernels[start, end] = kernel
        return kernel(x.reshape(-1, shape[-1])).view(*shape[:-1], end - start)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# torch._int_mm on CUDA (cuBLASLt, CUDA 13 on an H200) takes inner and output sizes divisible by 8, and rows in
# multiples of 32 where the inner size is small (measured: 17 to 40 rows fail at inner sizes 32 to 64, and
# 32 and 64 rows pass at every size; at 256 any row count over 16 passes)
_CUDA_ROWS, _CUDA_MULTIPLE = 32, 8


class _Kernel:
    """One int8 weight (out, in) prepared for the matmul of its device; (M, in) float -> (M, out) float32."""

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None, levels: int) -> None:
        self.scale, self.bias, self.cuda, self.levels = scale, bias, weight.is_cuda, levels
        if self.cuda:               # zero rows and columns padded in change no product; sliced off after
            self.out_features, self.pad_in = weight.shape[0], -weight.shape[1] % _CUDA_MULTIPLE
            padded = F.pad(weight, (0, self.pad_in, 0, -weight.shape[0] % _CUDA_MULTIPLE))
            self.weight = padded.t().contiguous()                   # (in, out), as torch._int_mm reads it
        else:
            self.weight = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
            self.zeros = torch.zeros(weight.shape[0], dtype=torch.long)

    def __call__(self, x: Tensor) -> Tensor:
        if self.cuda:
            q, row_scale = quantize_rows(x)
            q = F.pad(q, (0, self.pad_in, 0, -len(q) % _CUDA_ROWS))
            y = torch._int_mm(q, self.weight)[:len(x), :self.out_features]
            y = y.float().mul_(row_scale).mul_(self.scale)
            return y if self.bias is None else y.add_(self.bias)
        q, scale, zero = quantize_uint8(x, self.levels)
        return torch.ops.onednn.qlinear_pointwise.tensor(q, scale, zero, self.weight, self.scale, self.zeros,
                                                         self.bias, 1.0, 0, torch.float32, "none", [], "")


def int8_kernel_problem(device: torch.device, activation_levels: int = 255) -> str | None:
    """None where the int8 kernel of `device` runs and computes right, else why not, in words."""
    try:
        layer = Int8Linear(torch.eye(16, device=device), None, activation_levels)
        out = layer(torch.arange(32.0, device=device).view(2, 16))
    except (RuntimeError, NotImplementedError, AttributeError) as error:
        return f"the int8 kernel does not run on {device} ({str(error).splitlines()[0]})"
    if not torch.allclose(out, torch.arange(32.0, device=device).view(2, 16), atol=0.5):
        return f"the int8 kernel gives wrong results on {device}"
    return None
