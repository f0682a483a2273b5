"""The `.out` overloads of the backward ops: write every element of the given
tensors in their own strides, checked like the functional ops; not Inductor's
lowering targets (csrc/ops.cpp says why). The compiled backward ops are
right in every weight / bias / residual None pattern."""

import re

import pytest
import torch
from torch._inductor.utils import fresh_cache, run_and_get_code
from torch._library._out_variant import to_out_variant

import bnorm_ext  # noqa: F401  (registers the ops)
from common_utils import randn_shifted

OPS = torch.ops.bnorm_ext
C = 5
SHAPE = (3, C, 4, 6)
EPS = 1e-3
FORMATS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="cl")]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_out_overloads_are_not_inductor_lowering_targets():
    # Not tagged out (csrc/ops.cpp says why): Inductor keeps the functional ops.
    out_tag = getattr(torch.Tag, "out", None)  # NB: torch 2.11 has no out tag at all
    for op in (OPS.batch_norm_backward, OPS.batch_norm_act_backward):
        assert out_tag is None or out_tag not in op.out.tags
        assert to_out_variant(op.default) is None


def _case(dtype, memory_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = randn_shifted(SHAPE, dtype, memory_format=memory_format, generator=g)
    dy = randn_shifted(SHAPE, dtype, memory_format=memory_format, generator=g, shift=0.5)
    r = randn_shifted(SHAPE, dtype, memory_format=memory_format, generator=g)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(acc if dtype != torch.float64 else dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(w.dtype)
    mean = x.to(acc).mean((0, 2, 3))
    invstd = (x.to(acc).var((0, 2, 3), unbiased=False) + EPS).rsqrt()
    rv = torch.rand(C, generator=g, dtype=acc) + 0.5
    return x, dy, r, w, b, mean, invstd, rv


def _backward_args(x, dy, w, mean, invstd, rv, training):
    if training:
        return (dy, x, w, None, None, mean, invstd, True, EPS)
    return (dy, x, w, mean, rv, None, None, False, EPS)


def _act_backward_args(x, dy, r, w, b, mean, invstd, rv, training, activation, need_grad_residual):
    y = torch.relu(x - 5)  # an output-shaped tensor for relu's / leaky_relu's derivative
    stats = (None, None, mean, invstd) if training else (mean, rv, None, None)
    return (dy, y, x, w, b, *stats, r, training, EPS, need_grad_residual, activation, 0.1)


def _nan_outs(expected, layout):
    # Out tensors filled with NaN (so a skipped element shows), in `layout`:
    # "dense" (the expected strides), "cl"/"nchw" or "strided" (a non-dense view).
    outs = []
    for e in expected:
        if e.dim() == 4 and layout == "strided":
            t = torch.full((*e.shape[:3], e.shape[3] * 2), float("nan"), dtype=e.dtype)[..., ::2]
        elif e.dim() == 4 and layout in ("cl", "nchw"):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            t = torch.full(e.shape, float("nan"), dtype=e.dtype).contiguous(memory_format=fmt)
        else:
            t = torch.full_like(e, float("nan"))
        outs.append(t)
    return outs


@pytest.mark.parametrize("out_layout", ["dense", "nchw", "cl", "strided"])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_backward_out_writes_the_functional_values(dtype, memory_format, out_layout):
    x, dy, r, w, b, mean, invstd, rv = _case(dtype, memory_format)
    for training in (True, False):
        for has_w, _ in AFFINE[::2]:
            args = _backward_args(x, dy, w if has_w else None, mean, invstd, rv, training)
            expected = OPS.batch_norm_backward.default(*args)
            outs = _nan_outs(expected, out_layout)
            got = OPS.batch_norm_backward.out(*args, grad_input=outs[0], grad_weight=outs[1], grad_bias=outs[2])
            for o, g, e in zip(outs, got, expected):
                assert g is o
                torch.testing.assert_close(o, e, rtol=0, atol=0)


@pytest.mark.parametrize("out_layout", ["dense", "cl", "strided"])
@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_act_backward_out_writes_the_functional_values(dtype, memory_format, out_layout):
    x, dy, r, w, b, mean, invstd, rv = _case(dtype, memory_format)
    for training in (True, False):
        for has_w, has_b in AFFINE:
            for activation, residual, need in (
                ("relu", None, False),
                ("silu", r, True),
                ("leaky_relu", r, True),
                ("identity", r, False),
            ):
                args = _act_backward_args(
                    x,
                    dy,
                    residual,
                    w if has_w else None,
                    b if has_b else None,
                    mean,
                    invstd,
                    rv,
                    training,
                    activation,
                    need,
                )
                expected = OPS.batch_norm_act_backward.default(*args)
                outs = _nan_outs(expected, out_layout)
                got = OPS.batch_norm_act_backward.out(
                    *args, grad_input=outs[0], grad_weight=outs[1], grad_bias=outs[2], grad_residual=outs[3]
                )
                for o, g, e in zip(outs, got, expected):
                    assert g is o
                    torch.testing.assert_close(o, e, rtol=0, atol=0)


def test_out_overloads_check_their_out_tensors():
    x, dy, r, w, b, mean, invstd, rv = _case(torch.float32, torch.contiguous_format)
    args = _backward_args(x, dy, w, mean, invstd, rv, True)
    gi, gw, gb = OPS.batch_norm_backward.default(*args)
    with pytest.raises(RuntimeError, match=r"batch_norm_backward.out: expected grad_weight of dtype"):
        OPS.batch_norm_backward.out(*args, grad_input=gi, grad_weight=gw.double(), grad_bias=gb)
    with pytest.raises(RuntimeError, match=r"batch_norm_backward.out: expected grad_input of size"):
        OPS.batch_norm_backward.out(*args, grad_input=gi[:1], grad_weight=gw, grad_bias=gb)


def test_out_overloads_are_not_differentiable():
    x, dy, r, w, b, mean, invstd, rv = _case(torch.float32, torch.contiguous_format)
    args = _backward_args(x, dy.requires_grad_(), w, mean, invstd, rv, True)
    outs = [t.detach().clone() for t in OPS.batch_norm_backward.default(*args)]
    OPS.batch_norm_backward.out(*args, grad_input=outs[0], grad_weight=outs[1], grad_bias=outs[2])
    with pytest.raises(RuntimeError, match="derivative for bnorm_ext::batch_norm_backward is not implemented"):
        outs[0].sum().backward()


def _out_calls(codes):
    return re.findall(r"torch\.ops\.bnorm_ext\.(\w+)\.(default|out)\(", "\n".join(codes))


@pytest.mark.parametrize("memory_format", FORMATS)
def test_compiled_backward_ops_in_every_none_pattern(memory_format):
    x, dy, r, w, b, mean, invstd, rv = _case(torch.float32, memory_format)

    def backward_ops(dy, x, r, w, b, mean, invstd, rv):
        outs = []
        for training in (True, False):
            for has_w, has_b in AFFINE:
                wi, bi = (w if has_w else None), (b if has_b else None)
                if has_b:  # the plain op has no bias
                    outs += OPS.batch_norm_backward(*_backward_args(x, dy, wi, mean, invstd, rv, training))
                stats = (None, None, mean, invstd) if training else (mean, rv, None, None)
                y = torch.relu(x)  # any output-shaped tensor for relu's derivative
                for residual, need in ((None, False), (r, True), (r, False)):
                    outs += OPS.batch_norm_act_backward(
                        dy, y, x, wi, bi, *stats, residual, training, EPS, need, "silu", 0.0
                    )
                    outs += OPS.batch_norm_act_backward(
                        dy, y, x, wi, bi, *stats, residual, training, EPS, need, "relu", 0.0
                    )
        return [o * 1 for o in outs]  # consumed by generated code, as in a real backward

    args = (dy, x, r, w, b, mean, invstd, rv)
    with torch.no_grad(), fresh_cache():
        got, codes = run_and_get_code(torch.compile(backward_ops, fullgraph=True), *args)
        expected = backward_ops(*args)
    calls = _out_calls(codes)
    assert sorted(set(calls)) == [("batch_norm_act_backward", "default"), ("batch_norm_backward", "default")], calls
    assert calls.count(("batch_norm_backward", "default")) == 4
    assert calls.count(("batch_norm_act_backward", "default")) == 2 * 4 * 3 * 2
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6, msg=lambda m: f"output {i}: {m}")


# The overloads are Inductor's lowering targets, never traced themselves.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("memory_format", FORMATS)
def test_opcheck_out_overloads(memory_format):
    x, dy, r, w, b, mean, invstd, rv = _case(torch.float32, memory_format)
    for training in (True, False):
        args = _backward_args(x, dy, None, mean, invstd, rv, training)
        outs = [torch.empty_like(t) for t in OPS.batch_norm_backward.default(*args)]
        kwargs = dict(zip(("grad_input", "grad_weight", "grad_bias"), outs))
        torch.library.opcheck(OPS.batch_norm_backward.out, args, kwargs, test_utils=OPCHECK_UTILS)
        args = _act_backward_args(x, dy, r, w, None, mean, invstd, rv, training, "silu", True)
        outs = [torch.empty_like(t) for t in OPS.batch_norm_act_backward.default(*args)]
        kwargs = dict(zip(("grad_input", "grad_weight", "grad_bias", "grad_residual"), outs))
        torch.library.opcheck(OPS.batch_norm_act_backward.out, args, kwargs, test_utils=OPCHECK_UTILS)
