//! `ops`: W writers, each with one request in flight, doing reserve / release / commit / batch
//! (a checkout reserving 2-4 lines) on N SKUs chosen with Zipf skew `--skew` (0 = uniform,
//! ~1 = a few hot SKUs take most writes, as in a sale). Every SKU starts with `--stock` units, so
//! hot SKUs sell out and rejections appear, as they do in a real sale.
//!
//! stocksync-specific: measured from acks and errors (the peers do not ack). Reports acked ops/s,
//! ack latency and rejections by error code.
//!
//! `--mix increase --batch N`: every message is a `stock_batch` of N `increase 1` ops (N = 1 sends
//! the plain `stock_update`), so ops/s counts ops and messages/s counts messages (and acks).
//!
//! Given `--server-pid`, the server's CPU time (all its threads) over the measured window; given
//! `--metrics`, the growth of every counter of the server's `GET /metrics` (plain HTTP on
//! `--addr`) over the same window: fsyncs, log batches and socket writes per op come from these.

use crate::args::Args;
use crate::net::{Conn, Phase};
use crate::pool::{self, Looper};
use crate::stats;
use crate::wire;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub const FLAGS: &[&str] = &[
    "addr",
    "path",
    "token",
    "writers",
    "skus",
    "skew",
    "stock",
    "duration",
    "count",
    "label",
    "sources",
    "source-first",
    "connect-concurrency",
    "mix",
    "batch",
    "server-pid",
];

pub const SWITCHES: &[&str] = &["metrics"];

/// `--batch` at most: PROTOCOL.md allows 100 ops per `stock_batch` (`too_large` past that).
const BATCH_OPS_MAX: usize = 100;

/// How long each `GET /metrics` may take (connect, send, read) before the sample is given up.
const METRICS_TIMEOUT: Duration = Duration::from_secs(2);

/// A `/metrics` response larger than this is refused (the whole exposition is a few KiB).
const METRICS_BYTES_MAX: u64 = 1 << 20;

/// SKUs set per message during setup.
const SETUP_BATCH_SKUS: usize = 100;

#[derive(Default)]
struct Writer {
    sent_at: Option<Instant>,
    rng: u64,
}

struct Tally {
    measuring: bool,
    acked: u64,
    rejected: BTreeMap<String, u64>,
    histogram: hdrhistogram::Histogram<u64>,
    replies: u64,
}

/// The op mix and SKU choice.
struct Workload {
    cdf: Vec<f64>,
    sent: u64,
    count: u64,
    stop: bool,
    payload: Vec<u8>,
    /// `--mix increase`: every op is `increase 1` (never refused; the shape `redis-benchmark`
    /// runs against the same Lua script). Default `checkout`: the reserve/release/commit/batch mix.
    increase_only: bool,
    /// Ops per message with `increase_only`: 1 sends a `stock_update`, more a `stock_batch`.
    batch: usize,
}

impl Workload {
    fn sku(&self, rng: &mut u64) -> usize {
        let u = next_f64(rng);
        self.cdf
            .partition_point(|edge| *edge < u)
            .min(self.cdf.len() - 1)
    }

    /// Appends the next request frame to `out`; false once the run is over.
    fn next(&mut self, writer: &mut Writer, out: &mut Vec<u8>) -> bool {
        if self.stop || self.sent >= self.count {
            return false;
        }
        self.sent += 1;
        self.payload.clear();
        let roll = next_u64(&mut writer.rng) % 100;
        let sku = self.sku(&mut writer.rng);
        if self.increase_only {
            if self.batch == 1 {
                let _ = write_op(&mut self.payload, sku, "increase", 1);
            } else {
                let _ = write!(self.payload, r#"{{"type":"stock_batch","ops":["#);
                for line in 0..self.batch {
                    let sku = if line == 0 {
                        sku
                    } else {
                        self.sku(&mut writer.rng)
                    };
                    let comma = if line == 0 { "" } else { "," };
                    let _ = write!(
                        self.payload,
                        r#"{comma}{{"id":"sku-{sku}","action":"increase","change":1}}"#
                    );
                }
                let _ = write!(self.payload, "]}}");
            }
            let mask = (next_u64(&mut writer.rng) as u32).to_le_bytes();
            wire::encode_client_frame(out, wire::OPCODE_TEXT, &self.payload, mask);
            writer.sent_at = Some(Instant::now());
            return true;
        }
        let change = 1 + next_u64(&mut writer.rng) % 3;
        let _ = match roll {
            0..=39 => write_op(&mut self.payload, sku, "reserve", change),
            40..=59 => write_op(&mut self.payload, sku, "release", 1),
            60..=79 => write_op(&mut self.payload, sku, "commit", 1),
            _ => {
                let lines = 2 + next_u64(&mut writer.rng) % 3;
                let _ = write!(self.payload, r#"{{"type":"stock_batch","ops":["#);
                for line in 0..lines {
                    let sku = self.sku(&mut writer.rng);
                    let comma = if line == 0 { "" } else { "," };
                    let _ = write!(
                        self.payload,
                        r#"{comma}{{"id":"sku-{sku}","action":"reserve","change":1}}"#
                    );
                }
                write!(self.payload, "]}}")
            }
        };
        let mask = (next_u64(&mut writer.rng) as u32).to_le_bytes();
        wire::encode_client_frame(out, wire::OPCODE_TEXT, &self.payload, mask);
        writer.sent_at = Some(Instant::now());
        true
    }
}

fn write_op(out: &mut Vec<u8>, sku: usize, action: &str, change: u64) -> std::io::Result<()> {
    write!(
        out,
        r#"{{"type":"stock_update","stock":{{"id":"sku-{sku}","action":"{action}","change":{change}}}}}"#
    )
}

fn next_u64(state: &mut u64) -> u64 {
    // xorshift64*: plenty for choosing SKUs.
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn next_f64(state: &mut u64) -> f64 {
    (next_u64(state) >> 11) as f64 / (1u64 << 53) as f64
}

fn zipf_cdf(skus: usize, skew: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=skus)
        .map(|rank| 1.0 / (rank as f64).powf(skew))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut sum = 0.0;
    weights
        .iter()
        .map(|weight| {
            sum += weight / total;
            sum
        })
        .collect()
}

impl Tally {
    fn on_reply(&mut self, writer: &mut Writer, payload: &[u8], at: Instant) -> bool {
        let kind = wire::string_field(payload, "type");
        if !matches!(kind, Some("ack") | Some("error")) {
            return false;
        }
        let Some(sent_at) = writer.sent_at.take() else {
            return false;
        };
        self.replies += 1;
        if !self.measuring {
            return true;
        }
        let _ = self
            .histogram
            .record((at.saturating_duration_since(sent_at).as_nanos() as u64).max(1));
        if kind == Some("ack") {
            self.acked += 1;
        } else {
            let code = wire::string_field(payload, "code")
                .unwrap_or("?")
                .to_string();
            *self.rejected.entry(code).or_default() += 1;
        }
        true
    }
}

pub fn run(args: &Args) -> Result<Value, String> {
    let target = crate::target(args)?;
    let token = args.string("token", "");
    let path = crate::with_token(&args.string("path", "/ws"), &token);
    let writers: usize = args.get("writers", 64)?;
    let skus: usize = args.get::<usize>("skus", 1000)?.max(1);
    let skew: f64 = args.get("skew", 0.99)?;
    let stock: u64 = args.get("stock", 1000)?;
    let duration = Duration::from_secs_f64(args.get("duration", 10.0)?);
    let count: u64 = args.get("count", 100_000_000)?;
    let label = args.string("label", "server");
    let in_flight_max: usize = args.get("connect-concurrency", 256)?;
    let increase_only = match args.string("mix", "checkout").as_str() {
        "checkout" => false,
        "increase" => true,
        other => return Err(format!("--mix: `{other}` is not checkout or increase")),
    };
    let batch: usize = args.get("batch", 1)?;
    if !(1..=BATCH_OPS_MAX).contains(&batch) {
        return Err(format!("--batch: {batch} is not in 1..={BATCH_OPS_MAX}"));
    }
    if batch > 1 && !increase_only {
        return Err("--batch applies to --mix increase only".into());
    }
    let server_pid: Option<u32> = args.opt("server-pid")?;
    let metrics = args.switch("metrics");
    let cpu_at_start = stats::own_cpu();
    let mut looper = Looper::new()?;
    let mut conns: Vec<Conn<Writer>> = Vec::with_capacity(writers);
    let opened = pool::open_many(
        &mut looper,
        &mut conns,
        &target,
        0,
        writers,
        in_flight_max,
        Instant::now() + Duration::from_secs(60),
        &label,
        |index| {
            (
                path.clone(),
                Writer {
                    sent_at: None,
                    rng: 0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1),
                },
            )
        },
        |_| {},
        |_, _, _, _| {},
    );
    if opened.open == 0 {
        return Err(format!("no writer could connect: {:?}", looper.closes));
    }
    let mut tally = Tally {
        measuring: false,
        acked: 0,
        rejected: BTreeMap::new(),
        histogram: stats::latency_histogram(),
        replies: 0,
    };
    // Setup: writer 0 sets every SKU to `stock`, a batch at a time, waiting for each ack.
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    let first = conns
        .iter()
        .position(|conn| conn.phase == Phase::Open)
        .ok_or("no open writer")?;
    for chunk_start in (0..skus).step_by(SETUP_BATCH_SKUS) {
        let mut payload = Vec::from(&br#"{"type":"stock_batch","ops":["#[..]);
        for sku in chunk_start..(chunk_start + SETUP_BATCH_SKUS).min(skus) {
            let comma = if sku == chunk_start { "" } else { "," };
            let _ = write!(
                payload,
                r#"{comma}{{"id":"sku-{sku}","action":"set","quantity":{stock}}}"#
            );
        }
        payload.extend_from_slice(b"]}");
        let conn = &mut conns[first];
        wire::encode_client_frame(&mut conn.out, wire::OPCODE_TEXT, &payload, [3, 1, 4, 1]);
        conn.state.sent_at = Some(Instant::now());
        let _ = conn.flush();
        let replies_before = tally.replies;
        let mut setup_error = None;
        while tally.replies == replies_before && Instant::now() < setup_deadline {
            looper.turn(
                &mut conns[..],
                Duration::from_millis(50),
                |_| {},
                |writer, _, payload, at| {
                    if wire::string_field(payload, "type") == Some("error") {
                        setup_error = Some(String::from_utf8_lossy(payload).into_owned());
                    }
                    tally.on_reply(writer, payload, at);
                },
            );
        }
        if let Some(error) = setup_error {
            return Err(format!(
                "setup rejected (is --token a write token?): {error}"
            ));
        }
    }
    let mut workload = Workload {
        cdf: zipf_cdf(skus, skew),
        sent: 0,
        count,
        stop: false,
        payload: Vec::with_capacity(256),
        increase_only,
        batch,
    };
    let metrics_before = metrics.then(|| fetch_counters(target.addr));
    let server_cpu_before = server_pid.and_then(process_cpu);
    tally.measuring = true;
    let begin = Instant::now();
    for conn in conns.iter_mut().filter(|conn| conn.phase == Phase::Open) {
        workload.next(&mut conn.state, &mut conn.out);
        let _ = conn.flush();
    }
    let mut next_progress = begin + Duration::from_secs(1);
    let mut last_acked = 0;
    let until = begin + duration;
    while Instant::now() < until
        && !(workload.sent >= count && conns.iter().all(|c| c.state.sent_at.is_none()))
    {
        looper.turn(
            &mut conns[..],
            Duration::from_millis(50),
            |_| {},
            |writer, out, payload, at| {
                if tally.on_reply(writer, payload, at) {
                    workload.next(writer, out);
                }
            },
        );
        let now = Instant::now();
        if now >= next_progress {
            let rejected: u64 = tally.rejected.values().sum();
            eprintln!(
                "[{label}] t={:.0}s acked ops/s={} rejected={rejected} p99={:.0}us",
                (now - begin).as_secs_f64(),
                (tally.acked - last_acked) * batch as u64,
                tally.histogram.value_at_quantile(0.99) as f64 / 1000.0
            );
            last_acked = tally.acked;
            next_progress += Duration::from_secs(1);
        }
    }
    let elapsed = begin.elapsed();
    let server_cpu_after = server_pid.and_then(process_cpu);
    let metrics_after = metrics.then(|| fetch_counters(target.addr));
    workload.stop = true;
    let rejected: u64 = tally.rejected.values().sum();
    // A batch is acked or refused whole, so acked ops are acked messages times the batch size.
    let acked_ops = tally.acked * batch as u64;
    let seconds = elapsed.as_secs_f64();
    let server_cpu = match (server_cpu_before, server_cpu_after) {
        (Some(before), Some(after)) => {
            let cpu_s = (after - before).max(0.0);
            json!({
                "pid": server_pid,
                "cpu_s": stats::round3(cpu_s),
                "core_share": stats::round3(cpu_s / seconds.max(1e-9)),
                "cpu_us_per_op": stats::round3(cpu_s * 1e6 / (acked_ops.max(1) as f64)),
            })
        }
        _ => Value::Null,
    };
    let server_metrics = match (metrics_before, metrics_after) {
        (Some(Ok(before)), Some(Ok(after))) => json!(counter_growth(&before, &after)),
        (Some(Err(error)), _) | (_, Some(Err(error))) => json!({ "error": error }),
        _ => Value::Null,
    };
    Ok(json!({
        "scenario": "ops",
        "label": label,
        "writers": opened.open,
        "skus": skus,
        "skew": skew,
        "stock": stock,
        "batch": batch,
        "elapsed_s": stats::round3(seconds),
        // `acked` and `acked_per_s` count ops; `rejected` and the replies count messages.
        "acked": acked_ops,
        "acked_per_s": stats::round3(acked_ops as f64 / seconds),
        "messages_acked": tally.acked,
        "messages_per_s": stats::round3(tally.acked as f64 / seconds),
        "rejected": rejected,
        "replies_per_s": stats::round3((tally.acked + rejected) as f64 / seconds),
        "rejected_by_code": tally.rejected,
        "ack_latency_us": stats::latency_summary_us(&tally.histogram),
        "tool_cpu": stats::cpu_report(cpu_at_start, elapsed),
        "server_cpu": server_cpu,
        "server_metrics": server_metrics,
        "closes": looper.closes.to_json(),
    }))
}

/// User plus system CPU seconds of process `pid` (all its threads), from /proc/PID/stat.
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // proc(5): the command name in field 2 may hold spaces and parentheses, so count fields
    // after its closing ')'; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks_per_s = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks_per_s <= 0 {
        return None;
    }
    Some((utime + stime) as f64 / ticks_per_s as f64)
}

/// Every counter (`*_total`, with its labels) of `GET /metrics` on `addr`.
fn fetch_counters(addr: SocketAddr) -> Result<BTreeMap<String, f64>, String> {
    let text = http_get(addr, "/metrics").map_err(|error| format!("GET /metrics: {error}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or("GET /metrics: no end of head")?;
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or("");
        return Err(format!("GET /metrics: `{status}`"));
    }
    Ok(parse_counters(body))
}

/// Counter samples of a Prometheus text exposition: `name{labels} value` lines whose name ends
/// in `_total`, keyed by name and labels as written.
fn parse_counters(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            if !name.ends_with("_total") {
                return None;
            }
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `after - before` of every counter that grew (a counter missing before counts from 0).
fn counter_growth(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(series, value)| (series, value - before.get(series).copied().unwrap_or(0.0)))
        .filter(|(_, growth)| *growth > 0.0)
        .map(|(series, growth)| (series.clone(), growth))
        .collect()
}

/// A blocking HTTP/1.1 GET with `Connection: close`; the whole response as text.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, METRICS_TIMEOUT)?;
    stream.set_read_timeout(Some(METRICS_TIMEOUT))?;
    stream.set_write_timeout(Some(METRICS_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(METRICS_BYTES_MAX).read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_the_total_series_with_their_labels() {
        let body = "# HELP stocksync_log_fsyncs_total fdatasync calls on the log.\n\
                    # TYPE stocksync_log_fsyncs_total counter\n\
                    stocksync_log_fsyncs_total 12\n\
                    stocksync_ops_total{action=\"increase\",result=\"ok\"} 30\n\
                    stocksync_connections_open 64\n\
                    stocksync_ack_latency_seconds_count 7\n";
        let counters = parse_counters(body);
        let expected: BTreeMap<String, f64> = [
            ("stocksync_log_fsyncs_total".to_string(), 12.0),
            (
                "stocksync_ops_total{action=\"increase\",result=\"ok\"}".to_string(),
                30.0,
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(counters, expected);
    }

    #[test]
    fn growth_keeps_counters_that_grew_and_counts_new_ones_from_zero() {
        let before: BTreeMap<String, f64> =
            [("a_total".to_string(), 5.0), ("b_total".to_string(), 2.0)]
                .into_iter()
                .collect();
        let after: BTreeMap<String, f64> = [
            ("a_total".to_string(), 9.0),
            ("b_total".to_string(), 2.0),
            ("c_total".to_string(), 3.0),
        ]
        .into_iter()
        .collect();
        let expected: BTreeMap<String, f64> =
            [("a_total".to_string(), 4.0), ("c_total".to_string(), 3.0)]
                .into_iter()
                .collect();
        assert_eq!(counter_growth(&before, &after), expected);
    }

    /// One op per message is the plain `stock_update` scripts and peers have always been sent;
    /// N ops are one `stock_batch` of N `increase 1`.
    #[test]
    fn increase_messages_hold_batch_ops() {
        for (batch, ops) in [(1, 1), (10, 10)] {
            let mut workload = Workload {
                cdf: zipf_cdf(10, 0.0),
                sent: 0,
                count: 10,
                stop: false,
                payload: Vec::new(),
                increase_only: true,
                batch,
            };
            let mut writer = Writer {
                sent_at: None,
                rng: 7,
            };
            let mut frame = Vec::new();
            assert!(workload.next(&mut writer, &mut frame));
            let payload: Value = serde_json::from_slice(&workload.payload).unwrap();
            if batch == 1 {
                assert_eq!(payload["type"], "stock_update");
                assert_eq!(payload["stock"]["action"], "increase");
                assert_eq!(payload["stock"]["change"], 1);
            } else {
                assert_eq!(payload["type"], "stock_batch");
                let lines = payload["ops"].as_array().unwrap();
                assert_eq!(lines.len(), ops);
                assert!(lines
                    .iter()
                    .all(|op| op["action"] == "increase" && op["change"] == 1));
            }
        }
    }
}
