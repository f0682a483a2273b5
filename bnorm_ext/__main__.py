"""`python -m bnorm_ext` prints how the extension was built."""

import torch

import bnorm_ext


def main() -> None:
    info = bnorm_ext.build_info()
    print(f"bnorm_ext {info['bnorm_ext']}")
    print(f"torch {info['torch']} (CUDA build: {info['torch_cuda'] or 'no'})")
    if info["cuda_compiled"]:
        print(f"CUDA kernels: compiled for TORCH_CUDA_ARCH_LIST={info['cuda_archs']}")
    else:
        print("CUDA kernels: not compiled (CPU kernels only)")
    print(f"debug build: {'yes' if info['debug'] else 'no'}")
    print(f"CPU kernels: {info['cpu_isa']} build (BNORM_EXT_CPU_ISA=default|avx2 caps it)")
    print(f"CUDA device available: {torch.cuda.is_available()}")
    ops = sorted({s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("bnorm_ext::")})
    print(f"ops: {', '.join(ops)}")


if __name__ == "__main__":
    main()
