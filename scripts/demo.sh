#!/usr/bin/env bash
# Builds and runs the demo: an MLP trained on three 2-D spirals (examples/train_mlp.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ckpt_ensure_packages "${CKPT_BUILD_PACKAGES[@]}"

cmake --preset dev >/dev/null
cmake --build --preset dev --target train_mlp
./build/dev/examples/train_mlp "$@"
