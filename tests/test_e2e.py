"""End to end: a small CNN trained with torch's BatchNorm2d and with bnorm_ext's."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnorm_ext
from common_utils import devices


def make_cnn(bn_cls):
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        bn_cls(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 12 * 12, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


@pytest.mark.parametrize(
    "memory_format",
    [
        pytest.param(torch.contiguous_format, id="contiguous"),
        pytest.param(torch.channels_last, id="channels_last"),
    ],
)
@pytest.mark.parametrize("device", devices)
def test_train_small_cnn_matches_torch(device, memory_format):
    torch.manual_seed(0)
    model_t = make_cnn(nn.BatchNorm2d).to(device)
    model_o = make_cnn(bnorm_ext.BatchNorm2d).to(device)
    model_o.load_state_dict(model_t.state_dict())
    model_t = model_t.to(memory_format=memory_format)
    model_o = model_o.to(memory_format=memory_format)
    assert isinstance(model_o[1], bnorm_ext.BatchNorm2d) and type(model_t[1]) is nn.BatchNorm2d

    opt_t = torch.optim.SGD(model_t.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(model_o.parameters(), lr=0.05, momentum=0.9)
    steps, batch = 20, 16
    gen = torch.Generator().manual_seed(123)
    losses_t, losses_o = [], []
    for _ in range(steps):
        x = (torch.randn(batch, 1, 28, 28, generator=gen) * 2 + 3).to(device)
        x = x.contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        for model, opt, losses in ((model_t, opt_t, losses_t), (model_o, opt_o, losses_o)):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())

    lt = torch.tensor(losses_t, dtype=torch.float64)
    lo = torch.tensor(losses_o, dtype=torch.float64)
    assert torch.isfinite(lo).all()
    torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-5)
    assert lt[-1] < lt[0]  # it actually trained (memorizing random labels)

    bn_t, bn_o = model_t[1], model_o[1]
    assert bn_o.num_batches_tracked.item() == bn_t.num_batches_tracked.item() == steps
    torch.testing.assert_close(bn_o.running_mean, bn_t.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn_o.running_var, bn_t.running_var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn_o.weight, bn_t.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn_o.bias, bn_t.bias, rtol=1e-4, atol=1e-5)

    model_t.eval(), model_o.eval()
    x = (torch.randn(batch, 1, 28, 28, generator=gen) * 2 + 3).to(device).contiguous(memory_format=memory_format)
    with torch.no_grad():
        torch.testing.assert_close(model_o(x), model_t(x), rtol=1e-4, atol=1e-4)


def test_convert_then_train_matches_torch():
    torch.manual_seed(0)
    model_t = make_cnn(nn.BatchNorm2d)
    model_o = bnorm_ext.convert_batchnorm(copy.deepcopy(model_t))
    assert isinstance(model_o[1], bnorm_ext.BatchNorm2d)
    opt_t = torch.optim.SGD(model_t.parameters(), lr=0.05, momentum=0.9)
    opt_o = torch.optim.SGD(model_o.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(16, 1, 28, 28, generator=gen) * 2 + 3
        y = torch.randint(0, 10, (16,), generator=gen)
        lt = F.cross_entropy(model_t(x), y)
        lo = F.cross_entropy(model_o(x), y)
        torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-5)
        for _model, opt, loss in ((model_t, opt_t, lt), (model_o, opt_o, lo)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(model_o[1].running_var, model_t[1].running_var, rtol=1e-4, atol=1e-5)
