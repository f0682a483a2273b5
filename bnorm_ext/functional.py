"""Functional API and autograd.Function over the bnorm_ext ops.

The ops are differentiable as they are (their autograd kernels are registered
with the dispatcher, csrc/autograd/), so `batch_norm` and the modules call
them directly on every path: eager, no_grad, forward-mode AD, torch.func,
TorchScript, tracing and torch.compile all see the same op.
"""

from typing import List, Optional

import torch
from torch import Tensor

from . import _batching  # noqa: F401  (vmap rules of the ops)


def _verify_batch_size(size: List[int]) -> None:
    # Same check and message as torch.nn.functional.batch_norm.
    size_prods = size[0]
    for i in range(len(size) - 2):
        size_prods *= size[i + 2]
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")


def _check_batch_norm_args(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    api: str,
) -> None:
    # F.batch_norm's checks (same exceptions and messages); TorchScript-compatible.
    if training:
        _verify_batch_size(input.size())
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
        return
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if running_mean is None or running_var is None:
        raise RuntimeError(f"{api}: running_mean and running_var must be given when training=False")


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
    # F.batch_norm's checks, then one op; TorchScript-compatible.
    _check_batch_norm_args(input, running_mean, running_var, training, eps, "bnorm_ext.batch_norm")
    if training:
        return torch.ops.bnorm_ext.batch_norm_forward_train(
            input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
        )[0]
    assert running_mean is not None and running_var is not None  # checked above; for TorchScript
    return torch.ops.bnorm_ext.batch_norm_forward_eval(input, weight, bias, running_mean, running_var, eps)


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


class _BatchNormWithStats(torch.autograd.Function):
    # BatchNormFunction's computation, returning (output, save_mean, save_invstd)
    # (the statistics are None in eval); torch.func applies this class itself.

    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps):
        if training:
            return torch.ops.bnorm_ext.batch_norm_forward_train(
                input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps
            )
        output = torch.ops.bnorm_ext.batch_norm_forward_eval(input, weight, bias, running_mean, running_var, eps)
        return output, None, None

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, running_mean, running_var, _, training, _, eps = inputs
        _, save_mean, save_invstd = output
        if training:
            ctx.save_for_backward(input, weight, save_mean, save_invstd)
            ctx.mark_non_differentiable(save_mean, save_invstd)
        else:
            ctx.save_for_backward(input, weight, running_mean, running_var)
        ctx.save_for_forward(input, weight, save_mean, save_invstd, running_mean, running_var)
        ctx.training = training
        ctx.eps = eps
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_invstd):
        input, weight, mean, invstd_or_var = ctx.saved_tensors
        if ctx.training and torch.is_grad_enabled():
            # NB: differentiating this backward (create_graph=True) needs the batch
            # statistics as functions of the input; the saved ones are constants.
            _, mean, invstd_or_var = torch.ops.bnorm_ext.batch_norm_forward_train(
                input, None, None, None, None, None, 0.0, ctx.eps
            )
        if ctx.training:
            stats = (None, None, mean, invstd_or_var)
        else:
            stats = (mean, invstd_or_var, None, None)
        # The backward op is itself differentiable (double backward).
        grad_input, grad_weight, grad_bias = torch.ops.bnorm_ext.batch_norm_backward.default(
            grad_out, input, weight, *stats, ctx.training, ctx.eps
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

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, *_):
        input, weight, save_mean, save_invstd, running_mean, running_var = ctx.saved_tensors
        if ctx.training:
            mean, invstd = save_mean, save_invstd
        else:
            acc = torch.float64 if input.dtype == torch.float64 else torch.float32
            mean, invstd = running_mean, torch.rsqrt(running_var.to(acc) + ctx.eps)
        output_t = torch.ops.bnorm_ext.batch_norm_forward_jvp(
            input, input_t, weight, weight_t, bias_t, mean, invstd, ctx.training
        )[0]
        return output_t, None, None


class BatchNormFunction(_BatchNormWithStats):
    """Batch normalization over dim 1 of an (N, C, *) input.

    apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
          training, momentum, eps) -> output

    training=True normalizes with batch statistics and, when running_mean and
    running_var are given, updates them in the same op (and increments
    num_batches_tracked if given; momentum=None means the cumulative average
    over num_batches_tracked). training=False uses the running statistics.

    Reverse mode (any order), forward mode (`jvp`) and vmap
    (`generate_vmap_rule`) are supported, so it works under every torch.func
    transform. The modules and `batch_norm` call the differentiable ops
    directly; this Function is the same computation for code that wants one.
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        return _BatchNormWithStats.apply(*args, **kwargs)[0]
