"""Fused BatchNorm + activation (+ residual): the ops, their autograd, the
module and the fusion pass, against torch's composed BN -> add -> act."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad, gradcheck, gradgradcheck

import bnorm_ext
from common_utils import devices, dtypes, memory_formats, misaligned_copy, randn_shifted, requires_cuda, torch_act

ACTIVATIONS = ["identity", "relu", "leaky_relu", "silu"]
SLOPE = 0.2
EPS = 1e-5


def composed(x, rm, rv, w, b, training, activation, residual, momentum=0.1, eps=EPS):
    """torch's F.batch_norm, add, activation."""
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return torch_act(y, activation, SLOPE)


def make_case(shape, dtype, device, memory_format, param_dtype=None, residual=True, seed_shift=0.0):
    C = shape[1]
    pdt = param_dtype or dtype
    x = randn_shifted(shape, dtype, device, memory_format=memory_format)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).to(device, pdt)
    b = torch.randn(C, dtype=torch.float64).to(device, pdt)
    # NB: residual of size comparable to BN's output, so relu's mask depends on both.
    r = (
        (torch.randn(shape, dtype=torch.float64)).to(device, dtype).contiguous(memory_format=memory_format)
        if residual
        else None
    )
    rm = torch.randn(C, dtype=torch.float64).to(device, pdt)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, pdt)
    return x, w, b, r, rm, rv


def assert_close(ours, ref, atol, rtol, what):
    assert ours.dtype == ref.dtype, what
    assert not ours.isnan().any(), what
    torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# Shapes: C < 8 takes the two-pass path; C >= 8 NCHW the per-channel fused one.
PARITY_SHAPES = [pytest.param((4, 5, 6, 7), id="C5"), pytest.param((3, 8, 5, 6), id="C8")]


@pytest.mark.parametrize("shape", PARITY_SHAPES)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("device", devices)
def test_parity_float64(device, activation, has_residual, training, memory_format, shape):
    x, w, b, r, rm, rv = make_case(shape, torch.float64, device, memory_format, residual=has_residual)
    leaves = [t.requires_grad_() for t in (x, w, b, r) if t is not None]
    rm_ref, rv_ref = rm.clone(), rv.clone()
    out = bnorm_ext.batch_norm_act(x, rm, rv, w, b, training, 0.1, EPS, activation, SLOPE, r)
    ref = composed(x, rm_ref, rv_ref, w, b, training, activation, r)
    assert out.is_contiguous(memory_format=memory_format)
    assert_close(out, ref, 1e-12, 1e-12, "output")
    assert_close(rm, rm_ref, 1e-13, 1e-13, "running_mean")
    assert_close(rv, rv_ref, 1e-13, 1e-13, "running_var")
    g = torch.randn(shape, dtype=torch.float64, device=device)
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(ref, leaves, g)
    for name, ours, theirs in zip(["input", "weight", "bias", "residual"], grads, grads_ref):
        assert_close(ours, theirs, 1e-11, 1e-11, f"grad {name}")


@pytest.mark.parametrize("device", devices)
def test_parity_no_affine_momentum_none(device):
    x, _, _, r, rm, rv = make_case((4, 5, 3, 3), torch.float64, device, torch.contiguous_format)
    nbt = torch.tensor(3, device=device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    x.requires_grad_()
    out = torch.ops.bnorm_ext.batch_norm_act_forward_train(x, None, None, rm, rv, nbt, None, EPS, r, "silu", 0.0)[0]
    ref = F.silu(F.batch_norm(x, rm_ref, rv_ref, None, None, True, 1 / 4, EPS) + r)
    assert nbt.item() == 4
    assert_close(out, ref, 1e-12, 1e-12, "output")
    assert_close(rv, rv_ref, 1e-13, 1e-13, "running_var")
    (gx,) = torch.autograd.grad(out.sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.sum(), x)
    assert_close(gx, gx_ref, 1e-11, 1e-11, "grad input")


GRAD_SHAPE = (2, 3, 2, 3)


def _fn(training, activation, has_residual, device="cpu"):
    rm = torch.randn(GRAD_SHAPE[1], dtype=torch.float64).to(device)
    rv = (torch.rand(GRAD_SHAPE[1], dtype=torch.float64) + 0.5).to(device)

    def f(x, w, b, *r):
        return bnorm_ext.batch_norm_act(
            x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3, activation, SLOPE, r[0] if has_residual else None
        )

    return f


def _grad_inputs(has_residual, memory_format=torch.contiguous_format, device="cpu"):
    x, w, b, r, _, _ = make_case(GRAD_SHAPE, torch.float64, device, memory_format, residual=has_residual)
    return tuple(t.requires_grad_() for t in (x, w, b, r) if t is not None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_and_gradgradcheck(activation, has_residual, training):
    args = _grad_inputs(has_residual)
    f = _fn(training, activation, has_residual)
    assert gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)
    assert gradgradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("device", devices)
def test_gradcheck_channels_last_and_forward_ad(device, activation, training):
    args = _grad_inputs(True, torch.channels_last, device)
    f = _fn(training, activation, True, device)
    assert gradcheck(f, args, eps=1e-6, atol=1e-5, rtol=1e-4, check_forward_ad=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("has_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_ad_matches_torch(activation, has_residual, training):
    x, w, b, r, rm, rv = make_case((3, 5, 4, 4), torch.float64, "cpu", torch.contiguous_format, residual=has_residual)
    primals = [t for t in (x, w, b, r) if t is not None]
    tangents = [torch.randn_like(t) for t in primals]

    def run(fn):
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
            dx, dw, db = duals[:3]
            dr = duals[3] if has_residual else None
            out = fn(dx, rm.clone(), rv.clone(), dw, db, training, activation, dr)
            return forward_ad.unpack_dual(out).tangent

    ours = run(
        lambda x_, rm_, rv_, w_, b_, t_, a_, r_: bnorm_ext.batch_norm_act(
            x_, rm_, rv_, w_, b_, t_, 0.1, EPS, a_, SLOPE, r_
        )
    )
    theirs = run(composed)
    assert_close(ours, theirs, 1e-11, 1e-11, "output tangent")


@pytest.mark.parametrize("has_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_jvp_of_module_matches_torch(training, activation, has_residual):
    # torch.func.jvp through BatchNormAct2d with running stats, against torch's composed ops.
    # NB: torch's BatchNorm refuses to update captured running stats inside jvp; in training
    # the output does not depend on them, so the reference runs without them and the
    # running stats are checked against one eager torch call.
    torch_bn = nn.BatchNorm2d(5).double().train(training)
    x, w, b, r, rm, rv = make_case((3, 5, 4, 4), torch.float64, "cpu", torch.contiguous_format, residual=has_residual)
    with torch.no_grad():
        torch_bn.weight.copy_(w), torch_bn.bias.copy_(b), torch_bn.running_mean.copy_(rm)
        torch_bn.running_var.copy_(rv)
    ours = bnorm_ext.BatchNormAct2d(5, activation=activation, negative_slope=SLOPE).double().train(training)
    ours.load_state_dict(torch_bn.state_dict())
    primals = (x, r) if has_residual else (x,)
    tangents = tuple(torch.randn_like(t) for t in primals)

    def reference(x, *residual):
        stats = (None, None) if training else (rm, rv)
        return composed(x, *stats, w, b, training, activation, residual[0] if residual else None)

    out, tangent = torch.func.jvp(ours, primals, tangents)
    out_ref, tangent_ref = torch.func.jvp(reference, primals, tangents)
    assert_close(out, out_ref, 1e-12, 1e-12, "output")
    assert_close(tangent, tangent_ref, 1e-11, 1e-11, "output tangent")
    assert tangent.abs().max() > 1e-3
    torch_bn(x)  # the running stats: one update, as the eager call makes
    for name, value in torch_bn.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, msg=name)


# Tolerances of low-precision results against a float64 reference computed
# from the same (rounded) inputs: a few ulps of the output dtype.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("param_float32", [False, True], ids=["params_same", "params_float32"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["relu", "silu", "leaky_relu"])
@pytest.mark.parametrize("dtype", dtypes)
@pytest.mark.parametrize("device", devices)
def test_dtypes_and_layouts(device, dtype, activation, training, memory_format, param_float32):
    if param_float32 and dtype not in (torch.float16, torch.bfloat16):
        pytest.skip("float32 params only beside half input")
    pdt = torch.float32 if param_float32 else dtype
    shape = (4, 8, 5, 6)
    x, w, b, r, rm, rv = make_case(shape, dtype, device, memory_format, param_dtype=pdt)
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    rm_ref, rv_ref = rm.double(), rv.double()
    out = bnorm_ext.batch_norm_act(x, rm, rv, w, b, training, 0.1, EPS, activation, SLOPE, r)
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
    d = [t.detach().double().requires_grad_() for t in leaves]
    ref = composed(d[0], rm_ref, rv_ref, d[1], d[2], training, activation, d[3])
    tol = TOL[dtype]
    # NB: relative to the output's scale (BN's output is O(1); silu(5) ~ 5).
    assert_close(out.double(), ref.detach(), tol * 4, tol, "output")
    if training:
        assert_close(rm.double(), rm_ref, TOL[pdt], TOL[pdt], "running_mean")
        assert_close(rv.double(), rv_ref, TOL[pdt], TOL[pdt], "running_var")
    g = torch.randn(shape, dtype=torch.float64).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, g)
    grads_ref = torch.autograd.grad(ref, d, g.double())
    for name, ours, theirs, leaf in zip(["input", "weight", "bias", "residual"], grads, grads_ref, leaves):
        assert ours.dtype == leaf.dtype, name
        scale = theirs.abs().max().item()
        assert_close(ours.double(), theirs, tol * 8 * max(scale, 1.0), tol * 4, f"grad {name}")


# ---------------------------------------------------------------------------
# CUDA kernels against the CPU kernels (the reference semantics) and torch
# ---------------------------------------------------------------------------
def fused_step(x, w, b, r, rm, rv, g, training, activation, slope=SLOPE):
    """The fused ops as the autograd kernel calls them: the forward, then the
    backward with what it saves (the output for relu/leaky_relu, the residual
    for silu). Returns the forward's results, then the four gradients."""
    ops = torch.ops.bnorm_ext
    if training:
        nbt = torch.tensor(2, device=x.device)
        y, mean, invstd = ops.batch_norm_act_forward_train(x, w, b, rm, rv, nbt, 0.1, EPS, r, activation, slope)
        forward = [y, mean, invstd, rm, rv, nbt]
        stats = (None, None, mean, invstd)
    else:
        y = ops.batch_norm_act_forward_eval(x, w, b, rm, rv, EPS, r, activation, slope)
        forward = [y]
        stats = (rm, rv, None, None)
    saved_y = y if activation in ("relu", "leaky_relu") else None
    saved_r = r if activation == "silu" else None
    grads = ops.batch_norm_act_backward(
        g, saved_y, x, w, b, *stats, saved_r, training, EPS, r is not None, activation, slope
    )
    return forward + list(grads)


STEP_RESULTS = {
    True: ["output", "save_mean", "save_invstd", "running_mean", "running_var", "num_batches_tracked"],
    False: ["output"],
}
GRAD_NAMES = ["grad_input", "grad_weight", "grad_bias", "grad_residual"]
# CUDA (acc dtype float32 for float32/bfloat16/float16) against the CPU kernels
# (float64 sums): relative to max(1, |reference|).
CPU_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_cuda_matches_cpu(cuda_results, cpu_results, names, dtype):
    for name, ours, ref in zip(names, cuda_results, cpu_results):
        assert ours.device.type == "cuda", name
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (name, ours.dtype, ref.dtype, ours.shape, ref.shape)
        if ours.dtype == torch.long:
            assert torch.equal(ours.cpu(), ref), name
            continue
        if ref.dim() == 4:
            fmt = torch.channels_last if not ref.is_contiguous() else torch.contiguous_format
            assert ours.is_contiguous(memory_format=fmt), f"{name}: strides {ours.stride()} vs CPU {ref.stride()}"
        tol = CPU_TOL[dtype] * (4 if name in ("grad_weight", "grad_bias") else 1)
        scale = max(1.0, ref.double().abs().max().item()) if ref.numel() else 1.0
        assert_close(ours.cpu().double(), ref.double(), tol * scale, tol, f"{name} (CUDA vs CPU)")


# L = 24 and C = 16: 16-byte vectors for every dtype in both layouts; L = 21, C = 5: scalars.
CUDA_SHAPES = [pytest.param((4, 16, 4, 6), id="vectorised"), pytest.param((3, 5, 7, 3), id="scalar")]


@requires_cuda
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("has_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", dtypes)
def test_cuda_matches_cpu_kernels_and_torch(dtype, memory_format, activation, has_residual, shape, cuda_path):
    # Training (on the single-read or the two-pass kernels) and eval, forward and backward:
    # the CUDA ops against the CPU ops on the same data, and against torch's composed ops.
    from bnorm_ext import _C

    pdt = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x, w, b, r, rm, rv = make_case(shape, dtype, "cpu", memory_format, param_dtype=pdt, residual=has_residual)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    cpu = [x, w, b, r, rm, rv, g]
    for training in (True, False):
        host = [t.clone() if t is not None else None for t in cpu]
        dev = [t.cuda() if t is not None else None for t in cpu]
        launches = _C._single_read_launches()
        ours = fused_step(*dev, training, activation)
        torch.cuda.synchronize()
        if training:
            # forward and backward each take the single-read kernel where it is allowed
            assert _C._single_read_launches() - launches == (2 if cuda_path == "single_read" else 0)
        ref = fused_step(*host, training, activation)
        assert_cuda_matches_cpu(ours, ref, STEP_RESULTS[training] + GRAD_NAMES, dtype)
        # torch's composed ops on the same (rounded) data, in float64
        d = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, r)]
        out = composed(d[0], rm.double(), rv.double(), d[1], d[2], training, activation, d[3])
        leaves = [t for t in d if t is not None]
        theirs = torch.autograd.grad(out, leaves, g.double())
        n = len(STEP_RESULTS[training])
        tol = TOL[dtype]
        assert_close(ours[0].cpu().double(), out.detach(), tol * 4 * max(1.0, out.abs().max().item()), tol, "output")
        for name, mine, th in zip(GRAD_NAMES, ours[n : n + 3] + ([ours[n + 3]] if has_residual else []), theirs):
            assert_close(mine.cpu().double(), th, tol * 8 * max(1.0, th.abs().max().item()), tol * 4, name)
        if not has_residual:
            assert ours[n + 3].shape == (0,)


@requires_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_cuda_misaligned_tensors(dtype, memory_format, activation, cuda_path):
    # Every input-sized tensor one element past a 16-byte boundary (the scalar paths), in turn
    # and all at once: the same results as the CPU kernels.
    shape = (4, 16, 4, 6)
    pdt = torch.float32
    x, w, b, r, rm, rv = make_case(shape, dtype, "cpu", memory_format, param_dtype=pdt)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)
    for training in (True, False):
        ref = fused_step(x, w, b, r, rm.clone(), rv.clone(), g, training, activation)
        for which in ("x", "residual", "grad_out", "all"):
            dev = {k: t.cuda() for k, t in dict(x=x, residual=r, grad_out=g).items()}
            for k in dev:
                if which in (k, "all"):
                    dev[k] = misaligned_copy(dev[k])
            ours = fused_step(
                dev["x"],
                w.cuda(),
                b.cuda(),
                dev["residual"],
                rm.cuda(),
                rv.cuda(),
                dev["grad_out"],
                training,
                activation,
            )
            assert_cuda_matches_cpu(ours, ref, STEP_RESULTS[training] + GRAD_NAMES, dtype)


@requires_cuda
@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_cuda_misaligned_saved_output(activation):
    # relu / leaky_relu read the saved output in the backward: misaligned, the scalar path.
    x, w, b, r, rm, rv = make_case((4, 16, 4, 6), torch.float32, "cuda", torch.contiguous_format)
    g = torch.randn_like(x)
    y, mean, invstd = torch.ops.bnorm_ext.batch_norm_act_forward_train(
        x, w, b, None, None, None, 0.1, EPS, r, activation, SLOPE
    )
    args = (x, w, b, None, None, mean, invstd, None, True, EPS, True, activation, SLOPE)
    aligned = torch.ops.bnorm_ext.batch_norm_act_backward(g, y, *args)
    misaligned = torch.ops.bnorm_ext.batch_norm_act_backward(g, misaligned_copy(y), *args)
    for name, a, m in zip(GRAD_NAMES, aligned, misaligned):
        torch.testing.assert_close(m, a, rtol=1e-5, atol=1e-5, msg=lambda msg: f"{name}: {msg}")


@requires_cuda
@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_bitwise_reproducible(dtype, memory_format, activation, cuda_path):
    # No float atomics: the same call gives the same bits, here with several blocks per channel.
    x, w, b, r, rm, rv = make_case((32, 24, 20, 20), dtype, "cuda", memory_format, param_dtype=torch.float32)
    g = torch.randn_like(x)
    for training in (True, False):
        first = fused_step(x, w, b, r, rm.clone(), rv.clone(), g, training, activation)
        second = fused_step(x, w, b, r, rm.clone(), rv.clone(), g, training, activation)
        for name, a, c in zip(STEP_RESULTS[training] + GRAD_NAMES, first, second):
            assert torch.equal(a, c), name


@pytest.mark.parametrize("device", devices)
def test_empty_batch_and_bad_arguments_leave_running_stats(device):
    x, w, b, r, rm, rv = make_case((2, 3, 4, 4), torch.float32, device, torch.contiguous_format)
    nbt = torch.tensor(0, device=device)
    saved = (rm.clone(), rv.clone())
    op = torch.ops.bnorm_ext.batch_norm_act_forward_train
    with pytest.raises(ValueError, match="expected activation 'identity', 'relu', 'leaky_relu' or 'silu', got 'gelu'"):
        op(x, w, b, rm, rv, nbt, 0.1, EPS, r, "gelu", 0.0)
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        op(x, w, b, rm, rv, nbt, 0.1, EPS, r, "leaky_relu", -0.1)
    with pytest.raises(RuntimeError, match="expected residual of the input's size"):
        op(x, w, b, rm, rv, nbt, 0.1, EPS, r[:1], "relu", 0.0)
    with pytest.raises(RuntimeError, match="expected residual of the input's dtype"):
        op(x, w, b, rm, rv, nbt, 0.1, EPS, r.double(), "relu", 0.0)
    with pytest.raises(ValueError, match="activation must be"):
        bnorm_ext.batch_norm_act(x, rm, rv, w, b, True, activation="tanh")
    with pytest.raises(ValueError, match="negative_slope >= 0"):
        bnorm_ext.BatchNormAct2d(3, activation="leaky_relu", negative_slope=-1.0)
    assert torch.equal(rm, saved[0]) and torch.equal(rv, saved[1]) and nbt.item() == 0
    with pytest.raises(RuntimeError, match="reads its derivative from output, which is None"):
        torch.ops.bnorm_ext.batch_norm_act_backward(
            x, None, x, w, b, rm, rv, None, None, None, False, EPS, False, "relu", 0.0
        )
    empty = torch.empty(0, 3, 4, 4, device=device)
    out = bnorm_ext.batch_norm_act(empty, rm, rv, w, b, False, residual=torch.empty(0, 3, 4, 4, device=device))
    assert out.shape == empty.shape
    # training on an empty batch: running stats untouched, num_batches_tracked counts (as torch)
    out = op(empty, w, b, rm, rv, nbt, 0.1, EPS, empty, "silu", 0.0)[0]
    assert out.shape == empty.shape and nbt.item() == 1
    assert torch.equal(rm, saved[0]) and torch.equal(rv, saved[1])
    grads = torch.ops.bnorm_ext.batch_norm_act_backward(
        empty,
        out,
        empty,
        w,
        b,
        None,
        None,
        torch.zeros(3, device=device),
        torch.ones(3, device=device),
        empty,
        True,
        EPS,
        True,
        "relu",
        0.0,
    )
    assert [tuple(g.shape) for g in grads] == [(0, 3, 4, 4), (3,), (3,), (0, 3, 4, 4)]
    assert not grads[1].any() and not grads[2].any()


@pytest.mark.parametrize("device", devices)
def test_nan_propagates_like_torch(device):
    x, w, b, r, rm, rv = make_case((2, 3, 4, 4), torch.float64, device, torch.contiguous_format)
    r[0, 1, 2, 2] = float("nan")
    for activation in ACTIVATIONS:
        out = bnorm_ext.batch_norm_act(x, rm, rv, w, b, False, activation=activation, negative_slope=SLOPE, residual=r)
        ref = composed(x, rm, rv, w, b, False, activation, r)
        torch.testing.assert_close(out, ref, equal_nan=True)
        assert out.isnan().sum() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", devices)
def test_silu_extreme_pre_activations_like_torch(device, dtype):
    # silu's exponential in float (the CPU kernels' own, branch-free one) at and past its range
    # limits: overflow, subnormal and zero results, +-Inf and NaN, forward and backward.
    specials = [
        float("nan"),
        float("inf"),
        -float("inf"),
        1e30,
        -1e30,
        120.0,
        -120.0,
        104.5,
        -104.5,
        103.0,
        -103.0,
        89.0,
        -89.0,
        88.72,
        -88.72,
        87.5,
        -87.5,
        80.0,
        -80.0,
        20.0,
        -20.0,
        1e-3,
        -1e-3,
        0.0,
    ]
    x, w, b, _, rm, rv = make_case((2, 4, 5, 5), torch.float32, device, torch.contiguous_format)
    x, rm, rv, w, b = (t.to(dtype) for t in (x, rm, rv, w, b))
    r = torch.zeros_like(x)
    r.view(-1)[: len(specials)] = torch.tensor(specials, dtype=dtype)
    r.view(-1)[len(specials) :] = torch.linspace(-110, 100, r.numel() - len(specials), dtype=dtype)
    # Reference in float32 (bfloat16: the fused op rounds once, at the end).
    y_bn = F.batch_norm(x.float(), rm.float(), rv.float(), w.float(), b.float(), False, 0.1, EPS)
    z = (y_bn + r.float()).requires_grad_()
    ref = F.silu(z)
    r_ = r.clone().requires_grad_()
    out = bnorm_ext.batch_norm_act(x, rm, rv, w, b, False, eps=EPS, activation="silu", residual=r_)
    tol = dict(rtol=1e-5, atol=1e-30) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-30)
    torch.testing.assert_close(out, ref.to(dtype), equal_nan=True, **tol)
    assert torch.equal(out.isnan(), ref.isnan())
    dy = torch.randn_like(out)
    (g_ref,) = torch.autograd.grad(ref, z, dy.float())
    g_ref = g_ref.to(dtype)
    (g_r,) = torch.autograd.grad(out, r_, dy)
    torch.testing.assert_close(g_r, g_ref, equal_nan=True, **tol)
    assert torch.equal(g_r.isnan(), g_ref.isnan())


def test_residual_broadcast_falls_back_to_torch_add():
    x, w, b, _, rm, rv = make_case((2, 3, 4, 4), torch.float64, "cpu", torch.contiguous_format)
    r = torch.randn(3, 1, 1, dtype=torch.float64)
    out = bnorm_ext.batch_norm_act(x, rm, rv, w, b, False, activation="relu", residual=r)
    torch.testing.assert_close(out, composed(x, rm, rv, w, b, False, "relu", r))


def test_saved_tensors_no_more_than_torch():
    # relu: input, output (+ weight, stats); silu: input, residual (+ weight, bias, stats):
    # as many input-sized tensors as torch's composed BN -> add -> act saves.
    def big_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(1 for n in sizes if n == 2 * 8 * 4 * 4)

    for activation in ["relu", "silu"]:
        x, w, b, r, rm, rv = make_case((2, 8, 4, 4), torch.float32, "cpu", torch.contiguous_format)
        x.requires_grad_()
        r.requires_grad_()
        ours = big_saved(lambda: bnorm_ext.batch_norm_act(x, rm, rv, w, b, True, activation=activation, residual=r))
        theirs = big_saved(lambda: composed(x, rm, rv, w, b, True, activation, r))
        assert ours <= theirs, (activation, ours, theirs)


def test_module_state_dict_repr_script_and_fx():
    torch_bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        torch_bn.weight.uniform_(0.5, 1.5)
        torch_bn.bias.uniform_(-1, 1)
        torch_bn.running_mean.uniform_(-1, 1)
        torch_bn.num_batches_tracked.fill_(7)
    ours = bnorm_ext.BatchNormAct2d(6, activation="leaky_relu", negative_slope=0.1)
    assert isinstance(ours, bnorm_ext.BatchNorm2d)
    assert list(ours.state_dict()) == list(torch_bn.state_dict())
    ours.load_state_dict(torch_bn.state_dict())
    back = nn.BatchNorm2d(6)
    back.load_state_dict(ours.state_dict())
    for k, v in torch_bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert "activation=leaky_relu, negative_slope=0.1" in repr(ours)
    assert re.search(r"activation=silu\)", repr(bnorm_ext.BatchNormAct2d(4, activation="silu")))

    x = randn_shifted((2, 6, 5, 5))
    r = torch.randn(2, 6, 5, 5)
    for training in (True, False):
        ours.train(training)
        torch_bn.train(training)
        a, b_ = copy.deepcopy(ours), copy.deepcopy(torch_bn)
        out = a(x, r)
        ref = F.leaky_relu(b_(x) + r, 0.1)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.running_var, b_.running_var)
        assert a.num_batches_tracked.item() == b_.num_batches_tracked.item()
        scripted = torch.jit.script(copy.deepcopy(ours))
        torch.testing.assert_close(scripted(x, r), copy.deepcopy(ours)(x, r))
        torch.testing.assert_close(scripted(x), copy.deepcopy(ours)(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bnorm_ext.BatchNormAct2d(6, activation="silu")

        def forward(self, x, r):
            return self.bn(x, r) + 1

    traced = torch.fx.symbolic_trace(Net())
    calls = [n for n in traced.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["bn"] and len(calls[0].args) == 2
    traced.eval()
    torch.testing.assert_close(traced(x, r), F.silu(F.batch_norm(x, torch.zeros(6), torch.ones(6), eps=1e-5) + r) + 1)


# ---------------------------------------------------------------------------
# fusion pass
# ---------------------------------------------------------------------------
def fused_calls(gm):
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and type(modules[n.target]) is bnorm_ext.BatchNormAct2d]


def check_fused_model(model, x, expected_calls, activations=None, residual_calls=None):
    """fuse_activations(model) against bnorm_ext's unfused model (same kernels for BN):
    the fused-call count, state_dict keys, train outputs, every gradient and the
    running stats, then eval outputs."""
    # NB: the BatchNorms left unfused run the same kernels in both models.
    model = bnorm_ext.convert_batchnorm(model).train()
    reference = copy.deepcopy(model)
    fused = bnorm_ext.fuse_activations(model, inplace=True)
    calls = fused_calls(fused)
    assert len(calls) == expected_calls
    if residual_calls is not None:
        assert sum(len(n.args) == 2 for n in calls) == residual_calls
    if activations is not None:
        modules = dict(fused.named_modules())
        assert {modules[n.target].activation for n in calls} == activations
    assert list(fused.state_dict()) == list(reference.state_dict())
    out = fused(x)
    ref = reference(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=1e-5 * scale, rtol=1e-4)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    fused_params = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        q = fused_params[name]
        gscale = p.grad.abs().max().item()
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4 * gscale, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    fused_buffers = dict(fused.named_buffers())
    for name, buf in reference.named_buffers():
        torch.testing.assert_close(fused_buffers[name], buf, atol=1e-5, rtol=1e-4)
    fused.eval()
    reference.eval()
    with torch.no_grad():
        out, ref = fused(x), reference(x)
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-4)
    return fused


@pytest.mark.parametrize("arch,calls,residual_calls", [("resnet18", 17, 8), ("resnet50", 49, 16)])
def test_fuse_torchvision_resnet(arch, calls, residual_calls):
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, arch)(num_classes=10)
    x = randn_shifted((2, 3, 32, 32), scale=1.0, shift=0.5)
    check_fused_model(copy.deepcopy(model), x, calls, {"relu"}, residual_calls)
    # torch's BatchNorm2d modules are fused as they are (the fused ones become ours).
    fused = bnorm_ext.fuse_activations(copy.deepcopy(model), inplace=True).eval()
    assert len(fused_calls(fused)) == calls
    with torch.no_grad():
        ref = model.eval()(x)
        torch.testing.assert_close(fused(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)


class SiLUBlock(nn.Module):
    """MobileNetV2/EfficientNet-style inverted residual with SiLU, plus the
    functional and in-place spellings and a BN that must stay unfused."""

    def __init__(self, c=8, hidden=16):
        super().__init__()
        self.expand = nn.Conv2d(c, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act1 = nn.SiLU(inplace=True)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.conv4 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c)
        self.conv5 = nn.Conv2d(c, c, 1, bias=False)
        self.bn5 = bnorm_ext.BatchNorm2d(c)
        self.conv6 = nn.Conv2d(c, c, 1, bias=False)
        self.bn6 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = self.act1(self.bn1(self.expand(x)))
        h = F.silu(self.bn2(self.dw(h)))
        h = self.bn3(self.project(h))
        y = torch.add(x, h)  # BN -> add without activation: stays unfused
        z = F.leaky_relu(self.bn4(self.conv4(y)), 0.1, inplace=True)
        b5 = self.bn5(self.conv5(z))
        w = F.relu(b5) + b5  # BN output with another user: stays unfused
        v = torch.add(y, self.bn6(self.conv6(w)))  # residual first; resnet has `bn_out += residual`
        return F.silu(v)


def test_fuse_silu_block():
    x = randn_shifted((2, 8, 10, 10), scale=1.0, shift=0.5)
    fused = check_fused_model(SiLUBlock(), x, 4, {"silu", "leaky_relu"}, residual_calls=1)
    modules = dict(fused.named_modules())
    assert type(modules["bn3"]) is bnorm_ext.BatchNorm2d and type(modules["bn5"]) is bnorm_ext.BatchNorm2d
    assert modules["bn4"].negative_slope == 0.1


@pytest.mark.parametrize("isa", ["native", "avx2", "default"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("shape", [(4, 16, 6, 7), (3, 4, 10, 12)], ids=["channel_fused", "two_pass"])
def test_instruction_set_builds_and_thread_count(shape, memory_format, isa, monkeypatch):
    # Every kernel build computes the same function; results do not depend on the thread count.
    if isa == "native":
        monkeypatch.delenv("BNORM_EXT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("BNORM_EXT_CPU_ISA", isa)
    x, w, b, r, _, _ = make_case(shape, torch.float32, "cpu", memory_format)
    dy = torch.randn(shape).contiguous(memory_format=memory_format)
    ops = torch.ops.bnorm_ext
    for activation in ["silu", "leaky_relu"]:

        def run():
            y, mean, invstd = ops.batch_norm_act_forward_train(
                x, w, b, None, None, None, 0.1, EPS, r, activation, SLOPE
            )
            saved_y = y if activation == "leaky_relu" else None
            saved_r = r if activation == "silu" else None
            grads = ops.batch_norm_act_backward(
                dy, saved_y, x, w, b, None, None, mean, invstd, saved_r, True, EPS, True, activation, SLOPE
            )
            return (y,) + grads

        results = run()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            single = run()
        finally:
            torch.set_num_threads(threads)
        for a, b_ in zip(results, single):
            assert torch.equal(a, b_)
        d = [t.double().requires_grad_() for t in (x, w, b, r)]
        ref = composed(d[0], None, None, d[1], d[2], True, activation, d[3])
        torch.testing.assert_close(results[0].double(), ref.detach(), rtol=1e-5, atol=2e-5)
        grads_ref = torch.autograd.grad(ref, d, dy.double())
        for ours, theirs in zip(results[1:], (grads_ref[0], grads_ref[1], grads_ref[2], grads_ref[3])):
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", devices)
def test_residual_and_grad_in_other_layouts(device, training):
    # The residual (and grad_out) may have any strides; the output has the input's layout.
    x, w, b, _, rm, rv = make_case((3, 8, 5, 6), torch.float64, device, torch.channels_last)
    r = torch.randn(3, 8, 5, 12, dtype=torch.float64, device=device)[..., ::2]  # non-dense view
    leaves = [t.requires_grad_() for t in (x, w, b, r)]
    out = bnorm_ext.batch_norm_act(x, rm.clone(), rv.clone(), w, b, training, activation="silu", residual=r)
    ref = composed(x, rm.clone(), rv.clone(), w, b, training, "silu", r)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, 1e-12, 1e-12, "output")
    g = torch.randn(3, 8, 6, 5, dtype=torch.float64, device=device).transpose(2, 3)
    for name, ours, theirs in zip("xwbr", torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        assert_close(ours, theirs, 1e-11, 1e-11, f"grad {name}")


def test_torch_compile_fullgraph_module_train():
    # The fused module under torch.compile(fullgraph=True): forward, every gradient and the
    # running stats as in eager (the same kernels run).
    eager = bnorm_ext.BatchNormAct2d(8, activation="silu")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = randn_shifted((4, 8, 6, 6)).requires_grad_()
    r = torch.randn(4, 8, 6, 6, requires_grad=True)
    y_eager, y_compiled = eager(x, r), compiled(x, r)
    torch.testing.assert_close(y_compiled, y_eager)
    g = torch.randn_like(y_eager)
    grads_eager = torch.autograd.grad(y_eager, [x, r, eager.weight, eager.bias], g)
    grads_compiled = torch.autograd.grad(y_compiled, [x, r, compiled_module.weight, compiled_module.bias], g)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
