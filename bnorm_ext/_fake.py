"""Fake (meta) kernels: output shapes, dtypes and strides of every op, for
FakeTensor tracing under torch.compile and torch.library.opcheck."""

import torch
from torch._prims_common import suggest_memory_format


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_output(input: torch.Tensor) -> torch.Tensor:
    # Same memory format as the real kernels (and torch): input's suggested one.
    return torch.empty_like(input, memory_format=suggest_memory_format(input))


def _channel_stat(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((input.shape[1],), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("bnorm_ext::batch_norm_stats")
def _(input):
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bnorm_ext::batch_norm_gather_stats")
def _(mean, var, counts, running_mean, running_var, num_batches_tracked, momentum, eps):
    C = mean.shape[1]
    return mean.new_empty((C,)), mean.new_empty((C,))


@torch.library.register_fake("bnorm_ext::batch_norm_elemt")
def _(input, weight, bias, mean, invstd):
    return _like_output(input)


@torch.library.register_fake("bnorm_ext::batch_norm_forward_train")
def _(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    return _like_output(input), _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bnorm_ext::batch_norm_forward_eval")
def _(input, weight, bias, running_mean, running_var, eps):
    return _like_output(input)


@torch.library.register_fake("bnorm_ext::batch_norm_backward")
def _(grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps):
    param_dtype = weight.dtype if weight is not None else _acc_dtype(input.dtype)
    C = input.shape[1]
    return (
        _like_output(input),
        input.new_empty((C,), dtype=param_dtype),
        input.new_empty((C,), dtype=param_dtype),
    )


@torch.library.register_fake("bnorm_ext::batch_norm_backward_reduce")
def _(grad_out, input, mean):
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bnorm_ext::batch_norm_backward_elemt")
def _(grad_out, input, mean, invstd, weight, sum_dy, sum_dy_xmu, counts):
    return _like_output(input)


@torch.library.register_fake("bnorm_ext::batch_norm_act_forward_train")
def _(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    num_batches_tracked,
    momentum,
    eps,
    residual,
    activation,
    negative_slope,
):
    return _like_output(input), _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("bnorm_ext::batch_norm_act_forward_eval")
def _(input, weight, bias, running_mean, running_var, eps, residual, activation, negative_slope):
    return _like_output(input)


@torch.library.register_fake("bnorm_ext::batch_norm_act_backward")
def _(
    grad_out,
    output,
    input,
    weight,
    bias,
    running_mean,
    running_var,
    save_mean,
    save_invstd,
    residual,
    training,
    eps,
    need_grad_residual,
    activation,
    negative_slope,
):
    param_dtype = weight.dtype if weight is not None else _acc_dtype(input.dtype)
    C = input.shape[1]
    return (
        _like_output(input),
        input.new_empty((C,), dtype=param_dtype),
        input.new_empty((C,), dtype=param_dtype),
        _like_output(input) if need_grad_residual else input.new_empty((0,)),
    )


# The `.out` overloads write into (and return) the given tensors.
@torch.library.register_fake("bnorm_ext::batch_norm_backward.out")
def _(
    grad_out,
    input,
    weight,
    running_mean,
    running_var,
    save_mean,
    save_invstd,
    training,
    eps,
    *,
    grad_input,
    grad_weight,
    grad_bias,
):
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("bnorm_ext::batch_norm_act_backward.out")
def _(
    grad_out,
    output,
    input,
    weight,
    bias,
    running_mean,
    running_var,
    save_mean,
    save_invstd,
    residual,
    training,
    eps,
    need_grad_residual,
    activation,
    negative_slope,
    *,
    grad_input,
    grad_weight,
    grad_bias,
    grad_residual,
):
    return grad_input, grad_weight, grad_bias, grad_residual
