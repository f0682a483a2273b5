"""Module-level behaviour: class hierarchy, repr, state_dict, resets, convert/revert, CLI."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import bnorm_ext
from common_utils import devices, randn_shifted, requires_torch_bn_bias_arg

PAIRS = [
    pytest.param(nn.BatchNorm1d, bnorm_ext.BatchNorm1d, (4, 3, 5), id="bn1d"),
    pytest.param(nn.BatchNorm2d, bnorm_ext.BatchNorm2d, (4, 3, 5, 5), id="bn2d"),
    pytest.param(nn.BatchNorm3d, bnorm_ext.BatchNorm3d, (2, 3, 3, 4, 2), id="bn3d"),
]
OPTIONS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(eps=1e-3, momentum=None, affine=False), id="eps1e-3-momNone-noaffine"),
    pytest.param(dict(momentum=0.3, track_running_stats=False), id="mom0.3-notrack"),
    # NB: torch 2.11's nn.BatchNorm takes no `bias` argument (2.14's does); ours takes it.
    pytest.param(dict(bias=False), id="nobias", marks=requires_torch_bn_bias_arg),
]


@pytest.mark.parametrize("tcls,ocls,shape", PAIRS)
def test_isinstance_and_class(tcls, ocls, shape):
    m = ocls(3)
    assert isinstance(m, tcls)
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    assert type(m) is not tcls


@pytest.mark.parametrize("kwargs", OPTIONS)
@pytest.mark.parametrize("tcls,ocls,shape", PAIRS)
def test_repr_matches_torch(tcls, ocls, shape, kwargs):
    r_t = repr(tcls(7, **kwargs))
    r_o = repr(ocls(7, **kwargs))
    strip = lambda r: r.split("(", 1)[1]  # noqa: E731  (drop the class name)
    assert strip(r_o) == strip(r_t)
    assert r_o.split("(", 1)[0] in (tcls.__name__, ocls.__name__)
    assert ocls(7, **kwargs).extra_repr() == tcls(7, **kwargs).extra_repr()


@pytest.mark.parametrize("kwargs", OPTIONS)
@pytest.mark.parametrize("tcls,ocls,shape", PAIRS)
def test_constructor_attributes_match_torch(tcls, ocls, shape, kwargs):
    t, o = tcls(6, **kwargs), ocls(6, **kwargs)
    for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
        assert getattr(o, attr) == getattr(t, attr), attr
    assert [n for n, _ in o.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert [n for n, _ in o.named_buffers()] == [n for n, _ in t.named_buffers()]
    for (n, a), (_, b) in zip(o.state_dict().items(), t.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n


def _train_some(mod, shape, steps=3, device="cpu"):
    for _ in range(steps):
        x = randn_shifted(shape, torch.float32, device)
        mod(x).square().sum().backward()
    return mod


@pytest.mark.parametrize("tcls,ocls,shape", PAIRS)
@pytest.mark.parametrize("device", devices)
def test_state_dict_roundtrip(device, tcls, ocls, shape):
    # torch -> ours
    t = _train_some(tcls(3).to(device), shape, device=device)
    with torch.no_grad():
        t.weight.mul_(1.5).add_(0.25)
        t.bias.add_(-0.5)
    o = ocls(3).to(device)
    sd_t = t.state_dict()
    res = o.load_state_dict(sd_t, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    sd_o = o.state_dict()
    assert list(sd_o.keys()) == list(sd_t.keys())
    assert "num_batches_tracked" in sd_o
    for k in sd_t:
        assert sd_o[k].dtype == sd_t[k].dtype, k
        assert torch.equal(sd_o[k], sd_t[k]), k
    assert o.num_batches_tracked.item() == 3
    t.eval(), o.eval()
    x = randn_shifted(shape, torch.float32, device)
    torch.testing.assert_close(o(x), t(x))

    # ours -> torch
    o2 = _train_some(ocls(3).to(device), shape, steps=2, device=device)
    t2 = tcls(3).to(device)
    res = t2.load_state_dict(o2.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    for k, v in o2.state_dict().items():
        assert torch.equal(t2.state_dict()[k], v), k
    assert t2.num_batches_tracked.item() == 2
    t2.eval(), o2.eval()
    torch.testing.assert_close(o2(x), t2(x))


def test_state_dict_without_num_batches_tracked_like_torch():
    # old checkpoints lack num_batches_tracked; torch fills it with 0
    t = nn.BatchNorm2d(3)
    sd = t.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # pre-num_batches_tracked checkpoint
    o = bnorm_ext.BatchNorm2d(3)
    o.num_batches_tracked.fill_(7)
    t.num_batches_tracked.fill_(7)
    t.load_state_dict(sd)
    o.load_state_dict(sd)
    assert o.num_batches_tracked.item() == t.num_batches_tracked.item()


@pytest.mark.parametrize("tcls,ocls,shape", PAIRS)
def test_reset_running_stats_and_parameters(tcls, ocls, shape):
    o = _train_some(ocls(3), shape)
    with torch.no_grad():
        o.weight.add_(1.0)
        o.bias.add_(1.0)
    assert o.num_batches_tracked.item() == 3
    assert not torch.equal(o.running_mean, torch.zeros(3))
    w_before = o.weight.detach().clone()
    o.reset_running_stats()
    assert torch.equal(o.running_mean, torch.zeros(3))
    assert torch.equal(o.running_var, torch.ones(3))
    assert o.num_batches_tracked.item() == 0
    assert torch.equal(o.weight, w_before)  # parameters untouched by reset_running_stats

    _train_some(o, shape)
    o.reset_parameters()
    assert torch.equal(o.weight, torch.ones(3))
    assert torch.equal(o.bias, torch.zeros(3))
    assert torch.equal(o.running_mean, torch.zeros(3))
    assert torch.equal(o.running_var, torch.ones(3))
    assert o.num_batches_tracked.item() == 0
    # still works afterwards and equals a fresh torch module
    x = randn_shifted(shape)
    torch.testing.assert_close(o(x), tcls(3)(x))


# ---------------------------------------------------------------------------
# convert / revert
# ---------------------------------------------------------------------------
class CustomBN(nn.BatchNorm2d):
    """A user subclass: not an exact torch class, must be left alone."""


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 8)
        self.bn1 = nn.BatchNorm1d(8, momentum=None)

    def forward(self, v):
        return self.bn1(self.fc(v))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, eps=1e-3)
        self.custom = CustomBN(4)
        self.seq = nn.Sequential(nn.ReLU(), nn.Sequential(Inner()))
        self.blocks = nn.ModuleDict(
            {
                "bn3": nn.BatchNorm3d(2, affine=False, momentum=0.3),
                "bn1_seq": nn.BatchNorm1d(5, track_running_stats=False),
            }
        )
        self.blocks["bn3"].double()

    def forward(self, img, v, vol, seq):
        a = self.custom(self.bn2(self.conv(img)))
        b = self.seq(v)
        c = self.blocks["bn3"](vol)
        d = self.blocks["bn1_seq"](seq)
        return a, b, c, d


def _net_inputs(device="cpu"):
    return (
        randn_shifted((4, 3, 7, 7), torch.float32, device),
        randn_shifted((6, 12), torch.float32, device),
        randn_shifted((2, 2, 3, 3, 2), torch.float64, device),
        randn_shifted((3, 5, 4), torch.float32, device),
    )


def _bn_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


@pytest.mark.parametrize("device", devices)
def test_convert_batchnorm(device):
    model = Net().to(device)
    # some training so buffers are non-trivial; one BN in eval mode
    for _ in range(2):
        model(*_net_inputs(device))[0].sum()
    model.seq[1][0].bn1.eval()
    before = copy.deepcopy(model)
    bns_before = _bn_modules(model)
    params_before = {n: p for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    modes_before = {n: m.training for n, m in model.named_modules()}

    ret = bnorm_ext.convert_batchnorm(model)
    assert ret is model  # in place

    mapping = {
        nn.BatchNorm1d: bnorm_ext.BatchNorm1d,
        nn.BatchNorm2d: bnorm_ext.BatchNorm2d,
        nn.BatchNorm3d: bnorm_ext.BatchNorm3d,
    }
    bns_after = _bn_modules(model)
    assert set(bns_after) == set(bns_before)
    for name, old in _bn_modules(before).items():
        new = bns_after[name]
        if type(old) in mapping:
            assert type(new) is mapping[type(old)], name
        else:
            assert type(new) is type(old), f"{name}: {type(old)} must not be converted"
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            assert getattr(new, attr) == getattr(old, attr), (name, attr)
    # parameters: same objects or at least equal values, same device/dtype
    params_after = {n: p for n, p in model.named_parameters()}
    assert list(params_after) == list(params_before)
    for n, p in params_after.items():
        q = params_before[n]
        assert isinstance(p, nn.Parameter)
        assert p is q or (torch.equal(p, q) and p.dtype == q.dtype and p.device == q.device), n
        assert p.requires_grad == q.requires_grad
    buffers_after = {n: b for n, b in model.named_buffers()}
    assert list(buffers_after) == list(buffers_before)
    for n, b in buffers_after.items():
        assert b.dtype == buffers_before[n].dtype and b.device == buffers_before[n].device, n
        assert torch.equal(b, buffers_before[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes_before
    assert model.blocks["bn3"].running_mean.dtype == torch.float64
    assert model.blocks["bn1_seq"].running_mean is None

    # outputs (training mode, with the one eval BN) identical to before conversion
    inputs = _net_inputs(device)
    outs_b = before(*inputs)
    outs_a = model(*inputs)
    for a, b in zip(outs_a, outs_b):
        assert a.dtype == b.dtype and a.device == b.device
        torch.testing.assert_close(a, b)
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, dict(before.named_buffers())[n], msg=lambda m: f"{n}: {m}")
    # and in eval mode
    model.eval(), before.eval()
    for a, b in zip(model(*inputs), before(*inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", devices)
def test_convert_top_level_module(device):
    # a bare BN module as the model itself
    m = nn.BatchNorm2d(3).to(device)
    out = bnorm_ext.convert_batchnorm(m)
    assert isinstance(out, bnorm_ext.BatchNorm2d)
    x = randn_shifted((2, 3, 4, 4), torch.float32, device)
    torch.testing.assert_close(out(x), nn.functional.batch_norm(x, None, None, out.weight, out.bias, True))


@pytest.mark.parametrize("device", devices)
def test_revert_batchnorm(device):
    model = Net().to(device)
    bnorm_ext.convert_batchnorm(model)
    model(*_net_inputs(device))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    ret = bnorm_ext.revert_batchnorm(model)
    assert ret is model
    for name, m in _bn_modules(model).items():
        assert type(m) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, CustomBN), (name, type(m))
        assert not isinstance(m, (bnorm_ext.BatchNorm1d, bnorm_ext.BatchNorm2d, bnorm_ext.BatchNorm3d)), name
    assert type(model.custom) is CustomBN
    assert type(model.bn2) is nn.BatchNorm2d
    assert type(model.seq[1][0].bn1) is nn.BatchNorm1d
    assert type(model.blocks["bn3"]) is nn.BatchNorm3d
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]) and v.dtype == state[k].dtype, k
    for n, p in model.named_parameters():
        assert p is params_before[n] or torch.equal(p, params_before[n]), n
    assert {n: m.training for n, m in model.named_modules()} == modes

    # round trip convert -> revert -> convert keeps behaviour
    inputs = _net_inputs(device)
    model.eval()
    out_t = model(*inputs)
    bnorm_ext.convert_batchnorm(model)
    out_o = model(*inputs)
    for a, b in zip(out_o, out_t):
        torch.testing.assert_close(a, b)


def test_convert_preserves_optimizer_usability():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bnorm_ext.convert_batchnorm(model)
    w_before = model[1].weight.detach().clone()
    model(randn_shifted((4, 2, 6, 6))).square().mean().backward()
    opt.step()
    # the optimizer still updates the (converted) BN parameters
    assert not torch.equal(model[1].weight.detach(), w_before)


# ---------------------------------------------------------------------------
# CLI / build info
# ---------------------------------------------------------------------------
def test_python_m_bnorm_ext():
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "bnorm_ext"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(bnorm_ext.__file__)),
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.__version__.split("+")[0] in proc.stdout, proc.stdout


def test_build_info():
    info = bnorm_ext.build_info()
    assert isinstance(info, dict)
    assert {"torch", "cuda_compiled", "cuda_archs"} <= set(info)
    assert isinstance(info["torch"], str)
    assert torch.__version__.split("+")[0] in info["torch"]
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], str)
    assert info["cpu_isa"] in {"avx512", "avx2", "default"}
    if info["cuda_compiled"]:
        assert info["cuda_archs"].strip() != ""
    if torch.cuda.is_available():
        assert info["cuda_compiled"] is True


def test_minimum_torch_is_stated_alike_and_met():
    # pyproject.toml's requirement, setup.py's build-time check and the import-time check agree.
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(root, "pyproject.toml")):
        pytest.skip("needs the source tree (pyproject.toml, setup.py)")
    with open(os.path.join(root, "pyproject.toml")) as f:
        pyproject = f.read()
    with open(os.path.join(root, "setup.py")) as f:
        setup_py = f.read()
    minimum = ".".join(map(str, bnorm_ext.MIN_TORCH))
    assert re.findall(r'"torch>=([\d.]+)"', pyproject) == [minimum, minimum]  # build-system and project
    assert f"MIN_TORCH = {bnorm_ext.MIN_TORCH}" in setup_py
    assert bnorm_ext._torch_release(torch.__version__) >= bnorm_ext.MIN_TORCH
    assert bnorm_ext._torch_release("2.15.0a0+git1234") == (2, 15)
    assert bnorm_ext._torch_release("2.11.0+cu130") == (2, 11)
    assert bnorm_ext._torch_release("2.10.1") < bnorm_ext.MIN_TORCH
