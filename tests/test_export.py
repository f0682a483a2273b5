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
from conftest import make_bn_pair, randn_shifted, randomize_bn_

HAS_ONNXRUNTIME = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
requires_onnxruntime = pytest.mark.skipif(not HAS_ONNXRUNTIME, reason="onnx and onnxruntime not installed")

EXPORTERS = [
    pytest.param("dynamo", id="dynamo", marks=pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="onnxscript not installed")),
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


def assert_standard_onnx(proto):
    nodes = [node.domain + "::" + node.op_type for node in proto.graph.node]
    assert all(node.startswith("::") for node in nodes), f"node outside the default domain: {nodes}"
    assert not any("bnorm_ext" in node for node in nodes), nodes
    assert not proto.functions, [f.name for f in proto.functions]
    assert {opset.domain for opset in proto.opset_import} <= {"", "ai.onnx"}, proto.opset_import


def assert_onnx_matches(torch_model, ours, inputs, exporter, rtol, atol, **options):
    """Exports both models the same way: the same ONNX op counts, only standard ONNX, and
    onnxruntime on ours equal to eager (ours and torch's); returns ours' op counts."""
    proto_torch = export_onnx(torch_model, inputs, exporter, **options)
    proto_ours = export_onnx(ours, inputs, exporter, **options)
    assert_standard_onnx(proto_ours)
    assert op_counts(proto_ours) == op_counts(proto_torch)
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


@requires_onnxruntime
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_resnet18(exporter):
    torchvision = pytest.importorskip("torchvision")
    x = randn_shifted((2, 3, 32, 32))
    torch_model = with_nondefault_stats_(torchvision.models.resnet18(weights=None), (x,), steps=1)
    ours = converted_copy(torch_model)
    # without folding BN into Conv, so that every BN is a BatchNormalization node
    options = {"optimize": False} if exporter == "dynamo" else {"do_constant_folding": False}
    counts = assert_onnx_matches(torch_model, ours, (x,), exporter, rtol=1e-5, atol=1e-4, **options)
    assert counts[("", "BatchNormalization")] == 20, counts


def test_onnx_registration_leaves_torch_export_and_compile_graphs_alone():
    # torch.export keeps our op, with default decompositions too; Inductor's table lacks it
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bnorm_ext.BatchNorm2d(4), nn.ReLU()).eval()
    x = randn_shifted((2, 3, 8, 8))
    op = torch.ops.bnorm_ext.batch_norm_forward_eval.default
    program = torch.export.export(model, (x,))
    decomposed = program.run_decompositions()
    for graph in (program.graph, decomposed.graph):
        assert op in [node.target for node in graph.nodes], graph
    assert op not in torch.export.default_decompositions()
    from torch._inductor.decomposition import select_decomp_table

    assert op not in select_decomp_table()
    torch.testing.assert_close(decomposed.module()(x), model(x))


def test_onnx_decomposition_equals_eval_op():
    from bnorm_ext._onnx import batch_norm_eval_as_aten

    x = randn_shifted((3, 5, 4, 6), memory_format=torch.channels_last)
    _, bn, _ = make_bn_pair(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, 5)
    for weight, bias in ((bn.weight, bn.bias), (None, None)):
        args = (x, weight, bias, bn.running_mean, bn.running_var, 1e-3)
        expected = torch.ops.bnorm_ext.batch_norm_forward_eval(*args)
        got = batch_norm_eval_as_aten(*args)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
        assert got.stride() == expected.stride()
