"""Deployment paths of converted models, each against the same model with torch's BatchNorm:
ONNX export (dynamo and TorchScript exporters) run in onnxruntime, and the Conv/Linear+BN
fusion passes (torch.ao.quantization.fuse_modules(_qat), FX fuse, fuse_conv_bn_eval)."""

import collections
import contextlib
import copy
import importlib.util
import io
import warnings

import pytest
import torch
import torch.ao.nn.intrinsic as nni
from torch import nn
from torch.ao.quantization import fuse_modules, fuse_modules_qat
from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD
from torch.fx.experimental.optimization import fuse as torch_fx_fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

import bnorm_ext
from common_utils import make_bn_pair, randn_shifted, randomize_bn_

HAS_ONNXRUNTIME = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
requires_onnxruntime = pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnx and onnxruntime not installed")
requires_onnx = pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")

EXPORTERS = [
    pytest.param(
        "dynamo", id="dynamo", marks=pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="onnxscript not installed")
    ),
    pytest.param("torchscript", id="torchscript"),
]

TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
OUR_BN = (bnorm_ext.BatchNorm1d, bnorm_ext.BatchNorm2d, bnorm_ext.BatchNorm3d)


def with_nondefault_stats_(model, inputs, steps=2):
    """Random BN affine parameters and running stats, then `steps` training forwards on
    `inputs` (running stats move towards their non-zero-mean statistics); eval mode."""
    for m in model.modules():
        if isinstance(m, TORCH_BN):
            randomize_bn_(m)
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(*inputs)
    return model.eval()


def converted_copy(model):
    ours = bnorm_ext.convert_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, OUR_BN) for m in ours.modules())
    return ours


class BatchNormZoo(nn.Module):
    """Every BatchNorm input rank, affine and not, after layers that fold it (Conv, Linear)
    and after one that does not (ReLU)."""

    def __init__(self):
        super().__init__()
        self.bn1d_nc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.BatchNorm1d(8))
        self.bn1d_ncl = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.BatchNorm1d(8, affine=False))
        self.bn2d = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8))
        self.bn3d = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU(), nn.BatchNorm3d(4, eps=1e-3))

    def forward(self, x_nc, x_ncl, x_nchw, x_ncdhw):
        return self.bn1d_nc(x_nc), self.bn1d_ncl(x_ncl), self.bn2d(x_nchw), self.bn3d(x_ncdhw)


def zoo_inputs():
    return tuple(randn_shifted(s) for s in [(6, 6), (3, 3, 12), (2, 3, 10, 10), (2, 3, 5, 6, 6)])


def export_onnx(model, inputs, exporter, **options):
    """onnx.ModelProto of torch.onnx.export(model, inputs) with the given exporter."""
    import onnx

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated
        if exporter == "dynamo":
            return torch.onnx.export(model, inputs, dynamo=True, verbose=False, **options).model_proto
        f = io.BytesIO()
        torch.onnx.export(model, inputs, f, dynamo=False, **options)
        return onnx.load_from_string(f.getvalue())


def run_onnxruntime(proto, inputs):
    import onnxruntime

    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def op_counts(proto):
    return collections.Counter((node.domain, node.op_type) for node in proto.graph.node)


def batchnorm_attributes(proto):
    import onnx

    return [
        sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute)
        for node in proto.graph.node
        if node.op_type == "BatchNormalization"
    ]


def assert_standard_onnx(proto):
    nodes = [node.domain + "::" + node.op_type for node in proto.graph.node]
    assert all(node.startswith("::") for node in nodes), f"node outside the default domain: {nodes}"
    assert not any("bnorm_ext" in node for node in nodes), nodes
    assert not proto.functions, [f.name for f in proto.functions]
    assert {opset.domain for opset in proto.opset_import} <= {"", "ai.onnx"}, proto.opset_import


def assert_onnx_matches(torch_model, ours, inputs, exporter, rtol, atol, **options):
    """Exports both models the same way: the same ONNX op counts and BatchNormalization
    attributes, only standard ONNX, and onnxruntime on ours equal to eager (ours and
    torch's); returns ours' op counts."""
    proto_torch = export_onnx(torch_model, inputs, exporter, **options)
    proto_ours = export_onnx(ours, inputs, exporter, **options)
    assert_standard_onnx(proto_ours)
    assert op_counts(proto_ours) == op_counts(proto_torch)
    assert batchnorm_attributes(proto_ours) == batchnorm_attributes(proto_torch)
    outs_ort = run_onnxruntime(proto_ours, inputs)
    with torch.no_grad():
        outs_ours = ours(*inputs)
        outs_torch = torch_model(*inputs)
    outs_ours = outs_ours if isinstance(outs_ours, tuple) else (outs_ours,)
    outs_torch = outs_torch if isinstance(outs_torch, tuple) else (outs_torch,)
    assert len(outs_ort) == len(outs_ours)
    for i, (out_ort, out_ours, out_torch) in enumerate(zip(outs_ort, outs_ours, outs_torch)):
        assert torch.isfinite(out_ort).all(), f"output {i}: onnxruntime gave NaN/Inf"
        torch.testing.assert_close(out_ort, out_ours, rtol=rtol, atol=atol, msg=lambda m: f"output {i} vs ours: {m}")
        torch.testing.assert_close(out_ort, out_torch, rtol=rtol, atol=atol, msg=lambda m: f"output {i} vs torch: {m}")
    return op_counts(proto_ours)


@requires_onnxruntime
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_every_batchnorm_rank_is_standard_batchnormalization(exporter):
    inputs = zoo_inputs()
    torch_model = with_nondefault_stats_(BatchNormZoo(), inputs)
    ours = converted_copy(torch_model)
    counts = assert_onnx_matches(torch_model, ours, inputs, exporter, rtol=1e-5, atol=1e-5)
    # the BNs after ReLU cannot fold into a preceding layer (the ones after Conv/Linear may)
    assert counts[("", "BatchNormalization")] >= 4, counts


class EvalOpCall(nn.Module):
    # the eval op called directly, with grad enabled and parameters that require grad
    def __init__(self, bn):
        super().__init__()
        self.bn = bn

    def forward(self, x):
        bn = self.bn
        return torch.ops.bnorm_ext.batch_norm_forward_eval(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
        )


@requires_onnxruntime
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_keys_on_the_eval_op(exporter):
    x = randn_shifted((2, 4, 5, 5))
    torch_bn = with_nondefault_stats_(nn.BatchNorm2d(4, eps=1e-4), (x,))
    assert torch_bn.weight.requires_grad and torch.is_grad_enabled()
    counts = assert_onnx_matches(torch_bn, EvalOpCall(copy.deepcopy(torch_bn)), (x,), exporter, rtol=1e-5, atol=1e-5)
    assert counts == {("", "BatchNormalization"): 1}, counts


@requires_onnxruntime
@pytest.mark.parametrize("opset_version", [9, 13, 14, 15, 20], ids=lambda v: f"opset{v}")
def test_torchscript_onnx_export_at_each_opset(opset_version):
    # our symbolic at opsets 9-13 is torch's opset-9 one, from 14 on torch's opset-14 one
    x = randn_shifted((2, 3, 7, 7))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4, affine=False))
    torch_model = with_nondefault_stats_(model, (x,))
    counts = assert_onnx_matches(
        torch_model, converted_copy(torch_model), (x,), "torchscript", rtol=1e-5, atol=1e-5, opset_version=opset_version
    )
    assert counts[("", "BatchNormalization")] == 2, counts


@pytest.fixture(scope="module")
def resnet18_and_input():
    """torchvision ResNet-18 (random init) with non-default BN stats, eval mode; tests copy it."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    x = randn_shifted((2, 3, 32, 32))
    return with_nondefault_stats_(torchvision.models.resnet18(weights=None), (x,), steps=1), x


@requires_onnxruntime
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_resnet18(exporter, resnet18_and_input):
    torch_model, x = resnet18_and_input
    ours = converted_copy(torch_model)
    # without folding BN into Conv, so that every BN is a BatchNormalization node
    options = {"optimize": False} if exporter == "dynamo" else {"do_constant_folding": False}
    counts = assert_onnx_matches(torch_model, ours, (x,), exporter, rtol=1e-5, atol=1e-4, **options)
    assert counts[("", "BatchNormalization")] == 20, counts


def test_onnx_registration_leaves_torch_export_and_compile_graphs_alone():
    # torch.export keeps our op, with default decompositions too
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnorm_ext.BatchNorm2d(4), nn.ReLU()).eval()
    x = randn_shifted((2, 3, 8, 8))
    op = torch.ops.bnorm_ext.batch_norm_forward_eval.default
    program = torch.export.export(model, (x,))
    decomposed = program.run_decompositions()
    for graph in (program.graph, decomposed.graph):
        assert op in [node.target for node in graph.nodes], graph
    assert op not in torch.export.default_decompositions()
    from torch._inductor.decomposition import select_decomp_table

    # Inductor's table has only bnorm_ext's own decomposition (tests/test_compile_eval.py)
    assert select_decomp_table()[op] is bnorm_ext._inductor_decomp.DECOMPOSITIONS[op]
    torch.testing.assert_close(decomposed.module()(x), model(x))
    # symbolic shapes: FakeTensor may run the decomposition for metadata, the graph keeps our op
    from torch.fx.experimental.proxy_tensor import make_fx

    def eval_then_relu(x, weight, bias, running_mean, running_var):
        return op(x, weight, bias, running_mean, running_var, 1e-5).relu()

    bn = model[1]
    args = (randn_shifted((2, 4, 6, 6)), bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var)
    graph = make_fx(eval_then_relu, tracing_mode="symbolic")(*args).graph
    assert op in [node.target for node in graph.nodes], graph


def test_compile_of_eval_model_with_ci_environment_variable(monkeypatch):
    # Inductor, with CI set (GitHub Actions sets it), refuses to fall back to an op that has an
    # entry in torch._decomp.decomposition_table: the ONNX registration must not put ours there.
    monkeypatch.setenv("CI", "true")
    for op in (
        torch.ops.bnorm_ext.batch_norm_forward_eval.default,
        torch.ops.bnorm_ext.batch_norm_act_forward_eval.default,
    ):
        assert op not in torch._decomp.decomposition_table
    torch._dynamo.reset()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), bnorm_ext.BatchNorm2d(4), nn.Conv2d(4, 4, 1), bnorm_ext.BatchNormAct2d(4, activation="silu")
    ).eval()
    x = randn_shifted((2, 3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


@pytest.mark.parametrize(
    "shape, dtype, memory_format",
    [
        pytest.param((6, 5), torch.float32, torch.contiguous_format, id="NC-float32"),
        pytest.param((3, 5, 7), torch.float64, torch.contiguous_format, id="NCL-float64"),
        pytest.param((3, 5, 4, 6), torch.float32, torch.channels_last, id="NCHW-float32-channels_last"),
        pytest.param((3, 5, 4, 6), torch.bfloat16, torch.contiguous_format, id="NCHW-bfloat16-float32_params"),
        pytest.param((2, 5, 3, 4, 6), torch.float16, torch.channels_last_3d, id="NCDHW-float16-float32_params-cl3d"),
    ],
)
def test_onnx_decomposition_equals_eval_op(shape, dtype, memory_format):
    # what the dynamo exporter (and FakeTensor under symbolic shapes) sees instead of our op
    from bnorm_ext._onnx import batch_norm_eval_as_aten

    x = randn_shifted(shape, dtype=dtype, memory_format=memory_format)
    _, bn, _ = make_bn_pair(
        nn.BatchNorm1d, bnorm_ext.BatchNorm1d, 5, param_dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    for weight, bias in ((bn.weight, bn.bias), (None, None)):
        args = (x, weight, bias, bn.running_mean, bn.running_var, 1e-3)
        expected = torch.ops.bnorm_ext.batch_norm_forward_eval(*args)
        got = batch_norm_eval_as_aten(*args)
        assert got.dtype == expected.dtype and got.stride() == expected.stride()
        tol = {torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(dtype, 1e-6)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 10)


ACTIVATIONS = ["identity", "relu", "leaky_relu", "silu"]
RESIDUAL = [pytest.param(False, id="plain"), pytest.param(True, id="residual")]


class ComposedBatchNormAct(nn.Module):
    """torch's eval BatchNorm2d -> add -> activation, the model BatchNormAct2d replaces."""

    def __init__(self, num_features, activation, negative_slope=0.2):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps=1e-4)
        self.act = {
            "identity": nn.Identity(),
            "relu": nn.ReLU(),
            "leaky_relu": nn.LeakyReLU(negative_slope),
            "silu": nn.SiLU(),
        }[activation]

    def forward(self, x, residual=None):
        y = self.bn(x)
        return self.act(y if residual is None else y + residual)


class FusedBatchNormAct(nn.Module):
    # BatchNormAct2d with the composed model's state (same state_dict keys under `bn`)
    def __init__(self, composed, activation, negative_slope=0.2):
        super().__init__()
        self.bn = bnorm_ext.BatchNormAct2d(
            composed.bn.num_features, eps=composed.bn.eps, activation=activation, negative_slope=negative_slope
        )
        self.load_state_dict(composed.state_dict())
        self.eval()

    def forward(self, x, residual=None):
        return self.bn(x, residual)


def batch_norm_act_pair(activation, has_residual):
    """(torch's composed eval model, BatchNormAct2d with its state, inputs)."""
    x = randn_shifted((2, 4, 5, 5))
    # NB: a residual of BN's output scale, so the activation sees both signs.
    inputs = (x, torch.randn(2, 4, 5, 5)) if has_residual else (x,)
    torch_model = with_nondefault_stats_(ComposedBatchNormAct(4, activation), inputs)
    return torch_model, FusedBatchNormAct(torch_model, activation), inputs


def node_signatures(proto):
    import onnx

    return [
        (node.op_type, sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute))
        for node in proto.graph.node
    ]


@requires_onnxruntime
@pytest.mark.parametrize("has_residual", RESIDUAL)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_batch_norm_act_is_torchs_composition(exporter, activation, has_residual):
    # BatchNormalization, Add, then the activation exactly as torch exports its own BN -> add -> act
    torch_model, ours, inputs = batch_norm_act_pair(activation, has_residual)
    counts = assert_onnx_matches(torch_model, ours, inputs, exporter, rtol=1e-5, atol=1e-5)
    assert node_signatures(export_onnx(ours, inputs, exporter)) == node_signatures(
        export_onnx(torch_model, inputs, exporter)
    )
    expected = {"identity": [], "relu": ["Relu"], "leaky_relu": ["LeakyRelu"], "silu": ["Sigmoid", "Mul"]}[activation]
    expected = ["BatchNormalization"] + ["Add"] * has_residual + expected
    assert {op: n for (_, op), n in counts.items() if op != "Identity"} == collections.Counter(expected), counts


@requires_onnxruntime
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("opset_version", [9, 13, 14, 15, 20], ids=lambda v: f"opset{v}")
def test_torchscript_onnx_export_of_batch_norm_act_at_each_opset(opset_version, activation):
    torch_model, ours, inputs = batch_norm_act_pair(activation, True)
    assert_onnx_matches(torch_model, ours, inputs, "torchscript", rtol=1e-5, atol=1e-5, opset_version=opset_version)
    assert node_signatures(export_onnx(ours, inputs, "torchscript", opset_version=opset_version)) == node_signatures(
        export_onnx(torch_model, inputs, "torchscript", opset_version=opset_version)
    )


@requires_onnxruntime
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_fused_resnet18(exporter, resnet18_and_input):
    torch_model, x = resnet18_and_input
    fused = bnorm_ext.fuse_activations(torch_model).eval()
    modules = dict(fused.named_modules())
    assert (
        sum(
            n.op == "call_module" and isinstance(modules[n.target], bnorm_ext.BatchNormAct2d) for n in fused.graph.nodes
        )
        == 17
    )
    options = {"optimize": False} if exporter == "dynamo" else {"do_constant_folding": False}
    counts = assert_onnx_matches(torch_model, fused, (x,), exporter, rtol=1e-5, atol=1e-4, **options)
    assert counts[("", "BatchNormalization")] == 20, counts
    assert counts[("", "Relu")] == 17 and counts[("", "Add")] == 8, counts


@requires_onnx
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_in_training_mode_fails_as_for_the_plain_op(exporter):
    # neither training op has a translation: the same exception type, naming our training op
    # (the TorchScript exporter only sees it with training=TRAINING or PRESERVE)
    x, r = randn_shifted((2, 4, 5, 5)), torch.randn(2, 4, 5, 5)
    options = {} if exporter == "dynamo" else {"training": torch.onnx.TrainingMode.TRAINING}
    errors = []
    for model, inputs in (
        (bnorm_ext.BatchNorm2d(4), (x,)),
        (FusedBatchNormAct(ComposedBatchNormAct(4, "relu"), "relu"), (x, r)),
    ):
        with pytest.raises(Exception) as error:
            export_onnx(model.train(), inputs, exporter, **options)
        errors.append(error)
    assert errors[1].type is errors[0].type
    assert "batch_norm_forward_train" in str(errors[0].value)
    assert "batch_norm_act_forward_train" in str(errors[1].value)


@requires_onnxruntime
def test_torchscript_onnx_export_of_training_model_exports_eval_as_for_the_plain_op():
    # the TorchScript exporter's default training=EVAL runs the model in eval mode for the export
    torch_model, ours, inputs = batch_norm_act_pair("leaky_relu", True)
    proto = export_onnx(ours.train(), inputs, "torchscript")
    assert ours.training
    assert node_signatures(proto) == node_signatures(export_onnx(torch_model, inputs, "torchscript"))
    with torch.no_grad():
        expected = ours.eval()(*inputs)
    torch.testing.assert_close(run_onnxruntime(proto, inputs)[0], expected, rtol=1e-5, atol=1e-5)


def test_onnx_registration_of_batch_norm_act_leaves_torch_export_and_compile_graphs_alone():
    model = FusedBatchNormAct(ComposedBatchNormAct(4, "silu"), "silu")
    inputs = (randn_shifted((2, 4, 6, 6)), torch.randn(2, 4, 6, 6))
    op = torch.ops.bnorm_ext.batch_norm_act_forward_eval.default
    program = torch.export.export(model, inputs)
    decomposed = program.run_decompositions()
    for graph in (program.graph, decomposed.graph):
        assert op in [node.target for node in graph.nodes], graph
    assert op not in torch.export.default_decompositions()
    from torch._inductor.decomposition import select_decomp_table

    # Inductor's table has only bnorm_ext's own decomposition (tests/test_compile_eval.py)
    assert select_decomp_table()[op] is bnorm_ext._inductor_decomp.DECOMPOSITIONS[op]
    torch.testing.assert_close(decomposed.module()(*inputs), model(*inputs))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "shape, dtype, memory_format, residual_format",
    [
        pytest.param((3, 5, 4, 6), torch.float64, torch.contiguous_format, None, id="NCHW-float64-no_residual"),
        pytest.param((3, 5, 4, 6), torch.float32, torch.contiguous_format, torch.contiguous_format, id="NCHW-float32"),
        pytest.param(
            (3, 5, 4, 6),
            torch.float32,
            torch.channels_last,
            torch.contiguous_format,
            id="NCHW-float32-channels_last-residual_contiguous",
        ),
        pytest.param(
            (3, 5, 4, 6),
            torch.float64,
            torch.contiguous_format,
            torch.channels_last,
            id="NCHW-float64-residual_channels_last",
        ),
        pytest.param(
            (3, 5, 4, 6),
            torch.bfloat16,
            torch.channels_last,
            torch.channels_last,
            id="NCHW-bfloat16-float32_params-channels_last",
        ),
    ],
)
def test_onnx_decomposition_equals_batch_norm_act_eval_op(shape, dtype, memory_format, residual_format, activation):
    from bnorm_ext._onnx import batch_norm_act_eval_as_aten

    x = randn_shifted(shape, dtype=dtype, memory_format=memory_format)
    residual = (
        None if residual_format is None else torch.randn(shape).to(dtype).contiguous(memory_format=residual_format)
    )
    _, bn, _ = make_bn_pair(
        nn.BatchNorm2d, bnorm_ext.BatchNorm2d, 5, param_dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    for weight, bias in ((bn.weight, bn.bias), (None, None)):
        args = (x, weight, bias, bn.running_mean, bn.running_var, 1e-3, residual, activation, 0.2)
        expected = torch.ops.bnorm_ext.batch_norm_act_forward_eval(*args)
        got = batch_norm_act_eval_as_aten(*args)
        assert got.dtype == expected.dtype and got.stride() == expected.stride()
        tol = {torch.bfloat16: 2e-2}.get(dtype, 1e-6)
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * 10)
    with pytest.raises(ValueError, match="expected activation"):
        batch_norm_act_eval_as_aten(*args[:7], "gelu", 0.2)


# torch.ao.quantization's fusion patterns that contain a BatchNorm, e.g. (Conv2d, BatchNorm2d, ReLU)
BN_FUSION_PATTERNS = [
    pytest.param(types, id="-".join(t.__name__ for t in types))
    for types in _DEFAULT_OP_LIST_TO_FUSER_METHOD
    if any(t in TORCH_BN for t in types)
]


def layer_of(layer_type):
    if layer_type is nn.Linear:
        return nn.Linear(6, 4)
    if layer_type in TORCH_BN:
        return layer_type(4)
    if layer_type is nn.ReLU:
        return nn.ReLU()
    return layer_type(4, 4, 3)  # Conv{1,2,3}d, ConvTranspose{1,2,3}d


def input_for(layer_types):
    if layer_types[0] is nn.Linear:
        return randn_shifted((5, 6))
    spatial = {nn.BatchNorm1d: (10,), nn.BatchNorm2d: (7, 8), nn.BatchNorm3d: (4, 5, 6)}
    bn_type = next(t for t in layer_types if t in TORCH_BN)
    return randn_shifted((3, 4) + spatial[bn_type])


def module_types(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize("layer_types", BN_FUSION_PATTERNS)
def test_fuse_modules_eval_matches_torch(layer_types):
    x = input_for(layer_types)
    torch_model = with_nondefault_stats_(nn.Sequential(*map(layer_of, layer_types)), (x,))
    ours = converted_copy(torch_model)
    names = [str(i) for i in range(len(layer_types))]
    fused_torch = fuse_modules(torch_model, [names])
    fused_ours = fuse_modules(ours, [names])
    assert module_types(fused_ours) == module_types(fused_torch)
    assert any(isinstance(m, OUR_BN) for m in ours.modules()), "inplace=False changed the model"
    with torch.no_grad():
        torch.testing.assert_close(fused_ours(x), fused_torch(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_ours(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_types", BN_FUSION_PATTERNS)
def test_fuse_modules_qat_matches_torch(layer_types):
    x = input_for(layer_types)
    torch_model = with_nondefault_stats_(nn.Sequential(*map(layer_of, layer_types)), (x,)).train()
    ours = converted_copy(torch_model)
    names = [str(i) for i in range(len(layer_types))]
    try:
        fused_torch = fuse_modules_qat(torch_model, [names])
    except Exception as torch_error:  # e.g. ConvTranspose + BatchNorm: not supported in QAT
        with pytest.raises(type(torch_error)) as our_error:
            fuse_modules_qat(ours, [names])
        assert str(our_error.value) == str(torch_error)
        return
    fused_ours = fuse_modules_qat(ours, [names])
    # torch.ao.nn.intrinsic modules hold torch's BatchNorm class, for ours as for torch's
    assert module_types(fused_ours) == module_types(fused_torch)
    assert any(
        isinstance(
            m,
            (
                nni.ConvBn1d,
                nni.ConvBn2d,
                nni.ConvBn3d,
                nni.ConvBnReLU1d,
                nni.ConvBnReLU2d,
                nni.ConvBnReLU3d,
                nni.LinearBn1d,
                nni.BNReLU2d,
                nni.BNReLU3d,
            ),
        )
        for m in fused_ours.modules()
    )
    torch.testing.assert_close(fused_ours(x), fused_torch(x), rtol=1e-6, atol=1e-6)
    for (name, ours_buffer), (_, torch_buffer) in zip(fused_ours.named_buffers(), fused_torch.named_buffers()):
        torch.testing.assert_close(ours_buffer, torch_buffer, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


class ConvOutputUsedTwice(nn.Module):
    # the conv output also feeds the sum: neither FX fuse may fold this BN
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def fx_fuse_models():
    return {
        "Conv1d-BatchNorm1d-ReLU": (
            lambda: nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.ReLU()),
            (2, 3, 10),
        ),
        "Conv2d-BatchNorm2d-ReLU": (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
            (2, 3, 8, 8),
        ),
        "Conv3d-BatchNorm3d": (lambda: nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)), (2, 3, 4, 5, 6)),
        "Linear-BatchNorm1d": (lambda: nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)), (5, 6)),
        "conv_output_used_twice": (ConvOutputUsedTwice, (2, 3, 6, 6)),
    }


def graph_ops(graph_module):
    return [(node.op, str(node.target)) for node in graph_module.graph.nodes]


@pytest.mark.parametrize("model_name", list(fx_fuse_models()) + ["resnet18"])
def test_fx_fuse_conv_bn_matches_torch_fx_fuse(model_name, request):
    if model_name == "resnet18":
        torch_model, x = request.getfixturevalue("resnet18_and_input")
    else:
        make_model, input_shape = fx_fuse_models()[model_name]
        x = randn_shifted(input_shape)
        torch_model = with_nondefault_stats_(make_model(), (x,))
    ours = converted_copy(torch_model)
    fused_by_torch = torch_fx_fuse(torch_model)
    fused_ours = bnorm_ext.fuse_conv_bn(ours)
    fused_torch = bnorm_ext.fuse_conv_bn(torch_model)
    assert graph_ops(fused_torch) == graph_ops(fused_by_torch)
    assert graph_ops(fused_ours) == graph_ops(fused_by_torch)
    our_classes = {ours_class: torch_class for ours_class, torch_class in zip(OUR_BN, TORCH_BN)}
    # the root's class is made per GraphModule; below it, the same modules by name and class
    assert [(n, our_classes.get(type(m), type(m))) for n, m in fused_ours.named_modules() if n] == [
        (n, type(m)) for n, m in fused_by_torch.named_modules() if n
    ]
    if model_name != "conv_output_used_twice":
        assert not any(isinstance(m, TORCH_BN) for m in fused_ours.modules())
    assert any(isinstance(m, OUR_BN) for m in ours.modules()), "inplace=False changed the model"
    atol = 1e-4 if model_name == "resnet18" else 1e-5
    with torch.no_grad():
        expected = torch_model(x)
        torch.testing.assert_close(fused_torch(x), fused_by_torch(x), rtol=0, atol=0)
        torch.testing.assert_close(fused_ours(x), fused_by_torch(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_ours(x), expected, rtol=1e-5, atol=atol)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=atol)


def test_fx_fuse_conv_bn_leaves_sync_batchnorm_unfused_as_torch():
    # SyncBatchNorm is an FX leaf that neither pass folds; the BatchNorm2d after it is folded
    x = randn_shifted((2, 3, 6, 6))
    torch_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    for bn in (torch_model[1], torch_model[3]):
        randomize_bn_(bn)
    torch_model.eval()
    ours = converted_copy(torch_model)
    ours[1] = bnorm_ext.SyncBatchNorm.convert_sync_batchnorm(ours[1])
    fused_by_torch = torch_fx_fuse(torch_model)
    fused_ours = bnorm_ext.fuse_conv_bn(ours)
    assert graph_ops(fused_ours) == graph_ops(fused_by_torch)
    assert [type(m) for m in fused_ours.children()] == [nn.Conv2d, bnorm_ext.SyncBatchNorm, nn.Conv2d]
    assert [type(m) for m in fused_by_torch.children()] == [nn.Conv2d, nn.SyncBatchNorm, nn.Conv2d]
    with torch.no_grad():
        torch.testing.assert_close(fused_ours(x), fused_by_torch(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_ours(x), torch_model(x), rtol=1e-5, atol=1e-5)


def test_fx_fuse_conv_bn_in_training_mode_raises_as_torch():
    torch_model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(AssertionError) as torch_error:
        torch_fx_fuse(torch_model)
    with pytest.raises(AssertionError) as our_error:
        bnorm_ext.fuse_conv_bn(converted_copy(torch_model))
    assert str(our_error.value) == str(torch_error.value)


@pytest.mark.parametrize(
    "layer_type", [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear], ids=lambda t: t.__name__
)
def test_fuse_conv_bn_eval_accepts_our_batchnorm(layer_type):
    bn_type = {nn.Conv1d: nn.BatchNorm1d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}.get(
        layer_type, nn.BatchNorm2d
    )
    layer = layer_of(layer_type).eval()
    x = input_for((layer_type, bn_type))
    torch_bn, our_bn, _ = make_bn_pair(bn_type, dict(zip(TORCH_BN, OUR_BN))[bn_type], 4)
    torch_bn.eval(), our_bn.eval()
    if layer_type is nn.Linear:
        fused_torch, fused_ours = fuse_linear_bn_eval(layer, torch_bn), fuse_linear_bn_eval(layer, our_bn)
    else:
        transpose = layer_type is nn.ConvTranspose2d
        fused_torch = fuse_conv_bn_eval(layer, torch_bn, transpose=transpose)
        fused_ours = fuse_conv_bn_eval(layer, our_bn, transpose=transpose)
    assert type(fused_ours) is type(fused_torch) is layer_type
    assert torch.equal(fused_ours.weight, fused_torch.weight) and torch.equal(fused_ours.bias, fused_torch.bias)
    with torch.no_grad():
        torch.testing.assert_close(fused_ours(x), our_bn(layer(x)), rtol=1e-5, atol=1e-5)
