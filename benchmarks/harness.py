"""Measurement machinery shared by the benchmark scripts: timers, the busy meter, argument
parsing helpers, number formatting, CSV and plot output, the machine description and progress
lines.

CPU timing: samples of time.perf_counter over `number` calls each, implementations interleaved
per repeat (alternating who goes first), garbage collection off while timing.  CUDA timing: per
call, an L2 flush buffer is written, then the call is bracketed by CUDA events.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

# a measurement during which other processes used more than this fraction of the machine is flagged
BUSY_WARN = 0.10


def parse_shape(text: str) -> Tuple[int, ...]:
    """'16x64x56x56' -> (16, 64, 56, 56); argparse.ArgumentTypeError unless 4 positive dims."""
    parts = [p for p in text.lower().replace("*", "x").split("x") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected e.g. 16x64x56x56") from None
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: need 4 positive dims N x C x H x W")
    return shape


def parse_list(text: str, allowed: Sequence[str], what: str, aliases=None) -> List[str]:
    """Comma list -> deduplicated items of `allowed` (after `aliases`), in order; SystemExit otherwise."""
    out = []
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        if aliases is not None:
            item = aliases.get(item, item)
        if item not in allowed:
            raise SystemExit(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
        if item not in out:
            out.append(item)
    if not out:
        raise SystemExit(f"no {what} given")
    return out


def interleaved(names: Sequence[str], repeat: int) -> Sequence[str]:
    """The order in which to run `names` in repeat number `repeat`: as given on even, reversed on odd."""
    return names if repeat % 2 == 0 else names[::-1]


class BusyMeter:
    """CPU time used by *other* processes on this machine while we were timing, as a fraction
    of the machine (Linux /proc/stat minus our own CPU time). Contention from other processes
    makes multi-threaded CPU timings unreliable (a preempted OpenMP thread stalls a barrier)."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ncpu = os.cpu_count() or 1
        self.start()

    @staticmethod
    def _busy_jiffies() -> Optional[int]:
        """Busy jiffies of the whole machine so far, None where /proc/stat cannot be read."""
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...
        return sum(vals[:3]) + sum(vals[5:8])

    def start(self):
        """(Re)starts the measurement."""
        self.j0 = self._busy_jiffies()
        t = os.times()
        self.self0 = t.user + t.system
        self.w0 = time.perf_counter()

    def fraction(self) -> float:
        """Fraction (0..1) of the machine other processes used since start(); nan if unknown."""
        j1 = self._busy_jiffies()
        if j1 is None or self.j0 is None:
            return float("nan")
        t = os.times()
        wall = time.perf_counter() - self.w0
        if wall <= 0:
            return float("nan")
        others = (j1 - self.j0) / self.hz - (t.user + t.system - self.self0)
        return max(0.0, others / (wall * self.ncpu))


def wait_quiet(max_s: float, probe_s: float = 0.25):
    """Wait (at most max_s) until other processes use less than BUSY_WARN of the machine."""
    deadline = time.perf_counter() + max_s
    while time.perf_counter() < deadline:
        meter = BusyMeter()
        time.sleep(probe_s)
        f = meter.fraction()
        if not f == f or f <= BUSY_WARN:
            return


def cpu_once(fn: Callable, number: int) -> float:
    """Mean ms per call of `number` back-to-back calls of fn (perf_counter)."""
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number * 1e3


def time_cpu(
    fns: Dict[str, Callable], repeats: int, warmup: int, min_sample_ms: float
) -> Tuple[Dict[str, List[float]], int]:
    """Interleaved CPU samples (ms per call) of each callable, and the common calls per sample
    (calibrated so that one sample lasts >= min_sample_ms)."""
    names = list(fns)
    for _ in range(max(warmup, 1)):
        for n in names:
            fns[n]()
    # calibrate a common number of calls per sample
    est = max(min(cpu_once(fns[n], 1) for _ in range(2)) for n in names)
    number = max(1, int(math.ceil(min_sample_ms / max(est, 1e-6))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for n in interleaved(names, r):
                samples[n].append(cpu_once(fns[n], number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, number


class CudaTimer:
    """CUDA-event timer of single calls, each after writing a flush_mb MiB buffer (evicts L2)."""

    def __init__(self, flush_mb: int):
        self.flush = torch.empty(flush_mb * (1 << 20) // 4, dtype=torch.float32, device="cuda")

    def time(self, fns: Dict[str, Callable], repeats: int, warmup: int) -> Dict[str, List[float]]:
        """Interleaved samples (ms, one call each) of each callable after `warmup` untimed rounds."""
        names = list(fns)
        for _ in range(max(warmup, 1)):
            for n in names:
                fns[n]()
        torch.cuda.synchronize()
        events = {n: [] for n in names}
        for r in range(repeats):
            for n in interleaved(names, r):
                self.flush.zero_()  # evict L2 (H100/H200 L2 is 50-60 MB; 256 MB by default)
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[n]()
                end.record()
                events[n].append((start, end))
        torch.cuda.synchronize()
        return {n: [s.elapsed_time(e) for s, e in events[n]] for n in names}


def copy_bandwidth(device: str, flush_timer: Optional[CudaTimer], repeats: int) -> float:
    """Device copy bandwidth in GB/s (read + write), via dst.copy_(src) on a large buffer.
    CPU: best of `repeats` copies after waiting briefly for a quiet machine (a peak figure:
    contention only ever lowers it). CUDA: median of >= 20 event-timed copies, L2 flushed."""
    nbytes = (256 << 20) if device == "cuda" else (128 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    fn = functools.partial(dst.copy_, src)
    if device == "cuda":
        ms = statistics.median(flush_timer.time({"copy": fn}, max(repeats, 20), 3)["copy"])
    else:
        wait_quiet(2.0)
        for _ in range(2):
            fn()
        ms = min(cpu_once(fn, 1) for _ in range(max(repeats, 5)))
    del fn, src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


def fmt(v: float, nd: int = 3) -> str:
    """Number for a table: '-' for nan, no decimals from 1000 on, else `nd` decimals."""
    if v != v:  # nan
        return "-"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    return f"{v:.{nd}f}"


def geomean(vals: List[float]) -> float:
    """Geometric mean of the positive, non-nan values; nan if there are none."""
    vals = [v for v in vals if v == v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def write_rows_csv(path: str, rows: List[Dict], digits: int, fields: Optional[List[str]] = None):
    """Rows (dicts) as CSV at path, floats with `digits` decimals; fields: the columns (default:
    the first row's keys)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields or list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.{digits}f}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"CSV written to {path}")


class RowWriter:
    """CSV rows (dicts with `fields` keys, floats with 5 decimals) appended one at a time, flushed
    and fsynced after each; path '' writes nothing."""

    def __init__(self, path: str, fields: List[str]):
        self.file = open(path, "w", newline="") if path else None
        self.writer = csv.DictWriter(self.file, fieldnames=fields) if self.file else None
        if self.writer:
            self.writer.writeheader()
            self.file.flush()

    def write(self, row: Dict):
        """Appends one row and flushes it to disk."""
        if self.writer:
            self.writer.writerow({k: (f"{v:.5f}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()
            os.fsync(self.file.fileno())


def write_ratio_plot(
    path: str,
    labels: List[str],
    series: Dict[str, List[float]],
    title: str,
    ylabel: str = "time ratio (< 1: ours faster)",
):
    """Bar chart PNG at path: one bar group per label, one bar per series (name -> ratio per
    label), a line at 1.0; skipped with a message when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        print(f"(matplotlib not installed: plot {path} skipped)")
        return
    if not labels or not series:
        return
    xs = list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(labels)), 5))
    width = 0.8 / len(series) if len(series) > 1 else 0.6
    for k, (name, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in xs], values, width, label=name)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor() or the machine type."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa() -> Optional[str]:
    """The instruction set bnorm_ext's CPU kernels run with (build_info()['cpu_isa']), None if unknown."""
    with contextlib.suppress(Exception):
        import bnorm_ext

        return bnorm_ext.build_info().get("cpu_isa")
    return None


def cpu_description() -> str:
    """'<CPU model>, <n> CPUs[, ISA <isa>]' for benchmark headers."""
    isa = cpu_isa()
    return f"{cpu_model()}, {os.cpu_count() or 1} CPUs" + (f", ISA {isa}" if isa else "")


def machine_description(device: str) -> str:
    """The device for benchmark headers: the GPU's name on cuda, cpu_description() on cpu."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_description()


def progress(i: int, n: int, what: str):
    """Prints '[i/n] what' to stderr, flushed."""
    print(f"[{i}/{n}] {what}", file=sys.stderr, flush=True)
