"""Autograd function and functional API over the bnorm_ext ops."""

from typing import Optional

import torch
from torch import Tensor


def _verify_batch_size(size: torch.Size) -> None:
    # Same check and message as torch.nn.functional.batch_norm.
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _differentiable_backward(grad_out, input, weight, running_mean, running_var, training, eps):
    # NB: used only when the backward itself is differentiated (create_graph=True,
    # double backward). It is the same gradient as bnorm_ext::batch_norm_backward,
    # written in torch ops so that autograd can differentiate it; batch statistics
    # are recomputed from `input` so their dependence on it is part of the graph.
    dims = [0] + list(range(2, input.dim()))
    shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
    if training:
        mean = input.mean(dims, keepdim=True)
        invstd = torch.rsqrt(input.var(dims, unbiased=False, keepdim=True) + eps)
    else:
        mean = running_mean.view(shape)
        invstd = torch.rsqrt(running_var.view(shape) + eps)
    xhat = (input - mean) * invstd
    grad_bias = grad_out.sum(dims)
    grad_weight = (grad_out * xhat).sum(dims)
    scale = invstd if weight is None else weight.view(shape) * invstd
    if training:
        count = input.numel() // input.shape[1]
        grad_input = scale * (grad_out - (grad_bias.view(shape) + xhat * grad_weight.view(shape)) / count)
    else:
        grad_input = grad_out * scale
    return grad_input, grad_weight, grad_bias


class BatchNormFunction(torch.autograd.Function):
    """Batch normalization over dim 1 of an (N, C, *) input.

    apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
          training, momentum, eps) -> output

    training=True normalizes with batch statistics and, when running_mean and
    running_var are given, updates them in the same op (and increments
    num_batches_tracked if given; momentum=None means the cumulative average
    over num_batches_tracked). training=False uses the running statistics.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps):
        if training:
            output, save_mean, save_invstd = torch.ops.bnorm_ext.batch_norm_forward_train(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
            )
            ctx.save_for_backward(input, weight, save_mean, save_invstd)
        else:
            output = torch.ops.bnorm_ext.batch_norm_forward_eval(input, weight, bias, running_mean, running_var, eps)
            ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.training = training
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mean_or_running_mean, invstd_or_running_var = ctx.saved_tensors
        if ctx.training:
            running_mean = running_var = None
            save_mean, save_invstd = mean_or_running_mean, invstd_or_running_var
        else:
            running_mean, running_var = mean_or_running_mean, invstd_or_running_var
            save_mean = save_invstd = None
        if torch.is_grad_enabled():
            grad_input, grad_weight, grad_bias = _differentiable_backward(
                grad_out, input, weight, running_mean, running_var, ctx.training, ctx.eps
            )
        else:
            grad_input, grad_weight, grad_bias = torch.ops.bnorm_ext.batch_norm_backward(
                grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, ctx.training, ctx.eps
            )
        return (
            grad_input,
            grad_weight if weight is not None else None,
            grad_bias if ctx.has_bias else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError("bnorm_ext.batch_norm: running_mean and running_var must be given when training=False")
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (input, weight, bias)):
        # No graph to record: the op alone, without autograd.Function's overhead.
        if training:
            return torch.ops.bnorm_ext.batch_norm_forward_train(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
            )[0]
        return torch.ops.bnorm_ext.batch_norm_forward_eval(input, weight, bias, running_mean, running_var, eps)
    return BatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps
    )


def batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Same signature and semantics as torch.nn.functional.batch_norm."""
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
