"""Behaviour the CUDA ops share with the CPU that is testable without a GPU (the
CUDA cases skip there): strided running statistics, updated in place like torch
does, and the bookkeeping that sends later calls to the two-pass kernels after
the driver refused a cooperative (single-read) launch."""

import threading

import pytest
import torch
import torch.nn.functional as F

import bnorm_ext
from bnorm_ext import _C
from common_utils import devices, randn_shifted

ops = torch.ops.bnorm_ext


# ---------------------------------------------------------------------------
# strided running statistics: every other element of a [2C] buffer
# ---------------------------------------------------------------------------
def _strided_stats(C, dtype, device):
    """(running_mean, running_var) as stride-2 views of [2C] buffers whose other
    elements hold a sentinel that no update may touch."""
    rm_buf = torch.full((2 * C,), -7.0, dtype=torch.float64)
    rv_buf = torch.full((2 * C,), -7.0, dtype=torch.float64)
    rm_buf[::2] = torch.randn(C, dtype=torch.float64)
    rv_buf[::2] = torch.rand(C, dtype=torch.float64) + 0.5
    rm_buf, rv_buf = rm_buf.to(device, dtype), rv_buf.to(device, dtype)
    return rm_buf[::2], rv_buf[::2]


def _assert_sentinels_kept(*stats):
    for s in stats:
        base = s._base
        assert base is not None and not s.is_contiguous()
        assert torch.equal(base[1::2].cpu(), torch.full((base.numel() // 2,), -7.0, dtype=base.dtype)), (
            "an element between the strided running statistics was written"
        )


STAT_DTYPES = [
    pytest.param(torch.float64, torch.float64, id="float64"),
    pytest.param(torch.float32, torch.float32, id="float32"),
    pytest.param(torch.float16, torch.float32, id="float16-stats_float32"),
]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("dtype,stat_dtype", STAT_DTYPES)
@pytest.mark.parametrize("device", devices)
def test_strided_running_stats_training_update_like_torch(device, dtype, stat_dtype, momentum):
    C = 6
    x = randn_shifted((5, C, 4, 3), dtype, device)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).to(device, stat_dtype)
    b = torch.randn(C, dtype=torch.float64).to(device, stat_dtype)
    rm, rv = _strided_stats(C, stat_dtype, device)
    rm_t, rv_t = rm.clone(), rv.clone()  # contiguous copies for torch
    rm_r, rv_r = rm.double().cpu().clone(), rv.double().cpu().clone()  # float64 reference
    nbt = torch.tensor(2, dtype=torch.long, device=device)
    out, save_mean, save_invstd = ops.batch_norm_forward_train(x, w, b, rm, rv, nbt, momentum, 1e-5)
    out_t = F.batch_norm(x, rm_t, rv_t, w, b, training=True, momentum=0.1 if momentum is None else momentum)
    F.batch_norm(
        x.double().cpu(),
        rm_r,
        rv_r,
        w.double().cpu(),
        b.double().cpu(),
        training=True,
        momentum=1 / 3 if momentum is None else momentum,
    )  # momentum None: cumulative, 3rd batch
    assert nbt.item() == 3
    _assert_sentinels_kept(rm, rv)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rm.double().cpu(), rm_r, **tol)
    torch.testing.assert_close(rv.double().cpu(), rv_r, **tol)
    if momentum is not None:
        torch.testing.assert_close(rm, rm_t, **tol)
        torch.testing.assert_close(rv, rv_t, **tol)
    torch.testing.assert_close(out.double(), out_t.double(), **tol)


@pytest.mark.parametrize("dtype,stat_dtype", STAT_DTYPES)
@pytest.mark.parametrize("device", devices)
def test_strided_running_stats_module_path(device, dtype, stat_dtype):
    """bnorm_ext.batch_norm (training, then eval forward and backward) with strided
    running statistics gives torch's results and leaves the other elements alone."""
    C = 4
    x = randn_shifted((6, C, 5, 2), dtype, device)
    rm, rv = _strided_stats(C, stat_dtype, device)
    rm_t, rv_t = rm.clone(), rv.clone()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != torch.float16 else dict(rtol=2e-3, atol=2e-3)
    bnorm_ext.batch_norm(x, rm, rv, training=True, momentum=0.2)
    F.batch_norm(x, rm_t, rv_t, training=True, momentum=0.2)
    torch.testing.assert_close(rm, rm_t, **tol)
    torch.testing.assert_close(rv, rv_t, **tol)
    xe = x.clone().requires_grad_()
    xe_t = x.clone().requires_grad_()
    y = bnorm_ext.batch_norm(xe, rm, rv, training=False)
    y_t = F.batch_norm(xe_t, rm_t, rv_t, training=False)
    dy = torch.randn(y.shape, dtype=torch.float64).to(device, dtype)
    y.backward(dy)
    y_t.backward(dy)
    torch.testing.assert_close(y, y_t, **tol)
    torch.testing.assert_close(xe.grad, xe_t.grad, **tol)
    _assert_sentinels_kept(rm, rv)


@pytest.mark.parametrize("device", devices)
def test_strided_running_stats_gather_stats(device):
    """batch_norm_gather_stats updates strided running statistics as contiguous ones."""
    C = 5
    mean = (torch.randn(3, C, dtype=torch.float64) + 5).float().to(device)
    var = (torch.rand(3, C, dtype=torch.float64) + 0.5).float().to(device)
    counts = torch.tensor([4.0, 0.0, 7.0], device=device)
    rm, rv = _strided_stats(C, torch.float32, device)
    rm_c, rv_c = rm.clone(), rv.clone()
    rm_0 = rm.clone()
    nbt = torch.tensor(0, dtype=torch.long, device=device)
    got = ops.batch_norm_gather_stats(mean, var, counts, rm, rv, nbt, 0.1, 1e-5)
    want = ops.batch_norm_gather_stats(mean, var, counts, rm_c, rv_c, None, 0.1, 1e-5)
    assert nbt.item() == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(rm, rm_c, rtol=0, atol=0)
    torch.testing.assert_close(rv, rv_c, rtol=0, atol=0)
    assert not torch.equal(rm, rm_0), "running_mean not updated"
    _assert_sentinels_kept(rm, rv)


@pytest.mark.parametrize("device", devices)
def test_strided_running_stats_untouched_when_the_call_raises(device):
    C = 4
    x = randn_shifted((3, C, 2, 2), torch.float32, device)
    rm, rv = _strided_stats(C, torch.float32, device)
    before = (rm._base.clone(), rv._base.clone())
    nbt = torch.tensor(5, dtype=torch.long, device=device)
    bad_weight = torch.ones(C + 1, device=device)
    with pytest.raises(RuntimeError, match="weight"):
        ops.batch_norm_forward_train(x, bad_weight, None, rm, rv, nbt, 0.1, 1e-5)
    assert torch.equal(rm._base, before[0]) and torch.equal(rv._base, before[1])
    assert nbt.item() == 5


# ---------------------------------------------------------------------------
# the cooperative launch record (host code; exercised here through _C's test hooks
# with fake kernel ids, which never collide with real kernel addresses)
# ---------------------------------------------------------------------------
REFUSE_ENV = "BNORM_EXT_CUDA_TEST_REFUSE_COOPERATIVE"


@pytest.fixture
def clean_record(monkeypatch):
    monkeypatch.delenv(REFUSE_ENV, raising=False)
    _C._clear_cooperative_launch_record()
    yield
    _C._clear_cooperative_launch_record()


def _launch(kernel, device=0, grid=100, capturing=False, refuse=False):
    return _C._simulate_cooperative_launch(kernel, device, grid, capturing, refuse)


def test_refused_launch_is_remembered_per_kernel_and_device(clean_record):
    assert _launch(1, refuse=True) == (True, False)
    assert _C._cooperative_refusals() == 1
    # the same kernel on the same device: not attempted again, even if it would launch now
    assert _launch(1, refuse=False) == (False, False)
    assert _launch(1, grid=1, refuse=False) == (False, False)
    # another device, another kernel: attempted
    assert _launch(1, device=1) == (True, True)
    assert _launch(2) == (True, True)
    assert _C._cooperative_refusals() == 1
    _C._clear_cooperative_launch_record()
    assert _C._cooperative_refusals() == 0
    assert _launch(1) == (True, True)


def test_capture_attempts_only_grids_that_launched_before(clean_record):
    # a kernel never launched: not attempted while capturing (nothing recorded either)
    assert _launch(3, grid=64, capturing=True) == (False, False)
    assert _launch(3, grid=64) == (True, True)
    assert _launch(3, grid=64, capturing=True) == (True, True)
    assert _launch(3, grid=32, capturing=True) == (True, True)
    # a larger grid than any launched one: not while capturing
    assert _launch(3, grid=65, capturing=True) == (False, False)
    # a refusal outside capture also stops captured launches
    assert _launch(3, grid=65, refuse=True) == (True, False)
    assert _launch(3, grid=16, capturing=True) == (False, False)
    assert _C._cooperative_refusals() == 1


def test_forced_refusal_switch(clean_record, monkeypatch):
    monkeypatch.setenv(REFUSE_ENV, "1")
    # treated as refused without attempting the launch, and remembered
    assert _launch(4) == (False, False)
    assert _C._cooperative_refusals() == 1
    monkeypatch.delenv(REFUSE_ENV)
    assert _launch(4) == (False, False)
    assert _launch(5) == (True, True)
    monkeypatch.setenv(REFUSE_ENV, "0")
    assert _launch(6) == (True, True)


def test_record_is_thread_safe(clean_record):
    """Threads (the GIL released inside each call) race on one refused kernel and on
    many distinct ones: each thread attempts the shared kernel at most once, and no
    refusal is lost."""
    threads, per_thread = 8, 400
    shared_attempts = [0] * threads
    start = threading.Barrier(threads)

    def work(t):
        start.wait()
        for i in range(per_thread):
            attempted, launched = _launch(10, refuse=True)
            assert not launched
            shared_attempts[t] += attempted
            _launch(1000 + t * per_thread + i, refuse=True)
            assert _launch(10**6 + i, grid=i + 1) == (True, True)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert 1 <= sum(shared_attempts) <= threads
    assert all(a <= 1 for a in shared_attempts)
    assert _C._cooperative_refusals() == 1 + threads * per_thread


def test_single_read_launch_counter_is_an_int():
    n = _C._single_read_launches()
    assert isinstance(n, int) and n >= 0
    if not torch.cuda.is_available():
        assert n == 0
