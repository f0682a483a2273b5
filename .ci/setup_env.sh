#!/usr/bin/env bash
# Shared environment setup for .ci/run (tests) and benchmarks/run.sh (benchmark).
#
#   1. creates an isolated virtual environment (default: <repo>/.venv, override BNORM_VENV)
#   2. installs torch==2.14.1 ninja pybind11 pytest numpy, and what the ecosystem tests use:
#      torchvision, onnx, onnxscript, onnxruntime (skipped when already done)
#   3. exports CUDA_HOME=/usr/local/cuda when that toolkit exists
#   4. builds bnorm_ext with `pip install --no-build-isolation -e .` (MAX_JOBS=2 by default)
#
# Knobs (environment):
#   BNORM_VENV=PATH        where the venv lives                      (default <repo>/.venv)
#   PYTHON=python3.11      interpreter used to create the venv        (default python3)
#   BNORM_BUILD=auto|always|never
#                          auto: build when bnorm_ext does not import or csrc/ or setup.py
#                          changed since the last build; always: build every time
#                          (the default when CI=true); never: skip the build
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST, BNORM_EXT_CUDA, BNORM_EXT_DEBUG are passed to setup.py.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BNORM_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
DEPS=(torch==2.14.1 ninja pybind11 pytest numpy "setuptools>=64" wheel
      torchvision==0.29.1 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0)
if [[ "${CI:-}" == "true" ]]; then
  BUILD_MODE="${BNORM_BUILD:-always}"
else
  BUILD_MODE="${BNORM_BUILD:-auto}"
fi

log() { echo "[setup_env] $*"; }

cd "$ROOT"

# 1. venv ---------------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "using existing venv $VENV ($("$VENV/bin/python" --version 2>&1))"
else
  log "creating venv $VENV with $PY_BOOT ($("$PY_BOOT" --version 2>&1))"
  rm -rf "$VENV"
  "$PY_BOOT" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# 2. dependencies -------------------------------------------------------------------------
DEPS_STAMP="$VENV/.bnorm_ext_deps"
if [[ -f "$DEPS_STAMP" && "$(cat "$DEPS_STAMP")" == "${DEPS[*]}" ]] \
   && "$PY" -c 'import torch, ninja, pybind11, pytest, numpy, torchvision, onnx, onnxscript, onnxruntime' >/dev/null 2>&1; then
  log "dependencies already installed (${DEPS[*]})"
else
  log "pip install ${DEPS[*]}"
  "$PY" -m pip install --upgrade pip
  "$PY" -m pip install "${DEPS[@]}"
  echo "${DEPS[*]}" > "$DEPS_STAMP"
fi
"$PY" -c 'import torch; print("[setup_env] torch", torch.__version__, "| cuda build:", torch.version.cuda, "| cuda available:", torch.cuda.is_available())'

# 3. CUDA toolkit -------------------------------------------------------------------------
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
  export PATH="$CUDA_HOME/bin:$PATH"
  log "CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 1))"
else
  log "no CUDA toolkit found (CUDA_HOME=${CUDA_HOME:-unset}): CPU-only build"
fi

# 4. build --------------------------------------------------------------------------------
BUILD_STAMP="$VENV/.bnorm_ext_build"
need_build() {
  case "$BUILD_MODE" in
    always) return 0 ;;
    never) return 1 ;;
    auto) ;;
    *) echo "BNORM_BUILD must be auto, always or never (got $BUILD_MODE)" >&2; exit 2 ;;
  esac
  [[ -f "$BUILD_STAMP" ]] || return 0
  (cd / && "$PY" -c 'import bnorm_ext') >/dev/null 2>&1 || return 0
  # sources of the compiled extension (the Python files of an editable install need no build)
  [[ -z "$(find csrc setup.py pyproject.toml -newer "$BUILD_STAMP" \
            \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name 'setup.py' -o -name '*.toml' \) \
            2>/dev/null | head -n 1)" ]] || return 0
  return 1
}

if need_build; then
  export MAX_JOBS="${MAX_JOBS:-2}"
  log "building: MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps -e .  (mode $BUILD_MODE)"
  start=$(date +%s)
  rm -f "$BUILD_STAMP"
  "$PY" -m pip install --no-build-isolation --no-deps -e .
  touch "$BUILD_STAMP"
  log "build finished in $(( $(date +%s) - start )) s"
else
  if [[ "$BUILD_MODE" == never ]]; then log "build skipped (BNORM_BUILD=never)"; else log "build up to date; set BNORM_BUILD=always to force a rebuild"; fi
fi

# sanity check: importable from outside the source tree, print build info
(cd / && "$PY" -c 'import bnorm_ext; print("[setup_env] bnorm_ext imports from", bnorm_ext.__file__)')
(cd / && "$PY" -m bnorm_ext) || log "warning: 'python -m bnorm_ext' failed"
