"""vmap rules of the bnorm_ext ops (torch.func.vmap, and transforms built on it).

A vmap over B batches of an (N, C, *) batch norm is one batch norm over B*C
channels: the vmapped dim is folded into the channel dim, per-channel tensors
become [B*C], and the results are unfolded. Statistics stay per (batch, channel),
exactly as B separate calls would compute them.
"""

from typing import Optional

import torch
from torch import Tensor

_UNBATCHED_RUNNING_STATS = (
    "Batch norm got a batched tensor as input while the running_mean or running_var, which will be updated "
    "in place, were not batched.\nIf you are using a module and do not need eval mode, please set "
    "`track_running_stats` to be False.If you are using a prebuilt module and do not need eval mode, please "
    "see the functorch website for resources on how to patch your module to work with vmap"
)


def _batch_first(t: Tensor, bdim: Optional[int], batch_size: int) -> Tensor:
    # t with its vmapped dim moved to 0 (expanded there if t is not batched).
    if bdim is None:
        return t.unsqueeze(0).expand(batch_size, *t.shape)
    return t.movedim(bdim, 0)


def _fold_input(t: Optional[Tensor], bdim: Optional[int], batch_size: int) -> Optional[Tensor]:
    # (N, C, *) batched B times -> (N, B*C, *).
    if t is None:
        return None
    t = _batch_first(t, bdim, batch_size).movedim(0, 1)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _unfold_input(t: Tensor, batch_size: int) -> Tensor:
    # (N, B*C, *) -> (N, B, C, *): the vmapped dim is 1.
    return t.reshape(t.shape[0], batch_size, -1, *t.shape[2:])


def _fold_channel(t: Optional[Tensor], bdim: Optional[int], batch_size: int) -> Optional[Tensor]:
    # [C] batched B times -> [B*C].
    if t is None:
        return None
    return _batch_first(t, bdim, batch_size).reshape(-1)


def _check_running_stats_batched(running_mean, running_var, mean_dim, var_dim, count_dim) -> None:
    # The training rules' refusals, raised before the op writes anything.
    if (running_mean is not None or running_var is not None) and (mean_dim is None or var_dim is None):
        raise RuntimeError(_UNBATCHED_RUNNING_STATS)
    if count_dim is not None:
        raise RuntimeError("bnorm_ext: vmap over a batched num_batches_tracked is not supported")


def _fold_running_stat(t: Optional[Tensor], bdim: Optional[int]):
    # (the batched running stat with its vmapped dim at 0, the [B*C] tensor the op updates).
    if t is None:
        return None, None
    batched = t.movedim(bdim, 0)
    return batched, batched.reshape(-1)


def _write_back_running_stat(batched: Optional[Tensor], flat: Optional[Tensor]) -> None:
    # NB: the op updated `flat` in place; write it back where reshape had to copy.
    if batched is not None and flat.data_ptr() != batched.data_ptr():
        batched.copy_(flat.view(batched.shape))


def _forward_train_folded(
    op, B, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, *extra
):
    # A training forward op (plain or fused; `extra`: its arguments after eps, already folded)
    # on the vmapped dim folded into the channels, running statistics written back.
    input_dim, weight_dim, bias_dim, mean_dim, var_dim, count_dim = in_dims[:6]
    _check_running_stats_batched(running_mean, running_var, mean_dim, var_dim, count_dim)
    mean_batched, mean_flat = _fold_running_stat(running_mean, mean_dim)
    var_batched, var_flat = _fold_running_stat(running_var, var_dim)
    output, save_mean, save_invstd = op(
        _fold_input(input, input_dim, B),
        _fold_channel(weight, weight_dim, B),
        _fold_channel(bias, bias_dim, B),
        mean_flat,
        var_flat,
        num_batches_tracked,
        momentum,
        eps,
        *extra,
    )
    _write_back_running_stat(mean_batched, mean_flat)
    _write_back_running_stat(var_batched, var_flat)
    return (_unfold_input(output, B), save_mean.view(B, -1), save_invstd.view(B, -1)), (1, 0, 0)


def _forward_eval_folded(op, B, in_dims, input, weight, bias, running_mean, running_var, eps, *extra):
    # An eval forward op (plain or fused) on the vmapped dim folded into the channels.
    input_dim, weight_dim, bias_dim, mean_dim, var_dim = in_dims[:5]
    output = op(
        _fold_input(input, input_dim, B),
        _fold_channel(weight, weight_dim, B),
        _fold_channel(bias, bias_dim, B),
        _fold_channel(running_mean, mean_dim, B),
        _fold_channel(running_var, var_dim, B),
        eps,
        *extra,
    )
    return _unfold_input(output, B), 1


@torch.library.register_vmap("bnorm_ext::batch_norm_forward_train")
def _forward_train_vmap(
    info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
):
    return _forward_train_folded(
        torch.ops.bnorm_ext.batch_norm_forward_train,
        info.batch_size,
        in_dims,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
    )


@torch.library.register_vmap("bnorm_ext::batch_norm_forward_eval")
def _forward_eval_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
    return _forward_eval_folded(
        torch.ops.bnorm_ext.batch_norm_forward_eval,
        info.batch_size,
        in_dims,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
    )


@torch.library.register_vmap("bnorm_ext::batch_norm_backward")
def _backward_vmap(
    info, in_dims, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, training, eps
):
    B = info.batch_size
    channel_args = zip((weight, running_mean, running_var, save_mean, save_invstd), in_dims[2:7])
    grad_input, grad_weight, grad_bias = torch.ops.bnorm_ext.batch_norm_backward.default(
        _fold_input(grad_out, in_dims[0], B),
        _fold_input(input, in_dims[1], B),
        *(_fold_channel(t, bdim, B) for t, bdim in channel_args),
        training,
        eps,
    )
    return (_unfold_input(grad_input, B), grad_weight.view(B, -1), grad_bias.view(B, -1)), (1, 0, 0)


@torch.library.register_vmap("bnorm_ext::batch_norm_act_forward_train")
def _act_forward_train_vmap(
    info,
    in_dims,
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
    B = info.batch_size
    return _forward_train_folded(
        torch.ops.bnorm_ext.batch_norm_act_forward_train,
        B,
        in_dims,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        _fold_input(residual, in_dims[8], B),
        activation,
        negative_slope,
    )


@torch.library.register_vmap("bnorm_ext::batch_norm_act_forward_eval")
def _act_forward_eval_vmap(
    info, in_dims, input, weight, bias, running_mean, running_var, eps, residual, activation, negative_slope
):
    B = info.batch_size
    return _forward_eval_folded(
        torch.ops.bnorm_ext.batch_norm_act_forward_eval,
        B,
        in_dims,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        eps,
        _fold_input(residual, in_dims[6], B),
        activation,
        negative_slope,
    )


@torch.library.register_vmap("bnorm_ext::batch_norm_act_backward")
def _act_backward_vmap(
    info,
    in_dims,
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
    B = info.batch_size
    channel_args = zip((weight, bias, running_mean, running_var, save_mean, save_invstd), in_dims[3:9])
    grad_input, grad_weight, grad_bias, grad_residual = torch.ops.bnorm_ext.batch_norm_act_backward.default(
        _fold_input(grad_out, in_dims[0], B),
        _fold_input(output, in_dims[1], B),
        _fold_input(input, in_dims[2], B),
        *(_fold_channel(t, bdim, B) for t, bdim in channel_args),
        _fold_input(residual, in_dims[9], B),
        training,
        eps,
        need_grad_residual,
        activation,
        negative_slope,
    )
    if need_grad_residual:
        grad_residual, residual_dim = _unfold_input(grad_residual, B), 1
    else:
        residual_dim = None  # the op's empty [0] placeholder
    return (
        (_unfold_input(grad_input, B), grad_weight.view(B, -1), grad_bias.view(B, -1), grad_residual),
        (1, 0, 0, residual_dim),
    )
