"""The README's worked example of writing a new attention variant and a new sparse pattern runs as printed, and
what it builds is exact: causal, equal to the dense computation, and decodes incrementally as the full forward."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> dict:
    """Run the README's python block that defines `Sinks`; return its namespace."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    (code,) = [block for block in blocks if "class Sinks(Pattern)" in block]
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


@torch.no_grad()
def test_the_readme_variant_example_runs_and_its_model_is_causal_and_decodes_exactly():
    ns = _example()
    gpt, ids = ns["gpt"].eval(), torch.randint(0, 100, (2, 300))
    assert ns["logits"].shape == (2, 1000, 100)
    changed = ids.clone()
    changed[:, 200:] = torch.randint(0, 100, (2, 100))
    torch.testing.assert_close(gpt(ids)[:, :200], gpt(changed)[:, :200], atol=1e-5, rtol=0)
    cache = gpt.new_cache()
    steps = [gpt(ids[:, :280], cache=cache)] + [gpt(ids[:, t:t + 1], cache=cache) for t in range(280, 300)]
    torch.testing.assert_close(torch.cat(steps, 1), gpt(ids), atol=1e-4, rtol=0)


def test_the_new_pattern_equals_the_dense_mask_it_describes():
    ns = _example()
    from lightning_tfm.blocks import AttentionMask, LayerPlace
    from lightning_tfm.blocks.attention_variants import Band, SparseAttention

    pattern = Band(16) | ns["Sinks"](3)
    block = SparseAttention(32, 4, LayerPlace(causal=True), pattern=pattern, block=16).eval()
    x = torch.randn(1, 200, 32)
    q, k, v = block.qkv(x).view(1, 200, 3, 4, 8).permute(2, 0, 3, 1, 4)
    pos = torch.arange(200)
    allowed = (pos[:, None] - pos[None, :] < 16) & (pos[None, :] <= pos[:, None]) | (pos[None, :] < 3)
    allowed = allowed & (pos[None, :] <= pos[:, None])
    weights = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
    want = block.out((weights @ v).transpose(1, 2).reshape(1, 200, 32))
    torch.testing.assert_close(block(x, mask=AttentionMask(causal=True)), want, atol=1e-5, rtol=0)
