"""The eval ops under torch.compile's Inductor: decomposed into torch's own
eval BatchNorm (and add / activation) ATen ops, so Inductor fuses them into
generated code and, with freezing, folds them into the preceding convolution.
Outputs are compared with torch's BatchNorm compiled the same way."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import fresh_cache, run_and_get_code

import bnorm_ext
from common_utils import randn_shifted, torch_act

OPS = torch.ops.bnorm_ext
C = 6
SHAPE = (3, C, 5, 4)
EPS = 1e-3
# weight / bias present
AFFINE = [(True, True), (True, False), (False, True), (False, False)]
# activation, negative_slope, residual
FUSED = [
    ("identity", 0.0, False),
    ("relu", 0.0, True),
    ("leaky_relu", 0.2, True),
    ("silu", 0.0, False),
    ("silu", 0.0, True),
]


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _bnorm_ext_calls(codes):
    return re.findall(r"torch\.ops\.bnorm_ext\.\w+", "\n".join(codes))


def _params(dtype, generator):
    # Parameters and running stats in the acc dtype for half input (as a
    # half-precision input with float32 BatchNorm), else the input's.
    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = (torch.rand(C, generator=generator, dtype=torch.float64) + 0.5).to(pdt)
    b = (torch.randn(C, generator=generator, dtype=torch.float64)).to(pdt)
    rm = (torch.randn(C, generator=generator, dtype=torch.float64) * 3 + 5).to(pdt)
    rv = (torch.rand(C, generator=generator, dtype=torch.float64) * 4 + 0.5).to(pdt)
    return w, b, rm, rv


def _ours(x, r, w, b, rm, rv):
    # Every weight/bias None pattern of both eval ops, in one graph.
    outs = []
    for has_w, has_b in AFFINE:
        wi, bi = (w if has_w else None), (b if has_b else None)
        outs.append(OPS.batch_norm_forward_eval(x, wi, bi, rm, rv, EPS))
        for activation, slope, with_res in FUSED:
            outs.append(
                OPS.batch_norm_act_forward_eval(x, wi, bi, rm, rv, EPS, r if with_res else None, activation, slope)
            )
    return outs


def _torch(x, r, w, b, rm, rv):
    # The same computations with torch's BatchNorm, add and activations.
    outs = []
    for has_w, has_b in AFFINE:
        wi, bi = (w if has_w else None), (b if has_b else None)
        y = F.batch_norm(x, rm, rv, wi, bi, False, 0.0, EPS)
        outs.append(y)
        for activation, slope, with_res in FUSED:
            outs.append(torch_act(y + r if with_res else y, activation, slope))
    return outs


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_eval_ops_compile_to_generated_code_matching_torch(dtype, memory_format):
    g = torch.Generator().manual_seed(0)
    x = randn_shifted(SHAPE, dtype, memory_format=memory_format, generator=g)
    r = randn_shifted(SHAPE, dtype, memory_format=memory_format, generator=g)
    args = (x, r, *_params(dtype, g))
    with torch.no_grad():
        ours, codes = run_and_get_code(torch.compile(_ours, fullgraph=True), *args)
        torch._dynamo.reset()
        expected = torch.compile(_torch, fullgraph=True)(*args)
        eager = _ours(*args)
    assert _bnorm_ext_calls(codes) == [], "the eval ops must be fused into generated code"
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for i, (o, e, k) in enumerate(zip(ours, expected, eager)):
        assert o.dtype == dtype and o.shape == x.shape
        assert not o.isnan().any()
        torch.testing.assert_close(o, e, **tol, msg=lambda m: f"output {i} vs torch compiled: {m}")
        torch.testing.assert_close(o, k, **tol, msg=lambda m: f"output {i} vs our kernel: {m}")
        if dtype != torch.bfloat16:
            assert o.stride() == k.stride(), f"output {i}: strides {o.stride()} vs eager {k.stride()}"


def test_eval_decomposition_keeps_the_op_for_arguments_the_kernel_rejects():
    # A weight of another dtype than the running stats: the op stays (and
    # raises its own error at run time, as in eager).
    x = randn_shifted(SHAPE)
    w, b, rm, rv = _params(torch.float32, torch.Generator().manual_seed(1))
    f = torch.compile(lambda x, w: OPS.batch_norm_forward_eval(x, w, b, rm, rv, EPS))
    with pytest.raises(RuntimeError, match="batch_norm_forward_eval"):
        f(x, w.double())


class _ConvBN(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.conv = nn.Conv2d(3, C, 3, bias=False)
        self.bn = bn

    def forward(self, x):
        return self.bn(self.conv(x))


def _randomized_eval(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        model.bn.bias.copy_(torch.randn(C, generator=g))
        model.bn.running_mean.copy_(torch.randn(C, generator=g))
        model.bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_eval_batchnorm_folds_into_conv_under_freezing(fused):
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    reference = _randomized_eval(_ConvBN(nn.BatchNorm2d(C)))
    bn = bnorm_ext.BatchNormAct2d(C, activation="identity") if fused else bnorm_ext.BatchNorm2d(C)
    ours = _ConvBN(bn)
    ours.load_state_dict(reference.state_dict())
    ours.eval()
    x = randn_shifted((2, 3, 8, 8))
    with torch.no_grad(), inductor_config.patch(freezing=True):
        expected, ref_codes = run_and_get_code(torch.compile(reference), x)
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(ours), x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert _bnorm_ext_calls(codes) == []
    # Folded: no per-element normalization left (torch's folds the same way).
    assert "rsqrt" not in code and "sqrt" not in code, code
    assert code.count("def cpp_fused") == "\n".join(ref_codes).count("def cpp_fused")


def test_eval_decomposition_with_the_fx_graph_cache():
    # A second compile hits the cache and still runs generated code.
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(3)
    x = randn_shifted(SHAPE, generator=g)
    w, b, rm, rv = _params(torch.float32, g)

    def f(x):
        return OPS.batch_norm_act_forward_eval(x, w, None, rm, rv, EPS, None, "relu", 0.0)

    expected = F.relu(F.batch_norm(x, rm, rv, w, None, False, 0.0, EPS))
    with fresh_cache():
        counters.clear()
        with torch.no_grad():
            out, codes = run_and_get_code(torch.compile(f, fullgraph=True), x)
            torch.testing.assert_close(out, expected)
            assert _bnorm_ext_calls(codes) == []
            torch._dynamo.reset()
            out = torch.compile(f, fullgraph=True)(x)
        torch.testing.assert_close(out, expected)
        assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] > 0
        assert counters["inductor"]["fxgraph_cache_bypass"] == 0
