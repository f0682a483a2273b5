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


def _resource_usage():
    # {(arch, function): {"REG": n, "STACK": n, "LOCAL": n, ...}} from cuobjdump --dump-resource-usage,
    # one entry per architecture the library carries.
    out = subprocess.run(
        [CUOBJDUMP, "--dump-resource-usage", _library()], capture_output=True, text=True, check=True
    ).stdout
    usage, arch, function = {}, None, None
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"Function (\S+):", line)
        if m:
            function = m.group(1)
            continue
        if function is not None and line.startswith("REG:"):
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            function = None
    return usage


def test_no_spills_or_stack():
    usage = {key: u for key, u in _resource_usage().items() if "bnorm_ext" in key[1]}
    archs = {arch for arch, _ in usage}
    assert archs, "no bnorm_ext kernels found in the library"
    for arch in archs:
        n = sum(1 for a, _ in usage if a == arch)
        assert n > 20, f"expected the bnorm_ext kernels for {arch}, found {n}"
        assert any("single_read_channel_kernel" in f for a, f in usage if a == arch), (
            f"no single-read kernels for {arch}"
        )
    # NB: ptxas spills go to the stack frame (LOCAL stays 0), so STACK is the spill signal.
    bad = {f"{arch} {name}": u for (arch, name), u in usage.items() if u.get("STACK", 0) or u.get("LOCAL", 0)}
    assert not bad, f"kernels with a stack frame or local memory (spills): {bad}"


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
    # every vectorised kernel that writes a tensor (elementwise, single-read, eval-backward reduction)
    elementwise = {
        name: text
        for name, text in vectorised.items()
        if "channel_elementwise_kernel" in name or "single_read" in name or "EvalGradInputVisit" in name
    }
    assert any("EvalGradInputVisit" in name for name in elementwise), "no vectorised eval-backward reduction found"
    no_st128 = [name for name, text in elementwise.items() if "STG.E.128" not in text]
    assert not no_st128, f"vectorised kernels that write without 128-bit stores: {no_st128}"


def test_build_info_matches_environment():
    info = bnorm_ext.build_info()
    assert info["cuda_archs"], "CUDA build must record its architectures"
    assert os.path.exists(_library())
