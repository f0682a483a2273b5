#!/usr/bin/env python3
"""Model benchmark: torchvision ResNets with torch's BatchNorm, converted to bnorm_ext, and
converted + fused (BN -> act and BN -> add -> act as one op), eager and under torch.compile.

Usage (from the repository root, with the package built and torchvision installed):

    python benchmarks/bench_models.py            # ResNet-18 and ResNet-50, batch 16, 112x112 (2-4 min on 2 cores, most of it compiling)
    python benchmarks/bench_models.py --profile 4  # and where the time of a call goes, per variant (torch.profiler)
    python benchmarks/bench_models.py --quick    # ResNet-18 at 64x64, few repeats: a smoke run
    python benchmarks/bench_models.py --device cuda

Variants   torch      torchvision model as is (torch.nn.BatchNorm2d)
           converted  bnorm_ext.convert_batchnorm(model)
           fused      bnorm_ext.fuse_activations(bnorm_ext.convert_batchnorm(model))
Modes      eager, and compile = torch.compile(model) (default mode, dynamic=False), with
           bnorm_ext.enable_inductor_fusion() switched on (it leaves torch's BatchNorm alone, so
           under compile "converted" is fused by Inductor's pass and "fused" by fuse_activations)
Workloads  train  one SGD step: zero_grad, forward, cross-entropy, backward, optimizer.step()
           infer  eval-mode forward under torch.no_grad()

All variants start from the same weights. Before timing, each variant's first training loss and
its eval output are compared with the torch variant's in the same mode (float32 tolerances).
Timing: warm-up (compiles), then --repeats rounds; in each round every variant of the group runs
the same number of calls back to back (order alternating between rounds); figure = median ms per
call; ratio = variant / torch variant in the same mode. The CPU figures are for this machine only:
compare ratios, not times. Page faults per call (minor faults, getrusage) count the fresh pages the
kernel had to map and zero during the timed calls: with glibc's malloc, large tensors freed and
allocated again often come back as fresh pages (its mmap and trim thresholds decide), which costs
time in whichever op touches them first.
"""

import argparse
import copy
import os
import statistics
import sys
import time

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BusyMeter, interleaved, machine_description, progress, write_rows_csv  # noqa: E402

import bnorm_ext  # noqa: E402

VARIANTS = ("torch", "converted", "fused")


def build_variants(name, device, seed):
    import torchvision

    torch.manual_seed(seed)
    base = getattr(torchvision.models, name)(weights=None).to(device)
    converted = bnorm_ext.convert_batchnorm(copy.deepcopy(base))
    fused = bnorm_ext.fuse_activations(copy.deepcopy(converted))
    return {"torch": base, "converted": converted, "fused": fused}


class Runner:
    """One (variant, mode): the model, its optimizer and the step functions."""

    def __init__(self, model, mode):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.call = torch.compile(model, dynamic=False) if mode == "compile" else model

    def train_step(self, x, target):
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.call(x), target)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def infer(self, x):
        self.model.eval()
        with torch.no_grad():
            return self.call(x)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def minor_faults():
    """Minor page faults of this process so far (fresh pages the kernel mapped and zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else float("nan")


def time_group(fns, repeats, number, device):
    """Interleaved medians (ms per call) of zero-argument functions, and their minor page faults
    per call."""
    names = list(fns)
    samples = {n: [] for n in names}
    faults = {n: 0 for n in names}
    for r in range(repeats):
        for n in interleaved(names, r):
            sync(device)
            f0 = minor_faults()
            t0 = time.perf_counter()
            for _ in range(number):
                fns[n]()
            sync(device)
            samples[n].append((time.perf_counter() - t0) / number * 1e3)
            faults[n] += minor_faults() - f0
    return ({n: statistics.median(v) for n, v in samples.items()}, {n: faults[n] / (repeats * number) for n in names})


# Profile categories (--profile): self CPU time of the ops whose names match, per call.
PROFILE_CATEGORIES = (
    ("conv", lambda n: n.startswith(("aten::convolution", "aten::mkldnn_convolution", "aten::_convolution"))),
    (
        "bn_act",
        lambda n: n.startswith(
            (
                "bnorm_ext::",
                "aten::native_batch_norm",
                "aten::_native_batch_norm",
                "aten::batch_norm",
                "aten::threshold_backward",
                "aten::relu",
                "aten::clamp_min",
            )
        ),
    ),
    ("inductor", lambda n: n.startswith("## Call CompiledFxGraph")),
)


def profile_split(fn, steps):
    """ms per call of fn in PROFILE_CATEGORIES, the rest ("other") and in all ("total"), from the
    profiler's self CPU times (the calling thread's wall time in each op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    split = {name: 0.0 for name, _ in PROFILE_CATEGORIES}
    total = 0.0
    for e in prof.key_averages():
        total += e.self_cpu_time_total
        for name, match in PROFILE_CATEGORIES:
            if match(e.key):
                split[name] += e.self_cpu_time_total
                break
    split["other"] = total - sum(split.values())
    split["total"] = total
    return {k: v / 1e3 / steps for k, v in split.items()}


def check(runners, x, target, mode):
    """First training loss and eval output of every variant vs the torch variant."""
    ref_state = {n: copy.deepcopy(r.model.state_dict()) for n, r in runners.items()}
    losses = {n: r.train_step(x, target) for n, r in runners.items()}
    outs = {n: r.infer(x) for n, r in runners.items()}
    for n in runners:
        assert torch.isfinite(losses[n]) and outs[n].isfinite().all(), f"{n} {mode}: non-finite result"
        torch.testing.assert_close(losses[n], losses["torch"], rtol=1e-4, atol=1e-4, msg=f"{n} {mode}: training loss")
        # NB: after one step the running statistics are far from the batch's, so a deep net's eval
        # output is large and float32 rounding grows with depth: compare relative to its scale.
        # Compiled, torch's own model drifts further from its eager output (ResNet-50: 5.6e-3 of
        # the scale, ours compiled 6.4e-4), so the compiled check is looser.
        scale = outs["torch"].abs().max().item()
        tol = 1e-2 if mode == "compile" else 1e-3
        torch.testing.assert_close(outs[n], outs["torch"], rtol=tol, atol=tol * scale, msg=f"{n} {mode}: eval output")
        runners[n].model.load_state_dict(ref_state[n])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112, help="input height and width")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--workloads", default="train,infer")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 7, --quick 3, cuda 20)")
    p.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="ResNet-18 at 64x64, batch 4, 3 rounds")
    p.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/<device>_models.csv; '' to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS calls of each variant: ms per call in convolutions, BatchNorm + "
        "activation ops (ours, torch's), Inductor's generated code, the rest",
    )
    args = p.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.size, args.batch = "resnet18", 64, 4
    repeats = args.repeats or (3 if args.quick else 20 if device == "cuda" else 7)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if "compile" in modes:
        bnorm_ext.enable_inductor_fusion()
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 64))

    dev = machine_description(device)
    print(
        f"bnorm_ext model benchmark: device={device} ({dev}) torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch {args.batch} {args.size}x{args.size} float32{' channels_last' if args.channels_last else ''}; "
        f"median ms per call of {repeats} interleaved rounds"
    )
    print(
        f"{'model':>9} {'workload':>8} {'mode':>8} "
        + " ".join(f"{v:>10}" for v in VARIANTS)
        + f" {'conv/torch':>10} {'fused/torch':>11} {'busy':>5}  page faults per call"
    )
    rows, profiles = [], []
    rows_total, row_number = len(models) * len(modes) * len(workloads), 0
    gen = torch.Generator().manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for name in models:
        x = (torch.randn(args.batch, 3, args.size, args.size, generator=gen) * 3 + 5).to(device)
        x = x.contiguous(memory_format=fmt)
        target = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
        for mode in modes:
            variants = build_variants(name, device, args.seed)
            runners = {}
            for v, model in variants.items():
                runners[v] = Runner(model.to(memory_format=fmt), mode)
            t0 = time.perf_counter()
            check(runners, x, target, mode)  # also the warm-up that compiles
            print(
                f"  ({name} {mode}: checked{' and compiled' if mode == 'compile' else ''} in "
                f"{time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            for workload in workloads:
                row_number += 1
                progress(row_number, rows_total, f"{name} {workload} {mode}")
                if workload == "train":
                    fns = {v: (lambda r=r: r.train_step(x, target)) for v, r in runners.items()}
                else:
                    fns = {v: (lambda r=r: r.infer(x)) for v, r in runners.items()}
                for f in fns.values():
                    f()
                number = 1 if device == "cpu" else 5
                meter = BusyMeter()
                ms, faults = time_group(fns, repeats, number, device)
                busy = meter.fraction() if device == "cpu" else float("nan")
                row = dict(
                    device=device,
                    model=name,
                    workload=workload,
                    mode=mode,
                    batch=args.batch,
                    size=args.size,
                    torch_ms=ms["torch"],
                    converted_ms=ms["converted"],
                    fused_ms=ms["fused"],
                    ratio_converted=ms["converted"] / ms["torch"],
                    ratio_fused=ms["fused"] / ms["torch"],
                    busy=busy,
                    repeats=repeats,
                    **{f"{v}_faults": faults[v] for v in VARIANTS},
                )
                rows.append(row)
                print(
                    f"{name:>9} {workload:>8} {mode:>8} "
                    + " ".join(f"{ms[v]:10.2f}" for v in VARIANTS)
                    + f" {row['ratio_converted']:10.3f} {row['ratio_fused']:11.3f} {busy:5.2f}  "
                    + "/".join(f"{faults[v]:.0f}" for v in VARIANTS),
                    flush=True,
                )
                if args.profile and device == "cpu":
                    for v in VARIANTS:
                        split = profile_split(fns[v], args.profile)
                        profiles.append(
                            dict(
                                model=name,
                                workload=workload,
                                mode=mode,
                                variant=v,
                                steps=args.profile,
                                **{f"{k}_ms": val for k, val in split.items()},
                            )
                        )
                        print(
                            f"{'':>9} profile {v:>9}: "
                            + "  ".join(f"{k} {val:.1f}" for k, val in split.items())
                            + " ms per call",
                            flush=True,
                        )
            del runners, variants
    csv_path = (
        args.csv
        if args.csv is not None
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{device}_models.csv")
    )
    if csv_path and not args.quick:
        write_rows_csv(csv_path, rows, 4)
        if profiles:
            root, ext = os.path.splitext(csv_path)
            write_rows_csv(f"{root}_profile{ext or '.csv'}", profiles, 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
