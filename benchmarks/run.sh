#!/usr/bin/env bash
# The main job: benchmark bnorm_ext against torch.nn.BatchNorm2d.
#   bash benchmarks/run.sh                 # CPU, about a minute on 2 cores
#   bash benchmarks/run.sh --quick         # smoke run
#   bash benchmarks/run.sh --device cuda   # on a GPU machine
# Sets up the same venv as CI (.ci/setup_env.sh: created and built only when needed),
# then runs benchmarks/bench.py with the given arguments.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export BNORM_VENV="${BNORM_VENV:-$ROOT/.venv}"
bash .ci/setup_env.sh
echo "[bench] $BNORM_VENV/bin/python benchmarks/bench.py $*"
exec "$BNORM_VENV/bin/python" benchmarks/bench.py "$@"
