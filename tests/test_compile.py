"""torch.compile(fullgraph=True) of models using bnorm_ext modules; Inductor's code
around our ops (no layout copies) and the BN -> act fusion pass
(bnorm_ext.enable_inductor_fusion). About 2 minutes on 2 CPU cores: the two Inductor
model tests compile forward, backward and eval each."""

import copy

import pytest
import torch
import torch.nn as nn

import bnorm_ext
from common_utils import randn_shifted


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_models_match(m_c, m_e, what, tol):
    for (n, p), (_, q) in zip(m_c.named_parameters(), m_e.named_parameters()):
        assert p.grad is not None and q.grad is not None, f"{what}: missing grad {n}"
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"{what}: grad {n}: {m}")
    for (n, b), (_, c) in zip(m_c.named_buffers(), m_e.named_buffers()):
        assert b.dtype == c.dtype, n
        if b.dtype == torch.long:
            assert torch.equal(b, c), f"{what}: buffer {n}: {b} vs {c}"
        else:
            torch.testing.assert_close(b, c, **tol, msg=lambda m: f"{what}: buffer {n}: {m}")


def _train_steps(model, compiled, eager, steps, shape, memory_format=torch.contiguous_format):
    tol = dict(rtol=1e-4, atol=1e-5)
    for step in range(steps):
        x = randn_shifted(shape, torch.float32, memory_format=memory_format)
        target = torch.randn(x.shape[0], model[0].out_channels, x.shape[2] - 2, x.shape[3] - 2)
        for mod in (compiled, eager):
            for p in mod.parameters():
                p.grad = None
        out_c = compiled(x)
        out_e = eager(x)
        torch.testing.assert_close(out_c, out_e, **tol, msg=lambda m: f"step {step} output: {m}")
        ((out_c - target) ** 2).mean().backward()
        ((out_e - target) ** 2).mean().backward()
        _assert_models_match(model, eager, f"step {step}", tol)
        with torch.no_grad():  # identical SGD step on both
            for p, q in zip(model.parameters(), eager.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad


def test_compile_fullgraph_train_and_eval():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), bnorm_ext.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)

    model.train(), eager.train()
    _train_steps(model, compiled, eager, steps=3, shape=(4, 3, 10, 10))
    assert model[1].num_batches_tracked.item() == 3

    model.eval(), eager.eval()
    x = randn_shifted((4, 3, 10, 10))
    with torch.no_grad():
        out_c = compiled(x)
        out_e = eager(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    # eval must not touch running stats
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        assert torch.equal(b, c) if b.dtype == torch.long else torch.allclose(b, c, rtol=1e-4, atol=1e-5), n
    assert model[1].num_batches_tracked.item() == 3


def test_compile_fullgraph_momentum_none_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), bnorm_ext.BatchNorm2d(6, momentum=None), nn.ReLU())
    model = model.to(memory_format=torch.channels_last)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    _train_steps(model, compiled, eager, steps=3, shape=(4, 3, 9, 9), memory_format=torch.channels_last)
    assert model[1].num_batches_tracked.item() == 3
    assert eager[1].num_batches_tracked.item() == 3
    assert model[1].momentum is None


# ---------------------------------------------------------------------------
# Inductor: no layout copies around the ops, and the BN -> act fusion pass
# ---------------------------------------------------------------------------
import collections  # noqa: E402
import re  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torch._inductor.utils import fresh_cache, run_and_get_code  # noqa: E402

try:
    import torchvision.models.resnet as torchvision_resnet
except ImportError:  # the models that need it skip
    torchvision_resnet = None


class _SmallResNet(nn.Module):
    # Stem conv -> BN -> ReLU(inplace), a torchvision BasicBlock with a
    # downsample, a torchvision Bottleneck (one ReLU module used three times,
    # in-place add), pooled head: 6 fusable BatchNorms, the downsample's not.
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        downsample = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.layer1 = torchvision_resnet.BasicBlock(8, 16, stride=2, downsample=downsample)
        self.layer2 = torchvision_resnet.Bottleneck(16, 4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _SiluBlock(nn.Module):
    # BN -> SiLU (module), BN -> torch.add -> F.silu, BN -> F.leaky_relu(0.1):
    # fusable; a BN whose output has two users and one added to a broadcast
    # residual: not. NB: a 1x1 conv last, as in YOLO-style heads: Inductor
    # propagates channels-last only up to the last convolution (see README).
    def __init__(self, c=6):
        super().__init__()
        # NB: no conv bias before a training BatchNorm: its gradient is rounding noise.
        self.conv1, self.bn1, self.act = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.SiLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.bn4, self.bn5 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        z = F.silu(torch.add(self.bn2(self.conv2(y)), y))
        w = F.leaky_relu(self.bn3(self.conv3(z)), 0.1)
        v = self.bn4(w)
        u = F.relu(v) + v
        return self.head(F.silu(self.bn5(u) + u.mean(1, keepdim=True)))


FUSION_MODELS = {
    # name: (constructor, fused BatchNorms, unfused BatchNorms)
    "small_resnet": (_SmallResNet, 6, 1),
    "silu_block": (_SiluBlock, 3, 2),
}


@pytest.fixture
def inductor_fusion():
    bnorm_ext.enable_inductor_fusion()
    yield
    bnorm_ext.enable_inductor_fusion(False)


def _op_calls(codes):
    # bnorm_ext op calls in Inductor's generated code, by op name (`name` for
    # the functional overload, `name.out` for the out overload).
    calls = re.findall(r"torch\.ops\.bnorm_ext\.(\w+)\.(default|out)\(", "\n".join(codes))
    return collections.Counter(name if overload == "default" else f"{name}.out" for name, overload in calls)


def _layout_copy_kernels(codes):
    # Inductor kernels that write an argument of one of our op calls and are
    # named after our ops: the copies of arguments into the strides Inductor
    # thinks the op needs (e.g. `cpp_fused_batch_norm_forward_train_1(buf4,
    # buf5)` before `batch_norm_forward_train.default(buf5, ...)`).
    code = "\n".join(codes)
    op_args = set()
    for args in re.findall(r"torch\.ops\.bnorm_ext\.\w+\.(?:default|out)\(([^)]*)\)", code):
        op_args.update(a.split("=")[-1].strip() for a in args.split(","))
    return sorted(
        kernel
        for kernel, args in re.findall(r"^\s*(cpp_fused\w*batch_norm\w*)\(([^)]*)\)", code, re.MULTILINE)
        if op_args.intersection(a.strip() for a in args.split(","))
    )


def _randomized(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def _assert_close_scaled(actual, expected, what):
    # float32 tolerance relative to the tensor's largest value: the gradients
    # sum over the batch with cancellation, so near-zero elements carry the
    # rounding of the large ones.
    atol = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_same_state(model, eager, what):
    # The compiled model runs the same kernels as the eager one in
    # channels_last (Inductor's choice for CPU convolutions); only the order of
    # Inductor's own reductions and fused pointwise differ.
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        assert p.grad is not None and q.grad is not None, f"{what}: missing grad {n}"
        _assert_close_scaled(p.grad, q.grad, f"{what}: grad {n}")
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        if b.dtype == torch.long:
            assert torch.equal(b, c), f"{what}: buffer {n}: {b} vs {c}"
        else:
            _assert_close_scaled(b, c, f"{what}: buffer {n}")


def _ancestors(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def _assert_no_layout_copies_in_profile(prof, n_fused, n_plain):
    # A compiled training step: our fused and plain forward ops ran; the only
    # _to_copy / as_strided_ are convolution_backward's own (its weight
    # gradient back to the weight's layout, as with torch's BatchNorm), and our
    # forward ops copy nothing.
    events = prof.events()
    names = collections.Counter(e.name for e in events)
    assert names["bnorm_ext::batch_norm_act_forward_train"] == n_fused
    assert names["bnorm_ext::batch_norm_forward_train"] == n_plain
    for e in events:
        chain = list(_ancestors(e))
        if e.name in ("aten::_to_copy", "aten::as_strided_"):
            assert "aten::convolution_backward" in chain, f"{e.name} under {chain}"
        if e.name in ("aten::_to_copy", "aten::copy_", "aten::clone"):
            assert not any(
                a.startswith("bnorm_ext::batch_norm_act_forward") or a.startswith("bnorm_ext::batch_norm_forward")
                for a in chain
            ), f"{e.name} under {chain}"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.skipif(
                name == "small_resnet" and torchvision_resnet is None, reason="torchvision not installed"
            ),
        )
        for name in FUSION_MODELS
    ],
)
def test_inductor_fusion_train_and_eval(inductor_fusion, name):
    make, n_fused, n_plain = FUSION_MODELS[name]
    torch.manual_seed(0)
    model = _randomized(bnorm_ext.convert_batchnorm(make()))
    eager = copy.deepcopy(model).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break raises
    xs = [randn_shifted((4, 3, 12, 12)) for _ in range(3)]

    def train_step(model, x):
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
        return out

    def eager_step(x):
        return train_step(eager, x.contiguous(memory_format=torch.channels_last))

    with fresh_cache():
        out, codes = run_and_get_code(train_step, compiled, xs[0])
        calls = _op_calls(codes)
        expected_calls = {
            "batch_norm_act_forward_train": n_fused,
            "batch_norm_act_backward": n_fused,
            "batch_norm_forward_train": n_plain,
            "batch_norm_backward": n_plain,
        }
        assert calls == {k: v for k, v in expected_calls.items() if v}, calls
        assert _layout_copy_kernels(codes) == []
        _assert_close_scaled(out, eager_step(xs[0]), "step 0: output")
        _assert_same_state(model, eager, "step 0")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = train_step(compiled, xs[1])  # the compiled graph again, no recompile
        _assert_no_layout_copies_in_profile(prof, n_fused, n_plain)
        _assert_close_scaled(out, eager_step(xs[1]), "step 1: output")
        _assert_same_state(model, eager, "step 1")

        model.eval(), eager.eval()
        with torch.no_grad():
            out, codes = run_and_get_code(compiled, xs[2])
            out_e = eager(xs[2].contiguous(memory_format=torch.channels_last))
        # The eval ops are decomposed into generated code (tests/test_compile_eval.py).
        assert _op_calls(codes) == {}
        _assert_close_scaled(out, out_e, "eval: output")


def _residual_after_bn(m, x, r):
    y = m.bn(x)
    r2 = r * 2  # computed after the BatchNorm: the fused call runs at the add
    return F.relu(y + r2)


def _residual_written_after_bn(m, x, r):
    r2 = r * 1
    y = m.bn(x)
    r2.mul_(2)  # the add reads r2 after this, and so does the fused call
    return F.relu(y + r2)


def _running_mean_written_before_add(m, x, r):
    y = m.bn(x)
    m.bn.running_mean.add_(1)  # the BatchNorm reads (eval) or updates (train) it before this: not fused
    return F.relu(y + r)


def _running_mean_read_before_add(m, x, r):
    y = m.bn(x)
    s = m.bn.running_mean.sum()  # after the update: not fused
    return F.relu(y + r * s)


def _iadd_bn_first(m, x, r):
    y = m.bn(x)
    y += r
    return F.relu(y, inplace=True)


def _iadd_residual_first(m, x, r):
    r2 = r * 1
    r2 += m.bn(x)  # writes into the residual: not fused
    return F.relu(r2)


def _second_user(m, x, r):
    y = m.bn(x)
    return F.relu(y) + y


def _add_used_twice(m, x, r):
    z = m.bn(x) + r
    return F.relu(z) + z


PATTERNS = {  # name: (forward(module, x, residual), fused calls)
    "relu_module_inplace": (lambda m, x, r: nn.ReLU(inplace=True)(m.bn(x)), 1),
    "F.relu": (lambda m, x, r: F.relu(m.bn(x)), 1),
    "torch.relu_": (lambda m, x, r: torch.relu_(m.bn(x)), 1),
    "Tensor.relu": (lambda m, x, r: m.bn(x).relu(), 1),
    "Tensor.relu_": (lambda m, x, r: m.bn(x).relu_(), 1),
    "F.leaky_relu_kwarg_inplace": (lambda m, x, r: F.leaky_relu(m.bn(x), negative_slope=0.2, inplace=True), 1),
    "leaky_relu_module": (lambda m, x, r: nn.LeakyReLU(0.05)(m.bn(x)), 1),
    "silu_module": (lambda m, x, r: nn.SiLU()(m.bn(x)), 1),
    "F.silu_inplace": (lambda m, x, r: F.silu(m.bn(x), inplace=True), 1),
    "add_relu": (lambda m, x, r: F.relu(m.bn(x) + r), 1),
    "radd_silu": (lambda m, x, r: F.silu(r + m.bn(x)), 1),
    "iadd_bn_first": (_iadd_bn_first, 1),
    "torch.add_leaky_relu": (lambda m, x, r: F.leaky_relu(torch.add(m.bn(x), r), 0.1), 1),
    "Tensor.add_relu": (lambda m, x, r: m.bn(x).add(r).relu(), 1),
    "Tensor.add__relu_": (lambda m, x, r: m.bn(x).add_(r).relu_(), 1),
    "residual_after_bn": (_residual_after_bn, 1),
    "residual_written_after_bn": (_residual_written_after_bn, 1),
    # not fused
    "leaky_relu_negative_slope": (lambda m, x, r: F.leaky_relu(m.bn(x), -0.1), 0),
    "add_with_alpha": (lambda m, x, r: F.relu(torch.add(m.bn(x), r, alpha=2)), 0),
    "iadd_residual_first": (_iadd_residual_first, 0),
    "bn_output_second_user": (_second_user, 0),
    "add_output_second_user": (_add_used_twice, 0),
    "broadcast_residual": (lambda m, x, r: F.relu(m.bn(x) + r.mean(1, keepdim=True)), 0),
    "promoting_residual": (lambda m, x, r: F.relu(m.bn(x) + r.float()), 0),
    "running_mean_written_before_add": (_running_mean_written_before_add, 0),
    "running_mean_read_before_add": (_running_mean_read_before_add, 0),
    "gelu": (lambda m, x, r: F.gelu(m.bn(x)), 0),
}


class _Pattern(nn.Module):
    def __init__(self, forward, bn):
        super().__init__()
        self.bn, self._forward = bn, forward

    def forward(self, x, r):
        return self._forward(self, x, r)


def _with_fusion_pass(graphs):
    # A torch.compile backend: the fusion pass on the Dynamo graph, which then
    # runs as it is (the ops' own autograd kernels; no Inductor).
    from bnorm_ext._inductor_activation_fusion import fuse_batch_norm_activations

    def backend(gm, example_inputs):
        before = gm.code
        fuse_batch_norm_activations(gm.graph)
        gm.recompile()
        graphs.append((before, gm))
        return gm

    return backend


def _fused_calls(gm):
    fused = (
        torch.ops.bnorm_ext.batch_norm_act_forward_train.default,
        torch.ops.bnorm_ext.batch_norm_act_forward_eval.default,
    )
    return sum(1 for n in gm.graph.nodes if n.target in fused)


# NB: in eval the BatchNorm saves running_mean for its backward, so writing it
# afterwards makes the backward raise (in eager too).
TRAIN_ONLY_PATTERNS = {"running_mean_written_before_add"}


@pytest.mark.parametrize(
    "name,training",
    [
        pytest.param(n, t, id=f"{n}-{'train' if t else 'eval'}")
        for n in PATTERNS
        for t in (True, False)
        if t or n not in TRAIN_ONLY_PATTERNS
    ],
)
def test_fusion_pass_patterns(name, training):
    # Each form of BN -> [add ->] activation in the Dynamo graph, float64:
    # fused or not as expected, and outputs, gradients and running statistics
    # equal to the unfused eager model's.
    forward, expected = PATTERNS[name]
    bn = bnorm_ext.BatchNorm2d(5).double()
    model = _randomized(_Pattern(forward, bn)).train(training)
    eager = copy.deepcopy(model)
    graphs = []
    compiled = torch.compile(model, backend=_with_fusion_pass(graphs), fullgraph=True)
    x = randn_shifted((3, 5, 4, 4), torch.float64).requires_grad_()
    r = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    out = compiled(x, r)
    (len(graphs) == 1 and _fused_calls(graphs[0][1]) == expected) or pytest.fail(
        f"expected {expected} fused calls in\n{graphs[-1][1].code if graphs else 'no graph'}"
    )
    x_e, r_e = x.detach().clone().requires_grad_(), r.detach().clone().requires_grad_()
    out_e = eager(x_e, r_e)
    torch.testing.assert_close(out, out_e)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_e.backward(grad)
    torch.testing.assert_close(x.grad, x_e.grad)
    torch.testing.assert_close(r.grad, r_e.grad) if r_e.grad is not None else None
    for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"grad {n}: {m}")
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, c, msg=lambda m: f"buffer {n}: {m}")


@pytest.mark.parametrize("name", ["add_relu", "iadd_bn_first", "silu_module"])
def test_fusion_pass_leaves_torch_batchnorm_graphs_unchanged(name):
    # torch's own BatchNorm is Inductor's to fuse: the Dynamo graph of a
    # model on torch's BatchNorm comes out of the pass as it went in.
    forward, _ = PATTERNS[name]
    model = _Pattern(forward, nn.BatchNorm2d(5))
    graphs = []
    torch.compile(model, backend=_with_fusion_pass(graphs), fullgraph=True)(
        randn_shifted((3, 5, 4, 4)), torch.randn(3, 5, 4, 4)
    )
    ((before, gm),) = graphs
    assert gm.code == before


def test_enable_inductor_fusion_chains_with_the_users_pre_grad_passes():
    from torch._inductor import config

    from bnorm_ext._inductor_activation_fusion import (
        CONFIG_TAKES_PASS_LIST,
        FUSION_PASS,
        BatchNormActivationFusion,
        get_custom_graph_passes,
    )

    seen = []

    def user_pass(graph):
        seen.append("user")

    def assert_chained():
        # A list where torch takes one (2.14), else one callable running both in order (2.11).
        if CONFIG_TAKES_PASS_LIST:
            assert config.pre_grad_custom_pass == [user_pass, FUSION_PASS]
        else:
            assert callable(config.pre_grad_custom_pass)
            seen.clear()
            config.pre_grad_custom_pass(torch.fx.Graph())
            assert seen == ["user"]
        assert get_custom_graph_passes(config.pre_grad_custom_pass) == (user_pass, FUSION_PASS)

    with config.patch(pre_grad_custom_pass=user_pass):
        bnorm_ext.enable_inductor_fusion()
        bnorm_ext.enable_inductor_fusion()  # once only
        assert_chained()
        bnorm_ext.enable_inductor_fusion(False)
        assert config.pre_grad_custom_pass is user_pass
    with config.patch(pre_grad_custom_pass=(user_pass,)):
        bnorm_ext.enable_inductor_fusion()
        assert_chained()
        bnorm_ext.enable_inductor_fusion(False)
        assert config.pre_grad_custom_pass is user_pass
    with config.patch(pre_grad_custom_pass=None):
        bnorm_ext.enable_inductor_fusion()
        assert config.pre_grad_custom_pass is FUSION_PASS
        bnorm_ext.enable_inductor_fusion(False)
        assert config.pre_grad_custom_pass is None
    # Inductor's FX graph cache keys on the uuid: stable, and the source's hash.
    assert isinstance(FUSION_PASS.uuid(), bytes) and FUSION_PASS.uuid() == BatchNormActivationFusion().uuid()


def test_inductor_fusion_keeps_the_fx_graph_cache_working():
    # A second compile of the same model hits the cache (not bypassed for the
    # custom pass) and runs the fused op; with the pass off, the key differs
    # and the plain op runs.
    from torch._dynamo.utils import counters

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), bnorm_ext.BatchNorm2d(4), nn.ReLU())
    x = randn_shifted((2, 3, 6, 6))

    def compiled_op_counts():
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        compiled(x).sum().backward()  # compiles forward and backward
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            compiled(x)
        return collections.Counter(e.name for e in prof.events() if e.name.startswith("bnorm_ext::"))

    with fresh_cache():
        counters.clear()
        bnorm_ext.enable_inductor_fusion()
        try:
            assert compiled_op_counts() == {"bnorm_ext::batch_norm_act_forward_train": 1}
            hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
            assert hits == 0
            assert compiled_op_counts() == {"bnorm_ext::batch_norm_act_forward_train": 1}
            assert counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"] > 0
            assert counters["inductor"]["fxgraph_cache_bypass"] == 0
            assert counters["aot_autograd"]["autograd_cache_bypass"] == 0
        finally:
            bnorm_ext.enable_inductor_fusion(False)
        assert compiled_op_counts() == {"bnorm_ext::batch_norm_forward_train": 1}


@pytest.mark.parametrize("name,expected", [("add_relu", 1), ("broadcast_residual", 0)])
def test_fusion_pass_with_dynamic_shapes(name, expected):
    # Symbolic sizes: a residual of the same symbolic shape fuses, a
    # broadcast one does not; both run for a second batch size unchanged.
    forward, _ = PATTERNS[name]
    model = _randomized(_Pattern(forward, bnorm_ext.BatchNorm2d(5).double()))
    eager = copy.deepcopy(model)
    graphs = []
    compiled = torch.compile(model, backend=_with_fusion_pass(graphs), fullgraph=True, dynamic=True)
    for n in (3, 6):
        x = randn_shifted((n, 5, 4, 4), torch.float64)
        r = torch.randn(n, 5, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(compiled(x, r), eager(x, r))
    assert len(graphs) == 1 and _fused_calls(graphs[0][1]) == expected
    for (n, b), (_, c) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, c, msg=lambda m: f"buffer {n}: {m}")
