import pytest
import torch
import torch.nn.functional as F

from lightning_tfm.blocks.feedforward import GELUFeedForward, ReLUFeedForward, SiLUFeedForward, SwiGLU
from lightning_tfm.blocks.norms import LayerNorm, RMSNorm


def test_relu_feedforward_is_the_papers_equation_2():
    ff = ReLUFeedForward(8, 32)
    x = torch.randn(2, 3, 8)
    want = torch.relu(x @ ff.fc1.weight.T + ff.fc1.bias) @ ff.fc2.weight.T + ff.fc2.bias
    torch.testing.assert_close(ff(x), want)


def test_gelu_silu_and_swiglu_activations():
    x = torch.randn(2, 3, 8)
    for block, act in [(GELUFeedForward(8, 16), F.gelu), (GELUFeedForward(8, 16, approximate="tanh"),
                       lambda h: F.gelu(h, approximate="tanh")), (SiLUFeedForward(8, 16), F.silu)]:
        torch.testing.assert_close(block(x), block.fc2(act(block.fc1(x))))
    swiglu = SwiGLU(8, 16)
    w_gate, w_value = swiglu.fc1.weight[:16], swiglu.fc1.weight[16:]
    want = (F.silu(x @ w_gate.T) * (x @ w_value.T)) @ swiglu.fc2.weight.T
    torch.testing.assert_close(swiglu(x), want)


def test_norms_match_their_formulas():
    x = torch.randn(4, 10) * 3 + 1
    ln, rms = LayerNorm(10), RMSNorm(10, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(), ln.bias.uniform_(), rms.weight.uniform_()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    torch.testing.assert_close(ln(x), (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias)
    torch.testing.assert_close(rms(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * rms.weight)


@pytest.mark.parametrize("build, message", [
    (lambda: ReLUFeedForward(8, 16, dropout=1.0), r"dropout=1.0, must be in \[0, 1\)"),
    (lambda: GELUFeedForward(8, 0), "d_ff=0"),
    (lambda: GELUFeedForward(8, 16, approximate="fast"), "approximate='fast'"),
    (lambda: RMSNorm(8, eps=0.0), "eps=0.0, must be > 0"),
])
def test_bad_arguments_name_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()
