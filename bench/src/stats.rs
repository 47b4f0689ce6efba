//! Measurement helpers: latency histograms, the tool's own CPU time, a server's resident memory.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::time::Duration;

/// Latencies in nanoseconds, 1 ns to 60 s at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant bounds are valid")
}

/// p50/p90/p99/p999/max in microseconds.
pub fn latency_summary_us(histogram: &Histogram<u64>) -> Value {
    let us = |ns: u64| (ns as f64 / 1000.0 * 10.0).round() / 10.0;
    json!({
        "count": histogram.len(),
        "p50": us(histogram.value_at_quantile(0.50)),
        "p90": us(histogram.value_at_quantile(0.90)),
        "p99": us(histogram.value_at_quantile(0.99)),
        "p999": us(histogram.value_at_quantile(0.999)),
        "max": us(histogram.max()),
        "mean": (histogram.mean() / 1000.0 * 10.0).round() / 10.0,
    })
}

/// User and system CPU time this process used so far.
pub fn own_cpu() -> (Duration, Duration) {
    // SAFETY: getrusage only writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |tv: libc::timeval| Duration::new(tv.tv_sec as u64, tv.tv_usec as u32 * 1000);
    (time(usage.ru_utime), time(usage.ru_stime))
}

/// The tool's CPU use over `wall`: user and system seconds and the share of one core.
pub fn cpu_report(start: (Duration, Duration), wall: Duration) -> Value {
    let (user, system) = own_cpu();
    let user = user.saturating_sub(start.0).as_secs_f64();
    let system = system.saturating_sub(start.1).as_secs_f64();
    json!({
        "user_s": round3(user),
        "system_s": round3(system),
        "core_share": round3((user + system) / wall.as_secs_f64().max(1e-9)),
    })
}

/// VmRSS of `pid` in bytes, from /proc/PID/status.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Sum of VmRSS over `pids`; `None` if any cannot be read.
pub fn resident_bytes_sum(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|pid| resident_bytes(*pid)).sum()
}

pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
