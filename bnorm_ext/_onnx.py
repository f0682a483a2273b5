"""ONNX export of bnorm_ext's eval op as the standard BatchNormalization.

Both exporters are taught at `import bnorm_ext`, keyed on the op
`bnorm_ext::batch_norm_forward_eval` (not on the modules), and neither
registration imports onnx or onnxscript:

- torch.onnx.export(dynamo=True) decomposes every op that has no ONNX function
  with torch._decomp.decomposition_table; registering our eval op there as
  aten._native_batch_norm_legit_no_training (what torch's BatchNorm becomes in
  torch.export) hands it to torchlib's BatchNormalization translation.
  torch.export and torch.compile graphs keep our op: neither applies that
  table unless asked (torch.export.default_decompositions and Inductor's table
  list their ops). NB: with symbolic shapes FakeTensor prefers a table entry to
  a registered fake kernel, so it computes this op's output metadata through
  the decomposition (same dtype, shape and strides; the graph keeps our op).
- torch.onnx.export(dynamo=False) traces with TorchScript and looks our op up
  in its symbolic registry; the symbolic is torch's own aten::batch_norm one.

Training-mode export, and eval with track_running_stats=False, are not
supported: the exporters see the training op, which has no translation.
"""

import torch
import torch._decomp

EVAL_OP_NAME = "bnorm_ext::batch_norm_forward_eval"

# ONNX BatchNormalization's momentum attribute is unused in inference; torch's default.
_EXPORT_MOMENTUM = 0.1


def batch_norm_eval_as_aten(input, weight, bias, running_mean, running_var, eps):
    """bnorm_ext::batch_norm_forward_eval written as the core ATen op torch's
    BatchNorm exports to in eval mode."""
    return torch.ops.aten._native_batch_norm_legit_no_training.default(
        input, weight, bias, running_mean, running_var, _EXPORT_MOMENTUM, eps
    )[0]


def _register_decomposition() -> None:
    op = torch.ops.bnorm_ext.batch_norm_forward_eval.default
    if op not in torch._decomp.decomposition_table:
        torch._decomp.register_decomposition(op)(batch_norm_eval_as_aten)


def _torchscript_symbolic(torch_batch_norm_symbolic):
    # Our op's (input, weight, bias, running_mean, running_var, eps) as aten::batch_norm in eval mode.
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "f")
    def batch_norm_forward_eval(g, input, weight, bias, running_mean, running_var, eps):
        return torch_batch_norm_symbolic(
            g, input, weight, bias, running_mean, running_var, 0, _EXPORT_MOMENTUM, eps, 0
        )

    return batch_norm_forward_eval


def _register_torchscript_symbolics() -> None:
    # torch's aten::batch_norm symbolic changes at opset 14 (training_mode attribute); a
    # registration at opset N serves every opset from N up to the next one registered.
    import torch.onnx

    if not hasattr(torch.onnx, "register_custom_op_symbolic"):  # a torch without the TorchScript exporter
        return
    from torch.onnx import symbolic_opset9, symbolic_opset14

    for opset, torch_symbolic in ((9, symbolic_opset9.batch_norm), (14, symbolic_opset14.batch_norm)):
        torch.onnx.register_custom_op_symbolic(EVAL_OP_NAME, _torchscript_symbolic(torch_symbolic), opset)


def register() -> None:
    """Teaches both ONNX exporters bnorm_ext's eval op; called by `import bnorm_ext`."""
    _register_decomposition()
    _register_torchscript_symbolics()
