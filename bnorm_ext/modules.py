"""Drop-in BatchNorm modules: torch's classes with the forward replaced."""

from typing import Optional, Tuple

import torch
from torch import Tensor, fx, nn

from .functional import _batch_norm


def _fx_leaf_call(module: nn.Module, args: tuple, trace_through) -> fx.Proxy:
    # NB: FX keeps modules from torch.nn as call_module leaves and traces into
    # others; ours record themselves as a leaf the same way, so a traced model
    # switches between train and eval with the module, as with torch's. The
    # traced module itself is traced through (`trace_through(*args)`), as torch's is.
    tracer = args[0].tracer
    if module is getattr(tracer, "root", None):
        return trace_through(*args)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _BatchNormForward:
    # forward of torch's _BatchNorm, calling bnorm_ext. NB: num_batches_tracked is
    # incremented inside the op, after its checks, so a call that raises leaves
    # it (and the running stats) untouched; torch increments it first.
    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._batch_norm_forward(input)
        if isinstance(input, fx.Proxy):
            return _fx_leaf_call(self, (input,), self._batch_norm_forward)
        return self._batch_norm_forward(input)

    def _batch_norm_forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, bn_training, momentum, num_batches_tracked = self._batch_norm_mode()
        return _batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
            num_batches_tracked,
        )

    def _batch_norm_mode(
        self,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], bool, Optional[float], Optional[Tensor]]:
        # (running_mean, running_var, training, momentum, num_batches_tracked) of
        # the op call, as torch's _BatchNorm.forward decides them.
        momentum: Optional[float] = self.momentum
        num_batches_tracked: Optional[Tensor] = None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            num_batches_tracked = self.num_batches_tracked
        elif momentum is None:
            momentum = 0.0
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        track = not self.training or self.track_running_stats
        return (
            self.running_mean if track else None,
            self.running_var if track else None,
            bn_training,
            momentum,
            num_batches_tracked,
        )


class BatchNorm1d(_BatchNormForward, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d running bnorm_ext's kernels."""


class BatchNorm2d(_BatchNormForward, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d running bnorm_ext's kernels."""


class BatchNorm3d(_BatchNormForward, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d running bnorm_ext's kernels."""


_TO_OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_OURS.items()}


def _swap_classes(model: nn.Module, mapping: dict) -> nn.Module:
    # Our classes add nothing but forward, so swapping __class__ keeps every
    # parameter, buffer, hook, device, dtype and the train/eval flag as it is.
    for module in model.modules():
        new_class = mapping.get(type(module))
        if new_class is not None:
            module.__class__ = new_class
    return model


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Makes every torch.nn.BatchNorm{1,2,3}d in `model` (itself included) a
    bnorm_ext module, in place; returns `model`. Subclasses such as
    SyncBatchNorm are left alone."""
    return _swap_classes(model, _TO_OURS)


def revert_batchnorm(model: nn.Module) -> nn.Module:
    """The inverse of convert_batchnorm: bnorm_ext modules back to torch's."""
    return _swap_classes(model, _TO_TORCH)
