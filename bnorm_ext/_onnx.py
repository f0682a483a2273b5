"""ONNX export of bnorm_ext's eval ops as the standard BatchNormalization.

Both exporters are taught at `import bnorm_ext`, keyed on the ops
`bnorm_ext::batch_norm_forward_eval` and `bnorm_ext::batch_norm_act_forward_eval`
(not on the modules), and neither registration imports onnx or onnxscript.
The fused op exports as BatchNormalization, then Add (with a residual) and the
activation as torch's own ops export (Relu, LeakyRelu, Sigmoid+Mul for silu):

- torch.onnx.export(dynamo=True) decomposes every op that has no ONNX function
  with the table its create_onnx_friendly_decomposition_table builds; our
  wrapper of that function adds the eval op as
  aten._native_batch_norm_legit_no_training (what torch's BatchNorm becomes in
  torch.export), which torchlib translates to BatchNormalization, and the fused
  op as that op, aten.add and torch's activation.
  NB: not in torch._decomp.decomposition_table: with the CI environment
  variable set (as on GitHub Actions), Inductor refuses to fall back to an op
  that has an entry there ("make_fallback(...): a decomposition exists"), so
  torch.compile of an eval model would fail. torch.export and torch.compile
  graphs keep our ops.
- torch.onnx.export(dynamo=False) traces with TorchScript and looks our ops up
  in its symbolic registry; the symbolics are torch's own aten::batch_norm,
  aten::add and activation ones.

Training-mode export, and eval with track_running_stats=False, are not
supported: the exporters see a training op, which has no translation.
"""

import torch

EVAL_OP_NAME = "bnorm_ext::batch_norm_forward_eval"
ACT_EVAL_OP_NAME = "bnorm_ext::batch_norm_act_forward_eval"

# ONNX BatchNormalization's momentum attribute is unused in inference; torch's default.
_EXPORT_MOMENTUM = 0.1


def batch_norm_eval_as_aten(input, weight, bias, running_mean, running_var, eps):
    """bnorm_ext::batch_norm_forward_eval written as the core ATen op torch's
    BatchNorm exports to in eval mode."""
    return torch.ops.aten._native_batch_norm_legit_no_training.default(
        input, weight, bias, running_mean, running_var, _EXPORT_MOMENTUM, eps
    )[0]


def _check_activation(activation: str, negative_slope: float) -> None:
    # The fused ops' own argument checks (same ValueError messages).
    if activation not in ("identity", "relu", "leaky_relu", "silu"):
        raise ValueError(
            f"bnorm_ext::batch_norm_act_forward_eval: expected activation 'identity', 'relu', 'leaky_relu' or "
            f"'silu', got '{activation}'"
        )
    if activation == "leaky_relu" and negative_slope < 0.0:
        raise ValueError(
            "bnorm_ext::batch_norm_act_forward_eval: leaky_relu needs negative_slope >= 0 (the backward reads the "
            f"sign from the output), got {negative_slope}"
        )


def batch_norm_act_eval_as_aten(
    input, weight, bias, running_mean, running_var, eps, residual, activation, negative_slope
):
    """bnorm_ext::batch_norm_act_forward_eval written as the ATen ops torch's
    eval BatchNorm -> add -> activation exports to. NB: the add and activation
    run in the input dtype, as in torch's composition (bfloat16/half: one more
    rounding than the fused kernel's)."""
    _check_activation(activation, negative_slope)
    output = batch_norm_eval_as_aten(input, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        output = torch.ops.aten.add.Tensor(output, residual)
    if activation == "relu":
        return torch.ops.aten.relu.default(output)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu.default(output, negative_slope)
    if activation == "silu":
        return torch.ops.aten.silu.default(output)
    return output


def onnx_decompositions() -> dict:
    """Our eval ops -> their decompositions into ATen ops, for the dynamo ONNX exporter."""
    return {
        torch.ops.bnorm_ext.batch_norm_forward_eval.default: batch_norm_eval_as_aten,
        torch.ops.bnorm_ext.batch_norm_act_forward_eval.default: batch_norm_act_eval_as_aten,
    }


def _register_decomposition() -> None:
    # Wraps the dynamo exporter's (private) table builder; without it, export of our ops fails
    # with the exporter's unsupported-operator error.
    try:
        from torch.onnx._internal.exporter import _decomp
    except ImportError:
        return
    build_table = getattr(_decomp, "create_onnx_friendly_decomposition_table", None)
    if build_table is None or getattr(build_table, "_bnorm_ext", False):
        return

    def create_onnx_friendly_decomposition_table(*args, **kwargs):
        table = build_table(*args, **kwargs)
        table.update(onnx_decompositions())
        return table

    create_onnx_friendly_decomposition_table._bnorm_ext = True
    _decomp.create_onnx_friendly_decomposition_table = create_onnx_friendly_decomposition_table


def _torchscript_symbolic(torch_batch_norm_symbolic):
    # Our op's (input, weight, bias, running_mean, running_var, eps) as aten::batch_norm in eval mode.
    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "f")
    def batch_norm_forward_eval(g, input, weight, bias, running_mean, running_var, eps):
        return torch_batch_norm_symbolic(g, input, weight, bias, running_mean, running_var, 0, _EXPORT_MOMENTUM, eps, 0)

    return batch_norm_forward_eval


def _torchscript_act_symbolic(torch_batch_norm_symbolic):
    # The fused op as aten::batch_norm in eval mode, aten::add and the activation's aten symbolic
    # (torch's opset-9 add, relu, leaky_relu and silu serve every later opset too).
    from torch.onnx import symbolic_helper, symbolic_opset9

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "f", "v", "s", "f")
    def batch_norm_act_forward_eval(
        g, input, weight, bias, running_mean, running_var, eps, residual, activation, negative_slope
    ):
        _check_activation(activation, negative_slope)
        output = torch_batch_norm_symbolic(
            g, input, weight, bias, running_mean, running_var, 0, _EXPORT_MOMENTUM, eps, 0
        )
        if not symbolic_helper._is_none(residual):
            output = symbolic_opset9.add(g, output, residual)
        if activation == "relu":
            return symbolic_opset9.relu(g, output)
        if activation == "leaky_relu":
            return symbolic_opset9.leaky_relu(g, output, negative_slope, False)
        if activation == "silu":
            return symbolic_opset9.silu(g, output)
        return output

    return batch_norm_act_forward_eval


def _register_torchscript_symbolics() -> None:
    # torch's aten::batch_norm symbolic changes at opset 14 (training_mode attribute); a
    # registration at opset N serves every opset from N up to the next one registered.
    import torch.onnx

    if not hasattr(torch.onnx, "register_custom_op_symbolic"):  # a torch without the TorchScript exporter
        return
    from torch.onnx import symbolic_opset9, symbolic_opset14

    for opset, torch_symbolic in ((9, symbolic_opset9.batch_norm), (14, symbolic_opset14.batch_norm)):
        torch.onnx.register_custom_op_symbolic(EVAL_OP_NAME, _torchscript_symbolic(torch_symbolic), opset)
        torch.onnx.register_custom_op_symbolic(ACT_EVAL_OP_NAME, _torchscript_act_symbolic(torch_symbolic), opset)


def register() -> None:
    """Teaches both ONNX exporters bnorm_ext's eval ops; called by `import bnorm_ext`."""
    _register_decomposition()
    _register_torchscript_symbolics()
