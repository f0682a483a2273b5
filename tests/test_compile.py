"""torch.compile(fullgraph=True) of models using bnorm_ext modules (3 compiles in total)."""

import copy

import pytest
import torch
import torch.nn as nn

import bnorm_ext
from conftest import randn_shifted


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
