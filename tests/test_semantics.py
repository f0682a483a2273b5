"""Semantics of bnorm_ext: running statistics, modes, error handling, edge cases, ops."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnorm_ext
from common_utils import (
    acc_dtype_for,
    assert_same_strides,
    assert_state_unchanged,
    devices,
    make_bn_pair,
    memory_formats,
    randn_shifted,
    run_train_step,
    state_tensors,
)

ops = torch.ops.bnorm_ext
RED = (0, 2, 3)


def _bc(t, ndim=4):
    return t.view([1, -1] + [1] * (ndim - 2))


# ---------------------------------------------------------------------------
# running statistics
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices)
def test_running_var_is_unbiased(device):
    x = randn_shifted((3, 4, 5, 2), torch.float64, device)
    m = bnorm_ext.BatchNorm2d(4, momentum=1.0).to(device, torch.float64)
    m.train()
    m(x)
    unbiased = x.var(dim=RED, unbiased=True)
    biased = x.var(dim=RED, unbiased=False)
    torch.testing.assert_close(m.running_var, unbiased, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(m.running_var, biased, rtol=1e-6, atol=0)
    torch.testing.assert_close(m.running_mean, x.mean(dim=RED), rtol=1e-12, atol=1e-12)
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("device", devices)
def test_running_stats_momentum_formula(device):
    x = randn_shifted((4, 3, 3, 5), torch.float64, device)
    m = bnorm_ext.BatchNorm2d(3, momentum=0.3).to(device, torch.float64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    rm0, rv0 = m.running_mean.clone(), m.running_var.clone()
    m(x)
    torch.testing.assert_close(m.running_mean, 0.7 * rm0 + 0.3 * x.mean(dim=RED), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, 0.7 * rv0 + 0.3 * x.var(dim=RED, unbiased=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("start_nbt", [0, 5], ids=["fresh", "nbt5"])
@pytest.mark.parametrize("device", devices)
def test_momentum_none_cumulative_average(device, start_nbt):
    C = 3
    tmod = nn.BatchNorm2d(C, momentum=None).to(device, torch.float64)
    omod = bnorm_ext.BatchNorm2d(C, momentum=None).to(device, torch.float64)
    with torch.no_grad():
        for mm in (tmod, omod):
            mm.num_batches_tracked.fill_(start_nbt)
            mm.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            mm.running_var.copy_(torch.tensor([1.5, 0.7, 3.0]))
    exp_m = tmod.running_mean.clone()
    exp_v = tmod.running_var.clone()
    for step in range(3):
        x = randn_shifted((4, C, 3, 3), torch.float64, device)
        tmod(x)
        omod(x)
        n = start_nbt + step + 1
        exp_m = exp_m + (x.mean(dim=RED) - exp_m) / n
        exp_v = exp_v + (x.var(dim=RED, unbiased=True) - exp_v) / n
        assert omod.num_batches_tracked.item() == n
        torch.testing.assert_close(omod.running_mean, tmod.running_mean)
        torch.testing.assert_close(omod.running_var, tmod.running_var)
        torch.testing.assert_close(omod.running_mean, exp_m, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(omod.running_var, exp_v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", devices)
def test_eval_uses_running_stats(device):
    C = 4
    m = bnorm_ext.BatchNorm2d(C, eps=1e-3).to(device, torch.float64)
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0]))
        m.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 4.0]))
        m.weight.copy_(torch.tensor([1.5, -0.5, 2.0, 0.25]))
        m.bias.copy_(torch.tensor([0.1, 0.2, -0.3, 1.0]))
    m.eval()
    saved = state_tensors(m)
    x = randn_shifted((3, C, 4, 5), torch.float64, device)
    y = m(x)
    exp = (x - _bc(m.running_mean)) / torch.sqrt(_bc(m.running_var) + 1e-3) * _bc(m.weight) + _bc(m.bias)
    torch.testing.assert_close(y, exp, rtol=1e-12, atol=1e-12)
    # batch statistics would give something quite different
    y_train = F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=1e-3)
    assert not torch.allclose(y, y_train, atol=1e-2)
    assert_state_unchanged(m, saved)


@pytest.mark.parametrize("device", devices)
def test_track_running_stats_false(device):
    C = 3
    tmod, omod, _ = make_bn_pair(
        nn.BatchNorm2d, bnorm_ext.BatchNorm2d, C, device, torch.float64, track_running_stats=False
    )
    assert omod.running_mean is None and omod.running_var is None and omod.num_batches_tracked is None
    x = randn_shifted((4, C, 3, 5), torch.float64, device)
    y_train = omod(x)
    omod.eval(), tmod.eval()
    y_eval = omod(x)
    # eval uses batch statistics too
    torch.testing.assert_close(y_eval, y_train, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y_eval, tmod(x))
    exp = F.batch_norm(x, None, None, omod.weight, omod.bias, training=True)
    torch.testing.assert_close(y_eval, exp)
    assert omod.running_mean is None and omod.running_var is None and omod.num_batches_tracked is None
    # eval with a single value per channel has no batch statistics -> error like torch
    with pytest.raises(ValueError):
        tmod(randn_shifted((1, C, 1, 1), torch.float64, device))
    with pytest.raises(ValueError):
        omod(randn_shifted((1, C, 1, 1), torch.float64, device))


@pytest.mark.parametrize("device", devices)
def test_affine_false(device):
    C = 3
    m = bnorm_ext.BatchNorm2d(C, affine=False).to(device, torch.float64)
    assert m.weight is None and m.bias is None
    x = randn_shifted((4, C, 3, 5), torch.float64, device)
    y = m(x)
    mean = x.mean(dim=RED, keepdim=True)
    var = x.var(dim=RED, unbiased=False, keepdim=True)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + 1e-5), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
SINGLE_VALUE_CASES = [
    pytest.param(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, (1, 3, 1, 1), id="bn2d_1xCx1x1"),
    pytest.param(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, (1, 3), id="bn1d_1xC"),
    pytest.param(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, (1, 3, 1), id="bn1d_1xCx1"),
    pytest.param(nn.BatchNorm3d, bnorm_ext.BatchNorm3d, (1, 3, 1, 1, 1), id="bn3d_1xCx1x1x1"),
]


@pytest.mark.parametrize("momentum", [0.1, None], ids=["mom0.1", "momNone"])
@pytest.mark.parametrize("tcls,ocls,shape", SINGLE_VALUE_CASES)
@pytest.mark.parametrize("device", devices)
def test_single_value_per_channel_raises(device, tcls, ocls, shape, momentum):
    tmod, omod, _ = make_bn_pair(tcls, ocls, shape[1], device, torch.float32, momentum=momentum)
    x = randn_shifted(shape, torch.float32, device)
    with pytest.raises(ValueError):
        tmod(x)
    saved = state_tensors(omod)
    with pytest.raises(ValueError):
        omod(x)
    # torch increments num_batches_tracked before raising; ours must leave everything untouched
    assert_state_unchanged(omod, saved)
    # eval mode with one value per channel is fine and matches torch
    tmod.eval(), omod.eval()
    torch.testing.assert_close(omod(x), tmod(x))


@pytest.mark.parametrize("device", devices)
def test_single_value_per_channel_functional_raises(device):
    x = randn_shifted((1, 3, 1, 1), torch.float32, device)
    rm = torch.randn(3, device=device)
    rv = torch.rand(3, device=device) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(ValueError):
        F.batch_norm(x, rm.clone(), rv.clone(), training=True)
    with pytest.raises(ValueError):
        bnorm_ext.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    with pytest.raises(ValueError):
        bnorm_ext.batch_norm(x, None, None, training=True)


WRONG_RANK = [
    pytest.param(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, (2, 3, 4), id="bn2d_3d"),
    pytest.param(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, (2, 3, 4, 4, 4), id="bn2d_5d"),
    pytest.param(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, (2, 3, 4, 4), id="bn1d_4d"),
    pytest.param(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, (3,), id="bn1d_1d"),
    pytest.param(nn.BatchNorm3d, bnorm_ext.BatchNorm3d, (2, 3, 4, 4), id="bn3d_4d"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("tcls,ocls,shape", WRONG_RANK)
def test_wrong_rank_raises(tcls, ocls, shape, training):
    tmod, omod, _ = make_bn_pair(tcls, ocls, 3)
    tmod.train(training), omod.train(training)
    x = randn_shifted(shape)
    with pytest.raises(ValueError):
        tmod(x)
    saved = state_tensors(omod)
    with pytest.raises(ValueError):
        omod(x)
    assert_state_unchanged(omod, saved)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", devices)
def test_channel_mismatch_raises(device, training):
    tmod, omod, _ = make_bn_pair(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, 3, device)
    tmod.train(training), omod.train(training)
    x = randn_shifted((2, 4, 3, 3), torch.float32, device)
    with pytest.raises(RuntimeError):
        tmod(x)
    saved = state_tensors(omod)
    with pytest.raises(RuntimeError):
        omod(x)
    assert torch.equal(omod.running_mean, saved["running_mean"])
    assert torch.equal(omod.running_var, saved["running_var"])


@pytest.mark.parametrize("device", devices)
def test_channel_mismatch_functional_raises(device):
    x = randn_shifted((2, 4, 3, 3), torch.float32, device)
    w = torch.ones(3, device=device)
    rm, rv = torch.zeros(3, device=device), torch.ones(3, device=device)
    for training in (True, False):
        with pytest.raises(RuntimeError):
            bnorm_ext.batch_norm(x, rm, rv, training=training)
        with pytest.raises(RuntimeError):
            bnorm_ext.batch_norm(x, None, None, w, None, training=True)


@pytest.mark.parametrize("eps", [0.0, -1e-5], ids=["eps0", "eps_neg"])
@pytest.mark.parametrize("device", devices)
def test_nonpositive_eps_in_training_raises(device, eps):
    x = randn_shifted((2, 3, 3, 3), torch.float32, device)
    tmod, omod, _ = make_bn_pair(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, 3, device, eps=eps)
    with pytest.raises(ValueError):
        F.batch_norm(x, None, None, training=True, eps=eps)  # torch does so as well
    saved = state_tensors(omod)
    with pytest.raises(ValueError):
        omod(x)
    assert_state_unchanged(omod, saved)
    with pytest.raises(ValueError):
        bnorm_ext.batch_norm(x, None, None, training=True, eps=eps)


@pytest.mark.parametrize("device", devices)
def test_zero_eps_in_eval_like_torch(device):
    x = randn_shifted((2, 3, 3, 3), torch.float64, device)
    rm = torch.randn(3, dtype=torch.float64, device=device)
    rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5
    try:
        exp = F.batch_norm(x, rm, rv, training=False, eps=0.0)
    except ValueError:
        # NB: torch 2.11's F.batch_norm rejects eps=0 in eval too; newer torch and ours accept it.
        exp = (x - _bc(rm)) / _bc(rv).sqrt()
    torch.testing.assert_close(bnorm_ext.batch_norm(x, rm, rv, training=False, eps=0.0), exp)


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.uint8], ids=["int64", "int32", "uint8"])
@pytest.mark.parametrize("device", devices)
def test_integer_input_raises(device, int_dtype):
    x = torch.randint(0, 10, (2, 3, 4, 4), device=device).to(int_dtype)
    errors = (RuntimeError, TypeError, ValueError, NotImplementedError)
    with pytest.raises(errors):
        bnorm_ext.batch_norm(x, None, None, training=True)
    m = bnorm_ext.BatchNorm2d(3).to(device)
    saved = state_tensors(m)
    with pytest.raises(errors):
        m(x)
    assert torch.equal(m.running_mean, saved["running_mean"])
    assert torch.equal(m.running_var, saved["running_var"])
    m.eval()
    with pytest.raises(errors):
        m(x)


PARAM_MISMATCH = [
    pytest.param(torch.float32, torch.float64, id="x_float32-p_float64"),
    pytest.param(torch.float64, torch.float32, id="x_float64-p_float32"),
    pytest.param(torch.float32, torch.float16, id="x_float32-p_float16"),
    pytest.param(torch.float16, torch.float64, id="x_float16-p_float64"),
    pytest.param(torch.bfloat16, torch.float16, id="x_bfloat16-p_float16"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("x_dtype,p_dtype", PARAM_MISMATCH)
@pytest.mark.parametrize("device", devices)
def test_param_dtype_mismatch_raises(device, x_dtype, p_dtype, training):
    m = bnorm_ext.BatchNorm2d(3).to(device)
    m.weight.data = m.weight.data.to(p_dtype)
    m.bias.data = m.bias.data.to(p_dtype)
    m.running_mean.data = m.running_mean.data.to(p_dtype)
    m.running_var.data = m.running_var.data.to(p_dtype)
    x = randn_shifted((2, 3, 4, 4), x_dtype, device)
    m.train(training)
    saved = state_tensors(m)
    with pytest.raises(RuntimeError):
        m(x)
    assert_state_unchanged(m, saved)


@pytest.mark.parametrize("which", ["weight", "running_mean"])
@pytest.mark.parametrize("device", devices)
def test_param_dtype_mismatch_functional_raises(device, which):
    x = randn_shifted((2, 3, 4, 4), torch.float32, device)
    rm = torch.zeros(3, device=device)
    rv = torch.ones(3, device=device)
    w = torch.ones(3, device=device)
    if which == "weight":
        w = w.double()
    else:
        rm = rm.double()
    rm0, rv0 = rm.clone(), rv.clone()
    with pytest.raises(RuntimeError):
        bnorm_ext.batch_norm(x, rm, rv, w, None, training=True)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def _scalar_type_name(dtype):
    """How c10 prints a ScalarType: torch.float16 -> Half, torch.float32 -> Float."""
    return {torch.float16: "Half", torch.float32: "Float", torch.bfloat16: "BFloat16", torch.float64: "Double"}[dtype]


def _call_op_with_params(name, x, weight, bias):
    """Calls torch.ops.bnorm_ext.<name> on the (half) input x with the given weight
    and bias; float32 running/saved stats, relu for the fused ops."""
    C = x.shape[1]
    rm, rv = torch.zeros(C) + 0.5, torch.ones(C) * 2.0
    mean, invstd = torch.full((C,), 5.0), torch.full((C,), 0.5)
    nbt = torch.zeros((), dtype=torch.long)
    if name == "batch_norm_elemt":
        ops.batch_norm_elemt(x, weight, bias, mean, invstd)
    elif name == "batch_norm_forward_train":
        ops.batch_norm_forward_train(x, weight, bias, rm, rv, nbt, 0.1, 1e-5)
    elif name == "batch_norm_forward_eval":
        ops.batch_norm_forward_eval(x, weight, bias, rm, rv, 1e-5)
    elif name == "batch_norm_act_forward_train":
        ops.batch_norm_act_forward_train(x, weight, bias, rm, rv, nbt, 0.1, 1e-5, None, "relu", 0.0)
    elif name == "batch_norm_act_forward_eval":
        ops.batch_norm_act_forward_eval(x, weight, bias, rm, rv, 1e-5, None, "relu", 0.0)
    elif name == "batch_norm_act_backward":
        output = torch.relu(x)
        ops.batch_norm_act_backward(
            torch.randn_like(x), output, x, weight, bias, None, None, mean, invstd, None, True, 1e-5, False, "relu", 0.0
        )
    else:
        raise AssertionError(name)


# Every op that takes both weight and bias.
OPS_WITH_WEIGHT_AND_BIAS = [
    "batch_norm_elemt",
    "batch_norm_forward_train",
    "batch_norm_forward_eval",
    "batch_norm_act_forward_train",
    "batch_norm_act_forward_eval",
    "batch_norm_act_backward",
]


@pytest.mark.parametrize(
    "w_dtype,b_dtype",
    [(torch.float32, torch.float16), (torch.float16, torch.float32)],
    ids=["w_float32-b_float16", "w_float16-b_float32"],
)
@pytest.mark.parametrize("name", OPS_WITH_WEIGHT_AND_BIAS)
def test_op_weight_bias_dtype_mismatch_raises(name, w_dtype, b_dtype):
    # Each dtype alone is allowed beside a half input; together the kernel
    # would read one of them as the other's dtype.
    x = randn_shifted((4, 3, 5, 5), torch.float16, "cpu")
    weight = (torch.rand(3) + 0.5).to(w_dtype)
    bias = torch.randn(3).to(b_dtype)
    expected = (
        f"bnorm_ext::{name}: expected bias to have the same dtype as weight "
        f"({_scalar_type_name(w_dtype)}), got {_scalar_type_name(b_dtype)}"
    )
    with pytest.raises(RuntimeError, match=re.escape(expected)):
        _call_op_with_params(name, x, weight, bias)
    # The same call with agreeing dtypes runs.
    _call_op_with_params(name, x, weight.float(), bias.float())


@pytest.mark.parametrize("name", ["batch_norm_forward_train", "batch_norm_act_forward_train"])
def test_op_weight_bias_dtype_mismatch_leaves_running_stats(name):
    x = randn_shifted((4, 3, 5, 5), torch.float16, "cpu")
    C = x.shape[1]
    rm, rv = torch.zeros(C) + 0.5, torch.ones(C) * 2.0
    nbt = torch.zeros((), dtype=torch.long)
    weight, bias = torch.ones(C), torch.zeros(C, dtype=torch.float16)
    args = (x, weight, bias, rm, rv, nbt, 0.1, 1e-5)
    if name == "batch_norm_act_forward_train":
        args += (None, "relu", 0.0)
    with pytest.raises(RuntimeError, match="same dtype as weight"):
        getattr(ops, name)(*args)
    assert torch.equal(rm, torch.full((C,), 0.5)) and torch.equal(rv, torch.full((C,), 2.0))
    assert int(nbt) == 0


def test_op_act_backward_differentiable_weight_bias_dtype_mismatch_raises():
    # With a grad_out that requires grad the autograd kernel runs the composite
    # instead of the kernel; it checks the dtypes the same way.
    x = randn_shifted((4, 3, 5, 5), torch.float16, "cpu")
    mean, invstd = torch.full((3,), 5.0), torch.full((3,), 0.5)
    grad_out = torch.randn_like(x).requires_grad_()
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            "bnorm_ext::batch_norm_act_backward: expected bias to have the same dtype as weight (Float), got Half"
        ),
    ):
        ops.batch_norm_act_backward(
            grad_out,
            torch.relu(x),
            x,
            torch.ones(3),
            torch.zeros(3, dtype=torch.float16),
            None,
            None,
            mean,
            invstd,
            None,
            True,
            1e-5,
            False,
            "relu",
            0.0,
        )


# ---------------------------------------------------------------------------
# empty batch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", devices)
def test_empty_batch_like_torch(device, training, memory_format):
    C = 3
    tmod, omod, _ = make_bn_pair(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, C, device)
    tmod.train(training), omod.train(training)
    x = torch.randn(0, C, 4, 5, device=device).contiguous(memory_format=memory_format)
    saved = state_tensors(omod)
    yt = tmod(x)
    yo = omod(x)
    assert yo.shape == x.shape == yt.shape
    assert yo.dtype == yt.dtype and yo.device == yt.device
    assert torch.equal(omod.running_mean, saved["running_mean"])
    assert torch.equal(omod.running_var, saved["running_var"])
    assert torch.equal(omod.running_mean, tmod.running_mean)
    assert torch.equal(omod.running_var, tmod.running_var)
    assert torch.equal(omod.num_batches_tracked, tmod.num_batches_tracked), (
        f"num_batches_tracked {omod.num_batches_tracked} vs torch {tmod.num_batches_tracked}"
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device", devices)
def test_empty_batch_backward_like_torch(device, training):
    C = 3
    tmod, omod, _ = make_bn_pair(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, C, device)
    tmod.train(training), omod.train(training)
    x = torch.randn(0, C, 4, 5, device=device)
    dy = torch.randn(0, C, 4, 5, device=device)
    _, gx_t, gw_t, gb_t = run_train_step(tmod, x, dy)
    _, gx_o, gw_o, gb_o = run_train_step(omod, x, dy)
    assert gx_o.shape == x.shape
    torch.testing.assert_close(gw_o, gw_t)
    torch.testing.assert_close(gb_o, gb_t)


# ---------------------------------------------------------------------------
# NaN / Inf propagation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "neginf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("device", devices)
def test_nonfinite_propagation_like_torch(device, dtype, memory_format, training, bad):
    C = 4
    tmod, omod, _ = make_bn_pair(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, C, device, dtype)
    tmod.train(training), omod.train(training)
    x = randn_shifted((3, C, 4, 5), dtype, device, memory_format=memory_format)
    x[1, 2, 3, 1] = bad
    yt = tmod(x)
    yo = omod(x)
    assert_same_strides(yo, yt)
    assert torch.equal(torch.isnan(yo), torch.isnan(yt)), "NaN mask differs from torch"
    assert torch.equal(torch.isinf(yo), torch.isinf(yt)), "Inf mask differs from torch"
    assert torch.equal(torch.sign(yo[torch.isinf(yo)]), torch.sign(yt[torch.isinf(yt)]))
    assert torch.isnan(yt).any() or torch.isinf(yt).any()  # the test really has a non-finite value
    fin = torch.isfinite(yt)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(yo[fin], yt[fin], **tol)
    # the other channels are unaffected
    others = [c for c in range(C) if c != 2]
    assert torch.isfinite(yo[:, others]).all()
    for name in ("running_mean", "running_var"):
        o, t = getattr(omod, name), getattr(tmod, name)
        assert torch.equal(torch.isnan(o), torch.isnan(t)), f"{name} NaN mask {o} vs torch {t}"
        assert torch.equal(torch.isinf(o), torch.isinf(t)), f"{name} Inf mask {o} vs torch {t}"
        f = torch.isfinite(t)
        torch.testing.assert_close(o[f], t[f], **tol)


# ---------------------------------------------------------------------------
# functional API
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.1, 0.4], ids=["mom0.1", "mom0.4"])
@pytest.mark.parametrize("affine", [True, False, "weight_only"], ids=["affine", "noaffine", "weight_only"])
@pytest.mark.parametrize("with_stats", [True, False], ids=["stats", "nostats"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("device", devices)
def test_functional_batch_norm_matches_torch(device, memory_format, training, with_stats, affine, momentum):
    C = 5
    dtype = torch.float64
    x = randn_shifted((3, C, 4, 3), dtype, device, memory_format=memory_format)
    rm = torch.randn(C, dtype=dtype, device=device) if with_stats else None
    rv = (torch.rand(C, dtype=dtype, device=device) + 0.5) if with_stats else None
    w = (1 + 0.5 * torch.randn(C, dtype=dtype, device=device)) if affine else None
    b = torch.randn(C, dtype=dtype, device=device) if affine is True else None
    eps = 1e-4

    def run(fn):
        rm_ = rm.clone() if rm is not None else None
        rv_ = rv.clone() if rv is not None else None
        xx = x.detach().requires_grad_()
        ww = w.detach().requires_grad_() if w is not None else None
        bb = b.detach().requires_grad_() if b is not None else None
        y = fn(xx, rm_, rv_, ww, bb, training=training, momentum=momentum, eps=eps)
        return y, rm_, rv_, xx, ww, bb

    if not training and not with_stats:
        with pytest.raises(RuntimeError):
            F.batch_norm(x, None, None, w, b, training=False)
        with pytest.raises(RuntimeError):
            bnorm_ext.batch_norm(x, None, None, w, b, training=False)
        return

    yt, rmt, rvt, xt, wt, bt = run(F.batch_norm)
    yo, rmo, rvo, xo, wo, bo = run(bnorm_ext.batch_norm)
    torch.testing.assert_close(yo, yt)
    assert_same_strides(yo, yt)
    if with_stats:
        torch.testing.assert_close(rmo, rmt)
        torch.testing.assert_close(rvo, rvt)
        if training:
            assert not torch.equal(rmo, rm)  # the update really happened
        else:
            assert torch.equal(rmo, rm) and torch.equal(rvo, rv)
    dy = torch.randn(yt.shape, dtype=dtype, device=device)
    leaves_t = [t for t in (xt, wt, bt) if t is not None]
    leaves_o = [t for t in (xo, wo, bo) if t is not None]
    gt = torch.autograd.grad(yt, leaves_t, dy)
    go = torch.autograd.grad(yo, leaves_o, dy)
    for a, b_, name in zip(go, gt, ["input", "weight", "bias"]):
        torch.testing.assert_close(a, b_, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("device", devices)
def test_functional_defaults(device):
    x = randn_shifted((3, 4, 2, 3), torch.float64, device)
    rm = torch.randn(4, dtype=torch.float64, device=device)
    rv = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    # default training=False -> uses running stats
    torch.testing.assert_close(bnorm_ext.batch_norm(x, rm, rv), F.batch_norm(x, rm, rv))
    # positional args in F.batch_norm order
    w = torch.randn(4, dtype=torch.float64, device=device)
    b = torch.randn(4, dtype=torch.float64, device=device)
    rm1, rv1, rm2, rv2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    torch.testing.assert_close(
        bnorm_ext.batch_norm(x, rm1, rv1, w, b, True, 0.2, 1e-3), F.batch_norm(x, rm2, rv2, w, b, True, 0.2, 1e-3)
    )
    torch.testing.assert_close(rm1, rm2)
    torch.testing.assert_close(rv1, rv2)


@pytest.mark.parametrize("device", devices)
def test_batchnormfunction_apply_momentum_none(device):
    C = 3
    tmod = nn.BatchNorm2d(C, momentum=None).to(device, torch.float64)
    w = tmod.weight.detach().clone().requires_grad_()
    b = tmod.bias.detach().clone().requires_grad_()
    rm, rv, nbt = tmod.running_mean.clone(), tmod.running_var.clone(), tmod.num_batches_tracked.clone()
    for _ in range(3):
        x = randn_shifted((4, C, 3, 3), torch.float64, device)
        yt = tmod(x)
        yo = bnorm_ext.BatchNormFunction.apply(x, w, b, rm, rv, nbt, True, None, 1e-5)
        torch.testing.assert_close(yo, yt)
    assert nbt.item() == 3 == tmod.num_batches_tracked.item()
    torch.testing.assert_close(rm, tmod.running_mean)
    torch.testing.assert_close(rv, tmod.running_var)
    # eval path through the Function
    tmod.eval()
    x = randn_shifted((4, C, 3, 3), torch.float64, device)
    yo = bnorm_ext.BatchNormFunction.apply(x, w, b, rm, rv, None, False, None, 1e-5)
    torch.testing.assert_close(yo, tmod(x))
    assert nbt.item() == 3


# ---------------------------------------------------------------------------
# op-level semantics (values of torch.ops.bnorm_ext.*)
# ---------------------------------------------------------------------------
OP_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
op_dtypes = [pytest.param(d, id=str(d).replace("torch.", "")) for d in OP_DTYPES]


def _tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    }[dtype]


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", op_dtypes)
@pytest.mark.parametrize("device", devices)
def test_op_batch_norm_stats(device, dtype, memory_format):
    x = randn_shifted((3, 5, 4, 6), dtype, device, memory_format=memory_format)
    mean, var = ops.batch_norm_stats(x)
    acc = acc_dtype_for(dtype)
    assert mean.dtype == acc and var.dtype == acc and mean.shape == (5,) and var.shape == (5,)
    xd = x.double()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), xd.mean(dim=RED), **tol)
    torch.testing.assert_close(var.double(), xd.var(dim=RED, unbiased=False), **tol)


def _split_stats(x, sizes):
    """Per-'process' stats of x split along N: mean/var [P, C], counts [P]."""
    parts = torch.split(x, sizes, dim=0)
    means, vars_ = zip(*[ops.batch_norm_stats(p) for p in parts])
    acc = acc_dtype_for(x.dtype)
    counts = torch.tensor([p.numel() // p.shape[1] for p in parts], dtype=acc, device=x.device)
    return torch.stack(means), torch.stack(vars_), counts


@pytest.mark.parametrize("momentum", [0.2, None], ids=["mom0.2", "momNone"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("device", devices)
def test_op_gather_stats(device, dtype, momentum):
    x = randn_shifted((7, 4, 3, 5), dtype, device)
    mean_p, var_p, counts = _split_stats(x, [1, 4, 2])  # unequal counts
    rm = torch.randn(4, dtype=dtype, device=device)
    rv = torch.rand(4, dtype=dtype, device=device) + 0.5
    nbt = torch.tensor(2, dtype=torch.long, device=device)
    rm0, rv0 = rm.clone(), rv.clone()
    eps = 1e-3
    mean, invstd = ops.batch_norm_gather_stats(mean_p, var_p, counts, rm, rv, nbt, momentum, eps)
    xd = x.double()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    gm = xd.mean(dim=RED)
    gv = xd.var(dim=RED, unbiased=False)
    torch.testing.assert_close(mean.double(), gm, **tol)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(gv + eps), **tol)
    assert nbt.item() == 3
    f = momentum if momentum is not None else 1.0 / 3
    torch.testing.assert_close(rm.double(), (1 - f) * rm0.double() + f * gm, **tol)
    torch.testing.assert_close(rv.double(), (1 - f) * rv0.double() + f * xd.var(dim=RED, unbiased=True), **tol)
    # without running stats
    mean2, invstd2 = ops.batch_norm_gather_stats(mean_p, var_p, counts, None, None, None, 0.1, eps)
    torch.testing.assert_close(mean2, mean)
    torch.testing.assert_close(invstd2, invstd)


DTYPE_PAIRS = [pytest.param(d, d, id=str(d).replace("torch.", "")) for d in OP_DTYPES] + [
    pytest.param(torch.float16, torch.float32, id="float16-params_float32"),
    pytest.param(torch.bfloat16, torch.float32, id="bfloat16-params_float32"),
]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype,pdt", DTYPE_PAIRS)
@pytest.mark.parametrize("device", devices)
def test_op_elemt_and_forward(device, dtype, pdt, memory_format, affine):
    C = 5
    x = randn_shifted((3, C, 4, 6), dtype, device, memory_format=memory_format)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).to(device, pdt) if affine else None
    b = torch.randn(C, dtype=torch.float64).to(device, pdt) if affine else None
    eps = 1e-3
    acc = acc_dtype_for(dtype)
    xd = x.double()
    w_d = w.double() if affine else torch.ones(C, dtype=torch.float64, device=device)
    b_d = b.double() if affine else torch.zeros(C, dtype=torch.float64, device=device)

    # forward_train
    rm = torch.randn(C, dtype=torch.float64).to(device, pdt)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, pdt)
    nbt = torch.tensor(0, dtype=torch.long, device=device)
    out, smean, sinv = ops.batch_norm_forward_train(x, w, b, rm, rv, nbt, 0.1, eps)
    assert out.dtype == dtype and smean.dtype == acc and sinv.dtype == acc
    assert nbt.item() == 1
    m = xd.mean(dim=RED)
    v = xd.var(dim=RED, unbiased=False)
    exp = (xd - _bc(m)) / torch.sqrt(_bc(v) + eps) * _bc(w_d) + _bc(b_d)
    torch.testing.assert_close(smean.double(), m, **_tol(acc))
    torch.testing.assert_close(sinv.double(), 1 / torch.sqrt(v + eps), **_tol(acc))
    torch.testing.assert_close(out.double(), exp, **_tol(dtype))
    tref = torch.native_batch_norm(x, w, b, None, None, True, 0.1, eps)[0]
    assert_same_strides(out, tref)

    # elemt with given mean / invstd
    mean = (m + 0.25).to(acc)
    invstd = (1.0 / torch.sqrt(v + 0.5)).to(acc)
    y = ops.batch_norm_elemt(x, w, b, mean, invstd)
    exp = (xd - _bc(mean.double())) * _bc(invstd.double()) * _bc(w_d) + _bc(b_d)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), exp, **_tol(dtype))
    assert_same_strides(y, tref)

    # forward_eval
    rm = torch.randn(C, dtype=torch.float64).to(device, pdt)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, pdt)
    y = ops.batch_norm_forward_eval(x, w, b, rm, rv, eps)
    exp = (xd - _bc(rm.double())) / torch.sqrt(_bc(rv.double()) + eps) * _bc(w_d) + _bc(b_d)
    torch.testing.assert_close(y.double(), exp, **_tol(dtype))
    assert_same_strides(y, torch.native_batch_norm(x, w, b, rm, rv, False, 0.1, eps)[0])


def _backward_case(device, dtype, memory_format, training, C=4, eps=1e-3):
    x = randn_shifted((6, C, 3, 4), dtype, device, memory_format=memory_format)
    dy = torch.randn(x.shape, dtype=torch.float64).to(device, dtype).contiguous(memory_format=memory_format)
    w = (1 + 0.5 * torch.randn(C, dtype=torch.float64)).to(device, dtype)
    rm = torch.randn(C, dtype=torch.float64).to(device, dtype)
    rv = (torch.rand(C, dtype=torch.float64) + 0.5).to(device, dtype)
    xx = x.detach().requires_grad_()
    ww = w.detach().requires_grad_()
    bb = torch.zeros(C, dtype=dtype, device=device, requires_grad=True)
    yt = F.batch_norm(xx, rm.clone(), rv.clone(), ww, bb, training=training, eps=eps)
    grads_t = torch.autograd.grad(yt, [xx, ww, bb], dy)
    return x, dy, w, rm, rv, grads_t


BWD_DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", BWD_DTYPES)
@pytest.mark.parametrize("device", devices)
def test_op_backward(device, dtype, memory_format, training):
    eps = 1e-3
    x, dy, w, rm, rv, (gx_t, gw_t, gb_t) = _backward_case(device, dtype, memory_format, training, eps=eps)
    if training:
        _, smean, sinv = ops.batch_norm_forward_train(x, w, None, None, None, None, 0.1, eps)
        gx, gw, gb = ops.batch_norm_backward(dy, x, w, None, None, smean, sinv, True, eps)
    else:
        gx, gw, gb = ops.batch_norm_backward(dy, x, w, rm, rv, None, None, False, eps)
    tol = _tol(dtype)
    torch.testing.assert_close(gx, gx_t, **tol)
    torch.testing.assert_close(gw, gw_t, **tol)
    torch.testing.assert_close(gb, gb_t, **tol)
    assert_same_strides(gx, gx_t, "grad_input")


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", BWD_DTYPES)
@pytest.mark.parametrize("device", devices)
def test_op_backward_reduce(device, dtype, memory_format):
    eps = 1e-3
    x, dy, w, rm, rv, (gx_t, gw_t, gb_t) = _backward_case(device, dtype, memory_format, True, eps=eps)
    mean, _ = ops.batch_norm_stats(x)
    sum_dy, sum_dy_xmu = ops.batch_norm_backward_reduce(dy, x, mean)
    acc = acc_dtype_for(dtype)
    assert sum_dy.dtype == acc and sum_dy_xmu.dtype == acc
    xd = x.double()
    tol = _tol(dtype)
    torch.testing.assert_close(sum_dy.double(), dy.double().sum(dim=RED), **tol)
    torch.testing.assert_close(sum_dy_xmu.double(), (dy.double() * (xd - _bc(xd.mean(dim=RED)))).sum(dim=RED), **tol)
    torch.testing.assert_close(sum_dy.to(dtype), gb_t, **tol)
    # with an arbitrary (not the batch) mean: sum(dy * (x - m))
    m2 = (mean.double() + torch.linspace(-1, 1, mean.numel(), dtype=torch.float64, device=mean.device)).to(acc)
    _, s2 = ops.batch_norm_backward_reduce(dy, x, m2)
    torch.testing.assert_close(s2.double(), (dy.double() * (xd - _bc(m2.double()))).sum(dim=RED), **tol)


@pytest.mark.parametrize("memory_format", memory_formats)
@pytest.mark.parametrize("dtype", BWD_DTYPES)
@pytest.mark.parametrize("device", devices)
def test_op_gather_and_backward_elemt_decomposition(device, dtype, memory_format):
    """SyncBN-style: per-part stats -> gather -> global sums -> backward_elemt per part."""
    eps = 1e-3
    x, dy, w, rm, rv, (gx_t, gw_t, gb_t) = _backward_case(device, dtype, memory_format, True, eps=eps)
    tol = _tol(dtype)
    mean_p, var_p, counts = _split_stats(x, [2, 4])
    mean, invstd = ops.batch_norm_gather_stats(mean_p, var_p, counts, None, None, None, 0.1, eps)
    xd = x.double()
    # global reductions computed independently of batch_norm_backward_reduce
    acc = acc_dtype_for(dtype)
    sum_dy = dy.double().sum(dim=RED).to(acc)
    sum_dy_xmu = (dy.double() * (xd - _bc(mean.double()))).sum(dim=RED).to(acc)
    gparts = []
    for part_x, part_dy in zip(torch.split(x, [2, 4]), torch.split(dy, [2, 4])):
        g = ops.batch_norm_backward_elemt(part_dy, part_x, mean, invstd, w, sum_dy, sum_dy_xmu, counts)
        assert g.dtype == dtype and g.shape == part_x.shape
        gparts.append(g)
    torch.testing.assert_close(torch.cat(gparts), gx_t, **tol)
    # without weight: the same with weight = 1
    g1 = ops.batch_norm_backward_elemt(dy, x, mean, invstd, None, sum_dy, sum_dy_xmu, counts)
    g2 = ops.batch_norm_backward_elemt(dy, x, mean, invstd, torch.ones_like(w), sum_dy, sum_dy_xmu, counts)
    torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_grad_fast_path_matches_autograd_path(training):
    # Without a graph to record, batch_norm calls the ops directly; the result,
    # running stats and num_batches_tracked must be bitwise those of the
    # autograd.Function path.
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64) * 3 + 5
    a, b = bnorm_ext.BatchNorm2d(6, momentum=None).double(), bnorm_ext.BatchNorm2d(6, momentum=None).double()
    with torch.no_grad():
        for m in (a, b):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    b.load_state_dict(a.state_dict())
    a.train(training)
    b.train(training)
    with torch.no_grad():
        y_fast = a(x)
    y_graph = b(x.clone().requires_grad_())
    assert y_graph.requires_grad
    assert torch.equal(y_fast, y_graph.detach())
    for name, buf in a.named_buffers():
        assert torch.equal(buf, dict(b.named_buffers())[name]), name
