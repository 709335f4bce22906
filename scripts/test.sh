#!/usr/bin/env bash
# Builds the 'dev' preset (Release: tests, benchmarks, examples) and runs the whole test suite.
# CKPT_PRESET=<preset> builds and tests another preset of CMakePresets.json instead (.ci/run
# runs this script with ci-gcc, so that the README's command is what CI checks).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
ckpt_ensure_packages "${CKPT_BUILD_PACKAGES[@]}"

preset=${CKPT_PRESET:-dev}
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset"
ctest --test-dir "build/$preset" --output-on-failure
