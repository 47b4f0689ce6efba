//! Whole-server hold figures (docs/BENCHMARKS.md "Holds"), ignored by default:
//! `cargo test --release --test holds_load -- --ignored --nocapture`.
//!
//! Takes 1,000,000 live holds (one unit each, over 1,000 SKUs, deadlines an hour away), reads
//! the server's RSS before and after (memory per live hold, whole process), then takes 10,000
//! more holds that expire within the same second and measures, at the holder, the lag from
//! each deadline to its `hold_expired` push. The deadline is estimated as the client's send
//! time + ttl_ms, which is at or before the server's, so the lag is over- never under-stated.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{recv, send, Server, Ws};
use serde_json::{json, Value};

const SKUS: usize = 1_000;
const LIVE_HOLDS: usize = 1_000_000;
const EXPIRING_HOLDS: usize = 10_000;
const OPS_PER_BATCH: usize = 100;
const WINDOW: usize = 32;

/// Sends every batch with at most `WINDOW` in flight; calls `on_ack` per ack in order.
fn pipeline(ws: &mut Ws, batches: Vec<Value>, mut on_sent: impl FnMut(usize, Instant)) {
    let total = batches.len();
    let mut sent = 0;
    let mut acked = 0;
    let mut batches = batches.into_iter();
    while acked < total {
        while sent < total && sent - acked < WINDOW {
            on_sent(sent, Instant::now());
            send(ws, batches.next().unwrap());
            sent += 1;
        }
        let reply = recv(ws);
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            Some("hold_expired") => {}
            _ => panic!("unexpected {reply}"),
        }
    }
}

fn hold_batch(first: usize, count: usize, prefix: &str, ttl_ms: u64) -> Value {
    let ops: Vec<Value> = (first..first + count)
        .map(|i| {
            json!({"id": format!("sku-{}", i % SKUS), "action": "reserve", "change": 1,
                   "hold": format!("{prefix}-{i}"), "ttl_ms": ttl_ms})
        })
        .collect();
    json!({"type":"stock_batch","ops":ops})
}

#[test]
#[ignore]
fn one_million_live_holds_and_ten_thousand_expiring_in_one_second() {
    let server = Server::start_durable(&["--holds-max", "2000000"]);
    let mut ws = server.writer();
    let sets: Vec<Value> = (0..SKUS / OPS_PER_BATCH)
        .map(|b| {
            let ops: Vec<Value> = (b * OPS_PER_BATCH..(b + 1) * OPS_PER_BATCH)
                .map(|i| json!({"id": format!("sku-{i}"), "action":"set","quantity":1_000_000_000u64}))
                .collect();
            json!({"type":"stock_batch","ops":ops})
        })
        .collect();
    pipeline(&mut ws, sets, |_, _| {});
    let rss_before = common::rss_kb(server.child.id());
    let started = Instant::now();
    let batches: Vec<Value> = (0..LIVE_HOLDS / OPS_PER_BATCH)
        .map(|b| hold_batch(b * OPS_PER_BATCH, OPS_PER_BATCH, "live", 3_600_000))
        .collect();
    pipeline(&mut ws, batches, |_, _| {});
    let took = started.elapsed();
    let rss_after = common::rss_kb(server.child.id());
    println!(
        "{LIVE_HOLDS} holds taken in {:.1} s ({:.0} holds/s); RSS {} -> {} KiB: {:.0} bytes per live hold",
        took.as_secs_f64(),
        LIVE_HOLDS as f64 / took.as_secs_f64(),
        rss_before,
        rss_after,
        (rss_after - rss_before) as f64 * 1024.0 / LIVE_HOLDS as f64
    );
    // 10,000 holds expiring in one second: taken as fast as possible, ttl 2 s.
    let ttl_ms = 2_000;
    let batches: Vec<Value> = (0..EXPIRING_HOLDS / OPS_PER_BATCH)
        .map(|b| hold_batch(b * OPS_PER_BATCH, OPS_PER_BATCH, "soon", ttl_ms))
        .collect();
    let mut sent_at = vec![Instant::now(); EXPIRING_HOLDS / OPS_PER_BATCH];
    let burst = Instant::now();
    pipeline(&mut ws, batches, |i, at| sent_at[i] = at);
    let burst_took = burst.elapsed();
    let mut lags: Vec<f64> = Vec::with_capacity(EXPIRING_HOLDS);
    let mut seen: HashMap<usize, ()> = HashMap::new();
    common::set_timeout(&ws, Duration::from_secs(30));
    while seen.len() < EXPIRING_HOLDS {
        let message = recv(&mut ws);
        if message["type"] != "hold_expired" {
            continue;
        }
        let now = Instant::now();
        let hold = message["hold"].as_str().unwrap();
        let index: usize = hold.strip_prefix("soon-").unwrap().parse().unwrap();
        let deadline = sent_at[index / OPS_PER_BATCH] + Duration::from_millis(ttl_ms);
        lags.push(now.saturating_duration_since(deadline).as_secs_f64() * 1000.0);
        seen.insert(index, ());
    }
    lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)];
    println!(
        "{EXPIRING_HOLDS} holds taken in {:.0} ms, expiry lag at the holder: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (with {LIVE_HOLDS} other holds live)",
        burst_took.as_secs_f64() * 1000.0,
        pct(0.5),
        pct(0.99),
        lags[lags.len() - 1]
    );
    let metrics = ureq::get(&server.http("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    for line in metrics.lines().filter(|l| l.starts_with("stocksync_hold")) {
        println!("{line}");
    }
}
