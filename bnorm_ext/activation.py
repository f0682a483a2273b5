"""Fused BatchNorm + activation (+ residual add): y = act(BN(x) + residual).

`batch_norm_act` and `BatchNormAct2d` call the fused ops
torch.ops.bnorm_ext.batch_norm_act_forward_{train,eval}, differentiable at the
dispatcher like the plain ops (csrc/autograd/batch_norm_act_autograd.cpp).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from .functional import _check_batch_norm_args
from .modules import BatchNorm2d, _fx_leaf_call

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu")


def _check_activation(activation: str, negative_slope: float) -> None:
    # Same checks as the ops (ValueError), before anything runs.
    if activation != "identity" and activation != "relu" and activation != "leaky_relu" and activation != "silu":
        raise ValueError(f"activation must be 'identity', 'relu', 'leaky_relu' or 'silu', got '{activation}'")
    if activation == "leaky_relu" and negative_slope < 0.0:
        raise ValueError(
            f"leaky_relu needs negative_slope >= 0 (the backward reads the sign from the output), got {negative_slope}"
        )


def _activation(input: Tensor, activation: str, negative_slope: float) -> Tensor:
    # torch's own activation (the unfused composition).
    if activation == "relu":
        return F.relu(input)
    if activation == "leaky_relu":
        return F.leaky_relu(input, negative_slope)
    if activation == "silu":
        return F.silu(input)
    return input


def _batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    residual: Optional[Tensor],
    activation: str,
    negative_slope: float,
    num_batches_tracked: Optional[Tensor] = None,
) -> Tensor:
    # TorchScript-compatible.
    _check_activation(activation, negative_slope)
    _check_batch_norm_args(input, running_mean, running_var, training, eps, "bnorm_ext.batch_norm_act")
    fused_residual = residual
    fused_activation = activation
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
        # NB: the fused ops take a residual of the input's shape and dtype; anything
        # else (broadcasting, type promotion) is BN, then torch's add and activation.
        fused_residual = None
        fused_activation = "identity"
    if training:
        output = torch.ops.bnorm_ext.batch_norm_act_forward_train(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            momentum,
            eps,
            fused_residual,
            fused_activation,
            negative_slope,
        )[0]
    else:
        assert running_mean is not None and running_var is not None  # checked above; for TorchScript
        output = torch.ops.bnorm_ext.batch_norm_act_forward_eval(
            input, weight, bias, running_mean, running_var, eps, fused_residual, fused_activation, negative_slope
        )
    if residual is not None and fused_residual is None:
        output = _activation(output + residual, activation, negative_slope)
    return output


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """act(F.batch_norm(input, ...) + residual) in one fused op.

    activation: "identity", "relu", "leaky_relu" (negative_slope >= 0) or
    "silu"; residual: None or a tensor added before the activation (the
    input's shape and dtype are fused; others fall back to torch's add).
    Arguments and running-statistics updates as torch.nn.functional.batch_norm.
    """
    return _batch_norm_act(
        input, running_mean, running_var, weight, bias, training, momentum, eps, residual, activation, negative_slope
    )


class BatchNormAct2d(BatchNorm2d):
    """bnorm_ext.BatchNorm2d followed by an activation, with an optional
    residual added before it: forward(input, residual=None) is
    act(BatchNorm2d(input) + residual), one fused op.

    Parameters, buffers and state_dict keys are exactly BatchNorm2d's, so
    checkpoints load both ways.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "relu",
        negative_slope: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        _check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        text = f"{super().extra_repr()}, activation={self.activation}"
        if self.activation == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if torch.jit.is_scripting():
            return self._batch_norm_act_forward(input, residual)
        if isinstance(input, fx.Proxy):
            args = (input,) if residual is None else (input, residual)
            return _fx_leaf_call(self, args, self._batch_norm_act_forward)
        return self._batch_norm_act_forward(input, residual)

    def _batch_norm_act_forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        running_mean, running_var, bn_training, momentum, num_batches_tracked = self._batch_norm_mode()
        return _batch_norm_act(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            bn_training,
            momentum,
            self.eps,
            residual,
            self.activation,
            self.negative_slope,
            num_batches_tracked,
        )
