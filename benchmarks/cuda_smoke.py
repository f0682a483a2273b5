"""Drives every CUDA op once per dtype x memory format x size, for
compute-sanitizer (memcheck, racecheck, synccheck, initcheck) and as a quick
correctness check against the CPU reference kernels, and the fused BatchNorm +
activation ops (every activation, with and without a residual; training
forward and backward, eval forward and backward) against torch's composed
F.batch_norm -> add -> activation on the same device in float64. Exits
non-zero on any mismatch.

    python benchmarks/cuda_smoke.py               # small sizes
    python benchmarks/cuda_smoke.py --large       # adds sizes that fill the GPU
    python benchmarks/cuda_smoke.py --sanitizer   # the reduced set the sanitizers run
    python benchmarks/cuda_smoke.py --device cpu  # dry run of the script itself (CPU vs CPU)
    python benchmarks/cuda_smoke.py --time-budget 60   # start no case after 60 s (exit 4 if cut short;
                                                       # --stop-at T: once time.time() > T)

Each failure is printed (flushed) as it happens, "FAIL <case> <what>: <why>", with a
progress line every --progress-every runs, so a run that is killed still shows what failed.
A case that raises counts as a failure and the others still run, unless the error left the
CUDA context unusable. Exit status: 0 all passed, 1 failures, 2 no CUDA device, 4 no failures
but the time budget left cases undone.

Every case runs on both training paths, one after the other: the single-read
kernel (where the input fits on chip) and the two-pass kernels
(BNORM_EXT_CUDA_SINGLE_READ=0); the plain and the fused ops' cases alternate.
On CUDA it first checks that the single-read kernels really launch for a small
input (an instrumented run could lower occupancy and silently move everything
to the two-pass kernels). --sanitizer still reaches every kernel family with
32-bit indices once per path: each dtype in both layouts with 16-byte vectors
and with scalars, half inputs with half and with float32 parameters,
misaligned dense inputs, and more channels than resident blocks; the fused
ops each activation (silu also without a residual) for float32 and float16
in both layouts with vectors and with scalars, an empty batch and misaligned
tensors.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import bnorm_ext  # noqa: F401  (registers torch.ops.bnorm_ext)

ops = torch.ops.bnorm_ext
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(name, got, want, dtype, failures):
    got = got.detach().cpu().double()
    want = want.detach().cpu().double()
    if got.shape != want.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        return
    if got.numel() == 0:
        return
    if torch.isnan(got).any() or torch.isnan(want).any():
        failures.append(f"{name}: NaN")
        return
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if err > TOL[dtype]:
        failures.append(f"{name}: relative error {err:.3e} > {TOL[dtype]:.0e}")


def misaligned_copy(t):
    """A dense copy of t (same memory format) starting one element past a 16-byte boundary."""
    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    if channels_last:
        N, C, H, W = t.shape
        view = buf[1:].view(N, H, W, C).permute(0, 3, 1, 2)
    else:
        view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def run_case(shape, dtype, memory_format, path, failures, device="cuda", misaligned=False, half_params=False):
    tag = (
        f"{'x'.join(map(str, shape))}-{str(dtype).split('.')[-1]}-"
        f"{'cl' if memory_format == torch.channels_last else 'nchw'}-{path}"
        f"{'-misaligned' if misaligned else ''}{'-half_params' if half_params else ''}"
    )
    C = shape[1]
    x_cpu = (torch.randn(shape, dtype=torch.float64) * 3 + 5).to(dtype)
    if len(shape) == 4:
        x_cpu = x_cpu.contiguous(memory_format=memory_format)
    dy_cpu = (
        torch.randn(shape, dtype=torch.float64)
        .to(dtype)
        .contiguous(memory_format=(memory_format if len(shape) == 4 else torch.contiguous_format))
    )
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) and not half_params else dtype
    w_cpu = (torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype)
    b_cpu = torch.randn(C, dtype=torch.float64).to(param_dtype)
    rm_cpu = torch.randn(C, dtype=torch.float64).to(param_dtype)
    rv_cpu = (torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype)
    nbt_cpu = torch.tensor(3, dtype=torch.long)

    def dev(t):
        return t.to(device, copy=True) if t is not None else None

    x, dy, w, b = dev(x_cpu), dev(dy_cpu), dev(w_cpu), dev(b_cpu)
    if misaligned:
        x, dy = misaligned_copy(x), misaligned_copy(dy)
    rm, rv, nbt = dev(rm_cpu.clone()), dev(rv_cpu.clone()), dev(nbt_cpu.clone())
    rm_c, rv_c, nbt_c = rm_cpu.clone(), rv_cpu.clone(), nbt_cpu.clone()
    empty = x.numel() == 0

    got = ops.batch_norm_stats(x)
    want = ops.batch_norm_stats(x_cpu)
    for i, name in enumerate(["mean", "var"]):
        _close(f"{tag} stats.{name}", got[i], want[i], dtype, failures)

    if not empty:
        got = ops.batch_norm_forward_train(x, w, b, rm, rv, nbt, None, 1e-5)
        want = ops.batch_norm_forward_train(x_cpu, w_cpu, b_cpu, rm_c, rv_c, nbt_c, None, 1e-5)
        for i, name in enumerate(["out", "save_mean", "save_invstd"]):
            _close(f"{tag} forward_train.{name}", got[i], want[i], dtype, failures)
        if got[0].stride() != want[0].stride():
            failures.append(f"{tag} forward_train: strides {got[0].stride()} != {want[0].stride()}")
        _close(f"{tag} running_mean", rm, rm_c, dtype, failures)
        _close(f"{tag} running_var", rv, rv_c, dtype, failures)
        if nbt.item() != nbt_c.item():
            failures.append(f"{tag} num_batches_tracked {nbt.item()} != {nbt_c.item()}")
        save_mean, save_invstd = want[1], want[2]

        got = ops.batch_norm_backward(dy, x, w, None, None, dev(save_mean), dev(save_invstd), True, 1e-5)
        want = ops.batch_norm_backward(dy_cpu, x_cpu, w_cpu, None, None, save_mean, save_invstd, True, 1e-5)
        for i, name in enumerate(["grad_input", "grad_weight", "grad_bias"]):
            _close(f"{tag} backward_train.{name}", got[i], want[i], dtype, failures)

        sums = ops.batch_norm_backward_reduce(dy, x, dev(save_mean))
        sums_c = ops.batch_norm_backward_reduce(dy_cpu, x_cpu, save_mean)
        for i, name in enumerate(["sum_dy", "sum_dy_xmu"]):
            _close(f"{tag} backward_reduce.{name}", sums[i], sums_c[i], dtype, failures)
        counts = torch.tensor([x.numel() // C], dtype=torch.float32)
        got = ops.batch_norm_backward_elemt(dy, x, dev(save_mean), dev(save_invstd), w, sums[0], sums[1], dev(counts))
        want = ops.batch_norm_backward_elemt(dy_cpu, x_cpu, save_mean, save_invstd, w_cpu, sums_c[0], sums_c[1], counts)
        _close(f"{tag} backward_elemt", got, want, dtype, failures)

        got = ops.batch_norm_elemt(x, w, b, dev(save_mean), dev(save_invstd))
        want = ops.batch_norm_elemt(x_cpu, w_cpu, b_cpu, save_mean, save_invstd)
        _close(f"{tag} elemt", got, want, dtype, failures)

    got = ops.batch_norm_forward_eval(x, w, b, dev(rm_cpu), dev(rv_cpu), 1e-5)
    want = ops.batch_norm_forward_eval(x_cpu, w_cpu, b_cpu, rm_cpu, rv_cpu, 1e-5)
    _close(f"{tag} forward_eval", got, want, dtype, failures)
    got = ops.batch_norm_backward(dy, x, w, dev(rm_cpu), dev(rv_cpu), None, None, False, 1e-5)
    want = ops.batch_norm_backward(dy_cpu, x_cpu, w_cpu, rm_cpu, rv_cpu, None, None, False, 1e-5)
    for i, name in enumerate(["grad_input", "grad_weight", "grad_bias"]):
        _close(f"{tag} backward_eval.{name}", got[i], want[i], dtype, failures)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    means = torch.randn(3, C, dtype=acc) + 5
    var = torch.rand(3, C, dtype=acc) + 0.5
    counts = torch.tensor([4.0, 0.0, 7.0], dtype=acc)
    rm2, rv2 = dev(rm_cpu.to(acc).clone()), dev(rv_cpu.to(acc).clone())
    rm2_c, rv2_c = rm_cpu.to(acc).clone(), rv_cpu.to(acc).clone()
    got = ops.batch_norm_gather_stats(dev(means), dev(var), dev(counts), rm2, rv2, None, 0.1, 1e-5)
    want = ops.batch_norm_gather_stats(means, var, counts, rm2_c, rv2_c, None, 0.1, 1e-5)
    for i, name in enumerate(["mean", "invstd"]):
        _close(f"{tag} gather_stats.{name}", got[i], want[i], dtype, failures)
    _close(f"{tag} gather_stats.running_var", rv2, rv2_c, dtype, failures)


ACTIVATIONS = ["identity", "relu", "leaky_relu", "silu"]
SLOPE = 0.2


def _act(t, activation):
    if activation == "relu":
        return F.relu(t)
    if activation == "leaky_relu":
        return F.leaky_relu(t, SLOPE)
    if activation == "silu":
        return F.silu(t)
    return t


def run_act_case(
    shape, dtype, memory_format, path, failures, device="cuda", activation="relu", residual=True, misaligned=False
):
    """The fused ops act(BN(x) + residual) against torch's composed ops in float64 on the same device:
    training forward (output, statistics, running statistics) and backward as the autograd kernel calls
    them, then eval forward and backward."""
    tag = (
        f"act-{activation}{'+residual' if residual else ''}-{'x'.join(map(str, shape))}-"
        f"{str(dtype).split('.')[-1]}-{'cl' if memory_format == torch.channels_last else 'nchw'}-{path}"
        f"{'-misaligned' if misaligned else ''}"
    )
    C = shape[1]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def make(t, dt=dtype):
        t = t.to(device=device, dtype=dt)
        if t.dim() != len(shape):  # a per-channel tensor
            return t
        if len(shape) == 4:
            t = t.contiguous(memory_format=memory_format)
        return misaligned_copy(t) if misaligned else t

    x = make(torch.randn(shape, dtype=torch.float64) * 3 + 5)
    r = make(torch.randn(shape, dtype=torch.float64)) if residual else None
    dy = make(torch.randn(shape, dtype=torch.float64))
    w = make(torch.rand(C, dtype=torch.float64) + 0.5, param_dtype)
    b = make(torch.randn(C, dtype=torch.float64), param_dtype)
    rm0 = make(torch.randn(C, dtype=torch.float64), param_dtype)
    rv0 = make(torch.rand(C, dtype=torch.float64) + 0.5, param_dtype)
    for training in (True, False):
        mode = "train" if training else "eval"
        rm, rv = rm0.clone(), rv0.clone()
        # torch's composed ops in float64 on the same (rounded) data, with autograd
        leaves = [t.double().requires_grad_() for t in (x, w, b)] + ([r.double().requires_grad_()] if residual else [])
        rm_ref, rv_ref = rm0.double(), rv0.double()
        z = F.batch_norm(leaves[0], rm_ref, rv_ref, leaves[1], leaves[2], training, 0.1, 1e-5)
        y_ref = _act(z + leaves[3] if residual else z, activation)
        grads_ref = torch.autograd.grad(y_ref, leaves, dy.double())
        if training:
            y, mean, invstd = ops.batch_norm_act_forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, r, activation, SLOPE)
            stats = (None, None, mean, invstd)
            _close(f"{tag} {mode}.running_mean", rm, rm_ref, dtype, failures)
            _close(f"{tag} {mode}.running_var", rv, rv_ref, dtype, failures)
        else:
            y = ops.batch_norm_act_forward_eval(x, w, b, rm, rv, 1e-5, r, activation, SLOPE)
            stats = (rm, rv, None, None)
        _close(f"{tag} {mode}.output", y, y_ref, dtype, failures)
        if x.numel() and not y.is_contiguous(memory_format=memory_format):
            failures.append(f"{tag} {mode}.output: strides {y.stride()} not in the input's memory format")
        saved_y = y if activation in ("relu", "leaky_relu") else None
        saved_r = r if activation == "silu" else None
        grads = ops.batch_norm_act_backward(
            dy, saved_y, x, w, b, *stats, saved_r, training, 1e-5, residual, activation, SLOPE
        )
        for name, got, want in zip(["grad_input", "grad_weight", "grad_bias", "grad_residual"], grads, grads_ref):
            _close(f"{tag} {mode}.{name}", got, want, dtype, failures)
        if not residual and grads[3].shape != (0,):
            failures.append(f"{tag} {mode}.grad_residual: shape {tuple(grads[3].shape)}, expected (0,)")


def check_single_read_launches(failures):
    """The single-read kernels must launch for a small input (one forward, one backward)."""
    from bnorm_ext import _C

    os.environ["BNORM_EXT_CUDA_SINGLE_READ"] = "1"
    x = (torch.randn(4, 16, 8, 8, dtype=torch.float64) * 3 + 5).float().cuda()
    dy = torch.randn_like(x)
    launches = _C._single_read_launches()
    _, mean, invstd = ops.batch_norm_forward_train(x, None, None, None, None, None, 0.1, 1e-5)
    ops.batch_norm_backward(dy, x, None, None, None, mean, invstd, True, 1e-5)
    # the fused ops' kernels too (another register budget): silu with a residual
    _, mean, invstd = ops.batch_norm_act_forward_train(x, None, None, None, None, None, 0.1, 1e-5, dy, "silu", 0.0)
    ops.batch_norm_act_backward(dy, None, x, None, None, None, None, mean, invstd, dy, True, 1e-5, True, "silu", 0.0)
    torch.cuda.synchronize()
    launched = _C._single_read_launches() - launches
    print(f"single-read launches for a 4x16x8x8 float32 training step, plain and fused: {launched} (expected 4)")
    if launched != 4:
        failures.append(
            f"single-read kernels launched {launched} times for a small training step, expected 4 "
            f"(lower occupancy, e.g. under a sanitizer, or a refused cooperative launch: "
            f"{_C._cooperative_refusals()} refusals recorded)"
        )


SMALL_SHAPES = [
    (2, 3, 5, 7),
    (3, 5, 7, 9),
    (4, 64, 8, 8),
    (2, 1024, 2, 2),
    (2, 2048, 3, 3),
    (5, 7, 1, 1),
    (0, 3, 4, 4),
    (6, 13),
    (3, 4, 17),
]
LARGE_SHAPES = [(32, 64, 56, 56), (64, 256, 28, 28), (8, 3, 223, 221)]
# L = 16 and C = 16: 16-byte vectors for every dtype in both layouts; L = 9, C = 5: scalars
SANITIZER_SHAPES = [(2, 16, 4, 4), (3, 5, 3, 3), (0, 3, 4, 4)]


def act_cases(args):
    """(shape, dtype, memory_format, extras) of the fused ops' runs, for each path."""
    if args.sanitizer:
        shapes, dtypes = SANITIZER_SHAPES[:2], [torch.float32, torch.float16]
    else:
        shapes, dtypes = SMALL_SHAPES[:3] + [(6, 13), (3, 4, 17)], DTYPES
    variants = [{"activation": a} for a in ACTIVATIONS] + [{"activation": "silu", "residual": False}]
    if not args.sanitizer:
        variants += [{"activation": a, "residual": False} for a in ACTIVATIONS[:3]]
    formats_of = {4: [torch.contiguous_format, torch.channels_last]}
    for shape in shapes:
        for dtype in dtypes:
            for memory_format in formats_of.get(len(shape), [torch.contiguous_format]):
                for variant in variants:
                    yield shape, dtype, memory_format, variant
    for memory_format in formats_of[4]:
        yield (0, 3, 4, 4), torch.float32, memory_format, {"activation": "silu"}
        for activation in ("relu", "silu") if args.sanitizer else ACTIVATIONS:
            yield (2, 16, 4, 4), torch.float32, memory_format, {"activation": activation, "misaligned": True}
        if args.large:  # several blocks per channel
            for activation in ("relu", "silu"):
                yield LARGE_SHAPES[0], torch.float32, memory_format, {"activation": activation}


def cases(args):
    """(shape, dtype, memory_format, extras) of one run, for each path."""
    shapes = SANITIZER_SHAPES if args.sanitizer else SMALL_SHAPES + (LARGE_SHAPES if args.large else [])
    for shape in shapes:
        formats = [torch.contiguous_format, torch.channels_last] if len(shape) == 4 else [torch.contiguous_format]
        for dtype in DTYPES:
            for memory_format in formats:
                yield shape, dtype, memory_format, {}
    formats = [torch.contiguous_format, torch.channels_last]
    for memory_format in formats:
        yield (2, 16, 4, 4), torch.float32, memory_format, {"misaligned": True}
        yield (2, 16, 4, 4), torch.float16, memory_format, {"half_params": True}
        yield (2, 1024, 2, 2), torch.float32, memory_format, {}  # more channels than resident blocks
        if not args.sanitizer:
            yield (8, 64, 16, 16), torch.bfloat16, memory_format, {"misaligned": True}


class Failures(list):
    """The failures so far; each is printed (flushed) the moment it is recorded."""

    def append(self, message):
        super().append(message)
        print("FAIL", message, flush=True)


def interleave(*sequences):
    """Round robin over the sequences (a run cut short has covered a bit of each)."""
    iterators = [iter(s) for s in sequences]
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def is_fatal_cuda_error(exc):
    """A CUDA error that leaves the context unusable (every later call would fail the same way)."""
    text = f"{type(exc).__name__}: {exc}"
    return "AcceleratorError" in text or "CUDA error" in text or "illegal" in text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also sizes that fill the GPU")
    parser.add_argument("--sanitizer", action="store_true", help="the reduced set for compute-sanitizer")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: a dry run of the script (CPU kernels against themselves)",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="S",
        help="start no case after S seconds; exit 4 if cases were left (1 if anything failed)",
    )
    parser.add_argument(
        "--stop-at",
        type=float,
        default=None,
        metavar="T",
        help="start no case once time.time() has passed T (seconds since the epoch); as --time-budget",
    )
    parser.add_argument("--progress-every", type=int, default=25, metavar="N", help="a progress line every N runs")
    args = parser.parse_args()
    start = time.monotonic()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device", file=sys.stderr, flush=True)
        return 2
    torch.manual_seed(0)
    failures = Failures()
    if args.device == "cuda":
        try:
            check_single_read_launches(failures)
        except Exception as exc:
            failures.append(f"single-read launch check raised {type(exc).__name__}: {exc}")
            if is_fatal_cuda_error(exc):
                return 1
    # each case on both paths in turn, the plain and the fused ops' cases interleaved
    work = [(run_case, *c) for c in cases(args)], [(run_act_case, *c) for c in act_cases(args)]
    runs = [
        (fn, shape, dtype, memory_format, extras, path)
        for fn, shape, dtype, memory_format, extras in interleave(*work)
        for path in ("single_read", "two_pass")
    ]
    what = f"{args.device}{', sanitizer set' if args.sanitizer else ''}{', large' if args.large else ''}"
    print(
        f"cuda_smoke ({what}): {len(runs)} runs ({len(work[0])} plain-op and {len(work[1])} fused-op cases, "
        f"each on both paths)",
        flush=True,
    )
    progress = {"done": 0}
    try:
        stopped = run_all(runs, args, failures, start, progress)
    except KeyboardInterrupt:  # e.g. SIGINT from `timeout -s INT`: still say how far it got
        stopped = "interrupted"
    if args.device == "cuda" and stopped not in (FATAL, "interrupted"):
        torch.cuda.synchronize()
    done = progress["done"]
    left = len(runs) - done
    print(
        f"cuda_smoke ({what}): {done}/{len(runs)} runs, {len(failures)} failures, "
        f"{time.monotonic() - start:.0f} s" + (f"; stopped: {stopped}, {left} runs not done" if stopped else ""),
        flush=True,
    )
    return 1 if failures else 4 if left else 0


FATAL = "a CUDA error left the context unusable"


def run_all(runs, args, failures, start, progress):
    """Runs each (fn, shape, dtype, memory_format, extras, path), counting them in progress["done"];
    returns why it stopped early, or None."""
    for fn, shape, dtype, memory_format, extras, path in runs:
        if (args.time_budget is not None and time.monotonic() - start > args.time_budget) or (
            args.stop_at is not None and time.time() > args.stop_at
        ):
            return f"time limit, after {time.monotonic() - start:.0f} s"
        os.environ["BNORM_EXT_CUDA_SINGLE_READ"] = "1" if path == "single_read" else "0"
        try:
            fn(shape, dtype, memory_format, path, failures, device=args.device, **extras)
        except Exception as exc:  # a raising case is a failure; the others still run
            tag = f"{fn.__name__} {'x'.join(map(str, shape))} {str(dtype).split('.')[-1]} {path} {extras}"
            failures.append(
                f"{tag}: raised {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            if args.device == "cuda" and is_fatal_cuda_error(exc):
                progress["done"] += 1
                return FATAL
        progress["done"] += 1
        if progress["done"] % args.progress_every == 0:
            print(
                f"cuda_smoke: {progress['done']}/{len(runs)} runs, {len(failures)} failures, "
                f"{time.monotonic() - start:.0f} s",
                flush=True,
            )
    return None


if __name__ == "__main__":
    sys.exit(main())
