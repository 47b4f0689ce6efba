#!/usr/bin/env bash
# permessage-deflate on and off, measured in one run, interleaved (one round = every mode once, in
# turn), so that machine noise hits all modes alike; prints every run and the medians.
#
#   benches/deflate.sh [STOCKSYNC_BINARY]       (ROUNDS=3 DURATION=5 by default)
#
# SCENARIOS="fanout-1k fanout-10k" runs only those. The order of the modes rotates from round
# to round, so that a mode is not always the first one after a quiet (or busy) spell.
#
# One release stocksync (embedded engine, --data-dir none), a fresh process per run, on CPU 0;
# the load tool on CPU 1. Modes:
#   plain     server --compression on, tool offers nothing
#   deflate   server --compression on, every connection offers permessage-deflate (and agrees)
#   declined  server --compression off, every connection offers (the server declines)
# Scenarios:
#   fanout-1k / fanout-10k   subscribers on `*`, one publisher, at most 8 updates in flight
#   idle-10k                 10k connections subscribed to `*`, server RSS growth per connection
#   snapshot-10k             one connection subscribing to `*` over 10k SKUs: bytes on the wire
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
target="${CARGO_TARGET_DIR:-$root/target}"
OUT="${OUT:-$target/bench-deflate}"
mkdir -p "$OUT"
cargo build --release --quiet -p stocksync --bin stocksync
cargo build --release --quiet -p stocksync-bench
server="${1:-$target/release/stocksync}"
bench="$target/release/stocksync-bench"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

pid=""; port=""
start_server() { # COMPRESSION LOG
  port=$(free_port)
  taskset -c 0 "$server" --listen "127.0.0.1:$port" --data-dir none --write-token bench \
    --compression "$1" >"$2" 2>&1 &
  pid=$!
  for _ in $(seq 200); do grep -q "listening on" "$2" && break; sleep 0.05; done
}
stop_server() { kill "$pid"; wait "$pid" 2>/dev/null || true; }

run_one() { # MODE SCENARIO -> one number (and the JSON summary in $OUT)
  local compression=on offer=() log="$OUT/$1-$2.server.log" json="$OUT/$1-$2.json"
  [ "$1" = declined ] && compression=off
  [ "$1" != plain ] && offer=(--deflate)
  start_server "$compression" "$log"
  local common=(--addr "127.0.0.1:$port" --label "$1-$2" --output "$json")
  case "$2" in
    fanout-1k) taskset -c 1 "$bench" fanout "${common[@]}" --token bench "${offer[@]}" \
        --subscribers 1000 --window 8 --duration "$DURATION" >/dev/null 2>&1
      field "d['delivered_per_s'], d['deflate']['negotiated'], d['missing']" <"$json" ;;
    fanout-10k) taskset -c 1 "$bench" fanout "${common[@]}" --token bench "${offer[@]}" \
        --subscribers 10000 --sources 2 --window 8 --duration "$DURATION" >/dev/null 2>&1
      field "d['delivered_per_s'], d['deflate']['negotiated'], d['missing']" <"$json" ;;
    idle-10k) taskset -c 1 "$bench" idle "${common[@]}" "${offer[@]}" --connections 10000 \
        --sources 2 --server-pid "$pid" --settle 3 >/dev/null 2>&1
      field "d['server_bytes_per_connection'], d['deflate']['negotiated'], d['connections']" <"$json" ;;
    snapshot-10k)
      # 10k SKUs set by the ops scenario's setup, then one subscriber to `*`.
      taskset -c 1 "$bench" ops --addr "127.0.0.1:$port" --token bench --writers 1 \
        --skus 10000 --mix increase --duration 1 >/dev/null 2>&1
      taskset -c 1 "$bench" idle "${common[@]}" "${offer[@]}" --connections 1 --settle 2 \
        >/dev/null 2>&1
      field "d['bytes_read'], d['deflate']['compressed_messages'], d['deflate']['inflated_bytes']" <"$json" ;;
  esac
  stop_server
}

median() { sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

echo "| scenario | round | mode | result | deflate negotiated | check |"
echo "|---|---|---|---|---|---|"
for scenario in ${SCENARIOS:-fanout-1k fanout-10k idle-10k snapshot-10k}; do
  modes=(plain deflate declined)
  [ "$scenario" = idle-10k ] && modes=(plain deflate)
  [ "$scenario" = snapshot-10k ] && modes=(plain deflate)
  rounds="$ROUNDS"; [ "$scenario" = snapshot-10k ] && rounds=1
  declare -A values=()
  for round in $(seq "$rounds"); do
    shift_by=$(( (round - 1) % ${#modes[@]} ))
    for mode in "${modes[@]:shift_by}" "${modes[@]:0:shift_by}"; do
      read -r value negotiated check < <(run_one "$mode" "$scenario")
      values[$mode]+="$value "
      echo "| $scenario | $round | $mode | $value | $negotiated | $check |"
    done
  done
  for mode in "${modes[@]}"; do
    echo "| $scenario | median | $mode | $(printf '%s\n' ${values[$mode]} | median) | | |"
  done
  unset values
done
