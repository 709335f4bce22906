#!/bin/bash
# Side by side with PyTorch: installs what it needs (Debian packages), builds ckpt's driver
# (Release, build-peers/), cross-checks the gradients and times both sides; writes
# bench/peers/results/{results.json,results.md,*.png}. Options go to compare.py
# (--threads 1,2  --rounds 2  --reps 15  --quick  --plots-only).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=/usr/bin/python3  # Debian's python3-torch lives there, not in a pyenv python3

if ! $PY -c 'import torch, matplotlib, numpy' 2>/dev/null; then
  for i in $(seq 1 30); do  # another apt-get may hold the dpkg lock: wait and retry
    if apt-get install -y python3-torch python3-matplotlib python3-numpy; then break; fi
    echo "compare.sh: apt-get failed (dpkg lock?), retrying in 20 s ($i/30)" >&2
    sleep 20
  done
  $PY -c 'import torch, matplotlib, numpy'
fi

cmake -S . -B build-peers -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCKPT_BUILD_TESTS=OFF -DCKPT_BUILD_EXAMPLES=OFF -DCKPT_BUILD_BENCHMARKS=ON >/dev/null
nice ninja -C build-peers -j1 peer_ckpt

export PEERS_COMMAND="bash bench/peers/compare.sh $*"
exec $PY bench/peers/compare.py --driver build-peers/bench/peer_ckpt --out bench/peers/results "$@"
