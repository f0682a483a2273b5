"""Inductor decompositions of the eval ops: under torch.compile's Inductor,
`batch_norm_forward_eval` and `batch_norm_act_forward_eval` become the ATen
ops torch's own eval BatchNorm (and the activation / add after it) becomes,
so Inductor fuses them into their neighbours and, with
torch._inductor.config.freezing, folds them into the preceding convolution.

Only Inductor's decomposition table is extended: eager, TorchScript, export
and other backends keep the ops (and their kernels) as they are.

NB: numerics are then torch's compiled ones, not our kernel's: the
normalization is aten._native_batch_norm_legit_no_training's decomposition,
((x - mean) * rsqrt(var + eps)) * weight + bias computed in the accumulation
dtype (float32 for float16/bfloat16 input, float64 for float64) and rounded
once to the input dtype; the residual add and activation follow as torch's
add and activation on that result (as the unfused torch module compiled).
Our kernel computes x * scale + shift in the same accumulation dtype, so the
two differ by float32 (float64) rounding only.

Cache: the table is extended when bnorm_ext is imported, and the ops exist
only then, so no graph containing them is ever compiled without these
decompositions. Inductor's FX graph cache keys on the decomposed graph; the
AOTAutograd cache keys on the Dynamo graph (the op's name), so the
decomposition is a pure function of what that graph records (argument
presence, dtypes, shapes, devices), never of process state.
"""

import importlib.abc
import importlib.util
import sys
from typing import Optional

import torch
from torch import Tensor

from ._onnx import batch_norm_act_eval_as_aten, batch_norm_eval_as_aten

_OPS = torch.ops.bnorm_ext
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _param_ok(input: Tensor, p: Optional[Tensor]) -> bool:
    # The ops' parameter rule (csrc/batch_norm_args.cpp check_params): None, or C elements
    # on the input's device in the input's dtype (or float32 for half input).
    if p is None:
        return True
    half = input.dtype in (torch.float16, torch.bfloat16)
    return (
        p.dim() == 1
        and p.shape[0] == input.shape[1]
        and p.device == input.device
        and (p.dtype == input.dtype or (half and p.dtype == torch.float32))
    )


def _decomposable(input, weight, bias, running_mean, running_var, eps) -> bool:
    # Arguments the kernel would accept; anything else keeps the op, so its
    # checks raise their usual errors at run time.
    if not isinstance(input, Tensor) or input.dtype not in _FLOATS or input.dim() < 2 or eps < 0:
        return False
    params = (weight, bias, running_mean, running_var)
    if not all(_param_ok(input, p) for p in params):
        return False
    # NB: the kernel also wants all four in one dtype.
    return len({p.dtype for p in params if p is not None}) == 1


def batch_norm_forward_eval(input, weight, bias, running_mean, running_var, eps):
    # (N, C, *) -> input's shape and dtype; NotImplemented keeps the op.
    if not _decomposable(input, weight, bias, running_mean, running_var, eps):
        return NotImplemented
    # torch's eval BatchNorm: the ATen op F.batch_norm(training=False) traces to (as for ONNX export)
    return batch_norm_eval_as_aten(input, weight, bias, running_mean, running_var, eps)


def batch_norm_act_forward_eval(
    input, weight, bias, running_mean, running_var, eps, residual, activation, negative_slope
):
    # act(BN(input) + residual) -> input's shape and dtype; NotImplemented keeps the op.
    if not _decomposable(input, weight, bias, running_mean, running_var, eps):
        return NotImplemented
    if residual is not None and (
        residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device
    ):
        return NotImplemented
    if activation not in ("identity", "relu", "leaky_relu", "silu"):
        return NotImplemented
    if activation == "leaky_relu" and negative_slope < 0.0:
        return NotImplemented
    return batch_norm_act_eval_as_aten(
        input, weight, bias, running_mean, running_var, eps, residual, activation, negative_slope
    )


DECOMPOSITIONS = {
    _OPS.batch_norm_forward_eval.default: batch_norm_forward_eval,
    _OPS.batch_norm_act_forward_eval.default: batch_norm_act_forward_eval,
}


def register() -> None:
    """Adds the decompositions to Inductor's table (once; idempotent)."""
    from torch._inductor import decomposition

    decomposition.decompositions.update(DECOMPOSITIONS)
    # NB: select_decomp_table() returns a cached copy of the table.
    decomposition.fast_random_decomps.cache_clear()


_INDUCTOR_DECOMP_MODULE = "torch._inductor.decomposition"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    # Runs register() right after torch._inductor.decomposition is first
    # imported (so importing bnorm_ext does not import Inductor).

    def find_spec(self, fullname, path, target=None):
        if fullname != _INDUCTOR_DECOMP_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_inductor_loads() -> None:
    """register() now if Inductor's decomposition table is loaded, else as
    soon as it is."""
    if _INDUCTOR_DECOMP_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
