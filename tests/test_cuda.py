"""CUDA-only tests (skipped without a GPU)."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

from common_utils import STEP_NAMES as NAMES
from common_utils import (
    check_parity,
    dtypes,
    max_abs_err,
    memory_formats,
    misaligned_copy,
    randn_shifted,
    seeded_train_step,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")

import bnorm_ext  # noqa: E402
from bnorm_ext import _C  # noqa: E402

ops = torch.ops.bnorm_ext
DEV = "cuda"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# parity against torch on cuda and the float64 CPU reference
# ---------------------------------------------------------------------------
CUDA_SHAPES = [
    pytest.param((4, 8, 6, 6), id="4x8x6x6"),
    pytest.param((1, 3, 5, 6), id="N1"),
    pytest.param((8, 4, 1, 1), id="HW1"),
    pytest.param((3, 5, 7, 9), id="odd3x5x7x9"),
    pytest.param((4, 1, 6, 5), id="C1"),
    pytest.param((4, 1024, 2, 2), id="C1024"),
    pytest.param((2, 2048, 3, 3), id="C2048"),  # more channels than resident blocks
    pytest.param((16, 64, 17, 13), id="16x64x17x13"),
    pytest.param((64, 32, 28, 28), id="64x32x28x28"),  # several vectors per thread
]


@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", dtypes)
def test_cuda_parity(dtype, memory_format, shape, cuda_path):
    def make_x(dt, dev):
        return randn_shifted(shape, dt, dev, memory_format=memory_format)

    check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, DEV)


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cuda_mixed_dtype_parity(dtype, memory_format, cuda_path):
    def make_x(dt, dev):
        return randn_shifted((8, 16, 9, 7), dt, dev, memory_format=memory_format)

    check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, DEV, param_dtype=torch.float32)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
def test_cuda_options_parity(track, affine, momentum, cuda_path):
    def make_x(dt, dev):
        return randn_shifted((4, 3, 5, 6), dt, dev)

    check_parity(
        nn.BatchNorm2d,
        bnorm_ext.BatchNorm2d,
        make_x,
        torch.float32,
        DEV,
        affine=affine,
        track_running_stats=track,
        momentum=momentum,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_bn1d_bn3d_parity(dtype):
    check_parity(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, lambda dt, dev: randn_shifted((16, 5), dt, dev), dtype, DEV)
    check_parity(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, lambda dt, dev: randn_shifted((4, 5, 33), dt, dev), dtype, DEV)
    check_parity(
        nn.BatchNorm3d,
        bnorm_ext.BatchNorm3d,
        lambda dt, dev: randn_shifted((2, 3, 4, 5, 3), dt, dev, memory_format=torch.channels_last_3d),
        dtype,
        DEV,
    )


def test_cuda_noncontiguous_parity():
    check_parity(
        nn.BatchNorm2d,
        bnorm_ext.BatchNorm2d,
        lambda dt, dev: randn_shifted((3, 6, 5, 4), dt, dev).permute(0, 3, 2, 1),
        torch.float32,
        DEV,
    )
    check_parity(
        nn.BatchNorm2d,
        bnorm_ext.BatchNorm2d,
        lambda dt, dev: randn_shifted((3, 8, 5, 6), dt, dev)[:, ::2],
        torch.float32,
        DEV,
    )


MISALIGNED_SHAPES = [
    # L % VEC == 0 (NCHW) and C % VEC == 0 (channels_last) for every dtype: only the
    # pointer's alignment keeps the 16-byte vectors off
    pytest.param((4, 8, 8, 8), id="4x8x8x8"),
    pytest.param((16, 64, 16, 16), id="16x64x16x16"),
]


@pytest.mark.parametrize("shape", MISALIGNED_SHAPES)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", dtypes)
def test_cuda_misaligned_dense_input_parity(dtype, memory_format, shape, cuda_path):
    def make_x(dt, dev):
        return misaligned_copy(randn_shifted(shape, dt, dev, memory_format=memory_format))

    launches = _C._single_read_launches()
    check_parity(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, make_x, dtype, DEV)
    ran_single_read = _C._single_read_launches() > launches
    assert ran_single_read == (cuda_path == "single_read"), "single-read launches do not match the path"


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", dtypes)
def test_cuda_misaligned_grad_output(dtype, memory_format, cuda_path):
    """An aligned input with a misaligned grad_out (and the reverse) in the training
    backward: the same gradients as with both aligned."""
    C = 8
    x = randn_shifted((4, C, 8, 8), dtype, DEV, memory_format=memory_format)
    dy = torch.randn(x.shape, dtype=torch.float64).to(DEV, dtype).contiguous(memory_format=memory_format)
    mean, var = _ref_stats(x)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    save_mean, save_invstd = mean.to(acc), (1 / torch.sqrt(var + 1e-5)).to(acc)
    w = (1 + 0.5 * torch.randn(C, device=DEV)).to(acc)
    want = ops.batch_norm_backward(dy, x, w, None, None, save_mean, save_invstd, True, 1e-5)
    ref = ops.batch_norm_backward(
        dy.cpu().double(),
        x.cpu().double(),
        w.cpu().double(),
        None,
        None,
        save_mean.cpu().double(),
        save_invstd.cpu().double(),
        True,
        1e-5,
    )
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for dy_in, x_in in ((misaligned_copy(dy), x), (dy, misaligned_copy(x))):
        got = ops.batch_norm_backward(dy_in, x_in, w, None, None, save_mean, save_invstd, True, 1e-5)
        for name, a, b, r in zip(("grad_input", "grad_weight", "grad_bias"), got, want, ref):
            assert torch.isfinite(a).all(), name
            scale = max(1.0, r.abs().max().item())
            assert max_abs_err(a, r) <= tol * scale, f"{name}: {max_abs_err(a, r):.3e} from the float64 reference"
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{name} vs aligned: {m}")


# ---------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_gradcheck(memory_format, training, cuda_path):
    C = 3
    x = randn_shifted((2, C, 3, 4), torch.float64, DEV, memory_format=memory_format).requires_grad_()
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64, device=DEV)).requires_grad_()
    b = torch.randn(C, dtype=torch.float64, device=DEV).requires_grad_()
    rm = torch.randn(C, dtype=torch.float64, device=DEV)
    rv = torch.rand(C, dtype=torch.float64, device=DEV) + 0.5

    def fn(x, w, b):
        return bnorm_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, eps=1e-3)

    assert gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# determinism and streams
# ---------------------------------------------------------------------------
def _run_once(x, dy, C, param_dtype):
    return seeded_train_step(bnorm_ext.BatchNorm2d(C).to(DEV, param_dtype), x, dy)


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"]
)
def test_cuda_bitwise_determinism(dtype, memory_format, cuda_path):
    shape = (64, 64, 32, 32)
    x = randn_shifted(shape, dtype, DEV, memory_format=memory_format)
    dy = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=memory_format)
    runs = [_run_once(x, dy, shape[1], dtype) for _ in range(3)]
    for r in runs[1:]:
        for name, a, b in zip(NAMES, runs[0], r):
            assert torch.equal(a, b), f"{name} differs between identical runs"


def test_cuda_non_default_stream():
    shape = (32, 64, 16, 16)
    x = randn_shifted(shape, torch.float32, DEV)
    dy = torch.randn(shape, device=DEV)
    expected = _run_once(x, dy, shape[1], torch.float32)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        # keep the side stream busy first so a kernel launched on the default stream would race
        torch.cuda._sleep(10_000_000)
        got = _run_once(x, dy, shape[1], torch.float32)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for name, a, b in zip(NAMES, expected, got):
        assert torch.equal(a, b), f"{name} differs on a non-default stream"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_non_zero_device_index(memory_format, cuda_path):
    """Tensors on cuda:1 while cuda:0 is current: every kernel must run on cuda:1
    (device guard) and give the same numbers as on cuda:0."""
    shape = (16, 32, 12, 12)
    x = randn_shifted(shape, torch.float32, DEV, memory_format=memory_format)
    dy = torch.randn(shape, device=DEV).contiguous(memory_format=memory_format)
    expected = _run_once(x, dy, shape[1], torch.float32)
    torch.cuda.set_device(0)
    got = seeded_train_step(bnorm_ext.BatchNorm2d(shape[1]).to("cuda:1"), x.to("cuda:1"), dy.to("cuda:1"))
    assert torch.cuda.current_device() == 0
    for name, a, b in zip(NAMES, expected, got):
        assert b.device == torch.device("cuda:1"), f"{name} on {b.device}"
        torch.testing.assert_close(b.cpu(), a.cpu(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} on cuda:1: {m}")


# ---------------------------------------------------------------------------
# large shapes
# ---------------------------------------------------------------------------
def _ref_stats(x):
    xd = x.double()
    dims = [0] + list(range(2, x.dim()))
    return xd.mean(dims), xd.var(dims, unbiased=False)


@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_c64_large_nhw(memory_format):
    shape = (128, 64, 48, 48)  # ~18.9M elements
    x = randn_shifted(shape, torch.float32, DEV, memory_format=memory_format)
    rm, rv = torch.zeros(64, device=DEV), torch.ones(64, device=DEV)
    out, sm, si = ops.batch_norm_forward_train(x, None, None, rm, rv, None, 0.1, 1e-5)
    rmt, rvt = torch.zeros(64, device=DEV), torch.ones(64, device=DEV)
    out_t = F.batch_norm(x, rmt, rvt, training=True, momentum=0.1, eps=1e-5)
    mean_r, var_r = _ref_stats(x)
    n = x.numel() // 64
    torch.testing.assert_close(sm.double(), mean_r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(si.double(), 1 / torch.sqrt(var_r + 1e-5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * var_r * n / (n - 1), rtol=1e-6, atol=1e-6)
    out_r = (x.double() - mean_r.view(1, -1, 1, 1)) / torch.sqrt(var_r.view(1, -1, 1, 1) + 1e-5)
    err_o = (out.double() - out_r).abs().max().item()
    err_t = (out_t.double() - out_r).abs().max().item()
    assert err_o <= 2 * err_t + 2e-6, f"output error {err_o:.3e} vs torch's {err_t:.3e}"
    assert out.stride() == out_t.stride()


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_small_vs_big_agree(dtype, memory_format, monkeypatch):
    """~1M and ~30M elements with identical per-channel statistics (the big input is the
    small one tiled along N): the small one runs the single-read kernel, the big one the
    two-pass kernels, and they must agree."""
    monkeypatch.delenv("BNORM_EXT_CUDA_SINGLE_READ", raising=False)
    C = 64
    small = randn_shifted((32, C, 22, 22), dtype, DEV, memory_format=memory_format)  # ~1.0M
    big = small.repeat(30, 1, 1, 1).contiguous(memory_format=memory_format)  # ~29.7M
    assert 0.9e6 < small.numel() < 1.1e6 and 29e6 < big.numel() < 31e6
    pdt = torch.float32 if dtype == torch.float16 else dtype
    w = (1 + 0.5 * torch.randn(C, device=DEV)).to(pdt)
    b = torch.randn(C, device=DEV).to(pdt)
    res = {}
    for name, x in (("small", small), ("big", big)):
        rm, rv = torch.zeros(C, device=DEV, dtype=pdt), torch.ones(C, device=DEV, dtype=pdt)
        launches = _C._single_read_launches()
        out, sm, si = ops.batch_norm_forward_train(x, w, b, rm, rv, None, 0.1, 1e-5)
        ran_single_read = _C._single_read_launches() > launches
        assert ran_single_read == (name == "small"), f"{name}: single-read {'' if ran_single_read else 'not '}launched"
        res[name] = (out, sm, si, rm, rv, x.numel() // C)
    out_s, sm_s, si_s, rm_s, rv_s, n_s = res["small"]
    out_b, sm_b, si_b, rm_b, rv_b, n_b = res["big"]
    torch.testing.assert_close(sm_b, sm_s, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(si_b, si_s, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(rm_b, rm_s, rtol=2e-6, atol=2e-6)
    # unbiased variance differs only by the count correction
    torch.testing.assert_close((rv_b - 0.9) * (n_b - 1) / n_b, (rv_s - 0.9) * (n_s - 1) / n_s, rtol=2e-5, atol=2e-6)
    out_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=2e-3)
    for k in (0, 29):
        torch.testing.assert_close(out_b[32 * k : 32 * (k + 1)], out_s, **out_tol)
    # and both agree with the float64 reference
    mean_r, var_r = _ref_stats(small)
    torch.testing.assert_close(sm_s.double(), mean_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm_b.double(), mean_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(si_b.double(), 1 / torch.sqrt(var_r + 1e-5), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_more_than_2_31_elements_fp16(memory_format):
    """The 64-bit-index kernels (two-pass only): NCHW with 16-byte vectors (L % 8 == 0),
    channels_last with scalars (C = 4 < 8)."""
    N, C, H, W = 33, 4, 4096, 4000  # 2.16e9 elements > 2**31
    assert N * C * H * W > 2**31
    x = torch.empty((N, C, H, W), dtype=torch.float16, device=DEV, memory_format=memory_format)
    # per-channel constant offset + noise, generated in slices to bound memory
    for n in range(N):
        x[n].normal_(0, 1).mul_(3).add_(torch.arange(C, device=DEV, dtype=torch.float16).view(C, 1, 1) + 5)
    rm = torch.zeros(C, device=DEV)
    rv = torch.ones(C, device=DEV)
    nbt = torch.zeros((), dtype=torch.long, device=DEV)
    out, sm, si = ops.batch_norm_forward_train(x, None, None, rm, rv, nbt, 0.1, 1e-5)
    # float64 reference stats, accumulated per sample
    s1 = torch.zeros(C, dtype=torch.float64, device=DEV)
    s2 = torch.zeros(C, dtype=torch.float64, device=DEV)
    for n in range(N):
        xd = x[n].double()
        s1 += xd.sum(dim=(1, 2))
        s2 += (xd * xd).sum(dim=(1, 2))
        del xd
    cnt = N * H * W
    mean_r = s1 / cnt
    var_r = s2 / cnt - mean_r**2
    torch.testing.assert_close(sm.double(), mean_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(si.double(), 1 / torch.sqrt(var_r + 1e-5), rtol=1e-4, atol=1e-4)
    assert nbt.item() == 1
    # spot-check outputs at the start and beyond the 2**31 boundary (last sample)
    for n in (0, N - 1):
        exp = (x[n].double() - mean_r.view(C, 1, 1)) / torch.sqrt(var_r.view(C, 1, 1) + 1e-5)
        torch.testing.assert_close(out[n].double(), exp, rtol=2e-3, atol=4e-3)
    del out
    # backward over the huge input as well
    dy = x  # any non-trivial gradient; reuse the memory
    gi, gw, gb = ops.batch_norm_backward(dy, x, None, None, None, sm, si, True, 1e-5)
    gb_r = torch.zeros(C, dtype=torch.float64, device=DEV)
    for n in range(N):
        gb_r += dy[n].double().sum(dim=(1, 2))
    torch.testing.assert_close(gb.double(), gb_r, rtol=1e-4, atol=1e-2 * cnt**0.5)
    assert torch.isfinite(gi[N - 1]).all()


# ---------------------------------------------------------------------------
# single-read vs two-pass
# ---------------------------------------------------------------------------
def _kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def _train_step(x, dy, C, param_dtype):
    m = bnorm_ext.BatchNorm2d(C).to(DEV, param_dtype)
    xi = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    m(xi).backward(dy)


# NB: sizing of the single-read kernel for 16x64x32x32 float32, in both layouts, on
# any GPU with >= 4 * 64 blocks: 4 split segments per channel (channels_last: 256
# row splits), 4 kept vectors of 16 bytes per thread and input: 16 KiB (forward) and
# 32 KiB (backward: x and dy) of dynamic shared memory per block, plus under 4 KiB of
# static shared memory and 1 KiB reserved, 4 blocks per SM. That fits an A100
# (164 KiB per SM) and an H100/H200 (228 KiB); GPUs with less skip the test.
PATH_SWITCH_SMALL = (16, 64, 32, 32)
PATH_SWITCH_SMEM_PER_SM = 4 * (32 + 4 + 1) * 1024


@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_path_switch(memory_format, monkeypatch):
    """Inputs that fit on chip run one single-read launch each way; large ones and
    BNORM_EXT_CUDA_SINGLE_READ=0 run the two-pass kernels."""
    props = torch.cuda.get_device_properties(DEV)
    if props.shared_memory_per_multiprocessor < PATH_SWITCH_SMEM_PER_SM or props.multi_processor_count * 4 < 256:
        pytest.skip(
            f"{props.name}: {props.shared_memory_per_multiprocessor} B of shared memory per SM, "
            f"{props.multi_processor_count} SMs: the small input's single-read sizing does not fit"
        )
    monkeypatch.delenv("BNORM_EXT_CUDA_SINGLE_READ", raising=False)
    C = PATH_SWITCH_SMALL[1]
    small = randn_shifted(PATH_SWITCH_SMALL, torch.float32, DEV, memory_format=memory_format)  # 4 MB
    big = randn_shifted((512, C, 32, 32), torch.float32, DEV, memory_format=memory_format)  # 128 MB
    launches = _C._single_read_launches()
    names = _kernel_names(lambda: _train_step(small, torch.randn_like(small), C, torch.float32))
    assert _C._single_read_launches() - launches == 2, "expected a forward and a backward single-read launch"
    single = [n for n in names if "single_read_channel_kernel" in n]
    assert len(single) == 2, f"expected a forward and a backward single-read kernel, got {sorted(names)}"
    assert not any("channel_reduce" in n or "channel_elementwise" in n for n in names), sorted(names)
    launches = _C._single_read_launches()
    names = _kernel_names(lambda: _train_step(big, torch.randn_like(big), C, torch.float32))
    assert _C._single_read_launches() == launches
    assert not any("single_read" in n for n in names), sorted(names)
    assert any("channel_reduce" in n for n in names) and any("channel_elementwise" in n for n in names)
    monkeypatch.setenv("BNORM_EXT_CUDA_SINGLE_READ", "0")
    names = _kernel_names(lambda: _train_step(small, torch.randn_like(small), C, torch.float32))
    assert _C._single_read_launches() == launches
    assert not any("single_read" in n for n in names), sorted(names)


REFUSE_ENV = "BNORM_EXT_CUDA_TEST_REFUSE_COOPERATIVE"


@pytest.fixture
def clean_launch_record(monkeypatch):
    monkeypatch.delenv(REFUSE_ENV, raising=False)
    monkeypatch.delenv("BNORM_EXT_CUDA_SINGLE_READ", raising=False)
    _C._clear_cooperative_launch_record()
    yield
    _C._clear_cooperative_launch_record()


@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_refused_cooperative_launch_is_remembered(memory_format, monkeypatch, clean_launch_record):
    """A refused single-read launch (forced here) falls back to the two-pass kernels,
    with their exact results, and later calls do not try again until the record is
    cleared."""
    shape = (8, 16, 16, 16)
    C = shape[1]
    x = randn_shifted(shape, torch.float32, DEV, memory_format=memory_format)
    dy = torch.randn(shape, device=DEV).contiguous(memory_format=memory_format)
    monkeypatch.setenv("BNORM_EXT_CUDA_SINGLE_READ", "0")
    two_pass = _run_once(x, dy, C, torch.float32)
    monkeypatch.delenv("BNORM_EXT_CUDA_SINGLE_READ")

    monkeypatch.setenv(REFUSE_ENV, "1")
    launches = _C._single_read_launches()
    refused = _run_once(x, dy, C, torch.float32)
    assert _C._single_read_launches() == launches, "a single-read kernel ran although its launch was refused"
    assert _C._cooperative_refusals() == 2, "expected the forward and the backward kernel recorded as refused"
    monkeypatch.delenv(REFUSE_ENV)
    remembered = _run_once(x, dy, C, torch.float32)
    assert _C._single_read_launches() == launches, "a refused kernel was tried again"
    for name, a, b, c in zip(NAMES, two_pass, refused, remembered):
        assert torch.equal(a, b) and torch.equal(a, c), f"{name}: the fallback is not the two-pass result"

    _C._clear_cooperative_launch_record()
    single = _run_once(x, dy, C, torch.float32)
    assert _C._single_read_launches() == launches + 2, "after clearing the record the single-read kernels run again"
    for name, a, b in zip(NAMES, two_pass, single):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


SWITCH_SHAPES = [
    pytest.param((32, 64, 22, 22), id="32x64x22x22"),
    pytest.param((8, 2048, 7, 7), id="8x2048x7x7"),  # L % VEC != 0, several channels per block
    pytest.param((5, 3, 31, 17), id="5x3x31x17"),  # C % VEC != 0
    pytest.param((256, 16, 1, 1), id="256x16x1x1"),
]


@pytest.mark.parametrize("shape", SWITCH_SHAPES)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", dtypes)
def test_cuda_single_read_matches_two_pass(dtype, memory_format, shape, monkeypatch):
    """Both paths on the same data: outputs, saved and running statistics,
    num_batches_tracked and all gradients equal within rounding, and both close to
    the float64 reference."""
    C = shape[1]
    x = randn_shifted(shape, dtype, DEV, memory_format=memory_format)
    dy = torch.randn(shape, device=DEV).to(dtype).contiguous(memory_format=memory_format)
    monkeypatch.delenv("BNORM_EXT_CUDA_SINGLE_READ", raising=False)
    single = _run_once(x, dy, C, dtype)
    monkeypatch.setenv("BNORM_EXT_CUDA_SINGLE_READ", "0")
    two_pass = _run_once(x, dy, C, dtype)
    ref = _run_once_reference(x, dy, C)
    tol = {
        torch.float64: dict(rtol=1e-12, atol=1e-12),
        torch.float32: dict(rtol=2e-5, atol=2e-5),
        torch.float16: dict(rtol=2e-3, atol=4e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
    }[dtype]
    for name, a, b, r in zip(NAMES, single, two_pass, ref):
        assert torch.isfinite(a.double()).all(), f"{name}: non-finite values on the single-read path"
        if name == "num_batches_tracked":
            assert a.item() == b.item() == 1
            continue
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name} single-read vs two-pass: {m}")
        err_a, err_b = max_abs_err(a, r), max_abs_err(b, r)
        assert err_a <= 2 * err_b + tol["atol"], f"{name}: single-read error {err_a:.3e} vs two-pass {err_b:.3e}"


def _run_once_reference(x, dy, C):
    return seeded_train_step(torch.nn.BatchNorm2d(C).double(), x.cpu().double(), dy.cpu().double())


@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_graph_capture(memory_format, cuda_path):
    """Training steps captured in a CUDA graph and replayed update the running
    statistics and num_batches_tracked as the same steps run eagerly."""
    C = 32
    x = randn_shifted((16, C, 12, 12), torch.float32, DEV, memory_format=memory_format)
    dy = torch.randn_like(x)
    eager = bnorm_ext.BatchNorm2d(C, momentum=None).to(DEV)
    graphed = bnorm_ext.BatchNorm2d(C, momentum=None).to(DEV)
    xs = x.clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (allocator, kernel attributes)
        graphed(xs).backward(dy)
    torch.cuda.current_stream().wait_stream(s)
    eager(x.clone().requires_grad_()).backward(dy)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed(xs)
        out.backward(dy)
    for _ in range(3):
        graph.replay()
        xe = x.clone().requires_grad_()
        out_e = eager(xe)
        out_e.backward(dy)
    torch.cuda.synchronize()
    assert graphed.num_batches_tracked.item() == eager.num_batches_tracked.item() == 4
    torch.testing.assert_close(graphed.running_mean, eager.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(graphed.running_var, eager.running_var, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)


# Runs in a fresh process, so that the first launch of every kernel variant (and its
# attribute and occupancy queries) happens inside the capture.
CAPTURE_WITHOUT_WARMUP = r"""
import json, sys
import torch
import bnorm_ext
from bnorm_ext import _C

mf = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[sys.argv[1]]
C = 32
x = (torch.randn(16, C, 12, 12, dtype=torch.float64) * 3 + 5).float().cuda().contiguous(memory_format=mf)
dy = torch.randn_like(x)
report = {}
for phase in ("first_launch_in_capture", "after_an_eager_call"):
    graphed = bnorm_ext.BatchNorm2d(C, momentum=None).cuda()
    eager = bnorm_ext.BatchNorm2d(C, momentum=None).cuda()
    xs = x.clone().requires_grad_()
    launches = _C._single_read_launches()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = graphed(xs)
        out.backward(dy)
    captured_single_read = _C._single_read_launches() - launches
    for _ in range(3):
        graph.replay()
        eager.zero_grad(set_to_none=True)
        xe = x.clone().requires_grad_()
        out_e = eager(xe)
        out_e.backward(dy)
    torch.cuda.synchronize()
    tol = dict(rtol=1e-5, atol=1e-5)
    assert graphed.num_batches_tracked.item() == eager.num_batches_tracked.item() == 3
    torch.testing.assert_close(graphed.running_mean, eager.running_mean, **tol)
    torch.testing.assert_close(graphed.running_var, eager.running_var, **tol)
    torch.testing.assert_close(out, out_e, **tol)
    torch.testing.assert_close(xs.grad, xe.grad, **tol)
    torch.testing.assert_close(graphed.weight.grad, eager.weight.grad, **tol)
    torch.testing.assert_close(graphed.bias.grad, eager.bias.grad, **tol)
    report[phase] = captured_single_read
print(json.dumps(report))
"""


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_cuda_graph_capture_without_warmup(memory_format):
    """A training step captured with no call before it (fresh process): replays match
    eager steps. The first capture records the two-pass kernels (a cooperative launch
    never tried outside a capture is not tried inside one); once an eager call has
    launched them, a capture records the single-read kernels."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("BNORM_EXT_CUDA_SINGLE_READ", None)
    proc = subprocess.run(
        [sys.executable, "-c", CAPTURE_WITHOUT_WARMUP, memory_format],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, f"capture without warm-up failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"first_launch_in_capture": 0, "after_an_eager_call": 2}, report


# ---------------------------------------------------------------------------
# torch.compile on CUDA: default mode and reduce-overhead (CUDA graphs)
# ---------------------------------------------------------------------------
@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_torch_compile_training(mode, memory_format, no_tf32):
    """Conv-BN-ReLU-BN compiled (fullgraph) vs the same model eager, three training
    steps: outputs, every gradient and buffer after each step; reduce-overhead must
    really run CUDA graphs (no cudagraph skips)."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(3, 16, 3, bias=False),
            bnorm_ext.BatchNorm2d(16),
            nn.ReLU(),
            bnorm_ext.BatchNorm2d(16, momentum=None),
        )
        .to(DEV)
        .to(memory_format=memory_format)
    )
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, mode=mode, fullgraph=True)
    tol = dict(rtol=1e-4, atol=1e-5)
    for step in range(3):
        x = randn_shifted((8, 3, 18, 18), torch.float32, DEV, memory_format=memory_format)
        dy = torch.randn(8, 16, 16, 16, device=DEV).contiguous(memory_format=memory_format)
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        for m in (model, eager):
            m.zero_grad(set_to_none=True)
        out_c = compiled(x)
        out_e = eager(x)
        out_c.backward(dy)
        out_e.backward(dy)
        torch.testing.assert_close(out_c, out_e, **tol, msg=lambda m: f"step {step} output: {m}")
        for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            assert p.grad is not None, f"step {step}: no grad for {n}"
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"step {step} grad {n}: {m}")
        for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
            if b.dtype == torch.long:
                assert torch.equal(b, c), f"step {step} {n}: {b} vs {c}"
            else:
                torch.testing.assert_close(b, c, **tol, msg=lambda m: f"step {step} buffer {n}: {m}")
    assert model[1].num_batches_tracked.item() == 3
    if mode == "reduce-overhead":
        skips = dict(counters["inductor"])
        assert not any("cudagraph_skips" in k and v for k, v in skips.items()), f"CUDA graphs skipped: {skips}"


# ---------------------------------------------------------------------------
# numerics on both paths: large mean (cancellation), values near the float32 maximum
# ---------------------------------------------------------------------------
NUMERICS_SHAPES = [
    pytest.param((16, 8, 7, 7), id="7x7"),  # NCHW loads scalars (49 % 4 != 0)
    pytest.param((16, 8, 8, 8), id="8x8"),  # 16-byte vectors
]


@pytest.mark.parametrize("shape", NUMERICS_SHAPES)
@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_large_mean_no_worse_than_torch(memory_format, shape, cuda_path):
    """1e4 + N(0, 1) in float32 breaks E[x^2] - E[x]^2; ours must stay within 2x torch's
    own float32 CUDA error (plus about an ulp) against float64."""
    C, eps = shape[1], 1e-5
    x = (1e4 + torch.randn(shape, dtype=torch.float64)).float().contiguous(memory_format=memory_format).to(DEV)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).float().to(DEV)
    b = torch.randn(C, dtype=torch.float64).float().to(DEV)
    rm0, rv0 = torch.zeros(C, device=DEV), torch.ones(C, device=DEV)
    xd = x.double().cpu()
    out_r, mean_r, invstd_r = torch.native_batch_norm(
        xd, w.double().cpu(), b.double().cpu(), rm0.double().cpu(), rv0.double().cpu(), True, 0.1, eps
    )
    rm_t, rv_t = rm0.clone(), rv0.clone()
    out_t, mean_t, invstd_t = torch.native_batch_norm(x, w, b, rm_t, rv_t, True, 0.1, eps)
    rm_o, rv_o = rm0.clone(), rv0.clone()
    out_o, mean_o, invstd_o = ops.batch_norm_forward_train(x, w, b, rm_o, rv_o, None, 0.1, eps)
    n = x.numel() // C
    var_r = xd.transpose(0, 1).reshape(C, -1).var(1, unbiased=True)
    rv_r = 0.9 + 0.1 * var_r
    for name, o, t, r, tiny in [
        ("output", out_o, out_t, out_r, 1e-6),
        ("save_mean", mean_o, mean_t, mean_r, 1e-3),
        ("save_invstd", invstd_o, invstd_t, invstd_r, 1e-6),
        ("running_var", rv_o, rv_t, rv_r, 1e-7),
    ]:
        assert torch.isfinite(o).all(), f"{name} not finite"
        e_o, e_t = max_abs_err(o, r), max_abs_err(t, r)
        assert e_o <= 2 * e_t + tiny, f"{name}: ours {e_o:.3e} vs torch {e_t:.3e} (n={n})"


@pytest.mark.parametrize("shape", NUMERICS_SHAPES)
@pytest.mark.parametrize("memory_format", memory_formats)
def test_cuda_near_float32_max(memory_format, shape, cuda_path):
    """Values of 3e38 (a sum of two overflows float32): mean 3e38, variance 0, output = bias;
    never inf or NaN."""
    C = shape[1]
    x = torch.full(shape, 3e38, dtype=torch.float32, device=DEV).contiguous(memory_format=memory_format)
    b = torch.linspace(-1, 1, C, device=DEV)
    out, mean, invstd = ops.batch_norm_forward_train(x, None, b, None, None, None, 0.1, 1e-5)
    assert torch.isfinite(mean).all() and torch.isfinite(invstd).all() and torch.isfinite(out).all()
    torch.testing.assert_close(mean, torch.full_like(mean, 3e38), rtol=1e-6, atol=0)
    torch.testing.assert_close(invstd, torch.full_like(invstd, 1e-5**-0.5), rtol=1e-6, atol=0)
    torch.testing.assert_close(out, b.view(1, C, 1, 1).expand(shape), rtol=0, atol=1e-6)
