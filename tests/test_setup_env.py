"""The set-up script's rebuild check: the fingerprint it compares covers every
file the build compiles (the .inc kernel bodies included), not only some suffixes."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SETUP_ENV = REPO / ".ci" / "setup_env.sh"
pytestmark = pytest.mark.skipif(
    not SETUP_ENV.exists() or shutil.which("bash") is None or shutil.which("sha256sum") is None,
    reason="needs the source tree's .ci/setup_env.sh, bash and sha256sum",
)


def _fingerprint(root, **env):
    # `setup_env.sh --fingerprint` run in a copy of the tree, with only the given build knobs set.
    out = subprocess.run(
        ["bash", str(root / ".ci" / "setup_env.sh"), "--fingerprint"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )
    return out.stdout.strip()


@pytest.fixture
def tree(tmp_path):
    for name in ("csrc", ".ci"):
        shutil.copytree(REPO / name, tmp_path / name)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def test_fingerprint_changes_with_every_compiled_source_kind(tree):
    base = _fingerprint(tree)
    assert len(base) == 16
    sources = sorted(p for p in (tree / "csrc").rglob("*") if p.suffix in {".inc", ".cpp", ".h", ".cu", ".cuh"})
    assert {p.suffix for p in sources} >= {".inc", ".cpp", ".h", ".cu", ".cuh"}
    for suffix in (".inc", ".cpp", ".h", ".cu", ".cuh"):
        path = next(p for p in sources if p.suffix == suffix)
        original = path.read_bytes()
        path.write_bytes(original + b"\n// edited\n")
        assert _fingerprint(tree) != base, f"editing {path.relative_to(tree)} must trigger a rebuild"
        path.write_bytes(original)
        assert _fingerprint(tree) == base


def test_fingerprint_follows_build_knobs(tree):
    base = _fingerprint(tree)
    assert _fingerprint(tree, BNORM_EXT_CUDA="1") != base
    assert _fingerprint(tree, TORCH_CUDA_ARCH_LIST="9.0") != base
    assert _fingerprint(tree, BNORM_EXT_DEBUG="1") != base
    assert _fingerprint(tree) == base
