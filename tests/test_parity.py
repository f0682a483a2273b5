"""Numerical parity of bnorm_ext.BatchNorm{1,2,3}d with torch.nn.BatchNorm{1,2,3}d."""

import pytest
import torch
import torch.nn as nn

import bnorm_ext
from common_utils import (
    check_parity,
    devices,
    dtypes,
    lowp_dtypes,
    memory_formats,
    randn_shifted,
    requires_torch_bn_bias_arg,
)

# ---------------------------------------------------------------------------
# BatchNorm2d: device x dtype x memory format x shape
# ---------------------------------------------------------------------------
SHAPES_2D = [
    pytest.param((4, 8, 6, 6), id="4x8x6x6"),
    pytest.param((1, 3, 5, 6), id="N1"),
    pytest.param((8, 4, 1, 1), id="HW1"),
    pytest.param((3, 5, 7, 9), id="odd3x5x7x9"),
    pytest.param((4, 1, 6, 5), id="C1"),
    pytest.param((4, 1024, 2, 2), id="C1024"),
]


@pytest.mark.parametrize("shape", SHAPES_2D)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", dtypes)
@pytest.mark.parametrize("device", devices)
def test_bn2d_parity(device, dtype, memory_format, shape):
    def make_x(dt, dev):
        return randn_shifted(shape, dt, dev, memory_format=memory_format)

    check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, device)


# ---------------------------------------------------------------------------
# module options: affine x track_running_stats x momentum
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, 0.5, None], ids=["mom0.1", "mom0.5", "momNone"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["float64", "float32", "float16"])
@pytest.mark.parametrize("device", devices)
def test_bn2d_options_parity(device, dtype, memory_format, affine, track, momentum):
    shape = (4, 3, 5, 6)

    def make_x(dt, dev):
        return randn_shifted(shape, dt, dev, memory_format=memory_format)

    check_parity(
        nn.BatchNorm2d,
        bnorm_ext.BatchNorm2d,
        make_x,
        dtype,
        device,
        affine=affine,
        track_running_stats=track,
        momentum=momentum,
    )


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"]
)
@pytest.mark.parametrize("device", devices)
@requires_torch_bn_bias_arg
def test_bn2d_no_bias_parity(device, dtype, memory_format, track):
    # torch's BatchNorm takes bias=False (weight only)
    def make_x(dt, dev):
        return randn_shifted((4, 3, 5, 6), dt, dev, memory_format=memory_format)

    tmod, omod = check_parity(
        nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, device, bias=False, track_running_stats=track
    )
    assert omod.bias is None and omod.weight is not None


@pytest.mark.parametrize("device", devices)
def test_bn2d_eps_parity(device):
    def make_x(dt, dev):
        return randn_shifted((4, 3, 5, 6), dt, dev, scale=0.05)

    check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, torch.float32, device, eps=1e-2)


# ---------------------------------------------------------------------------
# non-contiguous inputs
# ---------------------------------------------------------------------------
def _permuted(dt, dev):  # (N,W,H,C) storage viewed as (N,C,H,W)
    return randn_shifted((3, 6, 5, 4), dt, dev).permute(0, 3, 2, 1)


def _channel_slice(dt, dev):
    return randn_shifted((3, 8, 5, 6), dt, dev)[:, ::2]


def _spatial_slice(dt, dev):
    return randn_shifted((3, 4, 5, 8), dt, dev)[..., 1:-1]


def _channels_last_sliced(dt, dev):
    return randn_shifted((3, 4, 6, 7), dt, dev, memory_format=torch.channels_last)[:, :, 1:, :-1]


def _batch_transposed(dt, dev):  # (C,N,H,W) storage viewed as (N,C,H,W)
    return randn_shifted((4, 3, 5, 6), dt, dev).transpose(0, 1)


def _expanded(dt, dev):  # stride 0 along N
    return randn_shifted((1, 4, 5, 6), dt, dev).expand(3, 4, 5, 6)


NONCONTIG = [
    pytest.param(_permuted, id="permuted"),
    pytest.param(_channel_slice, id="channel_slice"),
    pytest.param(_spatial_slice, id="spatial_slice"),
    pytest.param(_channels_last_sliced, id="channels_last_sliced"),
    pytest.param(_batch_transposed, id="batch_transposed"),
    pytest.param(_expanded, id="expanded_N"),
]


@pytest.mark.parametrize("make_x", NONCONTIG)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["float64", "float32", "bfloat16"]
)
@pytest.mark.parametrize("device", devices)
def test_bn2d_noncontiguous_parity(device, dtype, make_x):
    x = make_x(dtype, device)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, device)


# ---------------------------------------------------------------------------
# mixed precision: half/bf16 input, float32 module
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", lowp_dtypes)
@pytest.mark.parametrize("device", devices)
def test_bn2d_mixed_dtype_parity(device, dtype, memory_format):
    def make_x(dt, dev):
        return randn_shifted((4, 6, 5, 7), dt, dev, memory_format=memory_format)

    tmod, omod = check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, device, param_dtype=torch.float32)
    assert omod.weight.dtype == torch.float32
    assert omod.running_mean.dtype == torch.float32
    assert omod.running_var.dtype == torch.float32
    out = omod(make_x(dtype, device))
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", lowp_dtypes)
@pytest.mark.parametrize("device", devices)
def test_bn1d_mixed_dtype_parity(device, dtype):
    def make_x(dt, dev):
        return randn_shifted((16, 5), dt, dev)

    check_parity(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, make_x, dtype, device, param_dtype=torch.float32)


# ---------------------------------------------------------------------------
# BatchNorm1d
# ---------------------------------------------------------------------------
BN1D_INPUTS = [
    pytest.param(lambda dt, dev: randn_shifted((8, 5), dt, dev), id="2d_8x5"),
    pytest.param(lambda dt, dev: randn_shifted((2, 300), dt, dev), id="2d_N2_C300"),
    pytest.param(lambda dt, dev: randn_shifted((4, 5, 7), dt, dev), id="3d_4x5x7"),
    pytest.param(lambda dt, dev: randn_shifted((1, 5, 9), dt, dev), id="3d_N1"),
    pytest.param(lambda dt, dev: randn_shifted((6, 5, 1), dt, dev), id="3d_L1"),
    pytest.param(lambda dt, dev: randn_shifted((4, 7, 5), dt, dev).transpose(1, 2), id="3d_transposed"),
    pytest.param(lambda dt, dev: randn_shifted((5, 8), dt, dev).t(), id="2d_transposed"),
]


@pytest.mark.parametrize("make_x", BN1D_INPUTS)
@pytest.mark.parametrize("dtype", dtypes)
@pytest.mark.parametrize("device", devices)
def test_bn1d_parity(device, dtype, make_x):
    check_parity(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, make_x, dtype, device)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("device", devices)
def test_bn1d_options_parity(device, affine, momentum):
    def make_x(dt, dev):
        return randn_shifted((6, 4, 5), dt, dev)

    check_parity(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, make_x, torch.float32, device, affine=affine, momentum=momentum)


# ---------------------------------------------------------------------------
# BatchNorm3d
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "memory_format",
    [
        pytest.param(torch.contiguous_format, id="contiguous"),
        pytest.param(torch.channels_last_3d, id="channels_last_3d"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["float64", "float32", "float16"])
@pytest.mark.parametrize("device", devices)
def test_bn3d_parity(device, dtype, memory_format):
    def make_x(dt, dev):
        return randn_shifted((2, 3, 4, 5, 3), dt, dev, memory_format=memory_format)

    check_parity(nn.BatchNorm3d, bnorm_ext.BatchNorm3d, make_x, dtype, device)


@pytest.mark.parametrize("device", devices)
def test_bn3d_options_parity(device):
    def make_x(dt, dev):
        return randn_shifted((3, 2, 3, 2, 4), dt, dev)

    check_parity(nn.BatchNorm3d, bnorm_ext.BatchNorm3d, make_x, torch.float64, device, affine=False, momentum=None)
    check_parity(nn.BatchNorm3d, bnorm_ext.BatchNorm3d, make_x, torch.float64, device, track_running_stats=False)
