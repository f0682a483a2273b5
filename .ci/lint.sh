#!/usr/bin/env bash
# Lint: ruff (Python; settings in pyproject.toml) and clang-format (C++/CUDA; settings in
# csrc/.clang-format), versions pinned below. Run by .ci/run; by hand:
#   bash .ci/lint.sh          # check (non-zero exit on findings)
#   bash .ci/lint.sh --fix    # apply ruff's fixes and both formatters
# Installs the two tools into $BNORM_LINT_VENV (default <repo>/.venv-lint) when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUFF_VERSION=0.17.6
CLANG_FORMAT_VERSION=23.1.5
VENV="${BNORM_LINT_VENV:-$ROOT/.venv-lint}"

if ! "$VENV/bin/ruff" --version 2>/dev/null | grep -qx "ruff $RUFF_VERSION" \
   || ! "$VENV/bin/clang-format" --version 2>/dev/null | grep -q "version $CLANG_FORMAT_VERSION"; then
  echo "[lint] installing ruff==$RUFF_VERSION clang-format==$CLANG_FORMAT_VERSION into $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "ruff==$RUFF_VERSION" "clang-format==$CLANG_FORMAT_VERSION"
fi

mapfile -t cxx < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'csrc/*.inc')
if [[ "${1:-}" == "--fix" ]]; then
  "$VENV/bin/ruff" check --fix .
  "$VENV/bin/ruff" format .
  "$VENV/bin/clang-format" -i "${cxx[@]}"
  exit 0
fi
rc=0
"$VENV/bin/ruff" check . || rc=1
"$VENV/bin/ruff" format --check . || rc=1
"$VENV/bin/clang-format" --dry-run -Werror "${cxx[@]}" || rc=1
if [[ $rc == 0 ]]; then echo "[lint] OK (ruff check, ruff format, clang-format over ${#cxx[@]} C++/CUDA files)"; else echo "[lint] FAILED: run 'bash .ci/lint.sh --fix'"; fi
exit $rc
