#!/usr/bin/env bash
# Builds and tests bnorm_ext against the oldest supported torch (step 3 of .ci/run).
#
#   1. a venv with torch==$OLDEST_TORCH ninja numpy pytest setuptools wheel (reused when it
#      already holds that torch)
#   2. a CPU-only build (BNORM_EXT_CUDA=0) of a temporary copy of csrc/, bnorm_ext/, setup.py and
#      pyproject.toml, installed non-editable into that venv: the work tree's own build is untouched
#   3. from a temporary directory (so `import bnorm_ext` finds the installed build, not the work
#      tree), the whole test suite: in a venv with only torch, numpy and pytest, the tests that need
#      torchvision, onnx or onnxruntime skip with a reason and everything else passes
#
# Knobs (environment):
#   OLDEST_TORCH=2.11.0       torch version (the oldest in pyproject.toml's range)
#   BNORM_OLDEST_VENV=PATH    the venv (default ~/.cache/bnorm_ext/venv-torch$OLDEST_TORCH-py<ver>)
#   PYTHON=python3            interpreter that creates the venv
#   MAX_JOBS=2                parallel compile jobs
#   BNORM_OLDEST_TESTS="..."  test files to run (default: tests, the whole suite)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OLDEST_TORCH="${OLDEST_TORCH:-2.11.0}"
PY_BOOT="${PYTHON:-python3}"
PY_TAG="$("$PY_BOOT" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
VENV="${BNORM_OLDEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bnorm_ext/venv-torch${OLDEST_TORCH%.0}-$PY_TAG}"
TESTS="${BNORM_OLDEST_TESTS:-tests}"
DEPS=("torch==$OLDEST_TORCH" ninja numpy pytest "setuptools>=64" wheel)
export MAX_JOBS="${MAX_JOBS:-2}"
export BNORM_EXT_CUDA=0

log() { echo "[oldest_torch] $*"; }
cd "$ROOT"
case "$VENV" in "$ROOT"/*) log "BNORM_OLDEST_VENV must be outside the work tree: $VENV"; exit 2 ;; esac

# 1. venv ------------------------------------------------------------------------------------
start=$SECONDS
PY="$VENV/bin/python"
if [[ -x "$PY" ]] && "$PY" -c "import torch, ninja, numpy, pytest, setuptools, sys; sys.exit(torch.__version__.split('+')[0] != '$OLDEST_TORCH')" >/dev/null 2>&1; then
  log "using $VENV (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null))"
else
  log "creating $VENV with $PY_BOOT ($("$PY_BOOT" --version 2>&1)): pip install ${DEPS[*]}"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY_BOOT" -m venv "$VENV"
  "$PY" -m pip install -q "${DEPS[@]}"
fi
install_s=$((SECONDS - start))
log "venv ready: ${install_s} s"

# 2. build a copy, install it into the venv --------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/src"
cp -r csrc bnorm_ext setup.py pyproject.toml README.md "$tmp/src/"
find "$tmp/src" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
start=$SECONDS
log "building a CPU-only bnorm_ext against torch $OLDEST_TORCH (MAX_JOBS=$MAX_JOBS)"
"$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall "$tmp/src" >"$tmp/build.log" 2>&1 \
  || { tail -n 40 "$tmp/build.log"; log "build failed"; exit 1; }
build_s=$((SECONDS - start))
log "build + install: ${build_s} s"

# 3. tests, from a directory without the work tree's bnorm_ext -------------------------------
mkdir -p "$tmp/run"
cp -r tests "$tmp/run/"
cd "$tmp/run"
"$PY" -c 'import bnorm_ext, torch; print("[oldest_torch] bnorm_ext from", bnorm_ext.__file__, "| torch", torch.__version__)'
start=$SECONDS
set +e
# shellcheck disable=SC2086  # TESTS is a list of paths
"$PY" -m pytest -q -p no:cacheprovider $TESTS
rc=$?
set -e
test_s=$((SECONDS - start))
log "tests: ${test_s} s, pytest exit code $rc (venv ${install_s} s, build ${build_s} s)"
exit "$rc"
