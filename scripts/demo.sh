#!/usr/bin/env bash
# Builds and runs the main demo: one deep MLP trained under every checkpoint policy, printing
# per policy the step time, the peak memory, their ratios to `none`, and that the gradients
# are bit-for-bit those of `none` (examples/checkpoint_demo.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ckpt_ensure_packages "${CKPT_BUILD_PACKAGES[@]}"

cmake --preset dev >/dev/null
cmake --build --preset dev --target checkpoint_demo
./build/dev/examples/checkpoint_demo "$@"
