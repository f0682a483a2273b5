#!/usr/bin/env bash
# Shared environment setup for .ci/run (tests) and benchmarks/run.sh (benchmark).
#
#   1. creates an isolated virtual environment (default: <repo>/.venv, override BNORM_VENV)
#   2. installs torch==2.14.1 ninja pytest numpy, what the ecosystem tests use (torchvision,
#      onnx, onnxscript, onnxruntime) and matplotlib for the benchmarks' plots (skipped when
#      already done)
#   3. exports CUDA_HOME=/usr/local/cuda when that toolkit exists
#   4. builds bnorm_ext with `pip install --no-build-isolation -e .` (MAX_JOBS=2 by default),
#      printing each source as it compiles ([done/total] path)
#
# Knobs (environment):
#   BNORM_VENV=PATH        where the venv lives                      (default <repo>/.venv)
#   PYTHON=python3.11      interpreter used to create the venv        (default python3)
#   BNORM_BUILD=auto|always|never
#                          auto: build when bnorm_ext does not import, or the build's inputs
#                          (every file under csrc/, setup.py and the knobs below) differ from
#                          the last build's; always: build every time
#                          (the default when CI=true); never: skip the build
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST, BNORM_EXT_CUDA, BNORM_EXT_DEBUG are passed to setup.py
#   (CUDA kernels are built only for the GPUs present unless BNORM_EXT_CUDA=1; see setup.py).
#
#   bash .ci/setup_env.sh --fingerprint           prints the build inputs' fingerprint and exits
#   bash .ci/setup_env.sh --sources-fingerprint   the same for the sources alone
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BNORM_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
DEPS=(torch==2.14.1 ninja pytest numpy "setuptools>=64" wheel
      torchvision==0.29.1 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 matplotlib==3.11.2)
if [[ "${CI:-}" == "true" ]]; then
  BUILD_MODE="${BNORM_BUILD:-always}"
else
  BUILD_MODE="${BNORM_BUILD:-auto}"
fi

log() { echo "[setup_env] $*"; }

cd "$ROOT"

# The sources the library is built from (every file under csrc/, and setup.py), as one short
# hash, the same in every locale (LC_ALL=C: byte order of the paths); benchmarks/gpu_check.sh
# compares it with the one a prebuilt library records.
sources_fingerprint() {
  (export LC_ALL=C; find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}
# What a build depends on: the sources and the build knobs.
build_fingerprint() {
  echo "$(sources_fingerprint) BNORM_EXT_CUDA=${BNORM_EXT_CUDA:-} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}" \
    "BNORM_EXT_DEBUG=${BNORM_EXT_DEBUG:-}" | sha256sum | cut -c1-16
}
if [[ "${1:-}" == "--sources-fingerprint" ]]; then
  sources_fingerprint
  exit 0
fi
if [[ "${1:-}" == "--fingerprint" ]]; then
  build_fingerprint
  exit 0
fi

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
   && "$PY" -c 'import torch, ninja, pytest, numpy, torchvision, onnx, onnxscript, onnxruntime, matplotlib' >/dev/null 2>&1; then
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
  # the Python files of an editable install need no build
  [[ "$(cat "$BUILD_STAMP")" == "$(build_fingerprint)" ]] || return 0
  return 1
}

if need_build; then
  export MAX_JOBS="${MAX_JOBS:-2}"
  log "building: MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps -e .  (mode $BUILD_MODE)"
  start=$(date +%s)
  rm -f "$BUILD_STAMP"
  # -v for ninja's "[done/total] command" lines, shortened to the source being compiled
  set +e
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . >"$VENV/build.log" 2>&1 &
  pip_pid=$!
  tail -n +1 --pid="$pip_pid" -f "$VENV/build.log" \
    | sed -un -E 's#^ *(\[[0-9]+/[0-9]+\]) .* -c [^ ]*(csrc/[^ ]+\.(cpp|cu)) .*#[setup_env] compiling \1 \2#p;
                  s#^ *bnorm_ext: #[setup_env] #p'
  wait "$pip_pid"
  rc=$?
  set -e
  if [[ $rc != 0 ]]; then tail -n 40 "$VENV/build.log"; log "build failed (exit $rc); full log: $VENV/build.log"; exit 1; fi
  build_fingerprint > "$BUILD_STAMP"
  log "build finished in $(( $(date +%s) - start )) s"
else
  if [[ "$BUILD_MODE" == never ]]; then log "build skipped (BNORM_BUILD=never)"; else log "build up to date; set BNORM_BUILD=always to force a rebuild"; fi
fi

# sanity check: importable from outside the source tree, print build info
(cd / && "$PY" -c 'import bnorm_ext; print("[setup_env] bnorm_ext imports from", bnorm_ext.__file__)')
(cd / && "$PY" -m bnorm_ext) || log "warning: 'python -m bnorm_ext' failed"
