#!/usr/bin/env bash
# Redis engine benchmarks (docs/BENCHMARKS.md, "The Redis engine"). Each part starts its own
# redis-server and stocksync processes on free ports, is bounded in time, and writes JSON to $OUT.
#
#   benches/redis.sh                  all parts
#   PARTS="ops load" benches/redis.sh  some of them
#
# Parts:
#   ops     acked ops/s at 1, 8 and 64 writers (`increase 1`, one op per write) through one
#           stocksync process, next to redis-benchmark running the same Lua script with EVALSHA
#           against the same Redis, in the same run; Redis with appendonly yes + appendfsync
#           always (what README asks of production).
#   relay   server CPU per delivered update, 1 process against 2 processes on one port: the
#           same subscribers and updates; the second process hears every change through Redis.
#   load    a process started on a Redis holding 1,000,000 SKUs: time to listening, and resident
#           memory per SKU.
#   fleet   live subscribers across N processes on one port (`--workers N`), each receiving
#           every update of its SKU at 1 update/s, from several load-tool processes (one SKU and
#           one publisher each) over 127.0.0.x source addresses; reports p50/p99 per tool.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/target/bench-redis}"
PARTS="${PARTS:-ops relay load fleet}"
DURATION="${DURATION:-5}"
RELAY_SUBSCRIBERS="${RELAY_SUBSCRIBERS:-1000}"
RELAY_RATE="${RELAY_RATE:-200}"
FLEET_WORKERS="${FLEET_WORKERS:-8}"
FLEET_TOOLS="${FLEET_TOOLS:-6}"
FLEET_SUBSCRIBERS="${FLEET_SUBSCRIBERS:-16700}"
FLEET_DURATION="${FLEET_DURATION:-20}"
TOKEN=bench
mkdir -p "$OUT"
command -v redis-server >/dev/null || { echo "redis-server not found: apt-get install redis-server" >&2; exit 1; }
command -v redis-benchmark >/dev/null || { echo "redis-benchmark not found: apt-get install redis-tools" >&2; exit 1; }

echo "== building (release)" >&2
cargo build --release --quiet --bin stocksync -p stocksync
cargo build --release --quiet -p stocksync-bench
target_dir="${CARGO_TARGET_DIR:-$root/target}"
bin="$target_dir/release/stocksync"
bench="$target_dir/release/stocksync-bench"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_redis DIR PORT: appendonly yes, appendfsync always.
start_redis() {
  mkdir -p "$1"
  redis-server --port "$2" --dir "$1" --save '' --appendonly yes --appendfsync always \
    --daemonize no --logfile "$1/redis.log" &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$2" ping >/dev/null 2>&1 && return; sleep 0.05; done
  echo "redis-server did not start" >&2; exit 1
}

# start_stocksync LOG ARGS...: waits for its "listening" line; the pid is left in $started_pid.
start_stocksync() {
  local log="$1"; shift
  "$bin" --write-token "$TOKEN" --data-dir none "$@" >"$log" 2>&1 &
  started_pid=$!
  pids+=("$started_pid")
  for _ in $(seq 600); do grep -q "listening on" "$log" && return; sleep 0.05; done
  echo "stocksync did not start: $(tail -3 "$log")" >&2; exit 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
json_field() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval('d'+sys.argv[2]))" "$@"; }

write_sha() {
  python3 - "$root/src/engine/redis/scripts.rs" <<'PY'
import hashlib, sys
text = open(sys.argv[1]).read()
start = text.index('pub const WRITE: &str = r#"') + len('pub const WRITE: &str = r#"')
print(hashlib.sha1(text[start:text.index('"#;', start)].encode()).hexdigest())
PY
}

part_ops() {
  local rport sport dir
  rport=$(free_port); sport=$(free_port); dir="$OUT/ops-redis"
  rm -rf "$dir"; start_redis "$dir" "$rport"
  start_stocksync "$OUT/ops-stocksync.log" --listen "127.0.0.1:$sport" --redis "redis://127.0.0.1:$rport"
  local sha; sha=$(write_sha)
  redis-cli -p "$rport" script exists "$sha" | grep -q 1 || { echo "script not loaded" >&2; exit 1; }
  local rb="rb{inventory}:"
  echo "| writers | stocksync acked ops/s | p99 ack (ms) | redis-benchmark EVALSHA ops/s | p99 (ms) | ratio |" >"$OUT/ops.md"
  echo "|---|---|---|---|---|---|" >>"$OUT/ops.md"
  for writers in 1 8 64; do
    "$bench" ops --addr "127.0.0.1:$sport" --token "$TOKEN" --writers "$writers" --skus 10000 \
      --skew 0 --mix increase --duration "$DURATION" --label "ops-$writers" >"$OUT/ops-$writers.json"
    local ours p99; ours=$(json_field "$OUT/ops-$writers.json" "['acked_per_s']")
    p99=$(json_field "$OUT/ops-$writers.json" "['ack_latency_us']['p99']")
    # As many requests as stocksync acked in the same time, so both run about as long.
    local n; n=$(python3 -c "print(max(2000, int(float('$ours') * $DURATION)))")
    redis-benchmark -p "$rport" -c "$writers" -n "$n" -r 10000 --csv \
      EVALSHA "$sha" 5 "${rb}stock" "${rb}changed" "${rb}seq" "${rb}epoch" "${rb}epoch" \
      "${rb}changes" 0 86400 rb-epoch 0 rb-origin 1 "sku-__rand_int__" increase 1 -1 \
      >"$OUT/ops-$writers-redis-benchmark.csv"
    local theirs their_p99
    theirs=$(tail -1 "$OUT/ops-$writers-redis-benchmark.csv" | cut -d, -f2 | tr -d '"')
    their_p99=$(tail -1 "$OUT/ops-$writers-redis-benchmark.csv" | cut -d, -f7 | tr -d '"')
    echo "| $writers | $ours | $(python3 -c "print(round($p99/1000,2))") | $theirs | $their_p99 | $(python3 -c "print(round(float('$ours')/float('$theirs'),2))") |" >>"$OUT/ops.md"
  done
  cat "$OUT/ops.md"
  cleanup; pids=()
}

# One fan-out run against the processes in $@ (pids); prints CPU ticks per 1,000 deliveries.
relay_run() {
  local label="$1" port="$2"; shift 2
  local before=0 after=0 p
  for p in "$@"; do before=$((before + $(cpu_ticks "$p"))); done
  "$bench" fanout --addr "127.0.0.1:$port" --token "$TOKEN" --subscribers "$RELAY_SUBSCRIBERS" --rate "$RELAY_RATE" \
    --duration "$DURATION" --label "$label" >"$OUT/relay-$label.json"
  for p in "$@"; do after=$((after + $(cpu_ticks "$p"))); done
  local deliveries; deliveries=$(json_field "$OUT/relay-$label.json" "['deliveries']")
  local p99; p99=$(json_field "$OUT/relay-$label.json" "['latency_us']['p99']")
  # clock ticks are 10 ms: ticks * 10 ms / deliveries = CPU per delivery.
  python3 -c "print('| $label | $deliveries | $((after - before)) | %.2f | %.2f |' % (($after-$before)*10000.0/$deliveries, $p99/1000))" >>"$OUT/relay.md"
}

part_relay() {
  echo "| processes | deliveries | server CPU ticks (10 ms) | server CPU µs per delivery | p99 (ms) |" >"$OUT/relay.md"
  echo "|---|---|---|---|---|" >>"$OUT/relay.md"
  for round in $(seq "${RELAY_ROUNDS:-3}"); do
    local rport sport dir
    rport=$(free_port); sport=$(free_port); dir="$OUT/relay-redis"
    rm -rf "$dir"; start_redis "$dir" "$rport"
    start_stocksync "$OUT/relay-a.log" --listen "127.0.0.1:$sport" --redis "redis://127.0.0.1:$rport"
    local a=$started_pid
    relay_run "one-process-r$round" "$sport" "$a"
    start_stocksync "$OUT/relay-b.log" --listen "127.0.0.1:$sport" --redis "redis://127.0.0.1:$rport"
    local b=$started_pid
    relay_run "two-processes-r$round" "$sport" "$a" "$b"
    cleanup; pids=()
  done
  cat "$OUT/relay.md"
}

part_load() {
  local rport dir skus=1000000
  rport=$(free_port); dir="$OUT/load-redis"
  rm -rf "$dir"; start_redis "$dir" "$rport"
  redis-cli -p "$rport" config set appendfsync no >/dev/null
  echo "== writing $skus SKUs into Redis" >&2
  python3 - "$skus" <<'PY' | redis-cli -p "$rport" --pipe >/dev/null
import sys
n = int(sys.argv[1])
out = sys.stdout.buffer
def cmd(*args):
    out.write(b"*%d\r\n" % len(args))
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out.write(b"$%d\r\n%s\r\n" % (len(a), a))
k = "stocksync:{inventory}:"
for start in range(0, n, 1000):
    hset = [k + "stock"]; zadd = [k + "changed"]
    for i in range(start, min(n, start + 1000)):
        hset += ["sku-%07d" % i, "%d 0 1" % (i % 1000 + 1)]
        zadd += [str(i + 1), "sku-%07d" % i]
    cmd("HSET", *hset); cmd("ZADD", *zadd)
cmd("SET", k + "seq", str(n)); cmd("SET", k + "epoch", "bench-epoch")
PY
  redis-cli -p "$rport" config set appendfsync always >/dev/null
  local sport; sport=$(free_port)
  # Baseline: an empty inventory under another prefix.
  start_stocksync "$OUT/load-empty.log" --listen "127.0.0.1:$sport" --redis "redis://127.0.0.1:$rport" --redis-prefix empty:
  sleep 0.5; local rss_empty; rss_empty=$(rss_kib "$started_pid"); kill "$started_pid"
  local t0 t1; t0=$(date +%s.%N)
  sport=$(free_port)
  start_stocksync "$OUT/load-full.log" --listen "127.0.0.1:$sport" --redis "redis://127.0.0.1:$rport"
  t1=$(date +%s.%N)
  sleep 0.5
  local rss_full; rss_full=$(rss_kib "$started_pid")
  curl -s "127.0.0.1:$sport/stock/sku-0999999" >"$OUT/load-read.json"
  python3 - "$t0" "$t1" "$rss_empty" "$rss_full" "$skus" >"$OUT/load.md" <<'PY'
import sys
t0, t1, empty, full, n = map(float, sys.argv[1:])
print("| SKUs | start to listening (s) | RSS empty (MiB) | RSS loaded (MiB) | bytes per SKU |")
print("|---|---|---|---|---|")
print("| %d | %.2f | %.1f | %.1f | %.0f |" % (n, t1 - t0, empty / 1024, full / 1024, (full - empty) * 1024 / n))
PY
  grep "loaded" "$OUT/load-full.log" >>"$OUT/load.md" || true
  cat "$OUT/load.md" "$OUT/load-read.json"
  cleanup; pids=()
}

part_fleet() {
  local rport sport dir
  rport=$(free_port); sport=$(free_port); dir="$OUT/fleet-redis"
  rm -rf "$dir"; start_redis "$dir" "$rport"
  "$bin" --write-token "$TOKEN" --data-dir none --listen "127.0.0.1:$sport" \
    --redis "redis://127.0.0.1:$rport" --workers "$FLEET_WORKERS" >"$OUT/fleet-stocksync.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    [[ $(grep -c "listening on" "$OUT/fleet-stocksync.log") -ge $FLEET_WORKERS ]] && break; sleep 0.05
  done
  local tools=() i
  for i in $(seq 1 "$FLEET_TOOLS"); do
    # Two source addresses per tool: ~28k ephemeral ports each, far more than a tool opens.
    "$bench" fanout --addr "127.0.0.1:$sport" --token "$TOKEN" --subscribers "$FLEET_SUBSCRIBERS" \
      --rate 1 --duration "$FLEET_DURATION" --sku "fleet-$i" --subscribe-sku \
      --sources 2 --source-first $((2 * i)) --label "fleet-$i" --warmup-timeout 120 \
      >"$OUT/fleet-$i.json" 2>"$OUT/fleet-$i.log" &
    tools+=($!)
  done
  for p in "${tools[@]}"; do wait "$p" || true; done
  python3 - "$OUT" "$FLEET_TOOLS" "$FLEET_WORKERS" >"$OUT/fleet.md" <<'PY'
import json, sys
out, tools, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows, total, delivered, expected = [], 0, 0, 0
for i in range(1, tools + 1):
    try:
        d = json.load(open("%s/fleet-%d.json" % (out, i)))
    except Exception as e:
        rows.append("| fleet-%d | failed: %s |||||" % (i, e)); continue
    total += d["subscribers"]; delivered += d["deliveries"]; expected += d["deliveries_expected"]
    l = d["latency_us"]
    rows.append("| fleet-%d | %d | %d / %d | %d | %.2f | %.2f |" % (
        i, d["subscribers"], d["deliveries"], d["deliveries_expected"], d["missing"],
        l["p50"] / 1000, l["p99"] / 1000))
print("%d workers, %d live subscribers in all, %d of %d deliveries\n" % (workers, total, delivered, expected))
print("| tool | subscribers | delivered / expected | missing | p50 (ms) | p99 (ms) |")
print("|---|---|---|---|---|---|")
print("\n".join(rows))
PY
  cat "$OUT/fleet.md"
  cleanup; pids=()
}

for part in $PARTS; do
  echo "== $part" >&2
  "part_$part"
done
