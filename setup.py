"""Builds bnorm_ext._C: CPU kernels always, CUDA kernels when a toolkit is there.

Needs torch >= 2.11 (MIN_TORCH; also in pyproject.toml and bnorm_ext/__init__.py).

Environment switches:
  BNORM_EXT_CUDA=1|0      force / disable the CUDA build. Default: build the CUDA
                          kernels when torch is a CUDA build, CUDA_HOME has nvcc
                          and a GPU is visible (for the GPUs present, as torch's
                          own extensions do); a CPU-only build otherwise
  TORCH_CUDA_ARCH_LIST    architectures to compile for; default: the visible
                          GPUs', or "8.0;9.0" (sm_80, sm_90) when
                          BNORM_EXT_CUDA=1 and no GPU is visible
  MAX_JOBS                parallel compile jobs (ninja)
  BNORM_EXT_DEBUG=1       debug build (-O0 -g, device -O0 -G -g)
"""

import glob
import os
import re

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"
MIN_TORCH = (2, 11)


def _check_torch_version():
    """Raises for a torch older than MIN_TORCH, before anything compiles."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    release = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if release < MIN_TORCH:
        raise RuntimeError(
            f"bnorm_ext needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]} to build; found torch {torch.__version__} "
            f"in {os.path.dirname(torch.__file__)}. Install a newer torch (pip install 'torch>=2.11') "
            "and build with --no-build-isolation."
        )


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {os.environ[name]!r}")


def _cuda_archs():
    """Sets TORCH_CUDA_ARCH_LIST when unset and no GPU is visible; returns it."""
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _extension():
    import torch

    debug = _flag("BNORM_EXT_DEBUG") is True
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # C++ files of the CUDA backend (host-only code), compiled only in the CUDA build.
    cuda_host_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    want_cuda = _flag("BNORM_EXT_CUDA")
    can_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(cuda_sources)
    if want_cuda and not can_cuda:
        raise RuntimeError(
            "BNORM_EXT_CUDA=1 but the CUDA build is not possible: needs a CUDA build of torch "
            f"(torch.version.cuda={torch.version.cuda}), CUDA_HOME with nvcc "
            f"(found {cpp_extension.CUDA_HOME}) and csrc/cuda/*.cu sources"
        )
    if want_cuda is None:
        use_cuda = can_cuda and torch.cuda.is_available()
        if can_cuda and not use_cuda:
            print(
                "bnorm_ext: no GPU visible, building the CPU kernels only (BNORM_EXT_CUDA=1 builds the CUDA kernels too)"
            )
    else:
        use_cuda = want_cuda

    sources = sorted(
        glob.glob(os.path.join("csrc", "*.cpp"))
        + glob.glob(os.path.join("csrc", "autograd", "*.cpp"))
        + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    # NB: -g0 drops the -g that Python's own CFLAGS add: without it the host debug info is about
    # two thirds of the library (~65 MB) and a good part of the compile time.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # NB: -fno-trapping-math lets GCC if-convert (so vectorize) loops with a
    # float compare-and-select (the activations' derivatives); it changes no
    # value, and the kernels never rely on floating-point exceptions.
    cxx = opt + ["-fopenmp", "-fno-trapping-math"]
    define_macros = [("BNORM_EXT_DEBUG", None)] if debug else []
    extra_link_args = ["-fopenmp"]
    if not use_cuda:
        return cpp_extension.CppExtension(
            "bnorm_ext._C",
            sources,
            extra_compile_args={"cxx": cxx},
            define_macros=define_macros,
            extra_link_args=extra_link_args,
        )
    archs = _cuda_archs()
    nvcc = (["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"]) + ["--expt-relaxed-constexpr"]
    define_macros += [("BNORM_EXT_WITH_CUDA", None), ("BNORM_EXT_CUDA_ARCHS", f'"{archs}"')]
    return cpp_extension.CUDAExtension(
        "bnorm_ext._C",
        sources + cuda_sources + cuda_host_sources,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        define_macros=define_macros,
        extra_link_args=extra_link_args,
    )


# Project metadata and the package list live in pyproject.toml; this file builds the extension.
_check_torch_version()
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
