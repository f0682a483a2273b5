"""Helpers shared by the bnorm_ext tests and benchmarks: parametrize lists with readable ids,
data with a non-zero mean, module pairs, comparisons judged against torch's own error.

Import them with ``from common_utils import ...`` (pytest puts this folder on sys.path; so does
tests/conftest.py, for any import mode).
"""

import copy
import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F

CUDA_AVAILABLE = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason="CUDA not available")

# torch 2.11's nn.BatchNorm*d and nn.SyncBatchNorm take no `bias` argument (2.14's do; ours always do).
requires_torch_bn_bias_arg = pytest.mark.skipif(
    "bias" not in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters,
    reason="this torch's nn.BatchNorm has no bias argument (torch 2.11)",
)


def torch_act(t, activation, slope):
    """torch's own activation by the fused ops' name (identity, relu, leaky_relu, silu)."""
    if activation == "relu":
        return F.relu(t)
    if activation == "leaky_relu":
        return F.leaky_relu(t, slope)
    if activation == "silu":
        return F.silu(t)
    return t


devices = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=requires_cuda),
]

ALL_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LOWP_DTYPES = (torch.bfloat16, torch.float16)
dtypes = [pytest.param(dt, id=str(dt).replace("torch.", "")) for dt in ALL_DTYPES]
lowp_dtypes = [pytest.param(dt, id=str(dt).replace("torch.", "")) for dt in LOWP_DTYPES]

memory_formats = [
    pytest.param(torch.contiguous_format, id="contiguous"),
    pytest.param(torch.channels_last, id="channels_last"),
]


def acc_dtype_for(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# The CUDA training kernels: "single_read" (one cooperative launch that keeps
# the input on chip; used where it fits) or "two_pass" (forced by the environment).
CUDA_PATHS = ["single_read", "two_pass"]

SEED = 1234


def randn_shifted(
    shape,
    dtype=torch.float32,
    device="cpu",
    scale=3.0,
    shift=5.0,
    memory_format=torch.contiguous_format,
    generator=None,
):
    """Random data with non-zero mean: x*scale + shift, built in float64 then cast."""
    x = torch.randn(shape, dtype=torch.float64, generator=generator) * scale + shift
    # make the per-channel statistics differ between channels
    if len(shape) >= 2 and shape[1] > 1:
        c = shape[1]
        ch_shift = torch.linspace(-2.0, 2.0, c, dtype=torch.float64)
        ch_scale = torch.linspace(0.5, 1.5, c, dtype=torch.float64)
        view = [1, c] + [1] * (len(shape) - 2)
        x = x * ch_scale.view(view) + ch_shift.view(view)
    x = x.to(device=device, dtype=dtype)
    if memory_format is not None and memory_format != torch.contiguous_format:
        x = x.contiguous(memory_format=memory_format)
    return x


def natural_images(batch, size, generator):
    """[batch, 3, size, size] float64 images that look natural to a conv net: a 1/f amplitude
    spectrum, smooth gradients, per-image offsets, clipped to [0, 1] and normalised like ImageNet
    inputs (so non-zero mean per channel)."""
    fy = torch.fft.fftfreq(size, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.rfftfreq(size, dtype=torch.float64).view(1, -1)
    radius = torch.sqrt(fx * fx + fy * fy)
    radius[0, 0] = 1.0 / size
    noise = torch.randn(batch, 3, size, size, dtype=torch.float64, generator=generator)
    smooth = torch.fft.irfft2(torch.fft.rfft2(noise) / radius, s=(size, size))
    smooth = smooth / smooth.std(dim=(2, 3), keepdim=True)
    ramp = torch.linspace(-1, 1, size, dtype=torch.float64)
    angle = torch.rand(batch, 1, 1, 1, dtype=torch.float64, generator=generator) * 2 * np.pi
    gradient = torch.cos(angle) * ramp.view(1, 1, 1, -1) + torch.sin(angle) * ramp.view(1, 1, -1, 1)
    offset = 0.3 * torch.rand(batch, 3, 1, 1, dtype=torch.float64, generator=generator)
    img = (0.3 + 0.12 * smooth + 0.15 * gradient + offset).clamp(0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    return (img - mean) / std


def bn_layer_cases(model, x, generator):
    """Activations of every BatchNorm2d of float64 `model` in training mode on input x.

    Gives each BN layer random affine parameters and running stats (as a trained model has),
    runs the model on x and a random linear loss on its output backward; returns
    [(name, input, grad_of_output, weight, bias, running_mean, running_var)], all float64, with
    the parameters and running stats as they were before the forward."""
    model = model.double().train()
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for _, m in bns:
            C = m.num_features
            m.weight.copy_(1 + 0.25 * torch.randn(C, dtype=torch.float64, generator=generator))
            m.bias.copy_(0.25 * torch.randn(C, dtype=torch.float64, generator=generator))
            m.running_mean.copy_(torch.randn(C, dtype=torch.float64, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(C, dtype=torch.float64, generator=generator))
    params = {n: [t.detach().clone() for t in (m.weight, m.bias, m.running_mean, m.running_var)] for n, m in bns}
    inputs, grads = {}, {}

    def capture(name, module, args, out):
        inputs[name] = args[0].detach()
        # NB: a tensor hook registered before an in-place op (ReLU(inplace=True), +=) gets the
        # gradient of the value before it, i.e. of the BN output.
        out.register_hook(lambda grad: grads.__setitem__(name, grad.detach()))

    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: capture(name, mod, args, out)) for n, m in bns]
    try:
        y = model(x)
        (y * torch.randn(y.shape, dtype=torch.float64, generator=generator)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return [(n, inputs[n], grads[n], *params[n]) for n, _ in bns]


def misaligned_copy(x):
    """A dense copy of x (same memory format) whose data pointer is one element past
    a 16-byte boundary, so every kernel must take its scalar path."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    if channels_last:
        N, C, H, W = x.shape
        view = buf[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    else:
        view = buf[1:].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 16 != 0
    assert view.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return view


def randomize_bn_(mod):
    """Give a BN module non-trivial parameters and running stats (in place)."""
    with torch.no_grad():
        if getattr(mod, "weight", None) is not None:
            mod.weight.copy_(1.0 + 0.5 * torch.randn_like(mod.weight, dtype=torch.float64).to(mod.weight.dtype))
        if getattr(mod, "bias", None) is not None:  # torch >= 2.x BatchNorm has bias=False
            mod.bias.copy_(torch.randn_like(mod.bias, dtype=torch.float64).to(mod.bias.dtype))
        if mod.track_running_stats:
            mod.running_mean.copy_(torch.randn_like(mod.running_mean, dtype=torch.float64).to(mod.running_mean.dtype))
            mod.running_var.copy_(
                (0.5 + torch.rand_like(mod.running_var, dtype=torch.float64)).to(mod.running_var.dtype)
            )
            mod.num_batches_tracked.fill_(3)
    return mod


def make_bn_pair(torch_cls, our_cls, num_features, device="cpu", param_dtype=torch.float32, randomize=True, **kwargs):
    """torch module, our module (same state) and a float64 CPU reference copy."""
    tmod = torch_cls(num_features, **kwargs)
    if randomize:
        randomize_bn_(tmod)
    omod = our_cls(num_features, **kwargs)
    omod.load_state_dict(tmod.state_dict())
    tmod = tmod.to(device=device, dtype=param_dtype)
    omod = omod.to(device=device, dtype=param_dtype)
    # reference built from the (possibly rounded) low-precision parameters
    ref = copy.deepcopy(tmod).to(device="cpu", dtype=torch.float64)
    return tmod, omod, ref


def state_tensors(mod):
    out = {}
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        t = getattr(mod, name, None)
        out[name] = None if t is None else t.detach().clone()
    return out


def assert_state_unchanged(mod, saved):
    for name, before in saved.items():
        now = getattr(mod, name, None)
        if before is None:
            assert now is None, f"{name} became non-None"
            continue
        assert now is not None
        assert now.dtype == before.dtype, f"{name} dtype changed"
        assert torch.equal(now, before), f"{name} changed: {before} -> {now}"


# absolute slack added to 2*torch_error for low-precision dtypes, times max(1, |ref|)
LOWP_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def max_abs_err(a, ref):
    return (a.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def condition_number(x):
    """max over channels of (|mean| + std) / std of x (N, C, *), in float64.

    float32 kernels (acc dtype float32 per spec) lose about eps32 * cond relative accuracy in
    x - mean; torch's CPU kernels accumulate in double and do not. Used to scale float32
    tolerances for ill-conditioned inputs (e.g. 2 samples per channel)."""
    xd = x.detach().double().cpu()
    dims = [0] + list(range(2, xd.dim()))
    mean = xd.mean(dims)
    std = xd.var(dims, unbiased=False).sqrt()
    return ((mean.abs() + std) / std.clamp_min(1e-300)).max().item()


def assert_matches(ours, theirs, ref, dtype, what="", relative_to_torch=False, cond=None, atol_extra=0.0):
    """ours/theirs: results from bnorm_ext and torch in `dtype`; ref: float64 reference.

    float32/float64: torch.testing.assert_close(ours, theirs) with default tolerances, unless
    ours is the closer of the two to the float64 reference (and close to it in any case).
    bf16/fp16: max|ours-ref| <= 2*max|torch-ref| + atol*max(1,|ref|).
    relative_to_torch=True forces the bf16/fp16-style check for float32 results
    (used for float32 quantities computed from low-precision inputs).
    cond (see condition_number) scales float32/float64 tolerances by max(1, cond/10).
    atol_extra is added to every absolute tolerance (used for reductions: a few acc-dtype ulps
    of the L1 norm of the summands, see reduction_atol).
    NaN never passes (unless the reference itself is NaN at the same place).
    """
    assert ours is not None, f"{what}: ours is None"
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs torch {tuple(theirs.shape)}"
    assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} vs torch {theirs.dtype}"
    assert ours.device == theirs.device, f"{what}: device {ours.device} vs torch {theirs.device}"
    ref = ref.detach().double().cpu()
    o = ours.detach().double().cpu()
    if not torch.isnan(ref).any():
        assert not torch.isnan(o).any(), f"{what}: output has NaN"
        assert torch.isfinite(o).all(), f"{what}: output has Inf"
    if ours.numel() == 0:
        return
    if dtype in (torch.float32, torch.float64) and not relative_to_torch:
        c = max(1.0, cond / 10.0) if cond is not None else 1.0
        rtol, atol = (1.3e-6, 1e-5) if dtype == torch.float32 else (1e-7, 1e-7)
        err = max_abs_err(o, ref)
        err_t = max_abs_err(theirs, ref)
        try:
            torch.testing.assert_close(
                ours, theirs, rtol=rtol * c, atol=atol * c + atol_extra, msg=lambda m: f"{what}: {m}"
            )
        except AssertionError:
            # NB: far from torch is fine only where torch is the less accurate one (e.g. torch's
            # float32 channels_last CPU kernel on 50k values per channel: 2.9e-5 vs ours 2.9e-6).
            if err > err_t:
                raise
        # and not far from the exact answer either
        scale = max(1.0, ref.abs().max().item())
        tol = (1e-4 if dtype == torch.float32 else 1e-10) * scale * c + atol_extra
        assert err <= 2.0 * err_t + tol, (
            f"{what}: error vs float64 reference {err:.3e} > 2*torch_err({err_t:.3e}) + {tol:.3e}"
        )
    else:
        err_o = max_abs_err(o, ref)
        err_t = max_abs_err(theirs, ref)
        atol = LOWP_ATOL.get(dtype, 1e-5) * max(1.0, ref.abs().max().item())
        bound = 2.0 * err_t + atol + atol_extra
        assert err_o <= bound, (
            f"{what}: max abs error vs float64 reference {err_o:.4e} > 2*torch_err({err_t:.4e}) + {atol:.2e}"
        )


def reduction_atol(x, dy, ref_mod, training, dtype, ulps=4.0):
    """Absolute slack for per-channel reductions (grad_weight, grad_bias) in the acc dtype:
    `ulps` * eps(acc) * max_c sum |summand|. torch's CPU kernels accumulate in double; a float32
    accumulator legitimately differs by a few ulps of the largest partial sum."""
    acc_eps = torch.finfo(acc_dtype_for(dtype)).eps
    xd = x.detach().double().cpu()
    dyd = dy.detach().double().cpu()
    dims = [0] + list(range(2, xd.dim()))
    shape = [1, -1] + [1] * (xd.dim() - 2)
    if training or ref_mod.running_mean is None:
        mean = xd.mean(dims)
        var = xd.var(dims, unbiased=False)
    else:
        mean, var = ref_mod.running_mean.double(), ref_mod.running_var.double()
    xhat = (xd - mean.view(shape)) / torch.sqrt(var.view(shape) + ref_mod.eps)
    l1 = max((dyd * xhat).abs().sum(dims).max().item(), dyd.abs().sum(dims).max().item())
    return ulps * acc_eps * l1


def assert_same_strides(ours, theirs, what="output"):
    assert ours.stride() == theirs.stride(), (
        f"{what}: strides {ours.stride()} != torch {theirs.stride()} (shape {tuple(ours.shape)})"
    )


def run_train_step(mod, x, dy):
    """Forward + backward; returns out, grad_input, grad_weight, grad_bias (None when absent)."""
    xin = x.detach().requires_grad_(True)
    out = mod(xin)
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    params = [xin] + [p for p in (w, b) if p is not None]
    grads = list(torch.autograd.grad(out, params, dy))
    gx = grads.pop(0)
    gw = grads.pop(0) if w is not None else None
    gb = grads.pop(0) if b is not None else None
    return out.detach(), gx, gw, gb


# names of what seeded_train_step returns, in order
STEP_NAMES = ["output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var", "num_batches_tracked"]


def seeded_train_step(mod, x, dy):
    """One training step of BatchNorm module `mod` on a copy of x (gradient dy), with weight
    and bias set from a fixed seed; returns the values named by STEP_NAMES."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        mod.weight.copy_(1 + 0.5 * torch.randn(mod.num_features, generator=g))
        mod.bias.copy_(torch.randn(mod.num_features, generator=g))
    out, gx, gw, gb = run_train_step(mod, x.detach().clone(memory_format=torch.preserve_format), dy)
    return [out, gx, gw, gb, mod.running_mean.clone(), mod.running_var.clone(), mod.num_batches_tracked.clone()]


STEPS = 3


def _dy_like(out_shape, dtype, device):
    return torch.randn(out_shape, dtype=torch.float64).to(device=device, dtype=dtype)


def _check_param_grads(omod, tmod, o_grads, t_grads, r_grads, param_dtype, tag, mixed, cond, red_atol):
    for name, go, gt, gr in zip(("weight", "bias"), o_grads, t_grads, r_grads):
        tp, op = getattr(tmod, name), getattr(omod, name)
        assert (op is None) == (tp is None), f"{tag}: {name} presence differs from torch"
        if tp is None:
            assert go is None
            continue
        assert_matches(
            go, gt, gr, param_dtype, f"{tag} grad_{name}", relative_to_torch=mixed, cond=cond, atol_extra=red_atol
        )


def check_parity(
    torch_cls, our_cls, make_x, dtype, device, param_dtype=None, steps=STEPS, check_strides=True, **bn_kwargs
):
    """Train `steps` steps with fresh random inputs, then one eval step (forward + backward).

    make_x(dtype, device) -> input tensor (any layout).
    Checks output values/dtype/strides, grads of input/weight/bias, running stats and
    num_batches_tracked after every step, then the eval output and grads.
    """
    param_dtype = param_dtype or dtype
    mixed = param_dtype != dtype
    x0 = make_x(dtype, device)
    C = x0.shape[1]
    tmod, omod, ref = make_bn_pair(torch_cls, our_cls, C, device=device, param_dtype=param_dtype, **bn_kwargs)
    assert isinstance(omod, torch_cls)
    tmod.train(), omod.train(), ref.train()

    for step in range(steps):
        x = x0 if step == 0 else make_x(dtype, device)
        cond = condition_number(x)
        dy = _dy_like(x.shape, dtype, device)
        red_atol = reduction_atol(x, dy, ref, True, dtype)
        out_t, gx_t, gw_t, gb_t = run_train_step(tmod, x, dy)
        out_o, gx_o, gw_o, gb_o = run_train_step(omod, x, dy)
        out_r, gx_r, gw_r, gb_r = run_train_step(ref, x.detach().cpu().double(), dy.cpu().double())
        tag = f"train step {step}"
        assert_matches(out_o, out_t, out_r, dtype, f"{tag} output", cond=cond)
        if check_strides:
            assert_same_strides(out_o, out_t, f"{tag} output")
        assert_matches(gx_o, gx_t, gx_r, dtype, f"{tag} grad_input", cond=cond)
        _check_param_grads(
            omod, tmod, (gw_o, gb_o), (gw_t, gb_t), (gw_r, gb_r), param_dtype, tag, mixed, cond, red_atol
        )
        if bn_kwargs.get("track_running_stats", True):
            assert_matches(
                omod.running_mean,
                tmod.running_mean,
                ref.running_mean,
                param_dtype,
                f"{tag} running_mean",
                relative_to_torch=mixed,
                cond=cond,
            )
            assert_matches(
                omod.running_var,
                tmod.running_var,
                ref.running_var,
                param_dtype,
                f"{tag} running_var",
                relative_to_torch=mixed,
                cond=cond,
            )
            assert omod.num_batches_tracked.dtype == torch.long
            assert torch.equal(omod.num_batches_tracked, tmod.num_batches_tracked), (
                f"{tag}: num_batches_tracked {omod.num_batches_tracked} vs torch {tmod.num_batches_tracked}"
            )
        else:
            assert omod.running_mean is None and omod.running_var is None
            assert omod.num_batches_tracked is None

    tmod.eval(), omod.eval(), ref.eval()
    x = make_x(dtype, device)
    cond = condition_number(x)
    with torch.no_grad():
        out_t = tmod(x)
        out_o = omod(x)
        out_r = ref(x.cpu().double())
    assert_matches(out_o, out_t, out_r, dtype, "eval output", cond=cond)
    if check_strides:
        assert_same_strides(out_o, out_t, "eval output")
    # eval backward too (grads through the running-stats path)
    dy = _dy_like(x.shape, dtype, device)
    red_atol = reduction_atol(x, dy, ref, False, dtype)
    out_t, gx_t, gw_t, gb_t = run_train_step(tmod, x, dy)
    out_o, gx_o, gw_o, gb_o = run_train_step(omod, x, dy)
    out_r, gx_r, gw_r, gb_r = run_train_step(ref, x.detach().cpu().double(), dy.cpu().double())
    assert_matches(gx_o, gx_t, gx_r, dtype, "eval grad_input", cond=cond)
    _check_param_grads(omod, tmod, (gw_o, gb_o), (gw_t, gb_t), (gw_r, gb_r), param_dtype, "eval", mixed, cond, red_atol)
    if bn_kwargs.get("track_running_stats", True):
        assert torch.equal(omod.num_batches_tracked, tmod.num_batches_tracked)
    return tmod, omod
