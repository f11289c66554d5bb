"""MFU family, GPU only: model FLOPs utilisation of a GPT-2-small-sized decoder, ours against
`GPT2LMHeadModel`, trained in bf16 autocast with torch.compile (PaLM, Chowdhery et al. 2022, appendix B)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pairs import gpt2_pair, random_ids
from .timing import Bench, Record, Run, Sizes

# dense bf16 peak FLOP/s by device name, most specific first (vendor data sheets)
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12), ("L4", 121e12))


def bench_mfu(b: Bench, peak: float | None, quick: bool) -> None:
    """GPT-2 small (12 x 768, 12 heads, 50257 tokens) trained in bf16 autocast with torch.compile. FLOPs per
    token: 6N + 12 L d_model T (PaLM appendix B), N the parameters without the position table (the tied
    embedding counts once, as the output projection)."""
    if b.device.type != "cuda":
        b.log("MFU: skipped, no GPU (torch.cuda.is_available() is False)")
        return
    name = torch.cuda.get_device_name(b.device)
    peak = peak or next((flops for key, flops in PEAK_BF16 if key in name), None)
    B, T = (8, 512) if quick else (16, 1024)
    s = Sizes(n_layers=12, d_model=768, n_heads=12, vocab=50257)
    peer, ours = gpt2_pair(s, 1024, dropout=0.0)
    peer, ours = peer.to(b.device).train(), ours.to(b.device).train()
    n_params = sum(p.numel() for p in ours.parameters()) - ours.embedding.positions.table.weight.numel()
    flops_per_token = 6 * n_params + 12 * s.n_layers * s.d_model * T
    ids = random_ids(B, T + 1, vocab=s.vocab, device=b.device)
    b.log(f"MFU on {name}: compiling (a minute or two)")
    b = b.resized(warmup=3, repeats=5 if quick else 10)
    rec = b.compare(f"gpt2-small bf16 compiled train (B{B} T{T})", "tok/s",
                    _compiled_step(ours, lambda m: m(ids[:, :-1]), ids, B * T),
                    _compiled_step(peer, lambda m: m(ids[:, :-1]).logits, ids, B * T))
    if peak is None:
        b.log(f"MFU: unknown peak bf16 FLOP/s for {name!r}; pass --peak-tflops")
        return
    ours_mfu, peer_mfu = (100 * rate * flops_per_token / peak for rate in (rec.ours, rec.peer))
    b.add(Record("gpt2-small bf16 compiled MFU", ours_mfu, peer_mfu, "%", ours_mfu / peer_mfu,
                 note=f"{flops_per_token / 1e9:.3f} GFLOP/token, peak {peak / 1e12:.0f} TFLOP/s ({name})"))


def _compiled_step(model: nn.Module, logits: Callable[[nn.Module], Tensor], ids: Tensor, n_tokens: int) -> Run:
    """One bf16-autocast training step of `torch.compile(model)` on next-token prediction over `ids` (B, T + 1)."""
    fast, optimizer = torch.compile(model), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> int:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = logits(fast)
        F.cross_entropy(out.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return n_tokens
    return step
