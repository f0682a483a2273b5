"""The CPU kernels are compiled once per instruction set (baseline x86-64,
AVX2+FMA, AVX-512) and chosen at run time; BNORM_EXT_CPU_ISA=default|avx2 caps
the choice. Every build must compute the same function: each is checked against the float64 reference,
over both layouts and both NCHW paths (per-channel fused and two-pass)."""

import pytest
import torch


ops = torch.ops.bnorm_ext

SHAPES = {
    "fused": (4, 16, 6, 7),  # NCHW channels fit in L2, C >= 8: fused per-channel path
    "two_pass": (3, 4, 60, 70),  # C < 8: two-pass path
    "big_channel": (2, 8, 300, 300),  # channel over 1 MiB: two-pass path
}


@pytest.mark.parametrize("isa", ["native", "avx2", "default"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_both_instruction_set_builds_match_reference(isa, memory_format, shape, monkeypatch):
    if isa == "native":
        monkeypatch.delenv("BNORM_EXT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("BNORM_EXT_CPU_ISA", isa)
    torch.manual_seed(0)
    C = shape[1]
    x64 = torch.randn(shape, dtype=torch.float64) * 3 + 5
    dy64 = torch.randn(shape, dtype=torch.float64)
    w64 = torch.rand(C, dtype=torch.float64) + 0.5
    b64 = torch.randn(C, dtype=torch.float64)
    x = x64.float().contiguous(memory_format=memory_format)
    dy = dy64.float().contiguous(memory_format=memory_format)
    out, mean, invstd = ops.batch_norm_forward_train(x, w64.float(), b64.float(), None, None, None, 0.1, 1e-5)
    gx, gw, gb = ops.batch_norm_backward(dy, x, w64.float(), None, None, mean, invstd, True, 1e-5)

    x_ref = x64.clone().requires_grad_()
    w_ref = w64.clone().requires_grad_()
    b_ref = b64.clone().requires_grad_()
    ref = torch.nn.functional.batch_norm(x_ref, None, None, w_ref, b_ref, True, 0.1, 1e-5)
    ref.backward(dy64)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gx.double(), x_ref.grad, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(gw.double(), w_ref.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gb.double(), b_ref.grad, rtol=1e-4, atol=1e-3)
    assert out.stride() == x.stride() and gx.stride() == x.stride()
