#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA device (under 8 minutes on an H100/H200):
# builds the CUDA tests and bench_cuda for sm_90, runs the tests, runs bench_cuda, runs the same
# MLP through PyTorch (bench/peers/torch_cuda.py), runs the tests under compute-sanitizer's
# memcheck and racecheck in the time left, and prints one short table last.
#
# That machine has nvcc, CMake, ninja and PyTorch but no Debian packages: prepare .deps/ here
# first (bash scripts/gpu_deps.sh), then, with the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".deps"], timeout_s=540)
# Results land in $OUT (the device tool's folder) or build/gpu/out, at most 8 files (the tool's
# limit): build.log, test_cuda.txt, bench_cuda.json, torch_cuda.json, table.md, memcheck.txt,
# racecheck.txt, and configure.log when configuring fails. table.md is written as soon as the
# figures are in, so a call cut short still brings it back.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/build/gpu/out}
mkdir -p "$out"
export PATH=$PATH:/usr/local/cuda/bin  # nvcc and compute-sanitizer, where the toolkit is not on PATH
start=$SECONDS
budget=${GPU_CHECK_SECONDS:-480}  # the whole script; the call's limit is 540 s
status=0
results=()  # one line per check, printed under the table
log() { printf '\n==== %s (%ds)\n' "$*" $((SECONDS - start)); }
# A step's time limit: its own, or what is left of the budget if that is less.
limit() {
  local left=$((budget - (SECONDS - start)))
  left=$((left < 1 ? 1 : left))  # timeout 0 would mean no limit at all
  echo $(($1 < left ? $1 : left))
}

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
command -v nvcc >/dev/null || { echo "nvcc not found"; exit 2; }
nvcc --version | tail -2

log "configure and build (sm_90, Release)"
mkdir -p build
deps=$PWD/.deps/usr
[ -d "$deps" ] || { echo "no .deps/: run scripts/gpu_deps.sh on the dev machine and carry .deps"; exit 2; }
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCKPT_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCKPT_WERROR=OFF -DCKPT_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$deps" -DCKPT_NATIVE=OFF >build/gpu-configure.log 2>&1 ||
  { cp build/gpu-configure.log "$out/configure.log"; tail -30 "$out/configure.log"; exit 1; }
# -k 0: a failure in one target does not stop the other; the compiler's errors are kept.
timeout -k 5 "$(limit 240)" cmake --build build/gpu --target test_cuda bench_cuda -j "$(nproc)" -- -k 0 >"$out/build.log" 2>&1 ||
  { grep -m 30 -E "error|FAILED" "$out/build.log"; results+=("build: FAILED (see build.log)"); status=1; }
tail -3 "$out/build.log"

# Each step has a time limit, so that a hang leaves the rest of the call to the others.
if [ -x build/gpu/tests/test_cuda ]; then
  log "test_cuda (at most $(limit 150) s)"
  timeout -k 5 "$(limit 150)" build/gpu/tests/test_cuda 2>&1 | tee "$out/test_cuda.txt" | tail -15
  rc=${PIPESTATUS[0]}
  case $rc in
    0) results+=("test_cuda: passed") ;;
    77) results+=("test_cuda: skipped, no usable device (see above)"); status=1 ;;
    *) results+=("test_cuda: FAILED (exit $rc)"); status=1 ;;
  esac
else
  results+=("test_cuda: not built")
fi

if [ -x build/gpu/bench/bench_cuda ]; then
  log "bench_cuda (at most $(limit 200) s)"
  timeout -k 5 "$(limit 200)" build/gpu/bench/bench_cuda --benchmark_min_time=1 --benchmark_out="$out/bench_cuda.json" \
    --benchmark_out_format=json 2>&1 | tee build/gpu/bench_cuda.txt
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { results+=("bench_cuda: FAILED (exit $rc)"); status=1; }
fi

torch_json=""
if [ "$(limit 120)" -ge 30 ]; then
  log "PyTorch, same model (at most $(limit 120) s)"
  if timeout -k 5 "$(limit 120)" python3 bench/peers/torch_cuda.py --json "$out/torch_cuda.json"; then
    torch_json="$out/torch_cuda.json"
  else
    results+=("PyTorch: did not finish (see above)")
  fi
fi

have_table=0
if [ -s "$out/bench_cuda.json" ] && python3 bench/gpu_table.py "$out/bench_cuda.json" $torch_json >"$out/table.md"; then
  have_table=1
fi

# Out-of-bounds and uninitialised reads in the kernels (memcheck) and races on the reductions'
# shared memory (racecheck, on the two reduction kernels only), after the figures are in, each
# within its limit and what is left of the budget, as the sanitizers run kernels many times
# slower. Left out of memcheck: the test that provokes CUDA failures on purpose, the tests that
# time a spin kernel against the host, and the heavy multi-megabyte offload test. Exit code 3 is
# the sanitizer's finding; any other is the tests failing (or the tool not starting) under it.
if command -v compute-sanitizer >/dev/null; then
  sanitize() {  # tool, seconds, then compute-sanitizer options and doctest filter
    local tool=$1 lim
    lim=$(limit "$2")
    shift 2
    if [ "$lim" -lt 20 ]; then results+=("$tool: skipped, no time left"); return; fi
    log "compute-sanitizer --tool $tool (at most $lim s)"
    timeout -k 5 "$lim" compute-sanitizer --tool "$tool" --error-exitcode 3 "$@" >"$out/$tool.txt" 2>&1
    local rc=$?
    case $rc in
      0) results+=("$tool: clean") ;;
      3) results+=("$tool: ERRORS (see $tool.txt)"); grep -m 20 -E "=========|ERROR|Invalid" "$out/$tool.txt"; status=1 ;;
      124 | 137)
        if grep -qE "^========= (Invalid|Error|Race|.*hazard)" "$out/$tool.txt"; then
          results+=("$tool: ERRORS before it was stopped at $lim s (see $tool.txt)"); status=1
          grep -m 20 -E "^=========" "$out/$tool.txt"
        else
          results+=("$tool: nothing reported in $lim s, stopped before the end")
        fi ;;
      *) results+=("$tool: the tests failed or the tool did not start under it (exit $rc; see $tool.txt)"); tail -5 "$out/$tool.txt" ;;
    esac
    echo "${results[-1]}"
  }
  sanitize memcheck 90 --report-api-errors no build/gpu/tests/test_cuda \
    "--test-case-exclude=CUDA failures*,an upload*,upload staging*,offload with several*"
  sanitize racecheck 45 --report-api-errors no --kernel-name kns=sum build/gpu/tests/test_cuda "--test-case=products*"
else
  results+=("compute-sanitizer: not found, memcheck and racecheck not run")
fi

log "table"
if [ "$have_table" -eq 1 ]; then
  cat "$out/table.md"
else
  echo "no table: bench_cuda wrote no readable results"; status=1
fi
printf -- '- %s\n' "${results[@]}" | tee -a "$out/table.md"
exit $status
