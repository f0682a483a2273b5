#!/usr/bin/env bash
# Builds bnorm_ext._C on this machine (no GPU needed) for a machine with a GPU (sm_90, Python
# 3.12, torch 2.11.0+cu130) into device_build/ (git-ignored). Copy that folder along with the
# checkout to the GPU machine: benchmarks/gpu_check.sh uses the library there, and refuses to
# run (it never builds) unless the machine's torch version, its Python tag and the sources'
# fingerprint (gpu_check.sh --fingerprint: every file under csrc/ and setup.py) match.
#
#   bash benchmarks/build_for_device.sh      # from anywhere; writes <repo>/device_build/
#
# Steps: a Python 3.12 venv outside the work tree with torch==$DEVICE_TORCH (the
# registry's plain cp312 wheel is the same CUDA 13.0 build the image runs) and
# ninja; `setup.py build_ext` against it for TORCH_CUDA_ARCH_LIST=9.0 with
# CUDA_HOME=/usr/local/cuda, objects in a temporary folder; the library and
# build.txt (torch version, Python tag, archs, source fingerprint, commit) copied
# into device_build/; the library imported in that venv (no GPU needed).
#
# Knobs (environment):
#   DEVICE_TORCH=2.11.0        torch version of the device image (pip spec torch==$DEVICE_TORCH)
#   DEVICE_PYTHON=python3.12   interpreter for the venv (here pyenv's 3.12.1, see below)
#   DEVICE_VENV=PATH           the venv (default ~/.cache/bnorm_ext/device-venv-torch$DEVICE_TORCH-py312);
#                              reused when it already holds torch $DEVICE_TORCH
#   MAX_JOBS=2  TORCH_CUDA_ARCH_LIST=9.0  CUDA_HOME=/usr/local/cuda
#
# Measured on the 2-core CPU machine, 2026-12-02: creating the venv and installing
# torch 2.11.0 + ninja took 57 s (wheels from the machine's package mirror); from a
# clean clone with that venv in place the whole script took 351 s, 336 s of it the sm_90
# build (MAX_JOBS=2, other builds sharing the two cores); the library is 24.9 MB (23.8 MiB).
# 2026-12-08, from a fresh clone with the venv in place: 534 s (build 525 s, a test run and
# another build sharing the two cores); the library came out at 99.7 MB, 28.0 MB of it without
# the host debug info that Python's CFLAGS (-g) had added, hence -g0 in setup.py and the strip below.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE_TORCH="${DEVICE_TORCH:-2.11.0}"
DEVICE_PYTHON="${DEVICE_PYTHON:-python3.12}"
DEVICE_VENV="${DEVICE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bnorm_ext/device-venv-torch$DEVICE_TORCH-py312}"
OUT_DIR="$ROOT/device_build"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export BNORM_EXT_CUDA=1  # fail loudly rather than build a CPU-only library
if [[ -z "${PYENV_VERSION:-}" ]] && command -v pyenv >/dev/null 2>&1 && pyenv versions --bare 2>/dev/null | grep -qx 3.12.1; then
  export PYENV_VERSION=3.12.1
fi

log() { echo "[build_for_device] $*"; }
start=$SECONDS
cd "$ROOT"
case "$DEVICE_VENV" in "$ROOT"/*) log "DEVICE_VENV must be outside the work tree: $DEVICE_VENV"; exit 2 ;; esac

# 1. venv with the device's torch
PY="$DEVICE_VENV/bin/python"
if [[ -x "$PY" ]] && "$PY" -c "import torch, ninja, setuptools, sys; sys.exit(torch.__version__.split('+')[0] != '$DEVICE_TORCH')" 2>/dev/null; then
  log "using $DEVICE_VENV (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
else
  log "creating $DEVICE_VENV with $DEVICE_PYTHON ($("$DEVICE_PYTHON" --version 2>&1))"
  rm -rf "$DEVICE_VENV"
  mkdir -p "$(dirname "$DEVICE_VENV")"
  "$DEVICE_PYTHON" -m venv "$DEVICE_VENV"
  "$PY" -m pip install -q "torch==$DEVICE_TORCH" ninja setuptools
  log "venv ready after $((SECONDS - start)) s"
fi
read -r TORCH_VERSION TORCH_CUDA PY_TAG < <("$PY" -c '
import sys, torch
print(torch.__version__, torch.version.cuda, f"cpython-{sys.version_info[0]}{sys.version_info[1]}")' 2>/dev/null)
[[ "$TORCH_CUDA" != None ]] || { log "torch $TORCH_VERSION in $DEVICE_VENV is not a CUDA build"; exit 1; }

# 2. build, objects outside the tree
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
build_start=$SECONDS
log "building for sm_${TORCH_CUDA_ARCH_LIST//./} against torch $TORCH_VERSION ($PY_TAG), MAX_JOBS=$MAX_JOBS"
"$PY" setup.py -q build_ext --build-lib "$tmp/lib" --build-temp "$tmp/temp" >"$tmp/build.log" 2>&1 \
  || { tail -n 40 "$tmp/build.log"; log "build failed"; exit 1; }
build_s=$((SECONDS - build_start))
lib=("$tmp"/lib/bnorm_ext/_C.*.so)
[[ -f "${lib[0]}" ]] || { log "no library in $tmp/lib/bnorm_ext"; exit 1; }

# 3. device_build/: the library and what it was built for
rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
cp "${lib[0]}" "$OUT_DIR/"
# no host debug info on the GPU machine: the library travels, and its size counts
strip --strip-debug "$OUT_DIR"/_C.*.so
{
  echo "torch=$TORCH_VERSION"
  echo "python=$PY_TAG"
  echo "archs=$TORCH_CUDA_ARCH_LIST"
  echo "sources=$(bash benchmarks/gpu_check.sh --fingerprint)"
  echo "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- csrc setup.py 2>/dev/null || echo +changes)"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), build ${build_s} s"
  echo "glibc_needed=$(objdump -T "${lib[0]}" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)"
  echo "glibcxx_needed=$(objdump -T "${lib[0]}" 2>/dev/null | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -n 1)"
} >"$OUT_DIR/build.txt"

# 4. it imports next to the package (a copy, so the work tree's bnorm_ext/ stays as it was)
mkdir -p "$tmp/check"
cp -r bnorm_ext "$tmp/check/"
rm -f "$tmp"/check/bnorm_ext/_C.*.so
cp "$OUT_DIR"/_C.*.so "$tmp/check/bnorm_ext/"
(cd "$tmp/check" && "$PY" -c 'import bnorm_ext; i = bnorm_ext.build_info(); assert i["cuda_compiled"], i; print("[build_for_device] imports:", i)') \
  2> >(grep -v "Failed to initialize NumPy\|_conversion_method_template" >&2)

ls -l "$OUT_DIR"
cat "$OUT_DIR/build.txt"
log "done in $((SECONDS - start)) s (build ${build_s} s); with device_build/ next to the checkout on the GPU machine, run: bash benchmarks/gpu_check.sh 1 RESULTS_DIR"
