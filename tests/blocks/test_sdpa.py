"""`lightning_tfm.blocks.sdpa`: on CUDA the call runs inside `sdpa_kernel` with cuDNN's attention left out (it
builds a plan per new shape: our batches and decoding steps rarely repeat one); on the CPU it is the plain call.
The CUDA branch is checked with a stand-in tensor, so it runs on any machine."""

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

import lightning_tfm.blocks.sdpa as sdpa_module
from lightning_tfm.blocks.sdpa import sdpa


def test_on_cpu_sdpa_is_the_plain_call():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    assert torch.equal(sdpa(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_on_cuda_sdpa_leaves_cudnn_attention_out(monkeypatch):
    entered, called = [], []

    @contextlib.contextmanager
    def recording_kernel(backends):
        entered.append(list(backends))
        yield

    monkeypatch.setattr(sdpa_module, "sdpa_kernel", recording_kernel)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: called.append(kw) or "out")
    q = SimpleNamespace(is_cuda=True)
    assert sdpa(q, None, None, attn_mask="m", dropout_p=0.1) == "out"
    assert called == [{"attn_mask": "m", "dropout_p": 0.1}]
    assert entered == [sdpa_module.CUDA_BACKENDS] and SDPBackend.CUDNN_ATTENTION not in entered[0]
    assert SDPBackend.EFFICIENT_ATTENTION in entered[0]          # the fused kernel that takes a boolean mask
