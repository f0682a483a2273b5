#!/usr/bin/env python3
"""Layer benchmark of the fused BatchNorm + activation: bnorm_ext.BatchNormAct2d vs torch's
composed nn.BatchNorm2d -> (+ residual) -> ReLU, eager and under torch.compile.

Usage (from the repository root, with the package built):

    python benchmarks/bench_act.py                 # CPU: 2 shapes x 2 layouts x 2 patterns x 3 passes (a few minutes, most of it compiling)
    python benchmarks/bench_act.py --quick         # smoke run
    python benchmarks/bench_act.py --device cuda   # GPU: CUDA events, L2 flushed

Patterns   BN+ReLU (relu(BN(x))) and BN+add+ReLU (relu(BN(x) + residual)); --patterns silu: BN+SiLU
Passes     fwd      training forward (batch statistics, running-stat update, autograd graph recorded)
           fwd+bwd  training forward, then torch.autograd.grad of input, weight, bias (and residual)
           eval     eval forward under torch.no_grad()
Columns    fused    bnorm_ext.BatchNormAct2d (one op forward, one op backward)
           torch    torch.nn.BatchNorm2d, then torch's add and relu, eager
           compile  the same torch module under torch.compile (default mode, dynamic=False)

Measurement: warm-up, then ours and the baselines interleaved per repeat (alternating order),
input copies rotated; CPU samples last >= --min-sample-ms (harness.time_cpu), CUDA samples are
single calls bracketed by CUDA events after an L2 flush (harness.CudaTimer). Figures are medians;
ratio = fused / baseline (< 1: fused faster).
Traffic floor per element of size s, r = 1 with a residual: fwd (3 + r)s (x read for the
statistics and to normalize, residual read, y written), eval (2 + r)s, fwd+bwd (10 + 2r)s (the
backward reads dy, y and x for its reduction and again to write dx, and writes d residual);
GB/s = floor bytes / fused time, %floor = that as a percentage of the copy bandwidth.
Before timing, the fused output is compared with torch's and its gradients with
bnorm_ext.BatchNorm2d followed by torch's add and relu (float32 tolerances). NB: not torch's
gradients: where BN's output is within rounding of 0 the two BatchNorm kernels may round to
opposite sides, and the ReLU mask (so the gradient) differs there.
"""

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    BusyMeter,
    CudaTimer,
    copy_bandwidth,
    machine_description,
    parse_shape,
    progress,
    time_cpu,
    write_rows_csv,
)

import bnorm_ext  # noqa: E402

PASSES = ("fwd", "fwd+bwd", "eval")
# pattern -> (label, residual, activation)
PATTERNS = {
    "relu": ("BN+ReLU", False, "relu"),
    "add_relu": ("BN+add+ReLU", True, "relu"),
    "silu": ("BN+SiLU", False, "silu"),
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DEFAULT_SHAPES = "16x64x56x56,16x256x14x14"
QUICK_SHAPES = "4x32x16x16"
CUDA_DEFAULT_SHAPES = "32x64x112x112,32x256x56x56,32x1024x14x14"


def floor_bytes(pass_: str, residual: bool, numel: int, elsize: int) -> int:
    r = int(residual)
    factor = {"fwd": 3 + r, "eval": 2 + r, "fwd+bwd": 10 + 2 * r}[pass_]
    return factor * numel * elsize


class TorchComposed(nn.Module):
    """torch's BN -> (+ residual) -> ReLU or SiLU, the unfused model a user has."""

    def __init__(self, C, activation="relu", **kw):
        super().__init__()
        self.bn = nn.BatchNorm2d(C, **kw)
        self.act = F.silu if activation == "silu" else F.relu

    def forward(self, x, residual=None):
        y = self.bn(x)
        return self.act(y + residual) if residual is not None else self.act(y)


class PlainComposed(TorchComposed):
    """bnorm_ext.BatchNorm2d -> torch add/ReLU: the gradient reference for the fused op."""

    def __init__(self, C, activation="relu", **kw):
        super().__init__(C, activation, **kw)
        self.bn = bnorm_ext.BatchNorm2d(C, **kw)


class Fused(nn.Module):
    def __init__(self, C, activation="relu", **kw):
        super().__init__()
        self.bn = bnorm_ext.BatchNormAct2d(C, activation=activation, **kw)

    def forward(self, x, residual=None):
        return self.bn(x, residual)


class Case:
    """One (shape, layout, pattern): modules with equal parameters and rotating inputs."""

    def __init__(self, shape, layout, pattern, device, copies, with_compile, gen, dtype=torch.float32):
        # dtype: of the input, residual and gradients; parameters and running statistics float32
        _, residual, activation = PATTERNS[pattern]
        self.dtype = dtype
        C = shape[1]
        fmt = LAYOUTS[layout]
        kw = dict(device=device)
        self.torch = TorchComposed(C, activation, **kw)
        with torch.no_grad():
            self.torch.bn.weight.copy_(torch.rand(C, generator=gen) + 0.5)
            self.torch.bn.bias.copy_(torch.randn(C, generator=gen))
            self.torch.bn.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
        self.fused = Fused(C, activation, **kw)
        self.plain = PlainComposed(C, activation, **kw)
        for m in (self.fused, self.plain):
            m.load_state_dict(self.torch.state_dict())
        self.modules = {"fused": self.fused, "torch": self.torch, "plain": self.plain}
        self.compiled = {}
        if with_compile:
            # separate modules per mode, so that train and eval are separate compiled graphs
            for mode in ("train", "eval"):
                m = TorchComposed(C, activation, **kw)
                m.load_state_dict(self.torch.state_dict())
                self.modules["compile_" + mode] = m
                self.compiled["compile_" + mode] = torch.compile(m, dynamic=False)

        def data(scale, shift):
            # one random tensor, the copies scaled from it on the device (differ in value and address)
            base = (torch.randn(shape, generator=gen) * scale + shift).to(device)
            return [(base * (1 + 0.01 * i)).to(dtype).contiguous(memory_format=fmt) for i in range(copies)]

        self.xs = [x.requires_grad_() for x in data(3.0, 5.0)]
        self.rs = [r.requires_grad_() for r in data(1.0, 0.0)] if residual else [None] * copies
        self.gs = data(1.0, 0.0)
        self.i = 0

    def callable(self, name, pass_):
        """A zero-argument function running `pass_` with module `name` on the next input copy."""
        if name == "compile":
            name += "_eval" if pass_ == "eval" else "_train"
            module, call = self.modules[name], self.compiled[name]
        else:
            module = self.modules[name]
            call = module
        module.train(pass_ != "eval")
        params = [module.bn.weight, module.bn.bias]
        n = len(self.xs)

        def run():
            i = self.i = (self.i + 1) % n
            x, r = self.xs[i], self.rs[i]
            if pass_ == "eval":
                with torch.no_grad():
                    return call(x, r)
            y = call(x, r)
            if pass_ == "fwd":
                return y
            leaves = [x] + ([r] if r is not None else []) + params
            return torch.autograd.grad(y, leaves, self.gs[i])

        return run

    def check(self):
        """Fused vs torch (outputs) and vs bnorm_ext BN + torch ops (gradients), on one input copy;
        for 16-bit data the references run in float32 on the same (rounded) data."""
        state = {k: v.clone() for k, v in self.torch.state_dict().items()}
        data = self.xs, self.rs, self.gs

        def as_float(ts, grad):
            return [t.detach().float().requires_grad_(grad) if t is not None else None for t in ts]

        reference_data = (
            data
            if self.dtype == torch.float32
            else (as_float(self.xs, True), as_float(self.rs, True), as_float(self.gs, False))
        )
        for pass_ in PASSES:
            reference = "plain" if pass_ == "fwd+bwd" else "torch"
            results = []
            for name, (self.xs, self.rs, self.gs) in (("fused", data), (reference, reference_data)):
                self.modules[name].load_state_dict(state)  # same running statistics
                self.i = 0
                out = self.callable(name, pass_)()
                results.append(out if isinstance(out, tuple) else (out,))
            self.xs, self.rs, self.gs = data
            for got, want in zip(*results):
                assert got.isfinite().all(), f"{pass_}: non-finite values"
                if self.dtype == torch.float32:
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
                    continue
                # NB: in 16-bit types many more BN outputs round to either side of 0 (see the
                # module's docstring), so the check is on the relative error of the whole tensor
                err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
                assert err <= 1e-2, f"{pass_}: relative error {err:.2e} > 1e-2 (shape {tuple(got.shape)})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of NxCxHxW (default cpu {DEFAULT_SHAPES}, cuda {CUDA_DEFAULT_SHAPES})",
    )
    p.add_argument("--layouts", default="nchw,channels_last")
    p.add_argument("--patterns", default="relu,add_relu")
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--repeats", type=int, default=None, help="interleaved samples (default cpu 15, cuda 30, --quick 3)")
    p.add_argument("--min-sample-ms", type=float, default=20.0, help="cpu: each sample lasts at least this long")
    p.add_argument("--copies", type=int, default=3, help="input copies rotated between calls")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="one small shape, few repeats")
    p.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/<device>_act.csv; '' to skip)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes_text = args.shapes or (
        QUICK_SHAPES if args.quick else CUDA_DEFAULT_SHAPES if device == "cuda" else DEFAULT_SHAPES
    )
    shapes = [parse_shape(s) for s in shapes_text.split(",") if s.strip()]
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    patterns = [s.strip() for s in args.patterns.split(",") if s.strip()]
    passes = [s.strip() for s in args.passes.split(",") if s.strip()]
    for values, allowed, what in (
        (layouts, LAYOUTS, "layout"),
        (patterns, PATTERNS, "pattern"),
        (passes, PASSES, "pass"),
    ):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise SystemExit(f"unknown {what} {bad}: choose from {list(allowed)}")
    repeats = args.repeats or (3 if args.quick else 30 if device == "cuda" else 15)
    with_compile = not args.no_compile
    if with_compile:
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(getattr(cfg, name), 64))
    timer = CudaTimer(256) if device == "cuda" else None
    copy_gbps = copy_bandwidth(device, timer, 10)
    gen = torch.Generator().manual_seed(args.seed)

    dev = machine_description(device)
    print(
        f"bnorm_ext fused BN+act benchmark: device={device} ({dev}) torch={torch.__version__} "
        f"threads={torch.get_num_threads()} float32; median ms of {repeats} interleaved samples; "
        f"copy bandwidth {copy_gbps:.1f} GB/s"
    )
    cols = ["fused", "torch"] + (["compile"] if with_compile else [])
    head = f"{'shape':>15} {'layout':>13} {'pattern':>11} {'pass':>7} " + " ".join(f"{c:>8}" for c in cols)
    head += (
        f" {'/torch':>7}" + (f" {'/compile':>8}" if with_compile else "") + f" {'GB/s':>7} {'%floor':>6} {'busy':>5}"
    )
    print(head)
    rows = []
    rows_total, row_number = len(shapes) * len(layouts) * len(patterns) * len(passes), 0
    for shape in shapes:
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        for layout in layouts:
            for pattern in patterns:
                label, residual, _ = PATTERNS[pattern]
                case = Case(shape, layout, pattern, device, max(1, args.copies), with_compile, gen)
                case.check()
                for pass_ in passes:
                    row_number += 1
                    progress(row_number, rows_total, f"{pass_} {layout} {label} {'x'.join(map(str, shape))}")
                    fns = {c: case.callable(c, pass_) for c in cols}
                    if device == "cuda":
                        samples = timer.time(fns, repeats, 5)
                        busy = float("nan")
                    else:
                        meter = BusyMeter()
                        samples, _ = time_cpu(fns, repeats, 3, args.min_sample_ms)
                        busy = meter.fraction()
                    ms = {c: statistics.median(samples[c]) for c in cols}
                    nbytes = floor_bytes(pass_, residual, numel, 4)
                    gbps = nbytes / (ms["fused"] * 1e-3) / 1e9
                    row = dict(
                        device=device,
                        shape="x".join(map(str, shape)),
                        layout=layout,
                        pattern=label,
                        pass_=pass_,
                        floor_bytes=nbytes,
                        fused_ms=ms["fused"],
                        torch_ms=ms["torch"],
                        compile_ms=ms.get("compile", float("nan")),
                        ratio_torch=ms["fused"] / ms["torch"],
                        ratio_compile=ms["fused"] / ms["compile"] if with_compile else float("nan"),
                        gbps=gbps,
                        pct_floor=100 * gbps / copy_gbps,
                        busy=busy,
                        repeats=repeats,
                    )
                    rows.append(row)
                    line = f"{row['shape']:>15} {layout:>13} {row['pattern']:>11} {pass_:>7} "
                    line += " ".join(f"{ms[c]:8.3f}" for c in cols) + f" {row['ratio_torch']:7.2f}"
                    line += f" {row['ratio_compile']:8.2f}" if with_compile else ""
                    line += f" {gbps:7.1f} {row['pct_floor']:6.1f} {busy:5.2f}"
                    print(line, flush=True)
                del case
    csv_path = (
        args.csv
        if args.csv is not None
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{device}_act.csv")
    )
    if csv_path and not args.quick:
        fields = [
            "device",
            "shape",
            "layout",
            "pattern",
            "pass",
            "fused_ms",
            "torch_ms",
            "compile_ms",
            "ratio_torch",
            "ratio_compile",
            "floor_bytes",
            "gbps",
            "pct_floor",
            "busy",
            "repeats",
        ]
        out = [{**{k: r[k] for k in fields if k in r}, "pass": r["pass_"]} for r in rows]
        write_rows_csv(csv_path, out, 5, fields)
    return 0


if __name__ == "__main__":
    sys.exit(main())
