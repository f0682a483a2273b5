#!/usr/bin/env python3
"""float32 CPU error of bnorm_ext vs torch's BatchNorm on ResNet-18 activations.

Usage (from the repository root, with the package built):

    python benchmarks/numerics_resnet.py               # batch 8 at 224x224, both layouts
    python benchmarks/numerics_resnet.py --batch 4 --size 160 --layouts contiguous

The BN inputs are the conv outputs of a randomly initialised torchvision ResNet-18 (no
pretrained weights offline) run in float64 on natural-looking images (1/f noise, gradients,
non-zero means); the gradients fed to the backward are the BN outputs' gradients of a random
linear loss on the logits, from the same float64 run. Every layer's input is rounded to float32;
the reference is torch's float64 BatchNorm of that float32 input (exact to float32 precision).
For each quantity the script prints, per layer, max|err| of ours and of torch's float32 kernels,
and sums up ours/torch over the layers (mean and max error).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

import bnorm_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from common_utils import bn_layer_cases, natural_images  # noqa: E402  (test-suite data helpers)

ops = torch.ops.bnorm_ext
EPS = 1e-5
MOMENTUM = 0.1
QUANTITIES = (
    "output",
    "save_mean",
    "save_invstd",
    "running_mean",
    "running_var",
    "grad_input",
    "grad_weight",
    "grad_bias",
)


def resnet_bn_cases(batch=8, size=224, seed=0):
    """[(name, x, dy, weight, bias, running_mean, running_var)] in float64, one per BN layer of a
    random ResNet-18 in training mode: x is the layer's input, dy its output's gradient."""
    import torchvision

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    return bn_layer_cases(model, natural_images(batch, size, g), g)


def errors(x64, dy64, w64, b64, rm64, rv64, memory_format):
    """{quantity: (ours max|err|, torch max|err|, ours mean|err|, torch mean|err|)} of one layer's
    float32 training forward + backward, each against float64 on the same float32 input."""
    x = x64.float().contiguous(memory_format=memory_format)
    dy = dy64.float().contiguous(memory_format=memory_format)
    w, b, rm0, rv0 = w64.float(), b64.float(), rm64.float(), rv64.float()
    xr, dyr = x.double(), dy.double()

    def run_torch(x, dy, w, b, rm, rv):
        out, mean, invstd = torch.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, mean, invstd, True, EPS, [True, True, True]
        )
        return dict(
            output=out,
            save_mean=mean,
            save_invstd=invstd,
            running_mean=rm,
            running_var=rv,
            grad_input=gx,
            grad_weight=gw,
            grad_bias=gb,
        )

    def run_ours(x, dy, w, b, rm, rv):
        nbt = torch.tensor(0, dtype=torch.long)
        out, mean, invstd = ops.batch_norm_forward_train(x, w, b, rm, rv, nbt, MOMENTUM, EPS)
        gx, gw, gb = ops.batch_norm_backward(dy, x, w, None, None, mean, invstd, True, EPS)
        return dict(
            output=out,
            save_mean=mean,
            save_invstd=invstd,
            running_mean=rm,
            running_var=rv,
            grad_input=gx,
            grad_weight=gw,
            grad_bias=gb,
        )

    ref = run_torch(xr, dyr, w.double(), b.double(), rm0.double(), rv0.double())
    ours = run_ours(x, dy, w, b, rm0.clone(), rv0.clone())
    theirs = run_torch(x, dy, w, b, rm0.clone(), rv0.clone())
    result = {}
    for q in QUANTITIES:
        eo = (ours[q].double() - ref[q]).abs()
        et = (theirs[q].double() - ref[q]).abs()
        assert not torch.isnan(eo).any(), q
        result[q] = (eo.max().item(), et.max().item(), eo.mean().item(), et.mean().item())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layouts", default="contiguous,channels_last")
    parser.add_argument("--per-layer", action="store_true", help="print every layer's errors")
    args = parser.parse_args(argv)
    print(
        f"bnorm_ext {bnorm_ext.__file__}; torch {torch.__version__}; "
        f"ResNet-18 batch {args.batch} at {args.size}x{args.size}, seed {args.seed}"
    )
    cases = resnet_bn_cases(args.batch, args.size, args.seed)
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    worse = 0
    for layout in args.layouts.split(","):
        per_layer = [(name, errors(x, dy, w, b, rm, rv, formats[layout])) for name, x, dy, w, b, rm, rv in cases]
        print(f"\n{layout}: {len(per_layer)} BN layers; error vs float64 (ours / torch)")
        print(
            f"  {'quantity':<13}{'mean err ours':>14}{'torch':>10}{'max err ours':>14}{'torch':>10}"
            f"{'ratio max err: median':>23}{'worst':>7}{'layers ours>torch':>19}"
        )
        for q in QUANTITIES:
            e = [r[q] for _, r in per_layer]
            mean_o = sum(v[2] for v in e) / len(e)
            mean_t = sum(v[3] for v in e) / len(e)
            max_o = max(v[0] for v in e)
            max_t = max(v[1] for v in e)
            ratios = sorted(v[0] / v[1] if v[1] > 0 else (1.0 if v[0] == 0 else math.inf) for v in e)
            n_worse = sum(v[0] > v[1] for v in e)
            worse += n_worse
            print(
                f"  {q:<13}{mean_o:>14.2e}{mean_t:>10.2e}{max_o:>14.2e}{max_t:>10.2e}"
                f"{ratios[len(ratios) // 2]:>23.2f}{ratios[-1]:>7.2f}{n_worse:>12} of {len(e)}"
            )
        if args.per_layer:
            for name, r in per_layer:
                print(f"    {name:<22}" + " ".join(f"{q}={r[q][0]:.1e}/{r[q][1]:.1e}" for q in QUANTITIES))
    return 0 if worse == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
