#!/bin/bash
# Where a step's time goes, both sides: perf record -g of peer_ckpt and torch_peer.py on one
# configuration, one policy, 1 thread; prints each side's top symbols (self time).
#   bash bench/peers/profile.sh [mlp|lora] [depth] [width] [batch] [ckpt policy] [torch mode] [reps]
# Needs build-peers/bench/peer_ckpt (compare.sh builds it) and perf.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-mlp} depth=${2:-64} width=${3:-256} batch=${4:-64} policy=${5:-none} mode=${6:-none} reps=${7:-100}
out=build-peers/profile/${model}_L${depth}_w${width}_n${batch}
rm -rf "$out" && mkdir -p "$out"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
# The GEMM kernel compare.py picks: OpenBLAS's own, unless it takes the processor for an old
# core (Prescott on recent Xeons), where the newest kernel the processor runs is forced.
tuned=$(/usr/bin/python3 -c "__file__='bench/peers/compare.py'; exec(open(__file__).read().split('def load_avg')[0]); print(TUNED.get('OPENBLAS_CORETYPE', ''))")
[ -n "$tuned" ] && export OPENBLAS_CORETYPE=$tuned
build-peers/bench/peer_ckpt export "$out/data" --model "$model" --depth "$depth" --width "$width" --batch "$batch" --policies none >/dev/null
uptime
perf record -q -g -o "$out/ckpt.data" -- build-peers/bench/peer_ckpt time "$out/data" --policy "$policy" --reps "$reps" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print("ckpt  %s: median %.2f ms, cpu %.2f ms" % (d["policy"], d["median_ms"], d["cpu_median_ms"]))'
perf record -q -g -o "$out/torch.data" -- /usr/bin/python3 bench/peers/torch_peer.py time "$out/data" --mode "$mode" --reps "$reps" \
  | python3 -c 'import json,sys; d=json.load(sys.stdin); print("torch %s: median %.2f ms, cpu %.2f ms" % (d["policy"], d["median_ms"], d["cpu_median_ms"]))'
for side in ckpt torch; do
  echo "== $side: top symbols, self time (perf report --no-children)"
  perf report -i "$out/$side.data" --no-children --stdio --sort dso,symbol -g none --percent-limit 1.5 2>/dev/null \
    | grep -E '^ +[0-9]' | head -25
done
