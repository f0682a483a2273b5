#!/usr/bin/env python3
"""Layout copies around bnorm_ext's ops in the code torch.compile (Inductor) generates for one
training step of a torchvision model converted to bnorm_ext.

Usage (from the repository root):

    python benchmarks/compiled_copies.py [--model resnet18] [--batch 4] [--size 64] [--layout cl|nchw]

For every call of a bnorm_ext op in the generated code it prints whether an input-shaped tensor
argument (grad_out, output, residual) has other strides than `input`: the kernels then copy it into
input's layout before reading it (one extra pass over that tensor per call). It also counts the
Inductor kernels named after our ops that write one of their arguments (a copy Inductor adds).
"""

import argparse
import ast
import re
import sys


def _norm(text):
    return ", ".join(t.strip() for t in text.split(",") if t.strip())


def _layout(sizes, strides):
    # The strides of the dims of size > 1 (those of size-1 dims do not matter).
    return [st for sz, st in zip(sizes.split(", "), strides.split(", ")) if sz != "1"]


def buffer_strides(code):
    # {name: (sizes, strides)} of the buffers and graph inputs the code declares.
    found = {}
    for name, sizes, strides in re.findall(r"(\w+) = empty_strided_cpu\(\(([^)]*)\), \(([^)]*)\)", code):
        found[name] = (_norm(sizes), _norm(strides))
    for name, sizes, strides in re.findall(r"assert_size_stride\((\w+), \(([^)]*)\), \(([^)]*)\)", code):
        found[name] = (_norm(sizes), _norm(strides))
    for line in re.findall(r"^\s*(assert_size_stride_grouped\(.*\))\s*$", code, re.MULTILINE):
        call = ast.parse(line).body[0].value
        names = [n.id for n in call.args[0].elts]
        sizes, strides = ast.literal_eval(call.args[1]), ast.literal_eval(call.args[2])
        for name, size, stride in zip(names, sizes, strides):
            found[name] = (", ".join(map(str, size)), ", ".join(map(str, stride)))
    return found


def op_calls(code):
    # [(op, overload, [argument texts])] of the bnorm_ext calls in the code.
    calls = []
    for op, overload, args in re.findall(r"torch\.ops\.bnorm_ext\.(\w+)\.(default|out)\(([^)]*)\)", code):
        calls.append((op, overload, [a.strip() for a in args.split(",")]))
    return calls


def mismatched_args(code):
    # [(op, argument, its strides, input's strides)] for input-shaped arguments in another layout.
    strides = buffer_strides(code)
    found = []
    for op, _, args in op_calls(code):
        positional = [a for a in args if "=" not in a]
        if op in ("batch_norm_backward", "batch_norm_backward_reduce", "batch_norm_backward_elemt"):
            named = {"grad_out": positional[0], "input": positional[1]}
        elif op == "batch_norm_act_backward":
            named = {
                "grad_out": positional[0],
                "output": positional[1],
                "input": positional[2],
                "residual": positional[9] if len(positional) > 9 else "None",
            }
        else:
            continue
        inp = strides.get(named["input"])
        for arg_name, buf in named.items():
            if arg_name == "input" or buf not in strides or inp is None:
                continue
            if strides[buf][0] == inp[0] and _layout(*strides[buf]) != _layout(*inp):
                found.append((op, arg_name, strides[buf][1], inp[1]))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--layout", choices=["cl", "nchw"], default="cl")
    args = p.parse_args(argv)
    import torch
    import torchvision
    from torch._inductor.utils import run_and_get_code

    import bnorm_ext

    fmt = torch.channels_last if args.layout == "cl" else torch.contiguous_format
    model = bnorm_ext.convert_batchnorm(getattr(torchvision.models, args.model)(num_classes=10)).to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=fmt)
    compiled = torch.compile(model)

    def step():
        compiled(x).sum().backward()

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    calls = op_calls(code)
    print(
        f"{args.model} {args.layout} batch {args.batch} size {args.size}: {len(calls)} bnorm_ext calls "
        f"({sum(1 for c in calls if c[1] == 'out')} through .out)"
    )
    mismatches = mismatched_args(code)
    for op, arg_name, got, want in mismatches:
        print(f"  {op}: {arg_name} strides ({got}) vs input ({want})")
    print(f"input-shaped arguments in another layout than input: {len(mismatches)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
