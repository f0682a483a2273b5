"""The GPU check's tooling, without a GPU: benchmarks/gpu_check.sh refuses a prebuilt library
that does not fit (and never builds), its source fingerprint does not depend on the locale,
and benchmarks/pytest_live_report.py reports failures as they happen and stops at its limit."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
pytestmark = pytest.mark.skipif(
    not os.path.exists(GPU_CHECK) or not os.path.exists(os.path.join(ROOT, ".ci", "setup_env.sh")),
    reason="needs the source tree's benchmarks/ and .ci/ (the tests run outside it)",
)


def _fingerprint(**env):
    return subprocess.run(
        ["bash", GPU_CHECK, "--fingerprint"], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout.strip()


def test_fingerprint_covers_every_source_in_byte_order_in_any_locale():
    # the same hash computed here: sha256sum lines of every file under csrc/ and setup.py, paths
    # in byte order, hashed again
    import hashlib

    paths = ["setup.py"] + [
        os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "csrc")) for f in files
    ]
    assert any(p.endswith(".inc") for p in paths) and any(p.endswith(".cu") for p in paths)
    listing = "".join(
        f"{hashlib.sha256(open(os.path.join(ROOT, p), 'rb').read()).hexdigest()}  {p}\n"
        for p in sorted(paths, key=lambda p: p.encode())
    )
    expected = hashlib.sha256(listing.encode()).hexdigest()[:16]
    assert _fingerprint() == expected
    for locale in ("C", "C.UTF-8", "en_US.UTF-8"):
        assert _fingerprint(LC_ALL=locale, LANG=locale) == expected, locale


def _write_build_txt(folder, **fields):
    import sysconfig

    import torch

    values = {
        "torch": torch.__version__,
        "python": f"cpython-{sys.version_info[0]}{sys.version_info[1]}",
        "archs": "9.0",
        "sources": _fingerprint(),
        "commit": "test",
        "built": "test",
    }
    values.update(fields)
    (folder / "build.txt").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return sysconfig.get_config_var("EXT_SUFFIX")


@pytest.mark.parametrize(
    "field,value,reason",
    [
        ("torch", "2.11.0+cu130", "built for torch 2.11.0+cu130"),
        ("sources", "0123456789abcdef", "built from other sources"),
        (None, None, "no "),  # everything fits, but no library file
    ],
)
def test_gpu_check_refuses_a_prebuilt_library_that_does_not_fit(tmp_path, field, value, reason):
    _write_build_txt(tmp_path, **({field: value} if field else {}))
    out = tmp_path / "results"
    proc = subprocess.run(
        ["bash", GPU_CHECK, "1", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "BNORM_PREBUILT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"prebuilt library not usable: {reason}" in proc.stdout
    summary = (out / "summary.txt").read_text()
    assert "refused" in summary and reason in summary
    # it stopped there: no step ran, nothing was built
    assert sorted(p.name for p in out.iterdir()) == ["setup.log", "summary.txt"]
    assert not (tmp_path / "build").exists()


def test_live_report_prints_failures_as_they_happen_and_stops_at_its_limit(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent("""
        import time
        import pytest

        @pytest.mark.parametrize("i", range(8))
        def test_slow(i):
            time.sleep(0.4)
            assert i != 1, "one is wrong"

        @pytest.fixture
        def broken():
            raise RuntimeError("setup broke")

        def test_error(broken):
            pass
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "benchmarks")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "pytest_live_report",
            "--stop-after",
            "1.5",
            "--progress-every",
            "2",
            "-o",
            "addopts=",
            "test_sample.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("!! FAILED ")]
    assert failed == ["!! FAILED test_sample.py::test_slow[1] [call] AssertionError: one is wrong"], proc.stdout
    # printed before the later tests' progress, not only in the final summary
    assert lines.index(failed[0]) < next(i for i, line in enumerate(lines) if line.startswith("-- progress: 4/9"))
    final = [line for line in lines if line.startswith("-- final: ")]
    assert len(final) == 1 and "collected tests did not run (time limit)" in final[0], proc.stdout
    assert "test_error" not in proc.stdout  # never started
    assert proc.returncode == 2  # interrupted
