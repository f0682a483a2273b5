#!/usr/bin/env python3
"""torch.compile (Inductor, CPU) benchmark of bnorm_ext against torch's BatchNorm, and of what
bnorm_ext does under Inductor against calling its kernels as opaque ops.

Usage (from the repository root, with the package built and torchvision installed):

    python benchmarks/bench_compile.py            # per-layer eval BN, ResNet-18 inference and training step
    python benchmarks/bench_compile.py --quick    # smaller shapes, fewer repeats

Variants   torch    torch.nn.BatchNorm2d, compiled
           kernel   bnorm_ext.convert_batchnorm(model), compiled with the eval ops kept as opaque
                    calls of our kernels (as before the eval decompositions) and no `.out` lowering
           ours     bnorm_ext.convert_batchnorm(model), compiled as bnorm_ext registers it (eval ops
                    decomposed into Inductor's generated code; an op tagged torch.Tag.out would be
                    lowered to its `.out` overload, none is at present)
Cases      layer-eval   one BatchNorm2d, eval, no_grad (NCHW and channels_last)
           conv-bn-relu conv -> BN -> relu, eval, no_grad (NCHW and channels_last)
           resnet18-infer / resnet18-infer-freezing / resnet18-train (one SGD step)

Timing: each variant is compiled once (Inductor's caches off, so the switches above take effect);
then --repeats rounds, each running every variant --number calls back to back (order alternating);
ratio = median over rounds of (variant time / torch time in the same round). CPU figures are for
the machine they ran on: compare ratios, not times.
"""

import argparse
import contextlib
import copy
import statistics
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import cpu_once, interleaved  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cases", default="all", help="comma list of case names (default all)")
    return p.parse_args(argv)


@contextlib.contextmanager
def opaque_kernels():
    # The eval ops without their Inductor decompositions and no `.out` lowering.
    import torch._library._out_variant as out_variant
    from torch._inductor import decomposition

    from bnorm_ext import _inductor_decomp

    saved = {op: decomposition.decompositions.pop(op) for op in _inductor_decomp.DECOMPOSITIONS}
    decomposition.fast_random_decomps.cache_clear()
    to_out_variant = out_variant.to_out_variant
    out_variant.to_out_variant = lambda op: None
    try:
        yield
    finally:
        out_variant.to_out_variant = to_out_variant
        decomposition.decompositions.update(saved)
        decomposition.fast_random_decomps.cache_clear()


def time_rounds(fns, repeats, number):
    # {name: [seconds per call, per round]}, order alternating between rounds.
    times = {n: [] for n in fns}
    for r in range(repeats):
        for n in interleaved(list(fns), r):
            times[n].append(cpu_once(fns[n], number) * 1e-3)
    return times


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch
    import torch._inductor.config as inductor_config
    import torchvision

    import bnorm_ext

    inductor_config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    torch.manual_seed(0)
    repeats = args.repeats or (5 if args.quick else 11)
    batch, size, ch = (4, 64, 32) if args.quick else (8, 112, 64)

    def layer(fmt):
        bn = torch.nn.BatchNorm2d(ch)
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
        return bn.eval(), torch.randn(batch, ch, size // 2, size // 2).contiguous(memory_format=fmt)

    def conv_bn_relu(fmt):
        m = torch.nn.Sequential(
            torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False), torch.nn.BatchNorm2d(ch), torch.nn.ReLU()
        )
        with torch.no_grad():
            m[1].running_mean.normal_()
            m[1].running_var.uniform_(0.5, 2)
        m = m.eval().to(memory_format=fmt)
        return m, torch.randn(batch, ch, size // 2, size // 2).contiguous(memory_format=fmt)

    def resnet(fmt):
        m = torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)
        return m, torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)

    nchw, cl = torch.contiguous_format, torch.channels_last
    cases = {}
    for fname, fmt in (("nchw", nchw), ("cl", cl)):
        cases[f"layer-eval-{fname}"] = (lambda fmt=fmt: layer(fmt), "infer", False)
        cases[f"conv-bn-relu-{fname}"] = (lambda fmt=fmt: conv_bn_relu(fmt), "infer", False)
    cases["resnet18-infer-cl"] = (lambda: resnet(cl), "infer", False)
    cases["resnet18-infer-freezing-cl"] = (lambda: resnet(cl), "infer", True)
    cases["resnet18-train-cl"] = (lambda: resnet(cl), "train", False)
    if args.cases != "all":
        cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {batch}, size {size}, "
        f"repeats {repeats}; ratio = median over rounds of variant / torch"
    )
    for name, (make, mode, freezing) in cases.items():
        model, x = make()
        ours_model = bnorm_ext.convert_batchnorm(copy.deepcopy(model))
        variants = {"torch": model, "kernel": copy.deepcopy(ours_model), "ours": ours_model}
        fns = {}
        inductor_config.freezing = freezing
        for vname, m in variants.items():
            torch._dynamo.reset()
            ctx = opaque_kernels() if vname == "kernel" else contextlib.nullcontext()
            compiled = torch.compile(m)
            if mode == "infer":
                m.eval()

                def fn(compiled=compiled):
                    with torch.no_grad():
                        return compiled(x)
            else:
                m.train()
                opt = torch.optim.SGD(m.parameters(), lr=1e-3)
                target = torch.randint(0, 10, (x.shape[0],))

                def fn(compiled=compiled, m=m, opt=opt, target=target):
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(compiled(x), target)
                    loss.backward()
                    opt.step()
                    return loss

            with ctx:
                fn()
                fn()  # compiled (forward and backward) while the switches hold
            fns[vname] = fn
        inductor_config.freezing = False
        number = max(1, int(0.2 / max(1e-4, min(time_rounds({k: f}, 1, 1)[k][0] for k, f in fns.items()))))
        times = time_rounds(fns, repeats, number)
        ratios = {v: statistics.median(a / b for a, b in zip(times[v], times["torch"])) for v in fns if v != "torch"}
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        print(
            f"{name:28s} torch {med['torch']:8.2f} ms   kernel/torch {ratios['kernel']:.3f}   "
            f"ours/torch {ratios['ours']:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
