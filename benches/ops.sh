#!/usr/bin/env bash
# Durable writes side by side: stocksync's embedded engine (store + write-ahead log) next to
# redis-server with an append-only file, same machine, same run. Server pinned to CPU 0, load
# tool (stocksync-bench ops / redis-benchmark) to CPU 1. Writes JSON per run and a markdown
# table to $OUT (default target/bench-ops).
#
#   benches/ops.sh                                 3 interleaved rounds of every scenario (~2 min)
#   ROUNDS=1 DURATION=3 SCENARIOS=durable benches/ops.sh
#
# Scenarios (W closed-loop writers, each with one message in flight; Redis: redis-benchmark -c W):
#   durable   stocksync --fsync always, `increase 1` per message
#             vs redis-server --appendonly yes --appendfsync always, INCR
#   no-fsync  stocksync --fsync never vs redis-server --appendonly yes --appendfsync no
#   batch     stocksync --fsync always, a `stock_batch` of BATCH `increase 1` per message
#             vs redis-server --appendfsync always, INCR pipelined BATCH deep (-P BATCH): a
#             reference row, not the same contract (a pipeline is not one atomic message)
#
# Each run starts a fresh server on a fresh data directory under $OUT (keep $OUT on the disk you
# mean to measure: on tmpfs an fsync costs nothing). Rounds interleave the servers (redis,
# stocksync, redis, stocksync...) so a burst of load from other processes hits both alike; judge
# by the median of the per-round ratios. Per run: ops/s, ack latency p50/p99, the server's CPU
# (utime + stime of all its threads over the measured window, as a share of one core, and CPU
# microseconds per op) and, for stocksync, the growth of its /metrics counters over the window
# (fsyncs, log batches, socket writes per op). Every process is bounded in time and killed on exit.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/target/bench-ops}"
ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-5}"
SCENARIOS="${SCENARIOS:-durable no-fsync batch}"
WRITERS="${WRITERS:-64}"
BATCH="${BATCH:-10}"
# Keys spread like redis-benchmark -r 10000 (`counter:<0..9999>`), uniformly.
SKUS="${SKUS:-10000}"
TOKEN=bench
SERVER_CPU=0
TOOL_CPU=1
# As in benches/compare.sh: a higher CFS weight keeps other work off the pinned CPUs (root only).
NICE="${NICE:--15}"
if [[ "$(id -u)" != 0 ]]; then NICE=0; fi
on_server_cpu=(nice -n "$NICE" taskset -c "$SERVER_CPU")
on_tool_cpu=(nice -n "$NICE" taskset -c "$TOOL_CPU")

for tool in redis-server redis-benchmark redis-cli; do
  command -v "$tool" >/dev/null || {
    echo "$tool not found: apt-get install redis-server redis-tools" >&2
    exit 1
  }
done
command -v taskset >/dev/null || { echo "taskset not found: apt-get install util-linux" >&2; exit 1; }

mkdir -p "$OUT"
rm -rf "$OUT"/*.json "$OUT"/*.log "$OUT"/*.csv "$OUT"/*.info "$OUT"/data

echo "== building (release)" >&2
cargo build --release --quiet --bin stocksync -p stocksync
cargo build --release --quiet -p stocksync-bench
target_dir="${CARGO_TARGET_DIR:-$root/target}"
# Private copies: a rebuild during the run must not swap a binary under a running benchmark.
mkdir -p "$OUT/bin"
cp "$target_dir/release/stocksync" "$target_dir/release/stocksync-bench" "$OUT/bin/"
bin="$OUT/bin"
ticks_per_s=$(getconf CLK_TCK)

server_pid=""
tool_pid=""
stop_server() {
  if [[ -n "$server_pid" ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
cleanup() {
  if [[ -n "$tool_pid" ]]; then kill "$tool_pid" 2>/dev/null || true; fi
  stop_server
  jobs -p | xargs -r kill 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# bounded SECONDS CMD...: runs CMD in the background (so the EXIT trap can stop it), at most
# SECONDS, and returns its status.
bounded() {
  local seconds=$1
  shift
  timeout -k 5 "$seconds" "$@" &
  tool_pid=$!
  local status=0
  wait "$tool_pid" || status=$?
  tool_pid=""
  return "$status"
}

cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
# busy and total ticks of one CPU, from /proc/stat (busy: all but idle and iowait).
cpu_busy() { awk -v cpu="cpu$1" '$1 == cpu { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
now() { date +%s.%N; }

start_redis() {
  local dir=$1 port=$2 fsync=$3
  mkdir -p "$dir"
  "${on_server_cpu[@]}" redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save '' \
    --appendonly yes --appendfsync "$fsync" --daemonize no --logfile "$dir/redis.log" &
  server_pid=$!
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "redis-server did not start: $(tail -3 "$dir/redis.log")" >&2
  return 1
}

start_stocksync() {
  local dir=$1 port=$2 fsync=$3 log=$4
  mkdir -p "$dir"
  "${on_server_cpu[@]}" "$bin/stocksync" --listen "127.0.0.1:$port" --data-dir "$dir" \
    --fsync "$fsync" --write-token "$TOKEN" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 200); do
    grep -q "listening on" "$log" && return 0
    sleep 0.05
  done
  echo "stocksync did not start: $(tail -3 "$log")" >&2
  return 1
}

# The csv row of redis-benchmark: "INCR","rps","avg","min","p50","p95","p99","max" (ms).
csv_field() { tail -1 "$1" | cut -d, -f"$2" | tr -d '"'; }

# run_redis SCENARIO FSYNC PIPELINE
run_redis() {
  local scenario=$1 fsync=$2 pipeline=$3
  local name="$scenario.redis.r$round" dir="$OUT/data/$scenario.redis.r$round"
  port=$((port + 1))
  echo "-- $name (appendfsync $fsync, -P $pipeline)" >&2
  start_redis "$dir" "$port" "$fsync" || { stop_server; return 0; }
  local common=(-p "$port" -c "$WRITERS" -r "$SKUS" -P "$pipeline" --csv -t incr)
  # redis-benchmark stops after -n requests, not after a time: a short first run (also the
  # warm-up, like the ops tool's setup) measures the rate, and -n is that rate times DURATION.
  local calibration=$((20000 * pipeline))
  local started ended
  started=$(now)
  if ! bounded 60 "${on_tool_cpu[@]}" redis-benchmark "${common[@]}" -n "$calibration" \
    >"$OUT/$name.calibration.csv" 2>"$OUT/$name.log"; then
    echo "   calibration failed: $(tail -1 "$OUT/$name.log")" >&2
    stop_server
    return 0
  fi
  ended=$(now)
  local requests
  requests=$(python3 -c "import sys; n, s = int(sys.argv[1]), float(sys.argv[2]) - float(sys.argv[3]); \
print(max(2000, int(n / max(s, 1e-3) * float(sys.argv[4]))))" "$calibration" "$ended" "$started" "$DURATION")
  redis-cli -p "$port" info stats >"$OUT/$name.before.info"
  local ticks_before ticks_after status=0
  ticks_before=$(cpu_ticks "$server_pid")
  local tool_cpu_before tool_cpu_after server_cpu_before server_cpu_after
  tool_cpu_before=$(cpu_busy "$TOOL_CPU")
  server_cpu_before=$(cpu_busy "$SERVER_CPU")
  started=$(now)
  bounded $((DURATION * 4 + 30)) "${on_tool_cpu[@]}" redis-benchmark "${common[@]}" -n "$requests" \
    >"$OUT/$name.csv" 2>>"$OUT/$name.log" || status=$?
  ended=$(now)
  tool_cpu_after=$(cpu_busy "$TOOL_CPU")
  server_cpu_after=$(cpu_busy "$SERVER_CPU")
  ticks_after=$(cpu_ticks "$server_pid")
  redis-cli -p "$port" info stats >"$OUT/$name.after.info"
  stop_server
  rm -rf "$dir"
  if [[ "$status" != 0 ]]; then
    echo "   redis-benchmark failed ($status): $(tail -1 "$OUT/$name.log")" >&2
    return 0
  fi
  python3 - "$OUT/$name" "$scenario" "$round" "$fsync" "$pipeline" "$requests" "$started" "$ended" \
    "$ticks_before" "$ticks_after" "$ticks_per_s" "$tool_cpu_before" "$tool_cpu_after" \
    "$server_cpu_before" "$server_cpu_after" <<'PY'
import csv, json, sys
base, scenario, round_, fsync, pipeline, requests, started, ended, t0, t1, hz, c0, c1, s0, s1 = sys.argv[1:]
(busy0, total0), (busy1, total1) = map(int, c0.split()), map(int, c1.split())
(sbusy0, stotal0), (sbusy1, stotal1) = map(int, s0.split()), map(int, s1.split())
row = list(csv.DictReader(open(base + ".csv")))[-1]
wall = float(ended) - float(started)
cpu_s = (int(t1) - int(t0)) / int(hz)
def info(path):
    values = {}
    for line in open(path):
        key, _, value = line.strip().partition(":")
        try:
            values[key] = float(value)
        except ValueError:
            pass
    return values
before, after = info(base + ".before.info"), info(base + ".after.info")
growth = {k: after[k] - before.get(k, 0) for k in after
          if k in ("total_commands_processed", "eventloop_cycles", "total_reads_processed",
                   "total_writes_processed", "total_net_input_bytes", "total_net_output_bytes")}
requests = int(requests)
result = {
    "server": "redis", "scenario": scenario, "round": int(round_),
    "appendfsync": fsync, "pipeline": int(pipeline), "requests": requests,
    "wall_s": round(wall, 3),
    "ops_per_s": float(row["rps"]),
    # With -P N, N commands go out in one write and come back in one read.
    "messages_per_s": float(row["rps"]) / int(pipeline),
    "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"]),
    "latency_note": "per command" if pipeline == "1" else "per command of a %s-deep pipeline" % pipeline,
    "server_cpu": {"cpu_s": round(cpu_s, 3), "core_share": round(cpu_s / wall, 3),
                   "cpu_us_per_op": round(cpu_s * 1e6 / requests, 3)},
    # redis-benchmark's own CPU is not at hand: this is its CPU's busy share, whatever ran there.
    "tool_cpu": {"cpu_busy_share": round((busy1 - busy0) / max(total1 - total0, 1), 3)},
    # Busy time of the server's CPU that was not the server: other processes and interrupts.
    "server_cpu_others_share": round(max(0, (sbusy1 - sbusy0) - (int(t1) - int(t0)))
                                     / max(stotal1 - stotal0, 1), 3),
    "info_stats_growth": growth,
}
json.dump(result, open(base + ".json", "w"))
PY
  tail -1 "$OUT/$name.csv" >&2
}

# run_stocksync SCENARIO FSYNC BATCH
run_stocksync() {
  local scenario=$1 fsync=$2 batch=$3
  local name="$scenario.stocksync.r$round" dir="$OUT/data/$scenario.stocksync.r$round"
  port=$((port + 1))
  echo "-- $name (--fsync $fsync, --batch $batch)" >&2
  start_stocksync "$dir" "$port" "$fsync" "$OUT/$name.server.log" || { stop_server; return 0; }
  local status=0 ticks_before ticks_after server_cpu_before server_cpu_after
  ticks_before=$(cpu_ticks "$server_pid")
  server_cpu_before=$(cpu_busy "$SERVER_CPU")
  # Setup (SKUS set in batches of 100) and connecting take a few seconds at most; 60 s bounds it.
  bounded $((DURATION + 90)) "${on_tool_cpu[@]}" "$bin/stocksync-bench" ops --addr "127.0.0.1:$port" \
    --token "$TOKEN" --writers "$WRITERS" --skus "$SKUS" --skew 0 --mix increase --batch "$batch" \
    --duration "$DURATION" --server-pid "$server_pid" --metrics --label "$name" \
    --output "$OUT/$name.tool.json" >/dev/null 2>"$OUT/$name.log" || status=$?
  server_cpu_after=$(cpu_busy "$SERVER_CPU")
  ticks_after=$(cpu_ticks "$server_pid")
  stop_server
  rm -rf "$dir"
  if [[ "$status" != 0 ]]; then
    echo "   ops failed ($status): $(tail -1 "$OUT/$name.log")" >&2
    return 0
  fi
  python3 - "$OUT/$name" "$scenario" "$round" "$fsync" "$batch" "$ticks_before" "$ticks_after" \
    "$server_cpu_before" "$server_cpu_after" <<'PY'
import json, sys
base, scenario, round_, fsync, batch, t0, t1, s0, s1 = sys.argv[1:]
(sbusy0, stotal0), (sbusy1, stotal1) = map(int, s0.split()), map(int, s1.split())
tool = json.load(open(base + ".tool.json"))
metrics = tool.get("server_metrics") or {}
# Per-op ratios use the server's own op count over the same window as its other counters.
ops = sum(v for k, v in metrics.items()
          if k.startswith("stocksync_ops_total{") and 'result="ok"' in k) if "error" not in metrics else 0
per_op = {}
if ops:
    for key, value in metrics.items():
        name = key.split("{")[0]
        if name in ("stocksync_log_fsyncs_total", "stocksync_log_batches_total",
                    "stocksync_socket_writes_total", "stocksync_messages_in_total",
                    "stocksync_log_records_total", "stocksync_socket_reads_total") \
                or "loop" in name or "wake" in name:
            per_op[name[len("stocksync_"):]] = value / ops
fsyncs = metrics.get("stocksync_log_fsyncs_total", 0)
result = {
    "server": "stocksync", "scenario": scenario, "round": int(round_),
    "fsync": fsync, "batch": int(batch),
    "wall_s": tool["elapsed_s"],
    "ops_per_s": tool["acked_per_s"],
    "messages_per_s": tool["messages_per_s"],
    "rejected": tool["rejected"],
    "p50_ms": tool["ack_latency_us"]["p50"] / 1000,
    "p99_ms": tool["ack_latency_us"]["p99"] / 1000,
    "latency_note": "per message",
    "server_cpu": tool.get("server_cpu"),
    "tool_cpu": tool.get("tool_cpu"),
    # Over the tool's whole run (setup included): busy time of the server's CPU that was not
    # the server, i.e. other processes and interrupts.
    "server_cpu_others_share": round(max(0, (sbusy1 - sbusy0) - (int(t1) - int(t0)))
                                     / max(stotal1 - stotal0, 1), 3),
    "server_ops_in_window": ops,
    "per_op": per_op,
    "ops_per_fsync": ops / fsyncs if fsyncs else None,
    "server_metrics_growth": metrics,
}
json.dump(result, open(base + ".json", "w"))
PY
  tail -1 "$OUT/$name.log" >&2
}

{
  echo "date $(date -u +%FT%TZ) rounds $ROUNDS duration $DURATION writers $WRITERS batch $BATCH skus $SKUS"
  echo "redis $(redis-server --version)"
  echo "data dir filesystem $(stat -f -c %T "$OUT") ($(df -P "$OUT" | awk 'NR == 2 {print $1}'))"
  echo "nice $NICE, server on cpu $SERVER_CPU, tool on cpu $TOOL_CPU"
} >"$OUT/setup.txt"
echo "loadavg per run" >"$OUT/loadavg.txt"

port=9400
for round in $(seq 1 "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    echo "== round $round $scenario ($(cut -d' ' -f1-3 /proc/loadavg) load before)" >&2
    echo "round $round $scenario $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/loadavg.txt"
    case "$scenario" in
      durable)
        run_redis "$scenario" always 1
        run_stocksync "$scenario" always 1
        ;;
      no-fsync)
        run_redis "$scenario" no 1
        run_stocksync "$scenario" never 1
        ;;
      batch)
        run_redis "$scenario" always "$BATCH"
        run_stocksync "$scenario" always "$BATCH"
        ;;
      *)
        echo "unknown scenario $scenario (durable, no-fsync, batch)" >&2
        exit 2
        ;;
    esac
  done
done
rm -rf "$OUT/data"

python3 - "$OUT" "$SCENARIOS" "$WRITERS" "$BATCH" >"$OUT/table.md" <<'PY'
import glob, json, os, statistics, sys
out, scenarios, writers, batch = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
titles = {
    "durable": "durable single ops: stocksync --fsync always vs Redis appendfsync always INCR",
    "no-fsync": "single ops, no fsync: stocksync --fsync never vs Redis appendfsync no INCR",
    "batch": "batches of %s: stocksync --fsync always, stock_batch of %s vs Redis appendfsync "
             "always INCR -P %s (reference: a pipeline, not an atomic batch)" % (batch, batch, batch),
}

def load(scenario, server):
    runs = {}
    for path in glob.glob(os.path.join(out, "%s.%s.r*.json" % (scenario, server))):
        if path.endswith(".tool.json"):
            continue
        try:
            d = json.load(open(path))
        except (OSError, ValueError):
            continue
        runs[d["round"]] = d
    return runs

def num(v):
    if v is None:
        return "n/a"
    if v >= 1e4:
        return "%.1fk" % (v / 1e3)
    return "%.0f" % v

def ms(v):
    return "n/a" if v is None else "%.2f" % v

def pct(d):
    c = (d or {}).get("server_cpu") or {}
    return "%.0f%%" % (100 * c["core_share"]) if "core_share" in c else "n/a"

def us(d):
    c = (d or {}).get("server_cpu") or {}
    return "%.2f" % c["cpu_us_per_op"] if "cpu_us_per_op" in c else "n/a"

def tool(d):
    c = (d or {}).get("tool_cpu") or {}
    share = c.get("core_share", c.get("cpu_busy_share"))
    return "%.0f%%" % (100 * share) if share is not None else "n/a"

def others(d):
    share = (d or {}).get("server_cpu_others_share")
    return "%.0f%%" % (100 * share) if share is not None else "n/a"

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None

def get(d, *path):
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d

print("%s closed-loop writers (stocksync-bench ops --mix increase; redis-benchmark -c %s -r 10000), "
      "server on cpu 0, tool on cpu 1; CPU is the server's utime+stime over the measured window "
      "as a share of one core. Latency: per acked message (stocksync), per command (Redis). "
      "Tool CPU: stocksync-bench's own share of a core; for redis-benchmark, how busy cpu 1 was "
      "(its own CPU is not at hand); near 100%% means the tool, not the server, set the pace. "
      "cpu 0 others: how busy the server's CPU was with anything but the server (other processes, "
      "interrupts): a round where it is high was disturbed."
      % (writers, writers))
print()
print("| scenario | round | Redis ops/s | stocksync ops/s | stocksync / Redis | stocksync messages/s "
      "| Redis p50 / p99 ms | stocksync p50 / p99 ms | Redis CPU | stocksync CPU "
      "| Redis CPU µs/op | stocksync CPU µs/op | tool CPU Redis / stocksync "
      "| cpu 0 others Redis / stocksync |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for scenario in scenarios:
    redis, ours = load(scenario, "redis"), load(scenario, "stocksync")
    rounds = sorted(set(redis) | set(ours))
    ratios = []
    for r in rounds:
        a, b = ours.get(r), redis.get(r)
        ratio = a["ops_per_s"] / b["ops_per_s"] if a and b and b["ops_per_s"] else None
        ratios.append(ratio)
        print("| %s | %d | %s | %s | %s | %s | %s / %s | %s / %s | %s | %s | %s | %s | %s / %s | %s / %s |" % (
            scenario, r, num(get(b, "ops_per_s")), num(get(a, "ops_per_s")),
            "%.2fx" % ratio if ratio else "n/a", num(get(a, "messages_per_s")),
            ms(get(b, "p50_ms")), ms(get(b, "p99_ms")), ms(get(a, "p50_ms")), ms(get(a, "p99_ms")),
            pct(b), pct(a), us(b), us(a), tool(b), tool(a), others(b), others(a)))
    if rounds:
        def m(runs, *path):
            return med([get(d, *path) for d in runs.values()])
        share = lambda runs: m(runs, "server_cpu", "core_share")
        cpu_us = lambda runs: m(runs, "server_cpu", "cpu_us_per_op")
        ratio = med(ratios)
        print("| **%s** | **median** | %s | %s | **%s** | %s | %s / %s | %s / %s | %s | %s | %s | %s | | |" % (
            scenario, num(m(redis, "ops_per_s")), num(m(ours, "ops_per_s")),
            "%.2fx" % ratio if ratio else "n/a", num(m(ours, "messages_per_s")),
            ms(m(redis, "p50_ms")), ms(m(redis, "p99_ms")), ms(m(ours, "p50_ms")), ms(m(ours, "p99_ms")),
            "%.0f%%" % (100 * share(redis)) if share(redis) is not None else "n/a",
            "%.0f%%" % (100 * share(ours)) if share(ours) is not None else "n/a",
            "%.2f" % cpu_us(redis) if cpu_us(redis) is not None else "n/a",
            "%.2f" % cpu_us(ours) if cpu_us(ours) is not None else "n/a"))
print()
print("Median ratio stocksync / Redis is the median of the per-round ratios.")
print()
for scenario in scenarios:
    print("- %s: %s" % (scenario, titles.get(scenario, scenario)))
print()
print("stocksync per op, from the growth of its /metrics counters over the measured window "
      "(ops = stocksync_ops_total with result ok):")
print()
extra = sorted({k for s in scenarios for d in load(s, "stocksync").values() for k in d.get("per_op", {})}
               - {"log_fsyncs_total", "log_batches_total", "socket_writes_total",
                  "messages_in_total", "log_records_total"})
print("| scenario | round | ops | fsyncs/op | ops/fsync | log batches/op | socket writes/op "
      "| messages in/op | Redis commands/op (INFO) |" + "".join(" %s/op |" % k for k in extra))
print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(extra))
for scenario in scenarios:
    redis, ours = load(scenario, "redis"), load(scenario, "stocksync")
    for r in sorted(ours):
        d = ours[r]
        p = d.get("per_op", {})
        f = lambda k: "%.4f" % p[k] if k in p else "n/a"
        b = redis.get(r)
        cmds = get(b, "info_stats_growth", "total_commands_processed")
        rcmds = "%.3f" % (cmds / b["requests"]) if cmds and b.get("requests") else "n/a"
        opf = d.get("ops_per_fsync")
        print("| %s | %d | %d | %s | %s | %s | %s | %s | %s |%s" % (
            scenario, r, d.get("server_ops_in_window", 0), f("log_fsyncs_total"),
            "%.1f" % opf if opf else "n/a", f("log_batches_total"), f("socket_writes_total"),
            f("messages_in_total"), rcmds, "".join(" %s |" % f(k) for k in extra)))
PY
cat "$OUT/setup.txt"
echo
cat "$OUT/table.md"
