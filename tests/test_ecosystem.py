"""A converted model under the tools users run over models, compared with the
same model and weights on torch's BatchNorm: torch.func and forward-mode AD,
FX, TorchScript, torch.export, torch.compile, autocast, checkpointing, hooks,
serialization, casts, meta init, no_grad / inference_mode."""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, replace_all_batch_norm_modules_, vmap

import bnorm_ext
from common_utils import randn_shifted

modes = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


class SmallNet(nn.Module):
    # conv/BN/ReLU twice, then linear/BatchNorm1d: (N, 3, 8, 8) -> (N, 6).
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8, momentum=None)
        self.fc = nn.Linear(8, 6)
        self.bn3 = nn.BatchNorm1d(6)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.fc(x.mean(dim=(2, 3))))


def _randomize_stats(model):
    # Running statistics away from their defaults, so eval mode tests them.
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.num_batches_tracked.fill_(3)
            if m.affine:
                m.weight.data.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))
    return model


def model_pair(training, dtype=torch.float64, net=SmallNet):
    """(torch's model, the same weights converted to bnorm_ext), in train or eval mode."""
    theirs = _randomize_stats(net().to(dtype)).train(training)
    ours = bnorm_ext.convert_batchnorm(copy.deepcopy(theirs))
    assert any(isinstance(m, bnorm_ext.BatchNorm2d) for m in ours.modules())
    return theirs, ours


def transform_reference(theirs, training):
    """torch's model for a torch.func transform. NB: torch's BatchNorm refuses to update its
    running statistics inside grad/jvp transforms (a captured tensor mutated in place);
    ours updates them. In training the output does not depend on them, so the reference
    is torch's model without running statistics, and the statistics are checked apart."""
    if not training:
        return theirs
    reference = copy.deepcopy(theirs)
    replace_all_batch_norm_modules_(reference)
    return reference


def assert_same_state(theirs, ours):
    for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        torch.testing.assert_close(b, a, msg=name)


def sample(n=4, dtype=torch.float64):
    return randn_shifted((n, 3, 8, 8), dtype, "cpu")


# --- forward-mode AD and torch.func -------------------------------------------------


@pytest.mark.parametrize("training", modes)
def test_func_jvp_matches_torch_and_finite_differences(training):
    theirs, ours = model_pair(training)
    x, v = sample(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out_t, tangent_t = jvp(transform_reference(theirs, training), (x,), (v,))
    probe = copy.deepcopy(ours)
    out_o, tangent_o = jvp(ours, (x,), (v,))
    torch.testing.assert_close(out_o, out_t)
    torch.testing.assert_close(tangent_o, tangent_t)
    assert tangent_o.abs().max() > 1e-3  # not the all-zero derivative
    h = 1e-6
    finite = (probe(x + h * v) - probe(x - h * v)) / (2 * h)
    torch.testing.assert_close(tangent_o, finite, rtol=1e-5, atol=1e-6)
    theirs(x)  # the running statistics: one update, as torch's eager call makes
    assert_same_state(theirs, ours)


@pytest.mark.parametrize("grad_enabled", [pytest.param(True, id="grad"), pytest.param(False, id="no_grad")])
@pytest.mark.parametrize("training", modes)
def test_forward_ad_dual_tensor(training, grad_enabled):
    theirs, ours = model_pair(training)
    x, v = sample(), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    results = []
    for model in (theirs, ours):
        with torch.set_grad_enabled(grad_enabled), fwAD.dual_level():
            out = fwAD.unpack_dual(model(fwAD.make_dual(x, v)))
        assert out.tangent is not None
        results.append(out)
    torch.testing.assert_close(results[1].primal, results[0].primal)
    torch.testing.assert_close(results[1].tangent, results[0].tangent)


def test_forward_ad_of_weight_and_bias_tangents():
    # Tangents on the parameters only (the input is a constant).
    theirs, ours = model_pair(True)
    x = sample()
    tangents = {name: torch.randn_like(p) for name, p in theirs.named_parameters()}
    results = []
    for model in (transform_reference(theirs, True), ours):
        params = dict(model.named_parameters())
        results.append(jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))[1])
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("training", modes)
def test_func_grad_of_parameters(training):
    theirs, ours = model_pair(training)
    x = sample()
    grads = []
    for model in (transform_reference(theirs, training), ours):
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads.append(grad(lambda p: (functional_call(model, p, (x,)) ** 2).sum())(params))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
    if training:
        theirs(x)
    assert_same_state(theirs, ours)


@pytest.mark.parametrize("jac", [jacrev, jacfwd], ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("training", modes)
def test_jacobians(training, jac):
    theirs, ours = model_pair(training)
    x = randn_shifted((3, 3, 4, 4), torch.float64, "cpu")
    theirs.fc = nn.Linear(8, 2).double()
    ours.fc = copy.deepcopy(theirs.fc)
    del theirs.bn3, ours.bn3
    theirs.bn3 = ours.bn3 = nn.Identity()
    torch.testing.assert_close(jac(ours)(x), jac(transform_reference(theirs, training))(x))


def test_vmap_eval():
    theirs, ours = model_pair(False)
    xs = randn_shifted((5, 4, 3, 8, 8), torch.float64, "cpu")
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs))


def test_vmap_train_after_replace_all_batch_norm_modules():
    theirs, ours = model_pair(True)
    replace_all_batch_norm_modules_(theirs)
    replace_all_batch_norm_modules_(ours)
    xs = randn_shifted((5, 4, 3, 8, 8), torch.float64, "cpu")
    out = vmap(ours)(xs)
    torch.testing.assert_close(out, vmap(theirs)(xs))
    # per-sample statistics: the same as five separate calls
    torch.testing.assert_close(out, torch.stack([ours(x) for x in xs]))


def test_vmap_train_with_running_stats_raises_like_torch():
    theirs, ours = model_pair(True)
    xs = randn_shifted((2, 4, 3, 8, 8), torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(theirs)(xs)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(ours)(xs)
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)


@pytest.mark.parametrize("training", modes)
def test_vmap_of_grad_per_sample_gradients(training):
    theirs, ours = model_pair(training)
    if training:
        replace_all_batch_norm_modules_(theirs)
        replace_all_batch_norm_modules_(ours)
    xs = randn_shifted((3, 4, 3, 8, 8), torch.float64, "cpu")
    results = []
    for model in (theirs, ours):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, x):
            return (functional_call(model, p, (x,)) ** 2).sum()

        results.append(vmap(grad(loss), in_dims=(None, 0))(params, xs))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], msg=name)


def test_batch_norm_function_under_transforms():
    # The documented autograd.Function: setup_context, jvp and a generated vmap rule.
    x = randn_shifted((4, 3, 5, 5), torch.float64, "cpu")
    v = torch.randn_like(x)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)

    def ours(x, training):
        return bnorm_ext.BatchNormFunction.apply(
            x,
            w,
            b,
            None if training else torch.zeros(3, dtype=x.dtype),
            None if training else torch.ones(3, dtype=x.dtype),
            None,
            training,
            0.1,
            1e-5,
        )

    def theirs(x, training):
        return F.batch_norm(
            x,
            None if training else torch.zeros(3, dtype=x.dtype),
            None if training else torch.ones(3, dtype=x.dtype),
            w,
            b,
            training,
            0.1,
            1e-5,
        )

    for training in (True, False):
        torch.testing.assert_close(
            jvp(lambda x: ours(x, training), (x,), (v,))[1], jvp(lambda x: theirs(x, training), (x,), (v,))[1]
        )
        torch.testing.assert_close(
            grad(lambda x: (ours(x, training) ** 3).sum())(x), grad(lambda x: (theirs(x, training) ** 3).sum())(x)
        )
        xs = torch.stack([x, x * 2 + 1])
        torch.testing.assert_close(vmap(lambda x: ours(x, training))(xs), vmap(lambda x: theirs(x, training))(xs))
        xr = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: ours(x, training), (xr,), check_forward_ad=True)
        assert torch.autograd.gradgradcheck(lambda x: ours(x, training), (xr,))


# --- FX -----------------------------------------------------------------------------


def test_fx_symbolic_trace_keeps_modules_as_leaves():
    theirs, ours = model_pair(True)
    gm_t, gm_o = torch.fx.symbolic_trace(theirs), torch.fx.symbolic_trace(ours)
    call_modules = [n.target for n in gm_o.graph.nodes if n.op == "call_module"]
    assert call_modules == [n.target for n in gm_t.graph.nodes if n.op == "call_module"]
    assert {"bn1", "bn2", "bn3"} <= set(call_modules)
    for training in (True, False):  # the traced graph follows train()/eval() like torch's
        gm_t.train(training)
        gm_o.train(training)
        x = sample()
        torch.testing.assert_close(gm_o(x), gm_t(x))
        assert_same_state(gm_t, gm_o)


def test_fx_create_feature_extractor_on_resnet():
    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10).eval()
    ours = bnorm_ext.convert_batchnorm(copy.deepcopy(theirs))
    assert get_graph_node_names(ours) == get_graph_node_names(theirs)
    nodes = {"layer1.0.bn1": "bn", "layer2": "layer2", "fc": "fc"}
    fe_t, fe_o = create_feature_extractor(theirs, nodes), create_feature_extractor(ours, nodes)
    x = randn_shifted((2, 3, 64, 64), torch.float32, "cpu")
    for training in (False, True):
        fe_t.train(training)
        fe_o.train(training)
        out_t, out_o = fe_t(x), fe_o(x)
        for key in nodes.values():
            torch.testing.assert_close(out_o[key], out_t[key], rtol=1e-4, atol=1e-4, msg=key)


# --- TorchScript ----------------------------------------------------------------------

_LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch, bnorm_ext
    module = torch.jit.load(sys.argv[1])
    torch.save(module(torch.load(sys.argv[2])), sys.argv[3])
""")


def _run_in_fresh_process(script_path, x, tmp_path):
    torch.save(x, tmp_path / "x.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), *sys.path])))
    subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN, str(script_path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        check=True,
        env=env,
        timeout=120,
    )
    return torch.load(tmp_path / "y.pt")


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("training", modes)
def test_torchscript_save_load_in_fresh_process(training, how, tmp_path):
    theirs, ours = model_pair(training)
    x = sample()
    compiled = torch.jit.script(ours) if how == "script" else torch.jit.trace(ours, (sample(),))
    assert "bnorm_ext::batch_norm_forward" in str(compiled.inlined_graph)
    if how == "trace":  # tracing ran the model once: bring torch's to the same state
        theirs(sample()) if training else None
        ours.load_state_dict(theirs.state_dict())
        compiled.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(compiled(x), theirs(x))
    torch.jit.save(compiled, tmp_path / "model.pt")
    torch.testing.assert_close(_run_in_fresh_process(tmp_path / "model.pt", x, tmp_path), theirs(x))


def test_torchscript_scripted_module_gradients_and_buffers():
    theirs, ours = model_pair(True)
    scripted = torch.jit.script(ours)
    x = sample()
    for model in (theirs, scripted):
        model.zero_grad()
        (model(x) ** 2).sum().backward()
    for (name, p), (_, q) in zip(theirs.named_parameters(), scripted.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    assert_same_state(theirs, scripted)


# --- export, compile, autocast and friends (already equal: kept so) ----------------------


def test_torch_export_and_decompositions():
    theirs, ours = model_pair(False)
    x = sample()
    ep = torch.export.export(ours, (x,))
    assert any("bnorm_ext" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), theirs(x))
    torch.testing.assert_close(ep.run_decompositions().module()(x), theirs(x))


@pytest.mark.parametrize("training", modes)
def test_compile_fullgraph_dynamic(training):
    theirs, ours = model_pair(training)
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (4, 6):
        x = sample(n)
        torch.testing.assert_close(compiled(x), theirs(x))
    assert_same_state(theirs, ours)


def test_cpu_autocast_bfloat16():
    theirs, ours = model_pair(True, dtype=torch.float32)
    x = sample(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_t, out_o = theirs(x), ours(x)
    assert out_o.dtype == out_t.dtype
    torch.testing.assert_close(out_o.float(), out_t.float(), rtol=2e-2, atol=2e-2)


def test_activation_checkpointing():
    theirs, ours = model_pair(False)
    x = sample().requires_grad_()
    grads = []
    for model in (theirs, ours):
        out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *model.parameters()]))
    for g_o, g_t in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_o, g_t)


def test_hooks_and_weight_norm():
    theirs, ours = model_pair(True)
    seen = []
    for model in (theirs, ours):
        model.bn1.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        model.conv1 = nn.utils.parametrizations.weight_norm(model.conv1)
    ours.conv1.load_state_dict(theirs.conv1.state_dict())
    x = sample()
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(seen[1], seen[0])


def test_deepcopy_pickle_save_load():
    theirs, ours = model_pair(False)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(ours), pickle.loads(pickle.dumps(ours)), torch.load(buffer, weights_only=False)]
    x = sample()
    for clone in copies:
        assert type(clone.bn1) is bnorm_ext.BatchNorm2d
        torch.testing.assert_close(clone(x), theirs(x))


def test_dtype_and_memory_format_casts():
    theirs, ours = model_pair(True, dtype=torch.float32)
    theirs.double().to(memory_format=torch.channels_last)
    ours.double().to(memory_format=torch.channels_last)
    x = sample().contiguous(memory_format=torch.channels_last)
    out_t, out_o = theirs(x), ours(x)
    assert out_o.dtype == torch.float64
    torch.testing.assert_close(out_o, out_t)


def test_meta_init_and_to_empty():
    with torch.device("meta"):
        bn = bnorm_ext.BatchNorm2d(8)
    assert bn.weight.is_meta
    bn = bn.to_empty(device="cpu")
    bn.reset_parameters()
    ref = nn.BatchNorm2d(8)
    x = randn_shifted((4, 8, 5, 5), torch.float32, "cpu")
    torch.testing.assert_close(bn(x), ref(x))
    assert_same_state(ref, bn)


def test_fuse_conv_bn_eval():
    theirs, ours = model_pair(False)
    fused_t = torch.nn.utils.fusion.fuse_conv_bn_eval(theirs.conv1, theirs.bn1)
    fused_o = torch.nn.utils.fusion.fuse_conv_bn_eval(ours.conv1, ours.bn1)
    x = sample()
    torch.testing.assert_close(fused_o(x), fused_t(x))
    torch.testing.assert_close(fused_o(x), ours.bn1(ours.conv1(x)))


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("training", modes)
def test_no_grad_and_inference_mode(training, context):
    theirs, ours = model_pair(training)
    x = sample()
    with context():
        out_t, out_o = theirs(x), ours(x)
    assert not out_o.requires_grad
    torch.testing.assert_close(out_o, out_t)
    assert_same_state(theirs, ours)


def test_fx_symbolic_trace_sync_batchnorm_is_a_leaf():
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    ours = nn.Sequential(nn.Conv2d(3, 4, 3), bnorm_ext.SyncBatchNorm(4))
    for model in (theirs, ours):
        gm = torch.fx.symbolic_trace(model)
        assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]


# --- torch.func over the fused BatchNorm + activation (BatchNormAct2d and its ops) -------------

ACTIVATIONS = ["identity", "relu", "leaky_relu", "silu"]
SLOPE = 0.2
RESIDUALS = [
    pytest.param("none", id="no_residual"),
    pytest.param("batched", id="residual_batched"),
    pytest.param("unbatched", id="residual_unbatched"),
]


@pytest.fixture
def without_vmap_fallback():
    """vmap without its slow per-sample fallback: an op with no vmap rule raises instead of
    looping, so these tests see the rules."""
    enabled = torch._C._functorch._is_vmap_fallback_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    yield
    torch._C._functorch._set_vmap_fallback_enabled(enabled)


def batched_residual(residual, batch_shape):
    """(residual, its vmap in_dim): a per-sample residual, one shared by every sample, or None."""
    if residual == "batched":
        return torch.randn(batch_shape, dtype=torch.float64), 0
    if residual == "unbatched":
        return torch.randn(batch_shape[1:], dtype=torch.float64), None
    return None, None


def per_sample(t, in_dim, i):
    return t if in_dim is None or t is None else t.select(in_dim, i)


def batch_norm_act_fn(training, activation):
    # the fused functional with the positional layout vmap's in_dims follow
    def f(x, residual, weight, bias, running_mean, running_var):
        return bnorm_ext.batch_norm_act(
            x, running_mean, running_var, weight, bias, training, 0.1, 1e-5, activation, SLOPE, residual
        )

    return f


@pytest.mark.usefixtures("without_vmap_fallback")
@pytest.mark.parametrize(
    "batched_params", [pytest.param(False, id="shared_params"), pytest.param(True, id="batched_params-input_dim1")]
)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_vmap_batch_norm_act_eval_matches_per_sample_loop(activation, residual, batched_params):
    B, shape = 3, (4, 5, 3, 4)
    xs = randn_shifted((B,) + shape, torch.float64, "cpu")
    r, r_dim = batched_residual(residual, (B,) + shape)
    params_shape, p_dim = ((B, 5), 0) if batched_params else ((5,), None)
    w = 1 + 0.5 * torch.randn(params_shape, dtype=torch.float64)
    b, rm = torch.randn(params_shape, dtype=torch.float64), torch.randn(params_shape, dtype=torch.float64)
    rv = torch.rand(params_shape, dtype=torch.float64) + 0.5
    x_dim = 1 if batched_params else 0
    xs = xs.movedim(0, x_dim)
    f = batch_norm_act_fn(False, activation)
    in_dims = (x_dim, r_dim, p_dim, p_dim, p_dim, p_dim)
    out = vmap(f, in_dims)(xs, r, w, b, rm, rv)
    args = (xs, r, w, b, rm, rv)
    loop = torch.stack([f(*(per_sample(t, d, i) for t, d in zip(args, in_dims))) for i in range(B)])
    torch.testing.assert_close(out, loop)


@pytest.mark.usefixtures("without_vmap_fallback")
@pytest.mark.parametrize(
    "running_stats", [pytest.param(False, id="no_running_stats"), pytest.param(True, id="batched_running_stats")]
)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_vmap_batch_norm_act_training_matches_per_sample_loop(activation, residual, running_stats):
    # per-sample batch statistics; batched running stats (one of them vmapped at dim 1) updated per sample
    B, shape = 3, (4, 5, 3, 4)
    xs = randn_shifted((B,) + shape, torch.float64, "cpu")
    r, r_dim = batched_residual(residual, (B,) + shape)
    w, b = 1 + 0.5 * torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    rm_t = torch.randn(5, B, dtype=torch.float64) if running_stats else None  # vmapped at dim 1
    rv = torch.rand(B, 5, dtype=torch.float64) + 0.5 if running_stats else None
    rm_loop = rm_t.T.contiguous() if running_stats else None
    rv_loop = rv.clone() if running_stats else None
    f = batch_norm_act_fn(True, activation)
    stat_dims = (1, 0) if running_stats else (None, None)
    out = vmap(f, (0, r_dim, None, None) + stat_dims)(xs, r, w, b, rm_t, rv)
    loop = torch.stack(
        [
            f(xs[i], per_sample(r, r_dim, i), w, b, *((rm_loop[i], rv_loop[i]) if running_stats else (None, None)))
            for i in range(B)
        ]
    )
    torch.testing.assert_close(out, loop)
    if running_stats:
        torch.testing.assert_close(rm_t.T, rm_loop)
        torch.testing.assert_close(rv, rv_loop)
        assert not torch.equal(rv_loop[0], rv_loop[1])  # not one shared update


@pytest.mark.usefixtures("without_vmap_fallback")
@pytest.mark.parametrize(
    "need_grad_residual", [pytest.param(False, id="no_grad_residual"), pytest.param(True, id="grad_residual")]
)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", modes)
def test_vmap_batch_norm_act_backward_op_matches_per_sample_loop(training, activation, residual, need_grad_residual):
    # the fused backward op itself, every tensor argument batched but the residual as given
    B, shape = 3, (4, 5, 3, 4)
    xs = randn_shifted((B,) + shape, torch.float64, "cpu")
    r, r_dim = batched_residual(residual, (B,) + shape)
    ws, bs = 1 + 0.5 * torch.randn(B, 5, dtype=torch.float64), torch.randn(B, 5, dtype=torch.float64)
    rms, rvs = torch.randn(B, 5, dtype=torch.float64), torch.rand(B, 5, dtype=torch.float64) + 0.5
    ops = torch.ops.bnorm_ext
    forwards = []
    for i in range(B):
        r_i = per_sample(r, r_dim, i)
        if training:
            forwards.append(
                ops.batch_norm_act_forward_train(
                    xs[i], ws[i], bs[i], None, None, None, 0.1, 1e-5, r_i, activation, SLOPE
                )
            )
        else:
            forwards.append(
                (
                    ops.batch_norm_act_forward_eval(xs[i], ws[i], bs[i], rms[i], rvs[i], 1e-5, r_i, activation, SLOPE),
                    torch.zeros(5),
                    torch.zeros(5),
                )
            )
    ys, save_means, save_invstds = (torch.stack(t) for t in zip(*forwards))
    grad_outs = torch.randn((B,) + shape, dtype=torch.float64)

    def backward(dy, y, x, w, b, rm, rv, sm, si, res):
        return ops.batch_norm_act_backward(
            dy,
            y,
            x,
            w,
            b,
            rm,
            rv,
            sm if training else None,
            si if training else None,
            res,
            training,
            1e-5,
            need_grad_residual,
            activation,
            SLOPE,
        )

    args = (grad_outs, ys, xs, ws, bs, rms, rvs, save_means, save_invstds, r)
    in_dims = (0,) * 9 + (r_dim,)
    got = vmap(backward, in_dims)(*args)
    loop = [backward(*(per_sample(t, d, i) for t, d in zip(args, in_dims))) for i in range(B)]
    names = ["grad_input", "grad_weight", "grad_bias", "grad_residual"][: 4 if need_grad_residual else 3]
    for k, name in enumerate(names):
        torch.testing.assert_close(got[k], torch.stack([out[k] for out in loop]), msg=name)
    if not need_grad_residual:
        assert got[3].numel() == 0


class BatchNormThenAct(nn.Module):
    # forward(x, residual=None): act(bn(x) + residual); for torch's BatchNorm2d the unfused
    # composition, for a BatchNormAct2d one fused call
    def __init__(self, bn, activation):
        super().__init__()
        self.bn = bn
        self.activation = activation

    def forward(self, x, residual=None):
        if isinstance(self.bn, bnorm_ext.BatchNormAct2d):
            return self.bn(x, residual)
        y = self.bn(x)
        y = y if residual is None else y + residual
        if self.activation == "relu":
            return F.relu(y)
        if self.activation == "leaky_relu":
            return F.leaky_relu(y, SLOPE)
        return F.silu(y) if self.activation == "silu" else y


def batch_norm_act_pair(activation, training):
    """(torch's BatchNorm2d -> add -> activation, BatchNormAct2d with the same state), float64,
    same parameter names; in training both without running statistics, as
    replace_all_batch_norm_modules_ leaves them."""
    theirs = _randomize_stats(nn.BatchNorm2d(5).double()).train(training)
    ours = bnorm_ext.BatchNormAct2d(5, activation=activation, negative_slope=SLOPE).double().train(training)
    ours.load_state_dict(theirs.state_dict())
    if training:
        replace_all_batch_norm_modules_(theirs)
        replace_all_batch_norm_modules_(ours)
        assert ours.running_mean is None and not ours.track_running_stats
    return BatchNormThenAct(theirs, activation), BatchNormThenAct(ours, activation)


@pytest.mark.usefixtures("without_vmap_fallback")
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", modes)
def test_vmap_batch_norm_act_module_matches_unfused_and_loop(training, activation, residual):
    unfused, ours = batch_norm_act_pair(activation, training)
    B, shape = 3, (4, 5, 3, 4)
    xs = randn_shifted((B,) + shape, torch.float64, "cpu")
    r, r_dim = batched_residual(residual, (B,) + shape)
    in_dims = (0,) if r is None else (0, r_dim)
    args = (xs,) if r is None else (xs, r)
    out = vmap(ours, in_dims)(*args)
    torch.testing.assert_close(out, vmap(unfused, in_dims)(*args))
    torch.testing.assert_close(
        out, torch.stack([ours(*(per_sample(t, d, i) for t, d in zip(args, in_dims))) for i in range(B)])
    )


@pytest.mark.usefixtures("without_vmap_fallback")
def test_vmap_batch_norm_act_training_with_running_stats_raises_like_the_plain_op():
    # the plain rule's (and torch's) error, before the op writes the running stats
    xs, r = randn_shifted((2, 4, 5, 3, 3), torch.float64, "cpu"), torch.randn(2, 4, 5, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError) as plain_error:
        vmap(bnorm_ext.BatchNorm2d(5).double())(xs)
    ours = _randomize_stats(bnorm_ext.BatchNormAct2d(5, activation="silu").double())
    before = copy.deepcopy(ours.state_dict())
    for in_dims, args in (((0,), (xs,)), ((0, 0), (xs, r)), ((0, None), (xs, r[0]))):
        with pytest.raises(RuntimeError) as error:
            vmap(ours, in_dims)(*args)
        assert str(error.value) == str(plain_error.value)
        assert "running_mean or running_var" in str(error.value)
        for name, value in ours.state_dict().items():
            assert torch.equal(value, before[name]), name


@pytest.mark.usefixtures("without_vmap_fallback")
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("training", modes)
def test_vmap_of_grad_batch_norm_act_per_sample_gradients(training, activation, residual):
    # per-sample gradients of parameters, input and residual through the fused backward's vmap rule
    unfused, ours = batch_norm_act_pair(activation, training)
    B, shape = 3, (4, 5, 3, 4)
    xs = randn_shifted((B,) + shape, torch.float64, "cpu")
    r, r_dim = batched_residual(residual, (B,) + shape)
    probe = torch.randn(shape, dtype=torch.float64)
    results = []
    for model in (ours, unfused):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, x, *residual):
            return (functional_call(model, p, (x, *residual)) * probe).sum()

        argnums = (0, 1) if r is None else (0, 1, 2)
        in_dims = (None, 0) if r is None else (None, 0, r_dim)
        results.append(vmap(grad(loss, argnums=argnums), in_dims=in_dims)(params, xs, *([] if r is None else [r])))
    ours_grads, their_grads = results
    for name in their_grads[0]:
        torch.testing.assert_close(ours_grads[0][name], their_grads[0][name], msg=name)
    for i, (g_ours, g_theirs) in enumerate(zip(ours_grads[1:], their_grads[1:])):
        assert g_ours.shape == (B,) + shape
        torch.testing.assert_close(g_ours, g_theirs, msg=f"argument {i + 1}")
    assert their_grads[1].abs().max() > 1e-3  # not the all-zero gradient


@pytest.mark.usefixtures("without_vmap_fallback")
@pytest.mark.parametrize("has_residual", [pytest.param(False, id="no_residual"), pytest.param(True, id="residual")])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("jac", [jacrev, jacfwd], ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("training", modes)
def test_jacobians_of_batch_norm_act(training, jac, activation, has_residual):
    unfused, ours = batch_norm_act_pair(activation, training)
    x = randn_shifted((3, 5, 2, 2), torch.float64, "cpu")
    args = (x, torch.randn(3, 5, 2, 2, dtype=torch.float64)) if has_residual else (x,)
    argnums = tuple(range(len(args)))
    expected = jac(unfused, argnums=argnums)(*args)
    got = jac(ours, argnums=argnums)(*args)
    for i, (j_ours, j_theirs) in enumerate(zip(got, expected)):
        torch.testing.assert_close(j_ours, j_theirs, msg=f"argument {i}")
