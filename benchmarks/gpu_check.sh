#!/usr/bin/env bash
# GPU check in two calls, for a machine with a GPU (sm_90), with a prebuilt library from
# benchmarks/build_for_device.sh (device_build/, copied next to this checkout). Neither call
# builds anything: when the library does not match the machine (torch version, Python tag,
# the sources' fingerprint, the GPU's architecture) the call stops at once and says why.
#
#   bash benchmarks/gpu_check.sh 1 RESULTS_DIR   # about 5 minutes: smoke, CUDA tests, quick benchmark
#   bash benchmarks/gpu_check.sh 2 RESULTS_DIR   # about 4 minutes: compute-sanitizer, torch.compile tests
#   bash benchmarks/gpu_check.sh --fingerprint   # the sources' fingerprint (build_for_device.sh records it)
#
# Call 1 (about 5 minutes):
#   import         the prebuilt library imports, the GPU's architecture is in its build
#   then three lanes side by side (separate processes on the one GPU; none of them is timed):
#     smoke        benchmarks/cuda_smoke.py: every plain and fused op, every dtype and layout, on
#                  the single-read and the two-pass paths; each failure printed as it happens
#     tests_act    after the smoke: the fused ops' CUDA tests (tests/test_batch_norm_act.py -k cuda)
#     tests_cuda   tests/test_cuda.py (with the >2^31-element tests), test_cuda_host_side.py,
#                  test_build.py (SASS checks); the torch.compile tests are in call 2
#     tests_opcheck  torch.library.opcheck of every op on CUDA (tests/test_opcheck.py -k cuda)
#   bench          alone, last: benchmarks/bench_quick.py, 3 ResNet-50 shapes x both layouts x
#                  float32, bfloat16, plain and fused ops, no torch.compile; CSV written row by row
# Call 2 (about 4 minutes):
#   import         as above
#   then two lanes side by side:
#     memcheck, racecheck, synccheck, initcheck, one after another: compute-sanitizer over
#                  cuda_smoke.py --sanitizer (the reduced set), which starts no case shortly before
#                  the step's limit so that the tool still prints its summary
#     compile      tests/test_cuda.py -k torch_compile (Conv-BN-ReLU-BN, default and reduce-overhead
#                  modes, both layouts: cold Inductor compiles with backward) WITHOUT a sanitizer:
#                  Inductor's compiles under a sanitizer do not fit the call
#
# Budget. A call's steps share a deadline (STAGE_BUDGET_S: call 1 270 s, call 2 210 s, from the
# script's start). In a sequence of steps each is planned a share (s) and gets what is left less
# the shares of the steps after it (so the time an early step leaves unused goes to the next):
#   call 1: import 25 | lanes until 45 s before the deadline: smoke 50 + tests_act 150,
#           tests_cuda 200, tests_opcheck 200 | bench 45 and what the lanes left
#   call 2: import 25 | lanes until the deadline: memcheck 50 + racecheck 45 + synccheck 35 +
#           initcheck 45, compile 175
# Each step runs under `timeout -s INT` (pytest prints its summary on SIGINT), then KILL 8 s
# later; before that the Python steps stop from inside: cuda_smoke.py --stop-at, and pytest's
# --stop-at from benchmarks/pytest_live_report.py (which also prints each failure as it
# happens). A call therefore ends within STAGE_BUDGET_S + about 10 s: give the machine's command
# a limit of 300 s (call 1) and 240 s (call 2).
# Measured 2026-12-08 without a GPU, on the 2-core CPU machine under load (other builds running),
# torch 2.14.1, a CPU-only library given as BNORM_PREBUILT (every GPU step failed fast or skipped):
# call 1 48 s wall (collecting the 1022 CUDA tests and running the 16 CPU-side ones), call 2 20 s;
# a library that does not fit stops a call after 10 s. For scale, the CPU twins here:
# cuda_smoke.py --device cpu 676 runs in 27 s (--sanitizer: 152 runs, 19 s), the fused ops' CPU
# tests 147 in 16 s, opcheck's CPU cases 169 in 149 s (0.9 s each; its 204 CUDA cases should
# take no more each on the GPU machine, whose cores are faster and not shared). Test
# counts: tests_cuda 341, tests_act 477, tests_opcheck 204, compile 4; cuda_smoke 676 runs
# (--sanitizer 152). Nothing of this has run on a GPU yet: the shares are planned, not measured.
#
# Results, flat in RESULTS_DIR (at most 8 files, each under 16 MiB; checked at the end):
#   call 1: summary.txt setup.log smoke.log tests_act.log tests_cuda.log tests_opcheck.log
#           bench.log bench_quick.csv
#   call 2: summary.txt setup.log sanitizer_memcheck.log sanitizer_racecheck.log
#           sanitizer_synccheck.log sanitizer_initcheck.log compile.log
# The summary (one screen: each step's status, seconds, failure count and progress, the first
# failures) is printed last.
#
# Environment:
#   PYTHON=python3          interpreter
#   BNORM_PREBUILT=DIR      the prebuilt library and its build.txt (default <repo>/device_build)
#   STAGE_BUDGET_S          the call's deadline in seconds (defaults above)
#   COMPUTE_SANITIZER=PATH  the compute-sanitizer (default: on PATH, else $CUDA_HOME/bin/compute-sanitizer;
#                           the pip package nvidia-cuda-sanitizer-api has one in nvidia/cu13/bin)
#   CUDA_HOME=/usr/local/cuda
# A dry run without a GPU: build the library in place for the local torch, copy it with a
# build.txt (torch=, python=, archs=, sources=$(bash benchmarks/gpu_check.sh --fingerprint))
# into a folder and pass BNORM_PREBUILT=that-folder.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The sources the library is built from (every file under csrc/, and setup.py), as one short
# hash in any locale: the definition the set-up script's rebuild check uses.
fingerprint() {
  bash "$ROOT/.ci/setup_env.sh" --sources-fingerprint
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
# this script's files from an earlier run in the same folder
rm -f "$out"/{summary.txt,setup.log,smoke.log,tests_act.log,tests_cuda.log,tests_opcheck.log,bench.log,bench_quick.csv} \
  "$out"/{sanitizer_memcheck.log,sanitizer_racecheck.log,sanitizer_synccheck.log,sanitizer_initcheck.log,compile.log}

PY="${PYTHON:-python3}"
PREBUILT="${BNORM_PREBUILT:-$ROOT/device_build}"
# benchmarks/ for the pytest plugin pytest_live_report
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
unset BNORM_EXT_CUDA_SINGLE_READ BNORM_EXT_CUDA_TEST_REFUSE_COOPERATIVE
if [[ $stage == 1 ]]; then budget=${STAGE_BUDGET_S:-270}; else budget=${STAGE_BUDGET_S:-210}; fi
deadline=$((SECONDS + budget))
kill_grace=8
summary="$out/summary.txt"
steps_table=()
failure_lines=()
library="not set up"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Steps run one after another, or in lanes side by side (lane). Within a sequence each step is
# planned a share of seconds: the shares of the steps after it (reserved_after) are kept for them.
declare -A share
share=([import]=25 [smoke]=50 [tests_act]=150 [tests_cuda]=200 [tests_opcheck]=200 [bench]=45
  [memcheck]=50 [racecheck]=45 [synccheck]=35 [initcheck]=45 [compile]=175)
plan=()
reserved_after() {  # the shares of the steps in $plan after $1
  local name=$1 seen=0 sum=0 s
  for s in "${plan[@]}"; do
    ((seen)) && sum=$((sum + share[$s]))
    [[ $s == "$name" ]] && seen=1
  done
  echo $sum
}

# lane ID FUNCTION: runs FUNCTION (its steps) in the background; join_lanes waits for every lane
# and adds their rows to the summary, in the order the lanes were started.
lane_ids=()
lane_pids=()
lane() {
  local id=$1 fn=$2
  (
    steps_table=()
    failure_lines=()
    "$fn"
    printf '%s\n' "${steps_table[@]}" >"$tmp/lane_$id.rows"
    printf '%s\n' "${failure_lines[@]}" >"$tmp/lane_$id.fails"
  ) &
  lane_ids+=("$id")
  lane_pids+=($!)
}
join_lanes() {
  wait "${lane_pids[@]}"
  local id rows
  for id in "${lane_ids[@]}"; do
    mapfile -t rows < <(grep -v '^$' "$tmp/lane_$id.rows" 2>/dev/null)
    steps_table+=("${rows[@]}")
    mapfile -t rows < <(grep -v '^$' "$tmp/lane_$id.fails" 2>/dev/null)
    failure_lines+=("${rows[@]}")
  done
  lane_ids=()
  lane_pids=()
}

# failures_of KIND FILE: the failure count and up to 3 first failures (one per line after the count)
# of a step's output, by the kind of program that wrote it
failures_of() {
  local kind=$1 f=$2
  case $kind in
    smoke) { grep -c '^FAIL ' "$f"; grep -m3 '^FAIL ' "$f"; } ;;
    pytest) { grep '^!! FAILED ' "$f" | awk '{print $3}' | sort -u | wc -l; grep -m3 '^!! FAILED ' "$f" | cut -c4-; } ;;
    bench) { grep -c '  FAIL ' "$f"; grep -m3 '  FAIL ' "$f"; } ;;
    sanitizer)
      local n
      n=$(grep -h 'ERROR SUMMARY' "$f" | tail -n 1 | grep -o '[0-9][0-9]* error' | grep -o '[0-9]*')
      { echo "${n:--}"; grep -m3 '^========= [A-Z][a-z]' "$f" | grep -v 'ERROR SUMMARY\|COMPUTE-SANITIZER'; grep -m3 '^FAIL ' "$f"; } ;;
    *) echo - ;;
  esac
}

# the line of a step's output that says best how far it got
progress_of() {
  local kind=$1 f=$2 line=""
  case $kind in
    smoke|sanitizer) line=$(grep '^cuda_smoke' "$f" | tail -n 1) ;;
    pytest) line=$(grep -E '^-- (final|progress):|[0-9]+ (passed|failed|skipped|error)' "$f" | tail -n 1) ;;
    bench) line=$(grep '^bench_quick' "$f" | tail -n 1) ;;
  esac
  [[ -z "$line" ]] && line=$(grep -v '^\s*$\|^=== ' "$f" | tail -n 1)
  echo "$line" | sed 's/^-- //' | cut -c1-70
}

# step NAME LOG KIND CMD...: runs CMD (output appended to $out/LOG) with a limit of what is left of
# the call less the shares of the steps after it; in CMD's arguments @LIMIT@ becomes that limit and
# @STOP_AT@ the time (seconds since the epoch) after which CMD should start no new work; records
# the status, time, failure count and first failures (failures_of KIND) in the summary table.
step() {
  local name=$1 logfile=$out/$2 kind=$3
  shift 3
  local limit=$((deadline - SECONDS - $(reserved_after "$name") - kill_grace))
  if ((limit < 10)); then
    steps_table+=("$(printf '%-14s %-8s %5s %6s  %s' "$name" skipped - - "the call's time is spent")")
    return 99
  fi
  local margin=8
  [[ $name == compile ]] && margin=25  # a cold Inductor compile with backward takes about that
  [[ $kind == sanitizer ]] && margin=12  # the tool's teardown and report
  local stop_at=$(($(date +%s) + limit - margin))
  local args=() a
  for a in "$@"; do
    a=${a//@STOP_AT@/$stop_at}
    args+=("${a//@LIMIT@/$limit}")
  done
  local start=$SECONDS before
  : >>"$logfile"
  before=$(wc -l <"$logfile")
  local shown="${args[*]}"
  shown=${shown//$'\n'/ }
  echo "=== $name: ${shown:0:300} (limit ${limit} s, started $(date -u +%H:%M:%S))" >>"$logfile"
  timeout -s INT -k "$kill_grace" "$limit" "${args[@]}" >>"$logfile" 2>&1
  local rc=$?
  local took=$((SECONDS - start)) status=ok
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status="rc=$rc"
  ((rc == 126 || rc == 127)) && status="no-such-program"
  ((rc == 1)) && [[ $kind == smoke || $kind == pytest || $kind == bench ]] && status=failed
  ((rc == 3)) && [[ $kind == sanitizer ]] && status=errors
  [[ $kind == smoke || $kind == sanitizer || $kind == bench ]] && ((rc == 4)) && status=partial
  [[ $kind == pytest ]] && tail -n +"$((before + 1))" "$logfile" | grep -q 'time limit: no test starts' && status="partial"
  ((rc == 5)) && [[ $kind == pytest ]] && status="none-run"
  echo "=== $name: $status (rc $rc) after $took s" >>"$logfile"
  local section=$tmp/section_$name
  tail -n +"$((before + 1))" "$logfile" >"$section"
  local fails
  mapfile -t fails < <(failures_of "$kind" "$section")
  steps_table+=("$(printf '%-14s %-8s %4ss %6s  %s' "$name" "$status" "$took" "${fails[0]:--}" "$(progress_of "$kind" "$section")")")
  local f
  for f in "${fails[@]:1}"; do failure_lines+=("$name: ${f:0:150}"); done
  rm -f "$section"
  return $rc
}

kv() { grep -m1 "^$1=" "$PREBUILT/build.txt" 2>/dev/null | cut -d= -f2-; }

# Stops the call (exit 3) with the reason, summary written, when the prebuilt library does not fit.
refuse() {
  echo "prebuilt library not usable: $1" | tee -a "$out/setup.log"
  library="not usable: $1"
  steps_table+=("$(printf '%-14s %-8s %5s %6s  %s' "library" refused - - "${1:0:70}")")
  write_summary
  echo "== summary"
  cat "$summary"
  exit 3
}

# Puts the prebuilt bnorm_ext/_C*.so in place when it fits this machine; otherwise refuse().
setup_library() {
  local log=$out/setup.log
  local torch_here py_tag ext_suffix info
  # one interpreter start for the versions (an import of torch takes seconds)
  info=$("$PY" -c '
import sys, sysconfig, torch
try:
    import pytest
    pytest_version = pytest.__version__
except ImportError:
    pytest_version = "not installed"
print(torch.__version__, f"cpython-{sys.version_info[0]}{sys.version_info[1]}", sysconfig.get_config_var("EXT_SUFFIX"))
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| pytest", pytest_version)' 2>&1)
  read -r torch_here py_tag ext_suffix <<<"$(head -n 1 <<<"$info")"
  {
    date -u
    if command -v nvidia-smi >/dev/null; then
      echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
    else
      echo "gpu: (no nvidia-smi)"
    fi
    tail -n 1 <<<"$info"
    echo "prebuilt: $PREBUILT"
    cat "$PREBUILT/build.txt" 2>&1
  } >>"$log" 2>&1
  [[ "$ext_suffix" == .* ]] || refuse "$PY cannot import torch: $(tail -n 1 <<<"$info")"
  [[ -f "$PREBUILT/build.txt" ]] || refuse "no $PREBUILT/build.txt (make it with benchmarks/build_for_device.sh)"
  [[ "$(kv torch)" == "$torch_here" ]] || refuse "built for torch $(kv torch), this machine has $torch_here"
  [[ "$(kv python)" == "$py_tag" ]] || refuse "built for $(kv python), this machine has $py_tag"
  local here
  here=$(fingerprint)
  [[ "$(kv sources)" == "$here" ]] || refuse "built from other sources (fingerprint $(kv sources), commit $(kv commit); these sources: $here)"
  [[ -f "$PREBUILT/_C$ext_suffix" ]] || refuse "no $PREBUILT/_C$ext_suffix"
  # only this interpreter's library: a checkout may hold others (e.g. a local build for another Python)
  rm -f "bnorm_ext/_C$ext_suffix"
  cp "$PREBUILT/_C$ext_suffix" bnorm_ext/ || refuse "cannot copy the library into bnorm_ext/"
  library="prebuilt, commit $(kv commit), $(kv built)"
  echo "library: $library" >>"$log"
  export BNORM_ARCHS="$(kv archs)"
  local overall=$deadline
  deadline=$((SECONDS + share[import] + kill_grace))
  plan=(import)
  step import setup.log import "$PY" -c '
import os, torch, bnorm_ext
info = bnorm_ext.build_info()
print("bnorm_ext", bnorm_ext.__file__, info)
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device: every GPU step will fail or skip")
p = torch.cuda.get_device_properties(0)
cc = f"{p.major}.{p.minor}"
print(f"{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.shared_memory_per_block_optin // 1024} KiB shared "
      f"memory per block (opt-in), L2 {p.L2_cache_size >> 20} MiB, {p.total_memory >> 30} GiB")
archs = os.environ.get("BNORM_ARCHS", "").replace(";", " ").replace(",", " ").split()
if not info.get("cuda_compiled"):
    raise SystemExit("MISMATCH: the prebuilt library has no CUDA kernels")
if archs and not any(a.split("+")[0] == cc for a in archs):
    raise SystemExit(f"MISMATCH: the library is built for {archs}, the GPU is {cc}")
torch.ones(1, device="cuda").sum().item()
'
  local rc=$?
  deadline=$overall
  grep -q '^MISMATCH: ' "$log" && refuse "$(grep -m1 '^MISMATCH: ' "$log" | cut -c11-)"
  ((rc == 0)) || grep -q 'no CUDA device' "$log" || refuse "the prebuilt library does not import (see setup.log)"
  return 0
}

pytest_args=(-q -p no:cacheprovider -p pytest_live_report --stop-at @STOP_AT@ -rfE --tb=short --durations=10
  --maxfail=100 -o addopts="")

# Call 1: import; then three lanes side by side: smoke then the fused ops' tests | the plain
# ops' tests | opcheck; then the benchmark alone.
lane_smoke_act() {
  plan=(smoke tests_act)
  step smoke smoke.log smoke "$PY" benchmarks/cuda_smoke.py --stop-at @STOP_AT@
  step tests_act tests_act.log pytest "$PY" -m pytest "${pytest_args[@]}" tests/test_batch_norm_act.py -k cuda
}
lane_cuda() {
  plan=(tests_cuda)
  step tests_cuda tests_cuda.log pytest env BNORM_EXT_RUNSLOW=1 "$PY" -m pytest "${pytest_args[@]}" \
    tests/test_cuda.py tests/test_cuda_host_side.py tests/test_build.py -k "not torch_compile"
}
lane_opcheck() {
  plan=(tests_opcheck)
  step tests_opcheck tests_opcheck.log pytest "$PY" -m pytest "${pytest_args[@]}" tests/test_opcheck.py -k cuda
}
stage1() {
  local overall=$deadline
  # the lanes end share[bench] before the call's deadline
  deadline=$((overall - share[bench]))
  # NB: three processes share the CPU cores (their CPU reference computations)
  export OMP_NUM_THREADS=5
  lane smoke_act lane_smoke_act
  lane cuda lane_cuda
  lane opcheck lane_opcheck
  join_lanes
  unset OMP_NUM_THREADS
  deadline=$overall
  plan=(bench)
  step bench bench.log bench "$PY" benchmarks/bench_quick.py --csv "$out/bench_quick.csv"
}

# Call 2: import; then two lanes: the four sanitizers one after another | the torch.compile tests.
lane_sanitizers() {
  plan=(memcheck racecheck synccheck initcheck)
  local sanitizer
  sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
  # NB: no caching allocator, so an access past a tensor's end is outside any allocation
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  local filter=()
  "$sanitizer" --help 2>/dev/null | grep -q -- '--kernel-name' && filter=(--kernel-name kns=bnorm_ext)
  local tool
  for tool in memcheck racecheck synccheck initcheck; do
    # NB: initcheck sees every kernel, since writes by uninstrumented (torch) kernels would
    # look uninitialised to it; the others check bnorm_ext's kernels only, where the filter exists
    local f=("${filter[@]}")
    [[ $tool == initcheck ]] && f=()
    step "$tool" "sanitizer_$tool.log" sanitizer "$sanitizer" --tool "$tool" "${f[@]}" --error-exitcode 3 \
      --print-limit 50 "$PY" benchmarks/cuda_smoke.py --sanitizer --stop-at @STOP_AT@ --progress-every 10
  done
}
lane_compile() {
  plan=(compile)
  step compile compile.log pytest "$PY" -m pytest "${pytest_args[@]}" --progress-every 1 tests/test_cuda.py -k torch_compile
}
stage2() {
  local sanitizer
  sanitizer=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
  { echo "compute-sanitizer: $sanitizer"; "$sanitizer" --version 2>&1 | tail -n 2; } >>"$out/setup.log" 2>&1
  export OMP_NUM_THREADS=8
  lane sanitizers lane_sanitizers
  lane compile lane_compile
  join_lanes
}

write_summary() {
  {
    echo "gpu_check call $stage, $(date -u +%Y-%m-%dT%H:%M:%SZ), $SECONDS s of $budget s planned"
    grep -m1 '^gpu: ' "$out/setup.log"
    grep -m1 '^python ' "$out/setup.log"
    grep -m1 '^[^ ].*: sm_[0-9]*, [0-9]* SMs' "$out/setup.log"
    echo "library: $library"
    echo
    printf '%-14s %-8s %5s %6s  %s\n' step status time fails "progress / last line"
    printf '%s\n' "${steps_table[@]}"
    if ((${#failure_lines[@]})); then
      echo
      echo "first failures:"
      printf '  %s\n' "${failure_lines[@]:0:9}"
    fi
    if [[ $stage == 1 && -f "$out/bench.log" ]]; then
      echo
      awk '$2 == "plain" || $2 == "fused" {k = $1" "$2; n[k]++; if ($9 + 0 > 0) {s[k] += log($9); m[k]++}}
           END {for (k in n) printf "bench %-15s rows %3d, timed %3d, geomean ours/torch %s\n", k, n[k], m[k],
                                    m[k] ? sprintf("%.3f", exp(s[k] / m[k])) : "-"}' \
        "$out/bench.log" | sort
    fi
    if [[ $stage == 2 ]]; then
      echo
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
        printf '%-9s %s | in bnorm_ext kernels: %s\n' "$tool" "${result:-no ERROR SUMMARY: the tool did not finish}" "$ours"
      done
    fi
  } >"$summary"
}

# The files that go back: at most 8, flat, each under 16 MiB (a larger log keeps its first and
# last 7 MiB), 64 MiB in all.
check_results() {
  local f size n=0 total=0
  for f in "$out"/* "$out"/.[!.]*; do
    [[ -e $f ]] || continue
    if [[ -d $f || ! $(basename "$f") =~ ^[A-Za-z0-9._-]+$ ]]; then
      echo "results: $(basename "$f") is not a plain flat file: removed" | tee -a "$summary"
      rm -rf "$f"
      continue
    fi
    size=$(stat -c %s "$f")
    if ((size > 16 * 1024 * 1024 - 4096)); then
      { head -c $((7 << 20)) "$f"; printf '\n[... %d bytes cut ...]\n' $((size - (14 << 20))); tail -c $((7 << 20)) "$f"; } >"$f.cut"
      mv "$f.cut" "$f"
      echo "results: $(basename "$f") was $size bytes: cut to its first and last 7 MiB" >>"$summary"
      size=$(stat -c %s "$f")
    fi
    n=$((n + 1))
    total=$((total + size))
  done
  echo "results: $n files, $((total / 1024)) KiB in all$( ((n > 8)) && echo ' -- MORE THAN 8 FILES')" >>"$summary"
}

setup_library
"stage$stage"
write_summary
check_results
echo "== files in $out: $(cd "$out" && ls -l | awk 'NR > 1 {printf "%s (%s B) ", $9, $5}')"
echo "== summary"
cat "$summary"
