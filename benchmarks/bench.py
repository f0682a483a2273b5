#!/usr/bin/env python3
"""Benchmark bnorm_ext against torch.nn.BatchNorm2d.

Usage (from the repository root, with the package built):

    python benchmarks/bench.py                 # CPU defaults: ~15-20 s on 2 quiet cores (longer when busy: rows are retried)
    python benchmarks/bench.py --quick         # smoke run, a few seconds
    python benchmarks/bench.py --device cuda   # GPU: CUDA events, L2 flush, torch.compile baseline

Output: the table on stdout, a progress line per row on stderr ("[k/N] fwd channels_last
16x64x56x56"), benchmarks/results/<device>_bench.csv (--csv) and next to it a bar chart of the
ratios, <device>_bench.png (--plot; needs matplotlib).  The timing machinery is in harness.py.

Passes
    fwd   training forward (batch statistics, running-stat update, autograd graph recorded)
    bwd   backward only: torch.autograd.grad(out, [x, weight, bias], grad_out, retain_graph=True)
          on a forward done once beforehand
    eval  eval forward (running statistics) under torch.no_grad()

Both sides are module calls: bnorm_ext.BatchNorm2d vs torch.nn.BatchNorm2d with identical
parameters and buffers.  Before a row is timed, the outputs (and running stats / gradients)
of the two are compared with a loose tolerance; a row that disagrees or raises is reported as
FAIL/ERROR and is not timed, and the script exits non-zero.

Measurement
    CPU : warm-up, then `--repeats` samples of time.perf_counter; each sample times `number`
          calls (calibrated so that a sample lasts >= --min-sample-ms) and rotates over a few
          input copies so repeats are not cache-hot.  Ours and torch are interleaved per repeat
          (alternating who goes first).  The reported figure is the median.
    CUDA: per call, a 256 MiB buffer is written (L2 flush), then the call is bracketed by CUDA
          events; median of >= 20 interleaved samples.

Traffic floor: the minimal DRAM traffic of the pass, in bytes = k * s * numel with s the
element size and k = 3 (fwd: read for stats, read + write to normalize), 5 (bwd: read x and
dy for the reduction, read x and dy again and write dx), 2 (eval: read + write).
GB/s = floor bytes / ours time; "%floor" = that bandwidth as a percentage of the measured
copy bandwidth of the device (tensor.copy_ of a large buffer, counted as read + write), i.e.
how close the kernel gets to the time a copy-speed kernel moving just the floor bytes would take.
On CUDA, bnorm_ext's single-read kernel moves only 2s (fwd) and 3s (bwd) where the input fits
in the GPU's shared memory, so those rows can pass 100%; BNORM_EXT_CUDA_SINGLE_READ=0 times the
two-pass kernels instead.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    BUSY_WARN,
    BusyMeter,
    CudaTimer,
    copy_bandwidth,
    fmt,
    geomean,
    machine_description,
    parse_list,
    parse_shape,
    progress,
    time_cpu,
    wait_quiet,
    write_ratio_plot,
)

HERE = os.path.dirname(os.path.abspath(__file__))

PASSES = ("fwd", "bwd", "eval")
FLOOR_FACTOR = {"fwd": 3, "bwd": 5, "eval": 2}
LAYOUT_ALIASES = {
    "nchw": "nchw",
    "contiguous": "nchw",
    "cl": "cl",
    "nhwc": "cl",
    "channels_last": "cl",
}
LAYOUT_NAMES = {"nchw": "NCHW", "cl": "channels_last"}

# ResNet-50 BatchNorm shapes at batch 16 (one tensor <= 12.8 MB: larger ones are allocated with
# mmap by glibc on every call, which on this VM adds page-fault noise to both sides)
DEFAULT_SHAPES = "16x64x56x56,16x128x28x28,16x256x28x28,16x512x14x14,16x1024x7x7,16x2048x7x7"
QUICK_SHAPES = "8x64x28x28,8x256x14x14"
# ResNet-50 shapes at batch 32; few of them, since every (shape, layout, train/eval) is a
# separate max-autotune compile for the torch.compile baseline
CUDA_DEFAULT_SHAPES = "32x64x112x112,32x256x56x56,32x512x28x28,32x1024x14x14,32x2048x7x7"

# Loose tolerances: the guard exists to refuse timing a broken kernel, not to test accuracy
# (tests/ does that).
TOL = {"float64": 1e-6, "float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to options with a meaningful default not already described."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if d is not None and d is not False and d is not argparse.SUPPRESS and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Benchmark bnorm_ext vs torch.nn.BatchNorm2d (training forward, backward, eval forward).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: perf_counter timing; cuda: CUDA events, L2 flush, torch.compile baseline",
    )
    p.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated NxCxHxW list (default cpu: {DEFAULT_SHAPES}; "
        f"--quick: {QUICK_SHAPES}; cuda: ResNet-50 shapes at batch 32)",
    )
    p.add_argument("--passes", default="fwd,bwd,eval", help="comma list of fwd,bwd,eval")
    p.add_argument("--layouts", default="nchw,cl", help="comma list of nchw,cl (cl = channels_last)")
    p.add_argument("--dtype", default="float32", choices=sorted(TOL), help="input dtype")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per implementation and row (default cpu 31, --quick 5, cuda 30; cuda uses >= 20)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed calls per implementation before timing (default 3, --quick 1, cuda 5)",
    )
    p.add_argument("--copies", type=int, default=3, help="input copies rotated between calls")
    p.add_argument(
        "--min-sample-ms",
        type=float,
        default=None,
        help="cpu: calls per sample are chosen so one sample lasts at least this long (default 5, --quick 1)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="cpu: rows timed while other processes used > 10%% of the CPUs are timed again up to this many times",
    )
    p.add_argument("--retry-budget", type=float, default=40.0, help="cpu: seconds the retries may take in all")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        help="cpu: before a retry, wait up to this many seconds for the other processes to quieten",
    )
    p.add_argument("--quick", action="store_true", help="small shapes, few repeats: a smoke run of a few seconds")
    p.add_argument(
        "--csv", default=None, help="CSV output path (default benchmarks/results/<device>_bench.csv; '' to skip)"
    )
    p.add_argument(
        "--plot",
        default=None,
        help="PNG plot of the ratios (default: the CSV's path with .png, so benchmarks/results/<device>_bench.png; "
        "'' to skip). "
        "Skipped when matplotlib is not installed.",
    )
    p.add_argument("--no-compile", action="store_true", help="cuda: skip the torch.compile baseline")
    p.add_argument(
        "--compile-mode",
        default="max-autotune",
        help="cuda: torch.compile mode of the baseline (max-autotune compiles slowly; any torch.compile mode)",
    )
    p.add_argument("--flush-mb", type=int, default=256, help="cuda: size of the L2 flush buffer in MiB")
    p.add_argument(
        "--ours",
        choices=("bnorm_ext", "torch"),
        default="bnorm_ext",
        help="implementation measured as 'ours'; 'torch' benchmarks torch against itself "
        "(harness self-test, no extension needed)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random data")
    return p


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    pass_: str
    layout: str
    shape: Tuple[int, ...]
    numel: int
    floor_bytes: int
    torch_ms: float = float("nan")
    ours_ms: float = float("nan")
    compile_ms: float = float("nan")
    status: str = "ok"
    busy: float = float("nan")
    number: int = 1
    repeats: int = 0
    torch_samples: List[float] = field(default_factory=list)
    ours_samples: List[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.ours_ms / self.torch_ms if self.ok else float("nan")

    @property
    def ratio_compile(self) -> float:
        return self.ours_ms / self.compile_ms if self.ok else float("nan")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def gbps(self, ms: float) -> float:
        return self.floor_bytes / (ms * 1e-3) / 1e9 if ms and ms == ms else float("nan")


def import_ours(which: str):
    """Return (module class factory, description)."""
    if which == "torch":
        return torch.nn.BatchNorm2d, "torch.nn.BatchNorm2d (self-test: torch vs torch)"
    try:
        import bnorm_ext  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the build
        raise SystemExit(
            f"cannot import bnorm_ext ({type(exc).__name__}: {exc}).\n"
            "Build it first: pip install --no-build-isolation -e .   "
            "(or run benchmarks/run.sh), or pass --ours torch for a harness self-test."
        ) from exc
    info = ""
    with contextlib.suppress(Exception):
        info = f" build_info={bnorm_ext.build_info()}"
    return bnorm_ext.BatchNorm2d, f"bnorm_ext.BatchNorm2d from {os.path.dirname(bnorm_ext.__file__)}{info}"


def make_modules(ours_cls, C: int, device, param_dtype, gen):
    """Torch reference and ours, with identical random parameters and buffers (float32 params,
    or float64 when the data is float64)."""
    # Parameters follow the API spec: input dtype, or float32 for float16/bfloat16 input.
    ref = torch.nn.BatchNorm2d(C, device=device, dtype=param_dtype)
    ours = ours_cls(C, device=device, dtype=param_dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C, generator=gen) + 0.5)
        ref.bias.copy_(torch.randn(C, generator=gen))
        ref.running_mean.copy_(torch.randn(C, generator=gen) * 0.1)
        ref.running_var.copy_(torch.rand(C, generator=gen) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def to_layout(t, layout: str):
    if layout == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


# --------------------------------------------------------------------------------------------
# Correctness guard
# --------------------------------------------------------------------------------------------


def close(actual, expected, tol: float, what: str):
    expected = expected.detach()
    actual = actual.detach()
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.to(expected.dtype),
        expected,
        rtol=tol,
        atol=tol * max(1.0, scale),
        msg=lambda m: f"{what}: {m}",
    )
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")


def guard(pass_: str, ref, ours, x, gout, tol: float):
    """Run both once on the same data from the same state and compare. Raises on mismatch.
    The modules' states are restored afterwards."""
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    ours_state = {k: v.clone() for k, v in ours.state_dict().items()}
    try:
        if pass_ == "eval":
            ref.eval()
            ours.eval()
            with torch.no_grad():
                y_ref, y_ours = ref(x), ours(x)
            close(y_ours, y_ref, tol, "eval output")
            return
        ref.train()
        ours.train()
        xr = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        xo = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        y_ref, y_ours = ref(xr), ours(xo)
        close(y_ours, y_ref, tol, "train output")
        close(ours.running_mean, ref.running_mean, tol, "running_mean")
        close(ours.running_var, ref.running_var, tol, "running_var")
        if pass_ == "bwd":
            g_ref = torch.autograd.grad(y_ref, [xr, ref.weight, ref.bias], gout)
            g_ours = torch.autograd.grad(y_ours, [xo, ours.weight, ours.bias], gout)
            for name, a, b in zip(("grad_input", "grad_weight", "grad_bias"), g_ours, g_ref):
                close(a, b, tol, name)
    finally:
        ref.load_state_dict(ref_state)
        ours.load_state_dict(ours_state)


# --------------------------------------------------------------------------------------------
# Callables to time
# --------------------------------------------------------------------------------------------


class Rotating:
    """A zero-argument callable running one pass on input copy i, i+1, ... in turn."""

    def __init__(self, pass_: str, mod, xs, gouts):
        self.i = 0
        self.n = len(xs)
        self.pass_ = pass_
        self.mod = mod
        if pass_ == "eval":
            mod.eval()
            self.xs = xs
        else:
            mod.train()
            self.xs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True) for x in xs]
        self.gouts = gouts
        self.params = [mod.weight, mod.bias]
        self.outs = None
        if pass_ == "bwd":
            # one forward per copy, graph retained; only the gradient computation is timed
            self.outs = [mod(x) for x in self.xs]

    def __call__(self):
        i = self.i
        self.i = (i + 1) % self.n
        if self.pass_ == "fwd":
            return self.mod(self.xs[i])
        if self.pass_ == "eval":
            with torch.no_grad():
                return self.mod(self.xs[i])
        return torch.autograd.grad(self.outs[i], [self.xs[i]] + self.params, self.gouts[i], retain_graph=True)


# --------------------------------------------------------------------------------------------
# torch.compile baseline
# --------------------------------------------------------------------------------------------


def make_compiled(mode: str = "max-autotune"):
    """torch.compile(F.batch_norm, mode=mode) wrapped as a BatchNorm2d module."""
    import torch.nn.functional as F

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            with contextlib.suppress(Exception):
                setattr(cfg, name, max(getattr(cfg, name), 256))
    # the bwd pass calls autograd.grad(..., retain_graph=True) repeatedly on one graph, which a
    # compiled backward with donated buffers refuses
    with contextlib.suppress(Exception):
        torch._functorch.config.donated_buffer = False
    compiled = torch.compile(F.batch_norm, mode=mode, dynamic=False)

    class CompiledBN(torch.nn.BatchNorm2d):
        def forward(self, x):
            # momentum=0.1 fixed here (our modules use the default too)
            return compiled(
                x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
            )

    return CompiledBN


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def print_table(rows: List[Row], with_compile: bool, copy_gbps: float):
    header = ["pass", "layout", "shape", "torch ms", "ours ms", "ratio"]
    if with_compile:
        header += ["compile ms", "ratio/compile"]
    header += ["GB/s", "%floor", "status"]
    lines = []
    for r in rows:
        line = [
            r.pass_,
            LAYOUT_NAMES[r.layout],
            "x".join(map(str, r.shape)),
            fmt(r.torch_ms),
            fmt(r.ours_ms),
            fmt(r.ratio, 2),
        ]
        if with_compile:
            line += [fmt(r.compile_ms), fmt(r.ratio_compile, 2)]
        gb = r.gbps(r.ours_ms) if r.ok else float("nan")
        status = r.status
        if r.busy == r.busy and r.busy > BUSY_WARN:
            status += f" (busy {100 * r.busy:.0f}%)"
        line += [fmt(gb, 1), fmt(100 * gb / copy_gbps, 0) if copy_gbps else "-", status]
        lines.append(line)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    left = {0, 1, 2, len(header) - 1}

    def render(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    print(render(header))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print(render(line))


def write_csv(path: str, rows: List[Row], meta: Dict[str, str], copy_gbps: float):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = [
        "device",
        "dtype",
        "threads",
        "pass",
        "layout",
        "N",
        "C",
        "H",
        "W",
        "numel",
        "floor_bytes",
        "torch_ms",
        "ours_ms",
        "ratio",
        "compile_ms",
        "ratio_compile",
        "ours_gbps",
        "torch_gbps",
        "pct_floor",
        "copy_gbps",
        "number",
        "repeats",
        "status",
        "other_cpu_load",
        "ours_impl",
        "torch_version",
    ]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            N, C, H, W = r.shape
            gb = r.gbps(r.ours_ms) if r.ok else float("nan")
            w.writerow(
                {
                    "device": meta["device"],
                    "dtype": meta["dtype"],
                    "threads": meta["threads"],
                    "pass": r.pass_,
                    "layout": LAYOUT_NAMES[r.layout],
                    "N": N,
                    "C": C,
                    "H": H,
                    "W": W,
                    "numel": r.numel,
                    "floor_bytes": r.floor_bytes,
                    "torch_ms": f"{r.torch_ms:.5f}",
                    "ours_ms": f"{r.ours_ms:.5f}",
                    "ratio": f"{r.ratio:.4f}",
                    "compile_ms": f"{r.compile_ms:.5f}",
                    "ratio_compile": f"{r.ratio_compile:.4f}",
                    "ours_gbps": f"{gb:.3f}",
                    "torch_gbps": f"{r.gbps(r.torch_ms):.3f}",
                    "pct_floor": f"{100 * gb / copy_gbps:.2f}" if copy_gbps else "",
                    "copy_gbps": f"{copy_gbps:.3f}",
                    "number": r.number,
                    "repeats": r.repeats,
                    "status": r.status,
                    "other_cpu_load": f"{r.busy:.3f}" if r.busy == r.busy else "",
                    "ours_impl": meta["ours"],
                    "torch_version": meta["torch"],
                }
            )


def write_plot(path: str, rows: List[Row], with_compile: bool, title: str):
    """Ratio bar chart PNG of the timed rows (ours / torch eager, and / torch.compile when timed)."""
    ok = [r for r in rows if r.ok]
    if not ok:
        return
    labels = [f"{r.pass_} {LAYOUT_NAMES[r.layout]}\n{'x'.join(map(str, r.shape))}" for r in ok]
    series = {"ours / torch eager": [r.ratio for r in ok]}
    if with_compile:
        series["ours / torch.compile"] = [r.ratio_compile for r in ok]
    write_ratio_plot(path, labels, series, title)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.perf_counter()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tol = TOL[args.dtype]
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    if args.shapes:
        shapes = [parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    elif args.quick:
        shapes = [parse_shape(s) for s in QUICK_SHAPES.split(",")]
    elif device == "cuda":
        shapes = [parse_shape(s) for s in CUDA_DEFAULT_SHAPES.split(",")]
    else:
        shapes = [parse_shape(s) for s in DEFAULT_SHAPES.split(",")]
    passes = parse_list(args.passes, PASSES, "pass")
    layouts = parse_list(args.layouts, ("nchw", "cl"), "layout", LAYOUT_ALIASES)
    if device == "cuda":
        repeats = max(args.repeats or 30, 20)
        warmup = args.warmup if args.warmup is not None else 5
    else:
        repeats = args.repeats or (5 if args.quick else 31)
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    min_sample_ms = args.min_sample_ms if args.min_sample_ms is not None else (1.0 if args.quick else 5.0)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    copies = max(1, args.copies)

    ours_cls, ours_desc = import_ours(args.ours)
    with_compile = device == "cuda" and not args.no_compile
    compiled_cls = make_compiled(args.compile_mode) if with_compile else None
    timer = CudaTimer(args.flush_mb) if device == "cuda" else None

    copy_gbps = copy_bandwidth(device, timer, 10)

    dev_desc = machine_description(device)
    print(
        f"bnorm_ext benchmark: device={device} ({dev_desc}) torch={torch.__version__} "
        f"threads={torch.get_num_threads()} dtype={args.dtype} python={platform.python_version()}"
    )
    print(f"ours: {ours_desc}")
    print(
        f"timing: {'CUDA events, L2 flush %d MiB' % args.flush_mb if device == 'cuda' else 'perf_counter'}, "
        f"median of {repeats} interleaved samples"
        f"{'' if device == 'cuda' else ' of >= %g ms' % min_sample_ms}, {warmup} warm-up, {copies} rotating input copies"
    )
    print(
        f"copy bandwidth (read+write): {copy_gbps:.1f} GB/s{' (measured again at the end; the better one is used)' if device == 'cpu' else ''}  "
        f"[%floor = (floor bytes / ours time) / copy bandwidth; floor bytes per element: fwd 3s, bwd 5s, eval 2s]"
    )
    print()

    gen = torch.Generator().manual_seed(args.seed)
    row_numbers = itertools.count(1)  # progress: rows begun, of rows_total
    rows_total, row_prefix = len(shapes) * len(layouts) * len(passes), ""

    def measure(shape, layout, pass_list) -> List[Row]:
        """Guard and time `pass_list` on one (shape, layout); returns one Row per pass."""
        N, C, H, W = shape
        numel = N * C * H * W
        out: List[Row] = []
        # data shared by every pass of this (shape, layout); the copies differ in value and address
        base_x = torch.randn(shape, generator=gen) * 2 + 0.5
        base_g = torch.randn(shape, generator=gen)
        xs = [to_layout((base_x + 0.01 * i).to(device=device, dtype=dtype), layout) for i in range(copies)]
        gouts = [to_layout((base_g * (1 + 0.01 * i)).to(device=device, dtype=dtype), layout) for i in range(copies)]
        del base_x, base_g
        for pass_ in pass_list:
            row = Row(pass_, layout, shape, numel, FLOOR_FACTOR[pass_] * numel * xs[0].element_size())
            out.append(row)
            progress(
                next(row_numbers),
                rows_total,
                f"{row_prefix}{pass_} {LAYOUT_NAMES[layout]} {'x'.join(map(str, shape))}"
                f"{' (compiling the torch.compile baseline)' if with_compile else ''}",
            )
            ref, ours = make_modules(ours_cls, C, device, param_dtype, gen)
            try:
                guard(pass_, ref, ours, xs[0], gouts[0], tol)
            except AssertionError as exc:
                row.status = "FAIL"
                print(
                    f"!! {pass_} {LAYOUT_NAMES[layout]} {shape}: ours disagrees with torch, not timed:\n"
                    f"   {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}",
                    file=sys.stderr,
                )
                continue
            except Exception as exc:
                row.status = "ERROR"
                print(
                    f"!! {pass_} {LAYOUT_NAMES[layout]} {shape}: {type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                    file=sys.stderr,
                )
                continue
            fns = {"torch": Rotating(pass_, ref, xs, gouts), "ours": Rotating(pass_, ours, xs, gouts)}
            if with_compile:
                comp = compiled_cls(C, device=device, dtype=param_dtype)
                comp.load_state_dict(ref.state_dict())
                try:
                    fns["compile"] = Rotating(pass_, comp, xs, gouts)
                    for _ in range(2):
                        fns["compile"]()
                except Exception as exc:
                    print(
                        f"!! torch.compile baseline failed for {pass_} {shape}: {type(exc).__name__}: {exc}",
                        file=sys.stderr,
                    )
                    fns.pop("compile", None)
            if device == "cuda":
                samples = timer.time(fns, repeats, warmup)
                number = 1
            else:
                meter = BusyMeter()
                samples, number = time_cpu(fns, repeats, warmup, min_sample_ms)
                row.busy = meter.fraction()
            row.torch_ms = statistics.median(samples["torch"])
            row.ours_ms = statistics.median(samples["ours"])
            if "compile" in samples:
                row.compile_ms = statistics.median(samples["compile"])
            row.number, row.repeats = number, repeats
            row.torch_samples, row.ours_samples = samples["torch"], samples["ours"]
            del fns
        return out

    rows: List[Row] = []
    for shape in shapes:
        for layout in layouts:
            rows.extend(measure(shape, layout, passes))

    # CPU: rows timed while other processes competed for the cores are timed again (after
    # waiting a little for the machine to quieten); the attempt with the least contention is kept
    retry_deadline = time.perf_counter() + args.retry_budget
    for attempt in range(args.retries if device == "cpu" else 0):
        busy = [i for i, r in enumerate(rows) if r.ok and r.busy == r.busy and r.busy > BUSY_WARN]
        if not busy or time.perf_counter() > retry_deadline:
            break
        print(f"({len(busy)} row(s) timed while other processes used the CPUs: retry {attempt + 1}/{args.retries})")
        wait_quiet(args.quiet_wait)
        row_numbers, rows_total, row_prefix = itertools.count(1), len(busy), f"retry {attempt + 1}: "
        for i in busy:
            if time.perf_counter() > retry_deadline:
                break
            r = rows[i]
            (new,) = measure(r.shape, r.layout, [r.pass_])
            if not new.ok:  # cannot happen for a row that passed before, but never hide it
                rows[i] = new
            elif new.busy < r.busy:
                rows[i] = new

    if device == "cpu":
        copy_gbps = max(copy_gbps, copy_bandwidth(device, timer, 10))
    print_table(rows, with_compile, copy_gbps)
    print()
    print("geomean ratio (ours/torch, < 1: ours faster):")
    for pass_ in passes:
        per = [r.ratio for r in rows if r.pass_ == pass_ and r.ok]
        by_layout = ", ".join(
            f"{LAYOUT_NAMES[lay]} {fmt(geomean([r.ratio for r in rows if r.pass_ == pass_ and r.layout == lay and r.ok]), 3)}"
            for lay in layouts
        )
        extra = ""
        if with_compile:
            extra = (
                f"  | vs torch.compile {fmt(geomean([r.ratio_compile for r in rows if r.pass_ == pass_ and r.ok]), 3)}"
            )
        print(f"  {pass_:5s} {fmt(geomean(per), 3)}  ({by_layout}){extra}")
    all_ratios = [r.ratio for r in rows if r.ok]
    print(f"  all   {fmt(geomean(all_ratios), 3)}")
    print(f"copy bandwidth used for %floor: {copy_gbps:.1f} GB/s (read+write)")

    meta = {
        "device": device,
        "dtype": args.dtype,
        "threads": str(torch.get_num_threads()),
        "ours": args.ours,
        "torch": torch.__version__,
    }
    csv_path = args.csv if args.csv is not None else os.path.join(HERE, "results", f"{device}_bench.csv")
    if csv_path:
        write_csv(csv_path, rows, meta, copy_gbps)
        print(f"\nCSV written to {os.path.relpath(csv_path)}")
    # default: next to the CSV (benchmarks/results/<device>_bench.png unless --csv says otherwise)
    plot_path = (
        args.plot
        if args.plot is not None
        else (
            os.path.splitext(csv_path)[0] + ".png" if csv_path else os.path.join(HERE, "results", f"{device}_bench.png")
        )
    )
    if plot_path:
        write_plot(plot_path, rows, with_compile, f"bnorm_ext vs torch ({device}, {args.dtype})")

    busy_rows = [r for r in rows if r.busy == r.busy and r.busy > BUSY_WARN]
    if busy_rows:
        print(
            f"WARNING: other processes used > {100 * BUSY_WARN:.0f}% of the CPUs while {len(busy_rows)} row(s) "
            f"were timed (marked 'busy'): those figures are unreliable; rerun on a quiet machine (or with --threads 1, which suffers less)."
        )
    bad = [r for r in rows if not r.ok]
    print(f"total time {time.perf_counter() - t_start:.1f} s")
    if bad:
        print(f"{len(bad)} row(s) not timed because ours failed the correctness guard or raised", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
