#!/usr/bin/env bash
# A/B comparison of two stocksync binaries, interleaved in one run (A, B, A, B, ...), so that
# machine noise hits both alike; reports each run and the median ratio B/A per scenario.
#
#   benches/ab.sh OLD_BINARY NEW_BINARY          (ROUNDS=3 DURATION=5 by default)
#
# Scenarios (embedded engine, --data-dir none, server on CPU 0 and the load tool on CPU 1):
#   fanout-1k / fanout-10k   subscribers on `*`, one publisher, at most 8 updates in flight
#                            (one update per loop turn: the regime users live in)
#   ops-64                   64 writers, one write each in flight (`increase 1`)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
A="$1"; B="$2"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
OUT="${OUT:-$root/target/bench-ab}"
mkdir -p "$OUT"
cargo build --release --quiet -p stocksync-bench
bench="${CARGO_TARGET_DIR:-$root/target}/release/stocksync-bench"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_one() { # BINARY LABEL SCENARIO
  local port log pid; port=$(free_port); log="$OUT/$2-$3.log"
  taskset -c 0 "$1" --listen "127.0.0.1:$port" --data-dir none --write-token bench >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do grep -q "listening on" "$log" && break; sleep 0.05; done
  case "$3" in
    fanout-1k) taskset -c 1 "$bench" fanout --addr "127.0.0.1:$port" --token bench \
        --subscribers 1000 --window 8 --duration "$DURATION" --label "$2-$3" ;;
    fanout-10k) taskset -c 1 "$bench" fanout --addr "127.0.0.1:$port" --token bench \
        --subscribers 10000 --sources 2 --window 8 --duration "$DURATION" --label "$2-$3" ;;
    ops-64) taskset -c 1 "$bench" ops --addr "127.0.0.1:$port" --token bench --writers 64 \
        --skus 10000 --mix increase --duration "$DURATION" --label "$2-$3" ;;
  esac 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); print(d.get('delivered_per_s', d.get('acked_per_s')))"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

echo "| scenario | round | A | B | B/A |"
echo "|---|---|---|---|---|"
for scenario in fanout-1k fanout-10k ops-64; do
  ratios=()
  for round in $(seq "$ROUNDS"); do
    a=$(run_one "$A" A "$scenario"); b=$(run_one "$B" B "$scenario")
    r=$(python3 -c "print(round($b/$a, 3))")
    ratios+=("$r")
    echo "| $scenario | $round | $a | $b | $r |"
  done
  echo "| $scenario | median | | | $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}') |"
done
