"""SyncBatchNorm over torch.distributed, on bnorm_ext's kernels.

Batch statistics span every process of a process group: each process computes
its own per-channel (mean, var, count) with bnorm_ext, one all-gather brings
them together, and bnorm_ext merges them exactly (Chan et al.), so uneven batch
sizes, a process with an empty batch included, give the statistics of the
concatenated batch. The backward is one all-reduce of the two per-channel sums.

Unlike torch.nn.SyncBatchNorm, the forward does not read device values on the
host (the count of each process is made on the device and empty batches are
merged with weight zero instead of being masked out), so it can be captured in
a CUDA graph; the one exception is a process with at most one value per
channel, which reads the group's total to refuse a group-wide count of 1 (not
while capturing). It also runs on CPU tensors (gloo), under
DistributedDataParallel too.
"""

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn

from .modules import _BatchNormForward, _fx_leaf_call

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction"]

# The flat all-gather (a 1-D output that gloo and NCCL both accept): newer
# torch names it all_gather_single and deprecates all_gather_into_tensor.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce_size(input: Tensor) -> int:
    # Values per channel on this process: N * prod(spatial), from the shape only.
    size = input.shape[0]
    for d in input.shape[2:]:
        size *= d
    return size


def _is_capturing(input: Tensor) -> bool:
    return input.is_cuda and torch.cuda.is_current_stream_capturing()


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch normalization with statistics over a process group.

    apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
          momentum, eps, process_group, world_size) -> output

    Every process of `process_group` must call it (same C, dtype, momentum and
    eps), and in the backward every process must need the input gradient or
    none. running_mean/running_var (and num_batches_tracked, which is then
    incremented; momentum=None means the cumulative average) are updated with
    the statistics of the whole group, identically on every process.

    Gradients: the input gradient is that of the group-wide normalization;
    grad_weight and grad_bias are this process's own contributions, as in
    torch.nn.SyncBatchNorm (DistributedDataParallel all-reduces them).
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        num_batches_tracked: Optional[Tensor],
        momentum: Optional[float],
        eps: float,
        process_group,
        world_size: int,
    ) -> Tensor:
        C = input.shape[1]
        local_size = _reduce_size(input)
        acc = _acc_dtype(input.dtype)

        # Local statistics (zeros for an empty batch, which then weighs 0).
        mean, var = torch.ops.bnorm_ext.batch_norm_stats(input)
        # NB: the op's own checks of weight/bias against the input, on an empty
        # slice (no kernel runs), so a bad parameter raises before any
        # collective and before gather_stats writes the running stats.
        torch.ops.bnorm_ext.batch_norm_elemt(input[:0], weight, bias, mean, var)
        # NB: one float64 message [mean(C), var(C), count] per process: float32
        # statistics are exact in float64 and the count stays exact past 2**24.
        # The count comes from the shape, filled on the device: no host sync.
        count = torch.full((1,), local_size, dtype=torch.float64, device=input.device)
        local = torch.cat([mean.to(torch.float64), var.to(torch.float64), count])
        gathered = torch.empty(world_size * (2 * C + 1), dtype=torch.float64, device=input.device)
        _all_gather_flat(gathered, local, group=process_group)
        gathered = gathered.view(world_size, 2 * C + 1)
        means = gathered[:, :C].to(acc).contiguous()
        vars_ = gathered[:, C : 2 * C].to(acc).contiguous()
        counts = gathered[:, 2 * C].contiguous()

        # More than one value per channel is needed across the group. A process
        # with two or more values of its own knows that without looking; the
        # others (one or zero values) read the gathered total, a host sync that
        # only such degenerate batches pay, and raise together, before any
        # buffer is written. Skipped while a CUDA graph is being captured.
        if local_size <= 1 and not _is_capturing(input):
            if counts.sum().item() == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got input size "
                    f"{input.size()} on this process and 1 value per channel in the process group"
                )

        mean, invstd = torch.ops.bnorm_ext.batch_norm_gather_stats(
            means, vars_, counts, running_mean, running_var, num_batches_tracked, momentum, eps
        )
        output = torch.ops.bnorm_ext.batch_norm_elemt(input, weight, bias, mean, invstd)

        ctx.save_for_backward(input, weight, mean, invstd, counts)
        ctx.process_group = process_group
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return output

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, weight, mean, invstd, counts = ctx.saved_tensors
        # NB: not twice differentiable (the collectives are not). Refused when
        # the backward would be differentiated (create_graph=True with grad
        # requiring inputs), before any collective, rather than returning
        # gradients that silently lack their dependence on the input.
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (grad_out, input, weight)):
            raise RuntimeError(
                "bnorm_ext.SyncBatchNorm: double backward (create_graph=True) is not supported "
                "across processes; use bnorm_ext.BatchNorm*d for a single process"
            )
        # Local per-channel sum(dy) and sum(dy * (x - mean)); zeros for an empty batch.
        sum_dy, sum_dy_xmu = torch.ops.bnorm_ext.batch_norm_backward_reduce(grad_out, input, mean)

        grad_input = grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)

        if ctx.needs_input_grad[0]:
            # The one collective of the backward: both sums in one all-reduce.
            C = sum_dy.shape[0]
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, dist.ReduceOp.SUM, group=ctx.process_group)
            grad_input = torch.ops.bnorm_ext.batch_norm_backward_elemt(
                grad_out, input, mean, invstd, weight, combined[:C], combined[C:], counts
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm on bnorm_ext's kernels, for any device.

    Same constructor, attributes, repr, state_dict and semantics as
    torch.nn.SyncBatchNorm. In training mode with an initialised process
    group of two or more processes, the batch statistics are those of the
    whole group's batch (exact for uneven and empty local batches); in eval
    mode, with one process, or without torch.distributed initialised it is
    bnorm_ext's single-process BatchNorm.

    NB: a sibling of torch.nn.SyncBatchNorm (both subclass _BatchNorm), not a
    subclass: DistributedDataParallel refuses any CPU model that holds a
    torch.nn.SyncBatchNorm instance ("SyncBatchNorm layers only work with GPU
    modules"), which would rule out training on CPUs with gloo.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[Any] = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        # NB: torch 2.11's _BatchNorm takes no `bias` argument: passed only when False.
        bias_kwarg = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, **bias_kwarg
        )
        self.process_group = process_group

    # torch's own checks and messages
    _check_input_dim = nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels
    # what _BatchNormForward._batch_norm_forward (the single-process path) reads
    _batch_norm_mode = _BatchNormForward._batch_norm_mode

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return _fx_leaf_call(self, (input,), lambda x: _BatchNormForward._batch_norm_forward(self, x))
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)

        need_sync = self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            process_group = self.process_group if self.process_group else dist.group.WORLD
            world_size = dist.get_world_size(process_group)
            need_sync = world_size > 1
        if not need_sync:
            return _BatchNormForward._batch_norm_forward(self, input)

        if self.eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {self.eps}")
        # Running stats, num_batches_tracked and momentum exactly as the single-process modules pass them.
        running_mean, running_var, _, momentum, num_batches_tracked = self._batch_norm_mode()
        return SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            num_batches_tracked,
            momentum,
            self.eps,
            process_group,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replaces every BatchNorm layer in `module` (torch's BatchNorm*d and
        SyncBatchNorm, bnorm_ext's BatchNorm*d: any
        torch.nn.modules.batchnorm._BatchNorm) with a bnorm_ext.SyncBatchNorm
        that shares its parameters and buffers, keeps its train/eval flag and
        qconfig, and synchronizes over `process_group` (default: the whole
        world). Returns `module`, or the new layer if `module` is itself a
        BatchNorm layer, as torch.nn.SyncBatchNorm.convert_sync_batchnorm does.
        """
        module_output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module_output = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                bias=module.bias is not None,
            )
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module_output
