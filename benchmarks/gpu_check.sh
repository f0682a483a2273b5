#!/usr/bin/env bash
# One-shot GPU check for a short lease on the H200 (about 8 minutes in all):
# builds with the machine's own torch, runs the CUDA tests, compute-sanitizer
# (memcheck, racecheck, synccheck, initcheck) over the smoke script, and the GPU
# benchmark, writing logs and CSVs into the results folder it is given.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR      (on the device machine: "$OUT")
set -uo pipefail
out=${1:?usage: gpu_check.sh RESULTS_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
summary="$out/summary.txt"
: >"$summary"
step() { # step NAME TIMEOUT_S CMD...: runs CMD into $out/NAME.log, records its status
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$out/$name.log")" | tee -a "$summary"
  return $rc
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  nvcc --version | tail -n 1
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

step build 600 python3 -m pip install --no-build-isolation --no-deps -e . || { cat "$out/build.log" | tail -n 40; exit 1; }
step build_info 60 python3 -m bnorm_ext
step smoke 120 python3 benchmarks/cuda_smoke.py --large
step tests_cuda 300 python3 -m pytest -q -x tests/test_cuda.py tests/test_build.py -p no:cacheprovider
for tool in memcheck racecheck synccheck initcheck; do
  step "sanitizer_$tool" 240 compute-sanitizer --tool "$tool" --error-exitcode 3 python3 benchmarks/cuda_smoke.py
done
step bench_gpu 420 python3 benchmarks/bench.py --device cuda --csv "$out/gpu_bench.csv" --plot "$out/gpu_bench.png"
# the same training rows with the single-read kernel switched off (two-pass only), for the comparison
step bench_gpu_two_pass 150 env BNORM_EXT_CUDA_SINGLE_READ=0 python3 benchmarks/bench.py --device cuda --passes fwd,bwd \
  --no-compile --csv "$out/gpu_bench_two_pass.csv" --plot "$out/gpu_bench_two_pass.png"
echo "== summary"; cat "$summary"
