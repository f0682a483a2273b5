"""Per-call overhead of the modules on a tiny input: bnorm_ext vs torch.nn.BatchNorm2d.

    python benchmarks/overhead.py [--threads 1] [--rounds 15] [--calls 2000]

A 2x4x2x2 float32 input makes the kernels' own work negligible, so the time per call is
what the Python module, the dispatcher and autograd cost. Ours and torch's alternate in
every round; the figure is the median over rounds of the mean time per call, in us.
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import cpu_once  # noqa: E402

import bnorm_ext  # noqa: E402


def _cases(module, x, grad_out):
    def train_forward():
        module.train()
        module(x)

    def train_forward_backward():
        module.train()
        module(x).backward(grad_out)

    def eval_forward_no_grad():
        module.eval()
        with torch.no_grad():
            module(x)

    def eval_forward_backward():
        module.eval()
        module(x).backward(grad_out)

    return {
        "train fwd": train_forward,
        "train fwd+bwd": train_forward_backward,
        "eval fwd (no_grad)": eval_forward_no_grad,
        "eval fwd+bwd": eval_forward_backward,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = (torch.randn(2, 4, 2, 2) * 3 + 5).requires_grad_()
    grad_out = torch.randn(2, 4, 2, 2)
    theirs = torch.nn.BatchNorm2d(4)
    ours = bnorm_ext.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())
    cases = {"torch": _cases(theirs, x, grad_out), "bnorm_ext": _cases(ours, x, grad_out)}
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), input 2x4x2x2 float32, "
        f"median of {args.rounds} rounds x {args.calls} calls"
    )
    print(f"{'case':<20} {'torch us':>9} {'ours us':>9} {'ratio':>6}")
    for name in cases["torch"]:
        samples = {"torch": [], "bnorm_ext": []}
        for side in samples:  # warm-up
            for _ in range(args.calls // 10):
                cases[side][name]()
        for _ in range(args.rounds):
            for side in samples:
                samples[side].append(cpu_once(cases[side][name], args.calls) * 1e3)
        t, o = statistics.median(samples["torch"]), statistics.median(samples["bnorm_ext"])
        print(f"{name:<20} {t:9.2f} {o:9.2f} {o / t:6.2f}")


if __name__ == "__main__":
    main()
