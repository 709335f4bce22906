#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA device (under 8 minutes on an H100/H200):
# builds the CUDA tests and bench_cuda for sm_90, runs the tests (and, bounded, under
# compute-sanitizer's memcheck and racecheck), runs bench_cuda, runs the same
# MLP through PyTorch (bench/peers/torch_cuda.py), and prints one short table last.
#
# That machine has nvcc, CMake, ninja and PyTorch but no Debian packages: prepare .deps/ here
# first (bash scripts/gpu_deps.sh), then, with the device tool:
#   run(command="bash bench/gpu_check.sh", carry=[".deps"], timeout_s=540)
# Results land in $OUT (the device tool's folder) or build/gpu/out.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/build/gpu/out}
mkdir -p "$out"
start=$SECONDS
status=0
log() { printf '\n==== %s (%ds)\n' "$*" $((SECONDS - start)); }

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -2

log "configure and build (sm_90, Release)"
deps=$PWD/.deps/usr
[ -d "$deps" ] || { echo "no .deps/: run scripts/gpu_deps.sh on the dev machine and carry .deps"; exit 2; }
cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCKPT_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCKPT_WERROR=OFF -DCKPT_BUILD_EXAMPLES=OFF -DCMAKE_PREFIX_PATH="$deps" -DCKPT_NATIVE=OFF >"$out/configure.log" 2>&1 ||
  { tail -30 "$out/configure.log"; exit 1; }
cmake --build build/gpu --target test_cuda bench_cuda -j "$(nproc)" 2>&1 | tail -5
[ -x build/gpu/tests/test_cuda ] && [ -x build/gpu/bench/bench_cuda ] || { echo "build failed"; exit 1; }

log "test_cuda"
build/gpu/tests/test_cuda 2>&1 | tee "$out/test_cuda.txt" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# Out-of-bounds and uninitialised reads in the kernels (memcheck), races on the reductions'
# shared memory (racecheck): bounded, as the sanitizers run kernels many times slower. The test
# that provokes CUDA failures on purpose is left out of memcheck, which would report them.
if command -v compute-sanitizer >/dev/null; then
  sanitize() {  # tool, seconds, doctest filter
    log "compute-sanitizer --tool $1 (at most $2 s)"
    timeout "$2" compute-sanitizer --tool "$1" --error-exitcode 3 build/gpu/tests/test_cuda "$3" >"$out/$1.txt" 2>&1
    case $? in
      0) echo "$1: clean" ;;
      124) echo "$1: stopped at $2 s before the end, nothing reported until then (see $1.txt)" ;;
      *) echo "$1: errors"; grep -m 20 -E "=========|ERROR|Invalid" "$out/$1.txt"; status=1 ;;
    esac
  }
  sanitize memcheck 90 "--test-case-exclude=CUDA failures*"
  sanitize racecheck 45 "--test-case=products*"
fi

log "bench_cuda"
build/gpu/bench/bench_cuda --benchmark_min_time=1 --benchmark_out="$out/bench_cuda.json" --benchmark_out_format=json 2>&1 |
  tee "$out/bench_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

log "PyTorch, same model"
torch_json=""
if python3 bench/peers/torch_cuda.py --json "$out/torch_cuda.json"; then torch_json="$out/torch_cuda.json"; fi

log "table"
python3 bench/gpu_table.py "$out/bench_cuda.json" $torch_json | tee "$out/table.md"
exit $status
