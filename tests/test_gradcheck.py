"""gradcheck / gradgradcheck of bnorm_ext.batch_norm in float64 (small shapes)."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import bnorm_ext
from common_utils import devices, memory_formats, randn_shifted

SHAPES = [
    pytest.param((2, 3, 3, 4), id="2x3x3x4"),
]


def _inputs(shape, device, memory_format, affine):
    C = shape[1]
    x = randn_shifted(shape, torch.float64, device, memory_format=memory_format).requires_grad_()
    if affine:
        w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=device)).requires_grad_()
        b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_()
    else:
        w = b = None
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    return x, w, b, rm, rv


def _fn(training, rm, rv, affine, eps=1e-3):
    def f(x, *wb):
        w, b = wb if affine else (None, None)
        # fresh copies: training mode updates running stats in place
        return bnorm_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, momentum=0.1, eps=eps)

    return f


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("device", devices)
def test_gradcheck(device, memory_format, training, affine, shape):
    x, w, b, rm, rv = _inputs(shape, device, memory_format, affine)
    args = (x, w, b) if affine else (x,)
    assert gradcheck(_fn(training, rm, rv, affine), args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("device", devices)
def test_gradgradcheck(device, memory_format, training, affine, shape):
    x, w, b, rm, rv = _inputs(shape, device, memory_format, affine)
    args = (x, w, b) if affine else (x,)
    assert gradgradcheck(_fn(training, rm, rv, affine), args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", devices)
def test_gradcheck_no_running_stats_and_1d(device, training):
    # training with running stats None, and BatchNorm1d-style (N, C) / (N, C, L) inputs
    for shape in [(5, 3), (3, 2, 4)]:
        C = shape[1]
        x = randn_shifted(shape, torch.float64, device).requires_grad_()
        w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=device)).requires_grad_()
        b = torch.randn(C, dtype=torch.float64, device=device).requires_grad_()
        if training:
            fn = lambda x, w, b: bnorm_ext.batch_norm(x, None, None, w, b, training=True, eps=1e-3)  # noqa: E731
        else:
            rm = torch.randn(C, dtype=torch.float64, device=device)
            rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
            fn = _fn(False, rm, rv, True)
        assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
        assert gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", devices)
def test_gradcheck_weight_only(device, training):
    C = 3
    x = randn_shifted((2, C, 3, 2), torch.float64, device).requires_grad_()
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=device)).requires_grad_()
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5

    def fn(x, w):
        return bnorm_ext.batch_norm(x, rm.clone(), rv.clone(), w, None, training=training, eps=1e-3)

    assert gradcheck(fn, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, (x, w), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices)
def test_gradcheck_module(device):
    m = bnorm_ext.BatchNorm2d(3).double().to(device)
    x = randn_shifted((2, 3, 2, 3), torch.float64, device).requires_grad_()
    assert gradcheck(
        lambda x, w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (x,)),
        (x, m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_()),
        eps=1e-6,
        atol=1e-5,
        rtol=1e-4,
    )
