#!/usr/bin/env bash
# GPU check in two stages, each planned for one device call of under 8 minutes
# (a lease: 15 minutes of device time, 10 per command, a fresh bare machine each call).
#
#   bash benchmarks/gpu_check.sh 1 RESULTS_DIR   # CUDA tests (the >2^31-element ones too), cuda_smoke
#                                                # --large on both paths, the fused BN + activation ops'
#                                                # CUDA tests, a short benchmark of both paths and the
#                                                # fused ops' layer benchmark
#   bash benchmarks/gpu_check.sh 2 RESULTS_DIR   # compute-sanitizer memcheck, racecheck, synccheck and
#                                                # initcheck over cuda_smoke.py --sanitizer
#
# With the device tool: first, here, `bash benchmarks/build_for_device.sh` (writes device_build/),
# then one call per stage, e.g.
#   run(command='bash benchmarks/gpu_check.sh 1 "$OUT"', carry=["device_build"], timeout_s=540)
# Everything lands flat in RESULTS_DIR (at most 8 files per stage, the tool's limit):
#   stage 1: summary.txt setup.log smoke.log tests.log bench.log bench_single_read.csv bench_two_pass.csv
#            act_cuda.csv
#   stage 2: summary.txt setup.log sanitizer_{memcheck,racecheck,synccheck,initcheck}.log
# and the summary (one screen) is printed last.
#
# The library: device_build/ (from build_for_device.sh) is used when the device's
# torch.__version__, its Python tag and the sources' fingerprint match device_build/build.txt;
# otherwise it is built here (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16), which takes from the
# stage's budget (the build's time on the device is not known yet).
#
# Budget (planned, not measured: nothing has run on a GPU yet). Every step has its own
# `timeout` and the whole stage a deadline (STAGE_BUDGET_S, default 460 s): a step gets at most
# what is left, and steps with under 15 s left are skipped, so a stage ends within about
# 7.9 minutes even if steps hang; give the device call timeout_s=540. Planned limits, in order:
#   stage 1: setup 30 s (prebuilt; a build 300 s) | smoke --large 80 s | tests 160 s |
#            fused-op tests (tests/test_batch_norm_act.py and tests/test_opcheck.py -k act, CUDA
#            cases) 70 s | torch.compile tests 55 s | benchmark, single-read 25 s |
#            benchmark, two-pass 20 s | fused-op benchmark 20 s
#            (the fused-op steps and the smoke's fused cases are not timed anywhere yet)
#   stage 2: setup 30 s | smoke --sanitizer without a tool 30 s | memcheck 95 s | racecheck 105 s |
#            synccheck 80 s | initcheck 105 s (the smoke's fused-op cases, about as many runs again as
#            the plain ops', not timed anywhere yet)
# CPU-side parts measured on the 2-core CPU machine, 2026-12-02, in a dry run from a clean clone
# (torch 2.11.0+cu130, Python 3.12, the prebuilt library, no GPU, so every GPU step failed fast
# or skipped): stage 1 took 41 s (importing the library 4 s; collecting the CUDA tests and
# running the 16 CPU-side ones and tests/test_build.py's SASS checks of the sm_90 library 14 s),
# stage 2 15 s. cuda_smoke.py --device cpu, which does at least twice the CPU work of a GPU run
# (both sides on the CPU), took 3.5 s with --sanitizer, 15 s by default and 111 s with --large.
# For scale: the CPU parity and gradcheck tests, the CPU twins of most CUDA tests, took 34 s
# for 217 tests here (slowest: a gradgradcheck, 3 s). tests.log lists the 20 slowest CUDA tests.
#
# Other uses: `--fingerprint` prints the sources' fingerprint (build_for_device.sh records it).
# Environment: PYTHON (python3), STAGE_BUDGET_S (460), CUDA_HOME (/usr/local/cuda).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The sources the library is built from, as one short hash.
fingerprint() {
  find csrc setup.py -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.inc' \
    -o -name setup.py \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}
if [[ "${1:-}" == "--fingerprint" ]]; then
  fingerprint
  exit 0
fi

stage=${1:-}
out=${2:-}
if [[ "$stage" != 1 && "$stage" != 2 ]] || [[ -z "$out" ]]; then
  echo "usage: gpu_check.sh 1|2 RESULTS_DIR   (or --fingerprint)" >&2
  exit 2
fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
unset BNORM_EXT_CUDA_SINGLE_READ BNORM_EXT_CUDA_TEST_REFUSE_COOPERATIVE
deadline=$((SECONDS + ${STAGE_BUDGET_S:-460}))
summary="$out/summary.txt"
steps_table=()
: >"$summary"

# step NAME LOG LIMIT_S CMD...: runs CMD with its output appended to $out/LOG, within LIMIT_S and
# what is left of the stage; records the status, time and last line in the summary table.
step() {
  local name=$1 logfile=$out/$2 limit=$3
  shift 3
  local left=$((deadline - SECONDS - 5))
  ((limit > left)) && limit=$left
  if ((limit < 15)); then
    steps_table+=("$(printf '%-20s %-8s %5s  %s' "$name" skipped - "stage budget spent")")
    return 99
  fi
  local start=$SECONDS
  echo "=== $name: $* (limit ${limit} s)" >>"$logfile"
  timeout -k 10 "$limit" "$@" >>"$logfile" 2>&1
  local rc=$?
  local status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status="rc=$rc"
  local last
  last=$(grep -v '^\s*$' "$logfile" | tail -n 1 | cut -c1-90)
  steps_table+=("$(printf '%-20s %-8s %4ss  %s' "$name" "$status" "$((SECONDS - start))" "$last")")
  echo "=== $name: $status after $((SECONDS - start)) s" >>"$logfile"
  return $rc
}

kv() { grep -m1 "^$1=" device_build/build.txt 2>/dev/null | cut -d= -f2-; }

# Puts bnorm_ext/_C*.so in place: the carried device_build/ library when it matches, else a build.
setup_library() {
  local log=$out/setup.log
  {
    date -u
    echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>&1)"
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.shared_memory_per_multiprocessor // 1024} KiB shared memory "
          f"per SM ({p.shared_memory_per_block_optin // 1024} KiB per block opt-in), L2 {p.L2_cache_size >> 20} MiB")
EOF
    "$CUDA_HOME/bin/nvcc" --version 2>&1 | tail -n 1
  } >>"$log" 2>&1
  local torch_here py_tag ext_suffix
  torch_here=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
  py_tag=$("$PY" -c 'import sys; print(f"cpython-{sys.version_info[0]}{sys.version_info[1]}")')
  ext_suffix=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  # only this interpreter's library: a checkout may hold others (e.g. a local build for another Python)
  rm -f "bnorm_ext/_C$ext_suffix"
  library="built here"
  local why
  if [[ ! -f device_build/build.txt ]]; then
    why="no device_build/ carried"
  elif [[ "$(kv torch)" != "$torch_here" ]]; then
    why="device_build/ is for torch $(kv torch), this is $torch_here"
  elif [[ "$(kv python)" != "$py_tag" ]]; then
    why="device_build/ is for $(kv python), this is $py_tag"
  elif [[ "$(kv sources)" != "$(fingerprint)" ]]; then
    why="device_build/ was built from other sources ($(kv commit))"
  elif [[ ! -f "device_build/_C$ext_suffix" ]]; then
    why="no device_build/_C$ext_suffix"
  else
    cp "device_build/_C$ext_suffix" bnorm_ext/
    if step import_prebuilt setup.log 60 "$PY" -c 'import bnorm_ext; print(bnorm_ext.build_info())'; then
      library="prebuilt $(kv commit), $(kv built)"
      echo "library: $library" >>"$log"
      return 0
    fi
    rm -f "bnorm_ext/_C$ext_suffix"
    why="the prebuilt library did not import"
  fi
  echo "library: building here: $why" >>"$log"
  library="built here ($why)"
  step build setup.log 300 "$PY" setup.py build_ext --inplace || return 1
  step import_built setup.log 60 "$PY" -c 'import bnorm_ext; print(bnorm_ext.build_info())'
}

pytest_args=(-q -p no:cacheprovider -rfE --durations=20 -o addopts="")
"$PY" -c 'import pytest_timeout' 2>/dev/null && pytest_args+=(--timeout=150)

stage1() {
  step smoke smoke.log 80 "$PY" benchmarks/cuda_smoke.py --large
  step tests tests.log 160 env BNORM_EXT_RUNSLOW=1 "$PY" -m pytest "${pytest_args[@]}" --maxfail=40 \
    tests/test_cuda.py tests/test_cuda_host_side.py tests/test_build.py -k "not torch_compile"
  # NB: "act" selects all of test_batch_norm_act.py (its module name) and the fused ops' opcheck
  # cases; "cuda" their CUDA cases (the device id, or a test_cuda_* name)
  step tests_act tests.log 70 "$PY" -m pytest "${pytest_args[@]}" --maxfail=40 \
    tests/test_batch_norm_act.py tests/test_opcheck.py -k "act and cuda"
  step tests_compile tests.log 55 "$PY" -m pytest "${pytest_args[@]}" tests/test_cuda.py -k torch_compile
  local bench=(benchmarks/bench.py --device cuda --no-compile --repeats 20 --plot ""
    --shapes 32x64x112x112,32x256x28x28,32x2048x7x7)
  # NB: 32x2048x7x7 fits the single-read kernel both ways, 32x256x28x28 the forward only,
  # 32x64x112x112 neither (on an H200); the two-pass run times the same rows without it
  step bench_single_read bench.log 25 "$PY" "${bench[@]}" --csv "$out/bench_single_read.csv"
  step bench_two_pass bench.log 20 env BNORM_EXT_CUDA_SINGLE_READ=0 "$PY" "${bench[@]}" --passes fwd,bwd \
    --csv "$out/bench_two_pass.csv"
  step bench_act bench.log 20 "$PY" benchmarks/bench_act.py --device cuda --csv "$out/act_cuda.csv"
}

stage2() {
  local sanitizer
  sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
  "$sanitizer" --version >>"$out/setup.log" 2>&1 || echo "compute-sanitizer not found at $sanitizer" >>"$out/setup.log"
  # NB: no caching allocator, so an access past a tensor's end is outside any allocation
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step smoke_plain setup.log 30 "$PY" benchmarks/cuda_smoke.py --sanitizer
  local filter=()
  "$sanitizer" --help 2>/dev/null | grep -q -- '--kernel-name' && filter=(--kernel-name kns=bnorm_ext)
  local tool limit
  for tool in memcheck racecheck synccheck initcheck; do
    case $tool in memcheck) limit=95 ;; racecheck) limit=105 ;; synccheck) limit=80 ;; initcheck) limit=105 ;; esac
    # NB: initcheck sees every kernel, since writes by uninstrumented (torch) kernels would
    # look uninitialised to it; the others check bnorm_ext's kernels only, when the filter exists
    local f=("${filter[@]}")
    [[ $tool == initcheck ]] && f=()
    step "$tool" "sanitizer_$tool.log" "$limit" "$sanitizer" --tool "$tool" "${f[@]}" --error-exitcode 3 \
      --print-limit 50 "$PY" benchmarks/cuda_smoke.py --sanitizer
    local rc=$?
    if ((rc != 0 && rc != 3 && rc != 99 && rc != 124 && rc != 137 && ${#f[@]} > 0)) \
      && ! grep -q "ERROR SUMMARY" "$out/sanitizer_$tool.log"; then
      # the tool did not run the program (e.g. it refused the filter): once more without it
      step "${tool}_nofilter" "sanitizer_$tool.log" "$limit" "$sanitizer" --tool "$tool" --error-exitcode 3 \
        --print-limit 50 "$PY" benchmarks/cuda_smoke.py --sanitizer
    fi
  done
}

write_summary() {
  {
    echo "gpu_check stage $stage, $(date -u +%Y-%m-%dT%H:%M:%SZ), $((SECONDS)) s"
    grep -m1 '^gpu: ' "$out/setup.log"
    grep -m1 '^python ' "$out/setup.log"
    grep -m1 ' SMs, ' "$out/setup.log"
    echo "library: $library"
    echo
    printf '%-20s %-8s %5s  %s\n' step status time "last line"
    printf '%s\n' "${steps_table[@]}"
    echo
    if [[ $stage == 1 ]]; then
      grep -h '^FAIL \|^cuda_smoke\|^single-read launches' "$out/smoke.log" 2>/dev/null | head -n 8
      grep -hE '^(FAILED|ERROR) |[0-9]+ (passed|failed)' "$out/tests.log" 2>/dev/null | cut -c1-150 | head -n 16
      grep -hA5 '^geomean ratio' "$out/bench.log" 2>/dev/null | head -n 12
    else
      grep -h '^cuda_smoke\|^single-read launches\|^FAIL ' "$out/setup.log" 2>/dev/null | head -n 6
      local tool
      for tool in memcheck racecheck synccheck initcheck; do
        local f=$out/sanitizer_$tool.log
        [[ -f $f ]] || continue
        # reports that name one of our kernels (in the report's line or its first frame)
        local ours result
        ours=$(awk '/^========= (COMPUTE-SANITIZER|ERROR SUMMARY)/ {next}
                    /^========= [A-Z]/ {if ($0 ~ /bnorm_ext/) {n++; hdr=0} else hdr=1; next}
                    hdr && /^=========     at / {if ($0 ~ /bnorm_ext/) n++; hdr=0}
                    END {print n+0}' "$f")
        result=$(grep -h 'ERROR SUMMARY' "$f" | tail -n 1 | sed 's/^=* *//')
        printf '%-10s %s | in bnorm_ext kernels: %s | %s\n' "$tool" "${result:-no ERROR SUMMARY: the tool did not finish}" \
          "$ours" "$(grep -h '^single-read launches\|^cuda_smoke' "$f" | tr '\n' ' ' | cut -c1-70)"
      done
    fi
  } >"$summary"
}

library="not set up"
if setup_library; then
  "stage$stage"
else
  steps_table+=("$(printf '%-20s %-8s %5s  %s' "stage $stage" skipped - "no library: see setup.log")")
fi
write_summary
echo "== files in $out: $(cd "$out" && ls | tr '\n' ' ')"
echo "== summary"
cat "$summary"
