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


@torch.library.register_vmap("bnorm_ext::batch_norm_forward_train")
def _forward_train_vmap(info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked,
                        momentum, eps):
    B = info.batch_size
    input_dim, weight_dim, bias_dim, mean_dim, var_dim, count_dim = in_dims[:6]
    has_running_stats = running_mean is not None or running_var is not None
    if has_running_stats and (mean_dim is None or var_dim is None):
        raise RuntimeError(_UNBATCHED_RUNNING_STATS)
    if count_dim is not None:
        raise RuntimeError("bnorm_ext: vmap over a batched num_batches_tracked is not supported")
    running = []
    for t, bdim in ((running_mean, mean_dim), (running_var, var_dim)):
        if t is None:
            running.append((None, None))
            continue
        batched = t.movedim(bdim, 0)
        flat = batched.reshape(-1)
        running.append((batched, flat))
    output, save_mean, save_invstd = torch.ops.bnorm_ext.batch_norm_forward_train(
        _fold_input(input, input_dim, B),
        _fold_channel(weight, weight_dim, B),
        _fold_channel(bias, bias_dim, B),
        running[0][1],
        running[1][1],
        num_batches_tracked,
        momentum,
        eps,
    )
    for batched, flat in running:
        # NB: the op updated `flat` in place; write it back where reshape had to copy.
        if batched is not None and flat.data_ptr() != batched.data_ptr():
            batched.copy_(flat.view(batched.shape))
    return (_unfold_input(output, B), save_mean.view(B, -1), save_invstd.view(B, -1)), (1, 0, 0)


@torch.library.register_vmap("bnorm_ext::batch_norm_forward_eval")
def _forward_eval_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps):
    B = info.batch_size
    input_dim, weight_dim, bias_dim, mean_dim, var_dim = in_dims[:5]
    output = torch.ops.bnorm_ext.batch_norm_forward_eval(
        _fold_input(input, input_dim, B),
        _fold_channel(weight, weight_dim, B),
        _fold_channel(bias, bias_dim, B),
        _fold_channel(running_mean, mean_dim, B),
        _fold_channel(running_var, var_dim, B),
        eps,
    )
    return _unfold_input(output, B), 1


@torch.library.register_vmap("bnorm_ext::batch_norm_backward")
def _backward_vmap(info, in_dims, grad_out, input, weight, running_mean, running_var, save_mean, save_invstd,
                   training, eps):
    B = info.batch_size
    channel_args = zip((weight, running_mean, running_var, save_mean, save_invstd), in_dims[2:7])
    grad_input, grad_weight, grad_bias = torch.ops.bnorm_ext.batch_norm_backward(
        _fold_input(grad_out, in_dims[0], B),
        _fold_input(input, in_dims[1], B),
        *(_fold_channel(t, bdim, B) for t, bdim in channel_args),
        training,
        eps,
    )
    return (_unfold_input(grad_input, B), grad_weight.view(B, -1), grad_bias.view(B, -1)), (1, 0, 0)
