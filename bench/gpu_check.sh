#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA device (under 8 minutes on an H100/H200):
# builds the CUDA tests and bench_cuda for sm_90, runs the tests, runs bench_cuda, runs the same
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
