//! `idle`: open C connections (subscribed to `*` unless `--no-subscribe`), hold them, and report
//! the connect rate and, given `--server-pid` (a comma list for several processes), the growth of
//! the server's resident memory divided by C: user-space bytes per idle connection (socket
//! buffers are kernel memory and not in VmRSS).
//!
//! `--hold S` keeps the connections open S seconds after the measurement (answering pings), so a
//! script can measure several tool processes at once; "ALL OPEN" on stderr marks the moment.

use crate::args::Args;
use crate::net::{Conn, Phase};
use crate::pool::{self, Looper};
use crate::stats;
use crate::wire;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const FLAGS: &[&str] = &[
    "addr",
    "path",
    "token",
    "connections",
    "sources",
    "source-first",
    "server-pid",
    "hold",
    "settle",
    "label",
    "connect-concurrency",
    "duration",
];
/// `--deflate`: every connection offers permessage-deflate.
pub const SWITCHES: &[&str] = &["no-subscribe", "deflate"];

pub fn run(args: &Args) -> Result<Value, String> {
    let target = crate::target(args)?;
    let path = args.string("path", "/ws");
    let count: usize = args.get("connections", 10_000)?;
    let pids: Vec<u32> = args.list("server-pid")?;
    let hold = Duration::from_secs_f64(args.get("hold", 0.0)?);
    let settle = Duration::from_secs_f64(args.get("settle", 2.0)?);
    let label = args.string("label", "server");
    let in_flight_max: usize = args.get("connect-concurrency", 256)?;
    // Bounds the opening phase.
    let open_timeout = Duration::from_secs_f64(args.get("duration", 120.0)?);
    let subscribe = !args.switch("no-subscribe");
    let cpu_at_start = stats::own_cpu();

    let rss_before = stats::resident_bytes_sum(&pids);
    let mut looper = Looper::new()?;
    looper.offer_deflate = args.switch("deflate");
    let mut conns: Vec<Conn<()>> = Vec::with_capacity(count);
    let subscribe_frame = wire::subscribe_all_frame([9, 8, 7, 6]);
    let opened = pool::open_many(
        &mut looper,
        &mut conns,
        &target,
        0,
        count,
        in_flight_max,
        Instant::now() + open_timeout,
        &label,
        |_| (path.clone(), ()),
        |conn| {
            if subscribe {
                conn.out.extend_from_slice(&subscribe_frame);
            }
        },
        |_, _, _, _| {},
    );
    eprintln!(
        "[{label}] ALL OPEN: {} open, {} failed in {:.2}s ({:.0}/s)",
        opened.open,
        opened.failed,
        opened.elapsed.as_secs_f64(),
        opened.rate_per_s()
    );
    // Let the server finish processing subscriptions and free handshake buffers.
    pump_for(&mut looper, &mut conns, settle);
    let rss_after = stats::resident_bytes_sum(&pids);
    let bytes_per_connection = match (rss_before, rss_after) {
        (Some(before), Some(after)) if opened.open > 0 => {
            Some((after as f64 - before as f64) / opened.open as f64)
        }
        _ => None,
    };
    pump_for(&mut looper, &mut conns, hold);
    let still_open = conns
        .iter()
        .filter(|conn| conn.phase == Phase::Open)
        .count();
    Ok(json!({
        "scenario": "idle",
        "label": label,
        "connections": opened.open,
        "failed": opened.failed,
        "still_open": still_open,
        "subscribed": subscribe,
        "connect_s": stats::round3(opened.elapsed.as_secs_f64()),
        "connect_per_s": stats::round3(opened.rate_per_s()),
        "server_pids": pids,
        "server_rss_before": rss_before,
        "server_rss_after": rss_after,
        "server_bytes_per_connection": bytes_per_connection.map(|bytes| bytes.round()),
        "tool_cpu": stats::cpu_report(cpu_at_start, opened.elapsed + settle + hold),
        "closes": looper.closes.to_json(),
        "deflate": looper.deflate_json(),
        "bytes_read": looper.bytes_read,
    }))
}

/// Keeps the connections serviced (pings answered, closes counted) for `span`.
fn pump_for(looper: &mut Looper, conns: &mut [Conn<()>], span: Duration) {
    let until = Instant::now() + span;
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        looper.turn(
            conns,
            left.min(Duration::from_millis(200)),
            |_| {},
            |_, _, _, _| {},
        );
    }
}
