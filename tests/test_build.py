"""Checks of the compiled CUDA code itself (no GPU needed): no register spills
or stack frames in any kernel, and 128-bit global loads and stores in every
vectorised kernel. Skipped when the CUDA kernels were not compiled or the
cuobjdump that Triton's package ships is not installed."""

import os
import re
import subprocess
from pathlib import Path

import pytest

import bnorm_ext


def _cuobjdump():
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


CUOBJDUMP = _cuobjdump()
pytestmark = pytest.mark.skipif(
    not bnorm_ext.build_info()["cuda_compiled"] or CUOBJDUMP is None,
    reason="needs the CUDA kernels compiled and Triton's cuobjdump",
)


def _library():
    return bnorm_ext._C.__file__


def _per_function(text, header):
    # Splits cuobjdump output into {function name: its text}, per arch section.
    functions = {}
    current = None
    for line in text.splitlines():
        m = re.match(header, line.strip())
        if m:
            current = m.group(1)
            functions.setdefault(current, [])
        elif current is not None:
            functions[current].append(line)
    return {name: "\n".join(lines) for name, lines in functions.items()}


def _vec_width(name):
    # Kernels are templated <Op/Reducer, int VEC, ...>; mangled as ...ELi<VEC>E...
    m = re.search(r"ELi(\d+)E", name)
    return int(m.group(1)) if m else None


def _index64(name):
    # The two-pass kernels end their template arguments with the index type: ...ElEEv (int64) / ...EiEEv (int32);
    # the single-read kernels always index in 32 bits.
    return re.search(r"ElEEv", name) is not None


def test_no_spills_or_stack():
    out = subprocess.run(
        [CUOBJDUMP, "--dump-resource-usage", _library()], capture_output=True, text=True, check=True
    ).stdout
    usage = _per_function(out, r"Function (\S+):")
    kernels = {name: text for name, text in usage.items() if "bnorm_ext" in name}
    assert len(kernels) > 20, f"expected the bnorm_ext kernels in the library, found {len(kernels)}"
    spills = {name: text.strip() for name, text in kernels.items() if "LOCAL:0" not in text}
    assert not spills, f"kernels with local memory (spills): {spills}"
    # NB: a 64-bit-index kernel (only tensors of 2^31 elements and more) may keep
    # a few bytes of call-saved registers on the stack around the IEEE division's
    # slow path, stored once before its loop and loaded once after; the 32-bit
    # kernels, which every smaller tensor runs, must have no stack frame at all.
    stack32 = {name: text.strip() for name, text in kernels.items()
               if "STACK:0" not in text and not _index64(name)}
    assert not stack32, f"32-bit-index kernels with a stack frame: {stack32}"
    assert any(_index64(name) for name in kernels), "expected 64-bit-index kernels"
    assert any("single_read_channel_kernel" in name for name in kernels), "expected the single-read kernels"


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_vectorised_kernels_use_128_bit_accesses(arch):
    if arch.replace("sm_", "").replace("0", ".0", 1) not in bnorm_ext.build_info()["cuda_archs"].split(";"):
        pytest.skip(f"{arch} not compiled")
    out = subprocess.run(
        [CUOBJDUMP, "-sass", "-arch", arch, _library()], capture_output=True, text=True, check=True
    ).stdout
    sass = _per_function(out, r"Function : (\S+)")
    vectorised = {
        name: text
        for name, text in sass.items()
        if "channel_elementwise_kernel" in name or "channel_reduce" in name or "single_read" in name
        if (_vec_width(name) or 1) > 1
    }
    assert vectorised, "no vectorised kernels found"
    no_ld128 = [name for name, text in vectorised.items() if "LDG.E.128" not in text]
    assert not no_ld128, f"vectorised kernels without 128-bit loads: {no_ld128}"
    elementwise = {name: text for name, text in vectorised.items()
                   if "channel_elementwise_kernel" in name or "single_read" in name}
    no_st128 = [name for name, text in elementwise.items() if "STG.E.128" not in text]
    assert not no_st128, f"vectorised elementwise kernels without 128-bit stores: {no_st128}"


def test_build_info_matches_environment():
    info = bnorm_ext.build_info()
    assert info["cuda_archs"], "CUDA build must record its architectures"
    assert os.path.exists(_library())
