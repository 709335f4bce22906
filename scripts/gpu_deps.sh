#!/usr/bin/env bash
# Prepares .deps/ (git-ignored, about 12 MB) for bench/gpu_check.sh: the GPU machine has nvcc,
# CMake, ninja and PyTorch but no Debian packages and no network, so Eigen, doctest and Google
# Benchmark travel with the tree. Copies this machine's Debian packages' headers, CMake package
# files and libraries into .deps/usr, keeping their layout (their CMake files find the rest
# relative to themselves). Run it here, then carry .deps with the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
PKGS=(libeigen3-dev doctest-dev libbenchmark-dev libbenchmark1debian)
ckpt_ensure_packages "${PKGS[@]}"
rm -rf .deps
mkdir -p .deps
for p in "${PKGS[@]}"; do
  dpkg -L "$p" | while read -r f; do
    case "$f" in /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/*) continue ;; esac
    [ -f "$f" ] || continue  # regular files and links to them (copied as files: links do not travel)
    mkdir -p ".deps$(dirname "$f")"
    cp -L "$f" ".deps$f"
  done
done
du -sh .deps
