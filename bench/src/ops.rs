//! `ops`: W writers, each with one request in flight, doing reserve / release / commit / batch
//! (a checkout reserving 2-4 lines) on N SKUs chosen with Zipf skew `--skew` (0 = uniform,
//! ~1 = a few hot SKUs take most writes, as in a sale). Every SKU starts with `--stock` units, so
//! hot SKUs sell out and rejections appear, as they do in a real sale.
//!
//! stocksync-specific: measured from acks and errors (the peers do not ack). Reports acked ops/s,
//! ack latency and rejections by error code.

use crate::args::Args;
use crate::net::{Conn, Phase};
use crate::pool::{self, Looper};
use crate::stats;
use crate::wire;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
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
];

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
            let _ = write_op(&mut self.payload, sku, "increase", 1);
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
        increase_only: match args.string("mix", "checkout").as_str() {
            "checkout" => false,
            "increase" => true,
            other => return Err(format!("--mix: `{other}` is not checkout or increase")),
        },
    };
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
                "[{label}] t={:.0}s acked/s={} rejected={rejected} p99={:.0}us",
                (now - begin).as_secs_f64(),
                tally.acked - last_acked,
                tally.histogram.value_at_quantile(0.99) as f64 / 1000.0
            );
            last_acked = tally.acked;
            next_progress += Duration::from_secs(1);
        }
    }
    let elapsed = begin.elapsed();
    workload.stop = true;
    let rejected: u64 = tally.rejected.values().sum();
    Ok(json!({
        "scenario": "ops",
        "label": label,
        "writers": opened.open,
        "skus": skus,
        "skew": skew,
        "stock": stock,
        "elapsed_s": stats::round3(elapsed.as_secs_f64()),
        "acked": tally.acked,
        "acked_per_s": stats::round3(tally.acked as f64 / elapsed.as_secs_f64()),
        "rejected": rejected,
        "replies_per_s": stats::round3((tally.acked + rejected) as f64 / elapsed.as_secs_f64()),
        "rejected_by_code": tally.rejected,
        "ack_latency_us": stats::latency_summary_us(&tally.histogram),
        "tool_cpu": stats::cpu_report(cpu_at_start, elapsed),
        "closes": looper.closes.to_json(),
    }))
}
