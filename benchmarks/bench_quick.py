#!/usr/bin/env python3
"""A short benchmark of the plain and the fused ops without torch.compile, for a quick look on
a GPU: a few ResNet-50 BatchNorm shapes, both layouts, float32 and bfloat16; every row is
written to the CSV (and flushed) as soon as it is timed, so a run that is cut short keeps
the rows it finished.

    python benchmarks/bench_quick.py --csv quick.csv                  # CUDA (default)
    python benchmarks/bench_quick.py --device cpu --shapes 4x32x16x16 --repeats 3 --csv /tmp/q.csv

Rows, per dtype x shape x layout:
    plain  bnorm_ext.BatchNorm2d vs torch.nn.BatchNorm2d: fwd, bwd, eval (as benchmarks/bench.py)
    fused  bnorm_ext.BatchNormAct2d vs torch's BatchNorm2d -> (+ residual) -> ReLU, patterns
           BN+ReLU and BN+add+ReLU: fwd, fwd+bwd, eval (as benchmarks/bench_act.py)
Timing as in those scripts (CUDA: events after an L2 flush, interleaved, median; CPU:
perf_counter samples); each row is checked against torch first (a row that disagrees is
written with status FAIL and not timed; the exit status is then 1). ratio = ours / torch
(< 1: ours faster); GB/s and %floor from the pass's minimal traffic and the copy bandwidth.
Exit status: 0 every row timed, 1 a row failed its check, 2 no CUDA device, 4 interrupted
(SIGINT) with no failure.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
import harness  # noqa: E402
import bench_act  # noqa: E402

import bnorm_ext  # noqa: E402

# ResNet-50 at batch 32: on an H100/H200, 32x2048x7x7 fits the single-read kernel in both
# directions, 32x256x28x28 in the forward only, 32x64x112x112 in neither
SHAPES = "32x64x112x112,32x256x28x28,32x2048x7x7"
FIELDS = [
    "device",
    "dtype",
    "op",
    "pattern",
    "pass",
    "layout",
    "shape",
    "ours_ms",
    "torch_ms",
    "ratio",
    "floor_bytes",
    "gbps",
    "pct_floor",
    "copy_gbps",
    "repeats",
    "status",
    "seconds",
]


def timed(fns, device, timer, repeats):
    """Median ms per callable."""
    if device == "cuda":
        samples = timer.time(fns, repeats, 3)
    else:
        samples, _ = harness.time_cpu(fns, repeats, 1, 2.0)
    return {k: statistics.median(v) for k, v in samples.items()}


def plain_rows(shape, layout, dtype, device, timer, repeats, gen):
    """bnorm_ext.BatchNorm2d vs torch.nn.BatchNorm2d, passes fwd, bwd, eval: yields row dicts."""
    C = shape[1]
    param_dtype = torch.float32
    base_x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device)
    base_g = torch.randn(shape, generator=gen).to(device)
    xs = [bench.to_layout((base_x + 0.01 * i).to(dtype), layout) for i in range(3)]
    gs = [bench.to_layout((base_g * (1 + 0.01 * i)).to(dtype), layout) for i in range(3)]
    del base_x, base_g
    numel = xs[0].numel()
    for pass_ in ("fwd", "bwd", "eval"):
        t0 = time.monotonic()
        row = dict(
            op="plain",
            pattern="BN",
            **{"pass": pass_},
            floor_bytes=bench.FLOOR_FACTOR[pass_] * numel * xs[0].element_size(),
        )
        ref, ours = bench.make_modules(bnorm_ext.BatchNorm2d, C, device, param_dtype, gen)
        try:
            bench.guard(pass_, ref, ours, xs[0], gs[0], bench.TOL[str(dtype).split(".")[-1]])
        except Exception as exc:
            row["status"] = (
                f"FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
            )
            yield row, t0
            continue
        ms = timed(
            {"ours": bench.Rotating(pass_, ours, xs, gs), "torch": bench.Rotating(pass_, ref, xs, gs)},
            device,
            timer,
            repeats,
        )
        row.update(ours_ms=ms["ours"], torch_ms=ms["torch"], status="ok")
        yield row, t0


def fused_rows(shape, layout, pattern, dtype, device, timer, repeats, gen):
    """bnorm_ext.BatchNormAct2d vs torch's composed ops, passes fwd, fwd+bwd, eval: yields row dicts."""
    t0 = time.monotonic()
    label, residual, _ = bench_act.PATTERNS[pattern]
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    elsize = torch.tensor([], dtype=dtype).element_size()
    try:
        case = bench_act.Case(
            shape, {"cl": "channels_last"}.get(layout, layout), pattern, device, 3, False, gen, dtype=dtype
        )
        case.check()
        failed = None
    except Exception as exc:
        failed = f"FAIL {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
    for pass_ in bench_act.PASSES:
        row = dict(
            op="fused",
            pattern=label,
            **{"pass": pass_},
            floor_bytes=bench_act.floor_bytes(pass_, residual, numel, elsize),
        )
        if failed:
            row["status"] = failed
            yield row, t0
            continue
        ms = timed({c: case.callable(c, pass_) for c in ("fused", "torch")}, device, timer, repeats)
        row.update(ours_ms=ms["fused"], torch_ms=ms["torch"], status="ok")
        yield row, t0
        t0 = time.monotonic()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--shapes", default=SHAPES, help="comma list of NxCxHxW")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32,bfloat16,float16")
    p.add_argument("--layouts", default="nchw,cl", help="comma list of nchw,cl")
    p.add_argument("--repeats", type=int, default=20, help="interleaved samples per row")
    p.add_argument("--csv", default="", help="CSV path (rows written as they are timed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    start = time.monotonic()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_quick: no CUDA device", file=sys.stderr, flush=True)
        return 2
    shapes = [harness.parse_shape(s) for s in args.shapes.split(",") if s.strip()]
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",") if d.strip()]
    layouts = harness.parse_list(args.layouts, ("nchw", "cl"), "layout", bench.LAYOUT_ALIASES)
    timer = harness.CudaTimer(256) if device == "cuda" else None
    copy_gbps = harness.copy_bandwidth(device, timer, 10)
    gen = torch.Generator().manual_seed(args.seed)
    name = harness.machine_description(device)
    print(
        f"bench_quick: {name}, torch {torch.__version__}, copy bandwidth {copy_gbps:.1f} GB/s, "
        f"median of {args.repeats} interleaved samples",
        flush=True,
    )
    print(
        f"{'dtype':>8} {'op':>5} {'pattern':>11} {'pass':>7} {'layout':>6} {'shape':>14} "
        f"{'ours ms':>8} {'torch ms':>8} {'ratio':>6} {'GB/s':>7} {'%floor':>6}  status",
        flush=True,
    )
    out = harness.RowWriter(args.csv, FIELDS)
    counts = {"rows": 0, "bad": 0}
    try:
        run_rows(shapes, layouts, dtypes, device, timer, args.repeats, gen, copy_gbps, out, counts)
        interrupted = ""
    except KeyboardInterrupt:  # e.g. SIGINT from `timeout -s INT`: the rows so far are in the CSV
        interrupted = " (interrupted)"
    print(
        f"bench_quick: {counts['rows']} rows, {counts['bad']} not timed (FAIL), "
        f"{time.monotonic() - start:.0f} s{interrupted}",
        flush=True,
    )
    return 1 if counts["bad"] else 4 if interrupted else 0


def run_rows(shapes, layouts, dtypes, device, timer, repeats, gen, copy_gbps, out, counts):
    """Times every row, writing each to `out` and the table as it is done; counts rows and failures."""
    for dtype in dtypes:
        for shape in shapes:
            for layout in layouts:
                groups = [plain_rows(shape, layout, dtype, device, timer, repeats, gen)]
                groups += [
                    fused_rows(shape, layout, pattern, dtype, device, timer, repeats, gen)
                    for pattern in ("relu", "add_relu")
                ]
                for group in groups:
                    for row, t0 in group:
                        ok = row["status"] == "ok"
                        row.setdefault("ours_ms", float("nan"))
                        row.setdefault("torch_ms", float("nan"))
                        gbps = row["floor_bytes"] / (row["ours_ms"] * 1e-3) / 1e9 if ok else float("nan")
                        row.update(
                            device=device,
                            dtype=str(dtype).split(".")[-1],
                            layout=bench.LAYOUT_NAMES[layout],
                            shape="x".join(map(str, shape)),
                            ratio=row["ours_ms"] / row["torch_ms"] if ok else float("nan"),
                            gbps=gbps,
                            pct_floor=100 * gbps / copy_gbps,
                            copy_gbps=copy_gbps,
                            repeats=repeats,
                            seconds=time.monotonic() - t0,
                        )
                        out.write(row)
                        counts["rows"] += 1
                        counts["bad"] += not ok
                        print(
                            f"{row['dtype']:>8} {row['op']:>5} {row['pattern']:>11} {row['pass']:>7} "
                            f"{layout:>6} {row['shape']:>14} {row['ours_ms']:8.3f} {row['torch_ms']:8.3f} "
                            f"{row['ratio']:6.2f} {gbps:7.1f} {row['pct_floor']:6.1f}  {row['status']}",
                            flush=True,
                        )


if __name__ == "__main__":
    sys.exit(main())
