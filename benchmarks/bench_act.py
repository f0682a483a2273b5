#!/usr/bin/env python3
"""CPU layer benchmark of the fused BatchNorm + activation: bnorm_ext.BatchNormAct2d vs torch's
composed nn.BatchNorm2d -> (+ residual) -> ReLU, training mode.

Usage (from the repository root, with the package built):

    python benchmarks/bench_act.py            # a few shapes, fwd and fwd+bwd, both layouts
    python benchmarks/bench_act.py --quick    # smoke run

Passes
    fwd      training forward (autograd graph recorded)
    fwd+bwd  training forward, then torch.autograd.grad of input, weight, bias (and residual)

Measurement: bench.time_cpu (warm-up, calls per sample calibrated, ours and torch interleaved per
repeat, alternating who goes first); the figure is the median; ratio = ours / torch (< 1: faster).
Before timing, the fused module's output and gradients are compared with bnorm_ext.BatchNorm2d
followed by torch's add/ReLU (the same BatchNorm kernels; float32 tolerances) and its output with
torch's. NB: not torch's gradients: where BN's output is within rounding of 0 the two BatchNorm
kernels can round to opposite sides, and ReLU's mask (so the gradient) differs there.
"""

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import time_cpu  # noqa: E402

import bnorm_ext  # noqa: E402


def make_case(shape, layout, residual):
    C = shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (torch.randn(shape) * 3 + 5).contiguous(memory_format=fmt).requires_grad_()
    r = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_() if residual else None
    g = torch.randn(shape).contiguous(memory_format=fmt)
    theirs = nn.BatchNorm2d(C)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    ours = bnorm_ext.BatchNormAct2d(C, activation="relu")
    ours.load_state_dict(theirs.state_dict())
    plain = bnorm_ext.BatchNorm2d(C)
    plain.load_state_dict(theirs.state_dict())

    def torch_fwd():
        y = theirs(x)
        return F.relu(y + r) if residual else F.relu(y)

    def ours_fwd():
        return ours(x, r)

    def plain_fwd():
        y = plain(x)
        return F.relu(y + r) if residual else F.relu(y)

    leaves = [x, r] if residual else [x]

    def with_bwd(fwd, module):
        def run():
            y = fwd()
            return torch.autograd.grad(y, leaves + [module.weight, module.bias], g)
        return run

    cases = {"fwd": (ours_fwd, torch_fwd), "fwd+bwd": (with_bwd(ours_fwd, ours), with_bwd(torch_fwd, theirs))}
    reference = {"fwd": plain_fwd, "fwd+bwd": with_bwd(plain_fwd, plain)}
    return cases, reference


def check(cases, reference):
    torch.testing.assert_close(cases["fwd"][0](), cases["fwd"][1](), rtol=1e-4, atol=1e-4)
    for a, b in zip(cases["fwd+bwd"][0](), reference["fwd+bwd"]()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    shapes = [(16, 64, 56, 56), (16, 256, 14, 14)] if not args.quick else [(4, 32, 16, 16)]
    repeats = 3 if args.quick else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms of {repeats} interleaved samples")
    print(f"{'shape':>18} {'layout':>13} {'pattern':>14} {'pass':>8} {'ours':>8} {'torch':>8} {'ratio':>6}")
    for shape in shapes:
        for layout in ("nchw", "channels_last"):
            for residual in (False, True):
                cases, reference = make_case(shape, layout, residual)
                check(cases, reference)
                for pass_, (ours, theirs) in cases.items():
                    samples, _ = time_cpu({"ours": ours, "torch": theirs}, repeats, 2, 20.0)
                    o, t = statistics.median(samples["ours"]), statistics.median(samples["torch"])
                    pattern = "BN+add+ReLU" if residual else "BN+ReLU"
                    print(f"{str(shape):>18} {layout:>13} {pattern:>14} {pass_:>8} {o:8.3f} {t:8.3f} {o / t:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
