"""`scaled_dot_product_attention` with the kernels our shapes suit: on CUDA, FlashAttention, memory-efficient
attention or the math fallback, never cuDNN's attention.

torch 2.11 tries cuDNN's attention first on Hopper for an explicit mask, and cuDNN builds an execution plan for
every new shape (measured on an H200 through `lightning_tfm test --inference_precision bf16`: 32 s against 3 s;
reported at 0.4-1 s a shape in modelscope/FunASR#3704). Our shapes are rarely repeated: token-budget batches
differ in length and batch size, and decoding adds a key a step while finished sentences leave the batch. On
the CPU nothing changes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
    """`F.scaled_dot_product_attention(q, k, v, **kwargs)`; on CUDA, with cuDNN's kernel left out."""
    if q.is_cuda:
        with sdpa_kernel(CUDA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
