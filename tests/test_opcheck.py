"""torch.library.opcheck on every torch.ops.bnorm_ext op listed in the spec."""

import pytest
import torch

import bnorm_ext  # noqa: F401  (registers the ops)
from common_utils import acc_dtype_for, devices, memory_formats, randn_shifted

OP_NAMES = [
    "batch_norm_stats",
    "batch_norm_gather_stats",
    "batch_norm_elemt",
    "batch_norm_forward_train",
    "batch_norm_forward_eval",
    "batch_norm_backward",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
    "batch_norm_forward_jvp",
    "batch_norm_act_forward_train",
    "batch_norm_act_forward_eval",
    "batch_norm_act_backward",
]
# Differentiable as ops; the SyncBatchNorm building blocks raise when differentiated.
DIFFERENTIABLE_OPS = {
    "batch_norm_forward_train",
    "batch_norm_forward_eval",
    "batch_norm_backward",
    "batch_norm_forward_jvp",
    "batch_norm_act_forward_train",
    "batch_norm_act_forward_eval",
    "batch_norm_act_backward",
}

DTYPE_CASES = [
    pytest.param(torch.float64, torch.float64, id="float64"),
    pytest.param(torch.float32, torch.float32, id="float32"),
    pytest.param(torch.float16, torch.float16, id="float16"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float16, torch.float32, id="float16-params_float32"),
]

C = 5
SHAPE = (3, C, 4, 6)
EPS = 1e-3


def _op(name):
    return getattr(torch.ops.bnorm_ext, name).default


def _has_autograd_kernel(op):
    name = op.name()
    return any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, k)
        for k in ("Autograd", "AutogradCPU", "AutogradCUDA", "CompositeImplicitAutograd")
    )


def make_args(name, dtype, pdt, memory_format, device, variant, shape=SHAPE):
    """Fresh, realistic arguments for op `name` (new buffers on every call)."""
    acc = acc_dtype_for(dtype)
    x = randn_shifted(shape, dtype, device, memory_format=memory_format)
    dy = torch.randn(shape, dtype=torch.float64).to(device, dtype).contiguous(memory_format=memory_format)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).to(device, pdt)
    b = torch.randn(C, dtype=torch.float64).to(device, pdt)
    rm = torch.randn(C, dtype=torch.float64).to(device, pdt)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, pdt)
    nbt = torch.tensor(4, dtype=torch.long, device=device)
    xd = x.double()
    mean = xd.mean(dim=(0, 2, 3)).to(device, acc)
    invstd = (1 / torch.sqrt(xd.var(dim=(0, 2, 3), unbiased=False) + EPS)).to(device, acc)
    none_params = variant == "no_affine"

    if name == "batch_norm_stats":
        return (x,)
    if name == "batch_norm_gather_stats":
        P = 3
        mean_p = mean.unsqueeze(0) + 0.1 * torch.randn(P, C, dtype=torch.float64).to(device, acc)
        var_p = (0.5 + torch.rand(P, C, dtype=torch.float64)).to(device, acc)
        counts = torch.tensor([24.0, 48.0, 12.0], dtype=acc, device=device)
        rm_a = rm.to(acc)
        rv_a = rv.to(acc)
        if variant == "no_running_stats":
            return (mean_p, var_p, counts, None, None, None, 0.1, EPS)
        if variant == "momentum_none":
            return (mean_p, var_p, counts, rm_a, rv_a, nbt, None, EPS)
        return (mean_p, var_p, counts, rm_a, rv_a, nbt, 0.1, EPS)
    if name == "batch_norm_elemt":
        return (x, None if none_params else w, None if none_params else b, mean, invstd)
    if name == "batch_norm_forward_train":
        if variant == "no_running_stats":
            return (x, w, b, None, None, None, 0.1, EPS)
        if variant == "momentum_none":
            return (x, w, b, rm, rv, nbt, None, EPS)
        if none_params:
            return (x, None, None, rm, rv, nbt, 0.1, EPS)
        return (x, w, b, rm, rv, nbt, 0.1, EPS)
    if name == "batch_norm_forward_eval":
        return (x, None if none_params else w, None if none_params else b, rm, rv, EPS)
    if name == "batch_norm_backward":
        if variant == "eval":
            return (dy, x, None if none_params else w, rm, rv, None, None, False, EPS)
        return (dy, x, None if none_params else w, None, None, mean, invstd, True, EPS)
    if name == "batch_norm_backward_reduce":
        return (dy, x, mean)
    if name == "batch_norm_backward_elemt":
        sum_dy = dy.double().sum(dim=(0, 2, 3)).to(acc)
        sum_dy_xmu = (dy.double() * (xd - mean.double().view(1, C, 1, 1))).sum(dim=(0, 2, 3)).to(acc)
        counts = torch.tensor([float(x.numel() // C)], dtype=acc, device=device)
        return (dy, x, mean, invstd, None if none_params else w, sum_dy, sum_dy_xmu, counts)
    if name == "batch_norm_forward_jvp":
        x_t = torch.randn(shape, dtype=torch.float64).to(device, dtype).contiguous(memory_format=memory_format)
        w_t = None if none_params else torch.randn(C, dtype=torch.float64).to(device, pdt)
        b_t = None if none_params else torch.randn(C, dtype=torch.float64).to(device, pdt)
        training = variant != "eval"
        return (x, x_t, None if none_params else w, w_t, b_t, mean if training else rm.to(acc), invstd, training)
    if name.startswith("batch_norm_act_"):
        # variant "<activation>[_no_residual][_no_affine][_eval]"; default: relu with a residual
        activation = (
            next(a for a in ("leaky_relu", "relu", "silu", "identity") if variant.startswith(a))
            if variant != "default"
            else "relu"
        )
        slope = 0.1 if activation == "leaky_relu" else 0.0
        r = (
            None
            if "no_residual" in variant
            else torch.randn(shape, dtype=torch.float64).to(device, dtype).contiguous(memory_format=memory_format)
        )
        wa, ba = (None, None) if "no_affine" in variant else (w, b)
        if name == "batch_norm_act_forward_train":
            return (x, wa, ba, rm, rv, nbt, 0.1, EPS, r, activation, slope)
        if name == "batch_norm_act_forward_eval":
            return (x, wa, ba, rm, rv, EPS, r, activation, slope)
        training = "eval" not in variant
        y = (
            torch.ops.bnorm_ext.batch_norm_act_forward_train(
                x, wa, ba, None, None, None, 0.1, EPS, r, activation, slope
            )[0]
            if training
            else torch.ops.bnorm_ext.batch_norm_act_forward_eval(x, wa, ba, rm, rv, EPS, r, activation, slope)
        )
        y = y if activation in ("relu", "leaky_relu") else None
        r_saved = r if activation == "silu" else None
        stats = (None, None, mean, invstd) if training else (rm, rv, None, None)
        return (dy, y, x, wa, ba, *stats, r_saved, training, EPS, r is not None, activation, slope)
    raise AssertionError(name)


VARIANTS = {
    "batch_norm_stats": ["default"],
    "batch_norm_gather_stats": ["default", "momentum_none", "no_running_stats"],
    "batch_norm_elemt": ["default", "no_affine"],
    "batch_norm_forward_train": ["default", "momentum_none", "no_running_stats", "no_affine"],
    "batch_norm_forward_eval": ["default", "no_affine"],
    "batch_norm_backward": ["default", "eval", "no_affine"],
    "batch_norm_backward_reduce": ["default"],
    "batch_norm_backward_elemt": ["default", "no_affine"],
    "batch_norm_forward_jvp": ["default", "eval", "no_affine"],
    "batch_norm_act_forward_train": ["default", "silu", "leaky_relu_no_residual", "identity_no_affine"],
    "batch_norm_act_forward_eval": ["default", "silu_no_affine", "leaky_relu_no_residual"],
    "batch_norm_act_backward": ["default", "silu", "silu_no_residual_eval", "leaky_relu_eval", "identity_no_affine"],
}
VARIANT_DTYPE_IDS = ("float32", "float16-params_float32")  # non-default variants: these dtypes only
CASES = [
    pytest.param(dt.values[0], dt.values[1], n, v, id=f"{dt.id}-{n}-{v}")
    for dt in DTYPE_CASES
    for n in OP_NAMES
    for v in VARIANTS[n]
    if v == "default" or dt.id in VARIANT_DTYPE_IDS
]


def test_all_spec_ops_registered():
    for name in OP_NAMES:
        assert hasattr(torch.ops.bnorm_ext, name), name
        _op(name)


def _run_opcheck(op, args):
    result = torch.library.opcheck(op, args, raise_exception=False)
    failures = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not failures, f"opcheck failures for {op}: {failures}"


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype,pdt,name,variant", CASES)
@pytest.mark.parametrize("device", devices)
def test_opcheck(device, dtype, pdt, name, variant, memory_format):
    op = _op(name)
    args = make_args(name, dtype, pdt, memory_format, device, variant)
    _run_opcheck(op, args)
    assert _has_autograd_kernel(op)
    if name in DIFFERENTIABLE_OPS:
        # the op claims autograd support: also check it with inputs that require grad
        args = make_args(name, dtype, pdt, memory_format, device, variant)
        args = tuple(
            a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() == 4 else a
            for a in args
        )
        _run_opcheck(op, args)


@pytest.mark.parametrize("name", sorted(set(OP_NAMES) - DIFFERENTIABLE_OPS))
def test_non_differentiable_ops_raise(name):
    # Reverse mode raises at backward, forward mode at the call: never a silent zero or None.
    op = _op(name)
    args = make_args(name, torch.float64, torch.float64, torch.contiguous_format, "cpu", "default")
    index = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point())
    leaf = args[index].clone().requires_grad_()
    out = op(*args[:index], leaf, *args[index + 1 :])
    out = out[0] if isinstance(out, tuple) else out
    with pytest.raises(RuntimeError, match="derivative for bnorm_ext::.* is not implemented"):
        out.sum().backward()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(args[index], torch.ones_like(args[index]))
        with pytest.raises(RuntimeError, match="forward AD"):
            op(*args[:index], dual, *args[index + 1 :])


# Strides Inductor may hand the ops (they are tagged flexible_layout): each
# input-shaped argument gets its own layout. "input" is the op's `input`;
# "other" every other input-shaped tensor (grad_out, residual, output, input_t).
def _hw_swapped(t):
    return t.transpose(2, 3).contiguous().transpose(2, 3)  # dense, H and W strides swapped


def _sliced(t):
    wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]  # not dense


def _expanded(t):
    return t[:1].expand_as(t)  # stride 0 over N, as the gradient of a broadcast


LAYOUTS = {
    "contiguous": lambda t: t.contiguous(),
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "hw_swapped": _hw_swapped,
    "sliced": _sliced,
    "expanded": _expanded,
}
STRIDE_CASES = [  # (id, shape, layout of input, layout of the others)
    ("cl_input-contiguous_others", SHAPE, "channels_last", "contiguous"),
    ("contiguous_input-cl_others", SHAPE, "contiguous", "channels_last"),
    ("cl_input-sliced_others", SHAPE, "channels_last", "sliced"),
    ("sliced_input-cl_others", SHAPE, "sliced", "channels_last"),
    ("hw_swapped_input-expanded_others", SHAPE, "hw_swapped", "expanded"),
    ("cl_input-expanded_others", SHAPE, "channels_last", "expanded"),
    ("1x1_cl_input-contiguous_others", (4, C, 1, 1), "channels_last", "contiguous"),
    ("n1_w1_cl_input-hw_swapped_others", (1, C, 3, 1), "channels_last", "hw_swapped"),
    ("n1_cl_input-cl_others", (1, C, 2, 3), "channels_last", "channels_last"),
]
STRIDE_VARIANTS = {
    "batch_norm_act_forward_train": ["default", "silu"],
    "batch_norm_act_forward_eval": ["default", "silu_no_affine"],
    "batch_norm_act_backward": ["default", "silu", "identity_no_affine", "leaky_relu_eval"],
    "batch_norm_backward": ["default", "eval"],
}


def _restride(op, args, shape, input_layout, other_layout):
    names = [a.name for a in op._schema.arguments]
    return tuple(
        LAYOUTS[input_layout if name == "input" else other_layout](a)
        if isinstance(a, torch.Tensor) and a.shape == shape
        else a
        for name, a in zip(names, args)
    )


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("case_id,shape,input_layout,other_layout", STRIDE_CASES, ids=[c[0] for c in STRIDE_CASES])
@pytest.mark.parametrize(
    "name,variant",
    [
        pytest.param(n, v, id=f"{n}-{v}")
        for n in OP_NAMES
        if n != "batch_norm_gather_stats"
        for v in STRIDE_VARIANTS.get(n, ["default"])
    ],
)
def test_fake_strides_equal_real_strides_for_any_input_strides(
    name, variant, case_id, shape, input_layout, other_layout
):
    # Inductor trusts the fake kernels' output strides (the ops are
    # flexible_layout), so they must be the real kernels' for any strides;
    # and the values must not depend on the strides the kernels read.
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = _op(name)

    def fresh_args():  # the same values each time (the ops update running statistics)
        torch.manual_seed(7)
        args = make_args(name, torch.float64, torch.float64, torch.contiguous_format, "cpu", variant, shape=shape)
        return _restride(op, args, shape, input_layout, other_layout)

    expected = _tensors(op(*(a.contiguous() if isinstance(a, torch.Tensor) else a for a in fresh_args())))
    args = fresh_args()
    mode = FakeTensorMode()
    fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
    with mode:
        fake = _tensors(op(*fake_args))
    real = _tensors(op(*args))
    assert len(fake) == len(real) == len(expected)
    for i, (f, r, e) in enumerate(zip(fake, real, expected)):
        assert (f.shape, f.dtype) == (r.shape, r.dtype), f"output {i}"
        assert f.stride() == r.stride(), f"output {i}: fake strides {f.stride()}, real {r.stride()}"
        torch.testing.assert_close(r, e, msg=lambda m: f"output {i}: {m}")
