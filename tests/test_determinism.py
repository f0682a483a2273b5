"""CPU results do not depend on the thread count: the forward and backward of
the plain and the fused ops are bitwise equal under torch.set_num_threads(1),
2 and 3, in both layouts (the kernels split work by shape only and merge
partials in a fixed order)."""

import pytest
import torch

import bnorm_ext

THREADS = (1, 2, 3)
# Shapes that take each CPU path: channels-last with several row chunks and
# channel slabs; [N, C, L] per-channel fused (C >= 8, small channels) and
# chunked (C < 8, channels too large to fuse).
SHAPES = [
    ((16, 96, 20, 20), torch.channels_last),
    ((4, 1040, 7, 7), torch.channels_last),
    ((3, 37, 9, 11), torch.channels_last),
    ((8, 16, 16, 16), torch.contiguous_format),
    ((40, 4, 64, 64), torch.contiguous_format),
]


@pytest.fixture
def restore_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _inputs(shape, memory_format, seed):
    gen = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=gen) * 3 + 5).contiguous(memory_format=memory_format)
    residual = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format)
    grad = torch.randn(shape, generator=gen).contiguous(memory_format=memory_format)
    weight = torch.rand(C, generator=gen) + 0.5
    bias = torch.randn(C, generator=gen)
    return x, residual, grad, weight, bias


def _run(fn, shape, memory_format, threads):
    """fn(x, residual, weight, bias) -> output under `threads` threads:
    the output, the input/weight/bias(/residual) gradients, the running stats."""
    torch.set_num_threads(threads)
    x, residual, grad, weight, bias = _inputs(shape, memory_format, seed=1)
    x.requires_grad_(True)
    residual.requires_grad_(True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    running_mean = torch.zeros(shape[1])
    running_var = torch.ones(shape[1])
    out = fn(x, residual, weight, bias, running_mean, running_var)
    out.backward(grad)
    results = [out.detach(), running_mean, running_var]
    results += [t.grad for t in (x, residual, weight, bias) if t.grad is not None]
    return results


def _plain(training):
    def fn(x, residual, weight, bias, rm, rv):
        return bnorm_ext.batch_norm(x, rm, rv, weight, bias, training, 0.1, 1e-5)

    return fn


def _fused(training, activation):
    def fn(x, residual, weight, bias, rm, rv):
        return bnorm_ext.batch_norm_act(x, rm, rv, weight, bias, training, 0.1, 1e-5, activation, 0.2, residual)

    return fn


OPS = {
    "plain-train": _plain(True),
    "plain-eval": _plain(False),
    "relu-train": _fused(True, "relu"),
    "silu-train": _fused(True, "silu"),
    "leaky_relu-eval": _fused(False, "leaky_relu"),
    "silu-eval": _fused(False, "silu"),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(
    "shape,memory_format",
    SHAPES,
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).split(".")[-1],
)
def test_bitwise_equal_across_thread_counts(restore_threads, op, shape, memory_format):
    reference = _run(OPS[op], shape, memory_format, THREADS[0])
    assert all(torch.isfinite(t).all() for t in reference)
    for threads in THREADS[1:]:
        results = _run(OPS[op], shape, memory_format, threads)
        assert len(results) == len(reference)
        for i, (got, want) in enumerate(zip(results, reference)):
            assert got.stride() == want.stride()
            assert torch.equal(got, want), f"result {i} differs between 1 and {threads} threads"
