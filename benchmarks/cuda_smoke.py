"""Drives every CUDA op once per dtype x memory format x size, for
compute-sanitizer (memcheck, racecheck, synccheck, initcheck) and as a quick
correctness check against the CPU reference kernels. Exits non-zero on any
mismatch.

    python benchmarks/cuda_smoke.py            # small sizes (under a sanitizer)
    python benchmarks/cuda_smoke.py --large    # adds sizes that fill the GPU

Every case runs on both training paths: the single-read kernel (where the
input fits on chip) and the two-pass kernels (BNORM_EXT_CUDA_SINGLE_READ=0).
"""

import argparse
import os
import sys

import torch

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


def run_case(shape, dtype, memory_format, path, failures):
    tag = (f"{'x'.join(map(str, shape))}-{str(dtype).split('.')[-1]}-"
           f"{'cl' if memory_format == torch.channels_last else 'nchw'}-{path}")
    C = shape[1]
    x_cpu = (torch.randn(shape, dtype=torch.float64) * 3 + 5).to(dtype)
    if len(shape) == 4:
        x_cpu = x_cpu.contiguous(memory_format=memory_format)
    dy_cpu = torch.randn(shape, dtype=torch.float64).to(dtype)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w_cpu = (torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype)
    b_cpu = torch.randn(C, dtype=torch.float64).to(param_dtype)
    rm_cpu = torch.randn(C, dtype=torch.float64).to(param_dtype)
    rv_cpu = (torch.rand(C, dtype=torch.float64) + 0.5).to(param_dtype)
    nbt_cpu = torch.tensor(3, dtype=torch.long)

    def dev(t):
        return t.cuda() if t is not None else None

    x, dy, w, b = dev(x_cpu), dev(dy_cpu), dev(w_cpu), dev(b_cpu)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also sizes that fill the GPU")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    shapes = [(2, 3, 5, 7), (3, 5, 7, 9), (4, 64, 8, 8), (2, 1024, 2, 2), (2, 2048, 3, 3), (5, 7, 1, 1), (0, 3, 4, 4),
              (6, 13), (3, 4, 17)]
    if args.large:
        shapes += [(32, 64, 56, 56), (64, 256, 28, 28), (8, 3, 223, 221)]
    failures = []
    cases = 0
    for path in ("single_read", "two_pass"):
        os.environ["BNORM_EXT_CUDA_SINGLE_READ"] = "1" if path == "single_read" else "0"
        for shape in shapes:
            formats = [torch.contiguous_format, torch.channels_last] if len(shape) == 4 else [torch.contiguous_format]
            for dtype in DTYPES:
                for memory_format in formats:
                    run_case(shape, dtype, memory_format, path, failures)
                    cases += 1
    torch.cuda.synchronize()
    for f in failures:
        print("FAIL", f)
    print(f"cuda_smoke: {cases} cases, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
