"""Two facts of a CUDA GPU our code depends on (scripts/gpu_checks.sh runs this): which `torch._int_mm` shapes its
cuBLASLt takes (`Int8Linear` pads to them), and how long beam search takes over batches of new shapes in fp32
and bf16, with cuDNN's attention left out (`lightning_tfm.blocks.sdpa`) and put back first.

    python scripts/gpu_probe.py"""
import time

import torch
from torch.nn.attention import SDPBackend

import lightning_tfm.blocks.sdpa as sdpa_module
from lightning_tfm.inference import to_inference_precision
from lightning_tfm.models import EncoderDecoder
from lightning_tfm.tasks.translation import translate

dev = torch.device("cuda")
print("== _int_mm (rows n, in k, out m): ok or fail", flush=True)
for m in (56, 64, 96, 128, 768):
    for k in (32, 40, 64, 256):
        row = []
        for n in (17, 24, 27, 32, 40, 64):
            a = torch.randint(-5, 5, (n, k), dtype=torch.int8, device=dev)
            b = torch.randint(-5, 5, (k, m), dtype=torch.int8, device=dev)
            try:
                ok = torch.equal(torch._int_mm(a, b), (a.int().cpu() @ b.int().cpu()).to(dev))
                row.append(f"{n}:{'ok' if ok else 'WRONG'}")
            except RuntimeError:
                row.append(f"{n}:fail")
        print(f"m {m} k {k}: " + " ".join(row), flush=True)

torch.manual_seed(0)
model = EncoderDecoder(8000, d_model=256, n_layers=3, n_heads=4, d_ff=1024, dropout=0.0).to(dev).eval()
batches = []
for i, (B, S) in enumerate([(32, 12), (32, 17), (29, 23), (32, 9), (27, 30), (32, 14)]):
    src = torch.randint(4, 8000, (B, S), device=dev)
    mask = torch.arange(S, device=dev)[None, :] < torch.randint(S // 2, S + 1, (B, 1), device=dev)
    batches.append((src, mask))


def run():
    with torch.no_grad():
        for src, mask in batches:
            translate(model, src, mask, 1, 2, 0, beam_size=4, alpha=0.6, max_extra_len=25)
    torch.cuda.synchronize()


for backends, name in ((sdpa_module.CUDA_BACKENDS, "cuDNN left out"),
                       ([SDPBackend.CUDNN_ATTENTION] + sdpa_module.CUDA_BACKENDS, "cuDNN first")):
    sdpa_module.CUDA_BACKENDS[:] = backends
    for precision in ("fp32", "bf16"):
        converted = to_inference_precision(model, precision, measure=False)
        t = time.perf_counter()
        run()                                   # first time these shapes are seen
        first = time.perf_counter() - t
        t = time.perf_counter()
        run()
        again = time.perf_counter() - t
        print(f"{name}, {precision}: 6 batches {first:.2f} s the first time, {again:.2f} s again", flush=True)
        converted.restore()
