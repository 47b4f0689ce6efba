//! Service counters and their Prometheus text exposition (`GET /metrics`).
//!
//! Names follow Prometheus conventions: `stocksync_` prefix, `_total` for counters, base units
//! (`_seconds`, `_bytes`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use crate::api::ErrorCode;
use crate::broadcast::fanout::FanoutStats;
use crate::net::LoopStats;
use crate::stock::Action;
use crate::wal::LogStats;

/// Upper bounds (seconds) of the ack latency histogram buckets.
pub const ACK_LATENCY_BUCKETS_SECONDS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    counts: [u64; ACK_LATENCY_BUCKETS_SECONDS.len()],
    count: u64,
    sum_seconds: f64,
}

impl Histogram {
    /// Writes this histogram as the Prometheus family `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        family(out, name, "histogram", help);
        for (bound, count) in ACK_LATENCY_BUCKETS_SECONDS.iter().zip(self.counts.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum_seconds);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }

    pub fn observe(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in ACK_LATENCY_BUCKETS_SECONDS
            .iter()
            .zip(self.counts.iter_mut())
        {
            if seconds <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += seconds;
    }
}

/// Limits a client can run into that the service counts (the loop counts its own: connection
/// limits at accept, input buffer overflow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitHit {
    HandshakeTimeout,
    IdleTimeout,
    MessageTooBig,
    RequestTooLarge,
    Subscriptions,
    WriteRateConnection,
    WriteRateToken,
    SendQueueHard,
    Skus,
    WritesInFlight,
}

impl LimitHit {
    pub const ALL: [LimitHit; 10] = [
        LimitHit::HandshakeTimeout,
        LimitHit::IdleTimeout,
        LimitHit::MessageTooBig,
        LimitHit::RequestTooLarge,
        LimitHit::Subscriptions,
        LimitHit::WriteRateConnection,
        LimitHit::WriteRateToken,
        LimitHit::SendQueueHard,
        LimitHit::Skus,
        LimitHit::WritesInFlight,
    ];

    /// The `limit` label in metrics and the name in logs.
    pub fn name(self) -> &'static str {
        match self {
            LimitHit::HandshakeTimeout => "handshake_timeout",
            LimitHit::IdleTimeout => "idle_timeout",
            LimitHit::MessageTooBig => "message_too_big",
            LimitHit::RequestTooLarge => "request_too_large",
            LimitHit::Subscriptions => "subscriptions_max",
            LimitHit::WriteRateConnection => "write_rate_connection",
            LimitHit::WriteRateToken => "write_rate_token",
            LimitHit::SendQueueHard => "send_queue_hard",
            LimitHit::Skus => "skus_max",
            LimitHit::WritesInFlight => "writes_in_flight",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl From<crate::app::Limit> for LimitHit {
    fn from(limit: crate::app::Limit) -> Self {
        match limit {
            crate::app::Limit::HandshakeTimeout => LimitHit::HandshakeTimeout,
            crate::app::Limit::IdleTimeout => LimitHit::IdleTimeout,
            crate::app::Limit::MessageTooBig => LimitHit::MessageTooBig,
            crate::app::Limit::RequestTooLarge => LimitHit::RequestTooLarge,
        }
    }
}

/// Repeated hits of one limit are warned about at most this often; the rest are only counted.
pub const LIMIT_LOG_INTERVAL_MS: u64 = 10_000;

/// Counts of each limit hit, and when each was last warned about.
#[derive(Clone, Debug, Default)]
pub struct LimitHits {
    counts: [u64; LimitHit::ALL.len()],
    /// Loop time of the last warning per limit, `None` before the first.
    last_warned_ms: [Option<u64>; LimitHit::ALL.len()],
    /// Hits since the last warning, reported with the next one.
    unreported: [u64; LimitHit::ALL.len()],
}

impl LimitHits {
    /// Counts a hit and returns how many hits the warning should mention (this one plus those
    /// suppressed since the last warning), or `None` when this limit was warned about within
    /// [`LIMIT_LOG_INTERVAL_MS`].
    pub fn hit(&mut self, limit: LimitHit, now_ms: u64) -> Option<u64> {
        let i = limit.index();
        self.counts[i] += 1;
        self.unreported[i] += 1;
        let due = match self.last_warned_ms[i] {
            None => true,
            Some(last) => now_ms >= last.saturating_add(LIMIT_LOG_INTERVAL_MS),
        };
        if !due {
            return None;
        }
        self.last_warned_ms[i] = Some(now_ms);
        Some(std::mem::take(&mut self.unreported[i]))
    }

    pub fn count(&self, limit: LimitHit) -> u64 {
        self.counts[limit.index()]
    }
}

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Most outbox entries (writes in flight and replies behind them) seen at once.
    pub outbox_entries_peak: usize,
    pub ws_opened_total: u64,
    pub ws_messages_in_total: u64,
    pub http_requests_total: u64,
    pub changes_total: u64,
    pub duplicates_total: u64,
    pub rolled_back_total: u64,
    pub rate_limited_total: u64,
    pub rejected_origin_total: u64,
    pub slow_consumer_full_total: u64,
    pub slow_consumer_closed_total: u64,
    /// (action, result) -> ops; result is "ok" or an error code.
    pub ops: BTreeMap<(&'static str, &'static str), u64>,
    /// error code -> replies.
    pub errors: BTreeMap<&'static str, u64>,
    pub ack_latency: Histogram,
    pub limits: LimitHits,
    pub holds_committed_total: u64,
    pub holds_released_total: u64,
    pub holds_expired_total: u64,
    /// Deadline to the expiry's change being decided (durable), per expired hold.
    pub hold_expiry_lag: Histogram,
}

impl Metrics {
    pub fn count_error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.as_str()).or_insert(0) += 1;
    }

    /// Counts each op of an accepted (`None`) or refused write.
    pub fn count_op_result(&mut self, ops: &OpCounts, error: Option<ErrorCode>) {
        let result = error.map_or("ok", ErrorCode::as_str);
        for (action, &n) in Action::ALL.iter().zip(&ops.0) {
            if n > 0 {
                *self.ops.entry((action.as_str(), result)).or_insert(0) += u64::from(n);
            }
        }
    }
}

// `OpCounts` indexes by discriminant and reads back in `Action::ALL` order: the two agree.
const _: () = {
    let mut i = 0;
    while i < Action::ALL.len() {
        assert!(Action::ALL[i] as usize == i);
        i += 1;
    }
};

/// How many ops of each action one write carries, kept until its outcome is counted: a fixed
/// array rather than a `Vec` of actions, so a write costs no allocation for its metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpCounts([u32; Action::ALL.len()]);

impl OpCounts {
    pub fn of(actions: impl IntoIterator<Item = Action>) -> OpCounts {
        let mut counts = OpCounts::default();
        for action in actions {
            counts.0[action as usize] += 1;
        }
        counts
    }
}

/// Everything /metrics shows, gathered from each layer.
pub struct Snapshot<'a> {
    pub service: &'a Metrics,
    pub loop_stats: &'a LoopStats,
    pub fanout: &'a FanoutStats,
    pub log: &'a LogStats,
    pub connections_open: usize,
    pub skus_known: usize,
    pub idempotency_keys: usize,
    pub writes_refused: bool,
    pub uptime_seconds: u64,
    pub holds: crate::engine::HoldStats,
}

pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The hold figures (PROTOCOL.md "Holds").
fn render_holds(out: &mut String, s: &Snapshot<'_>) {
    let m = s.service;
    single(
        out,
        "stocksync_holds_live",
        "gauge",
        "Live holds.",
        s.holds.live,
    );
    single(
        out,
        "stocksync_holds_expired_markers",
        "gauge",
        "Holds remembered as expired (one hour each).",
        s.holds.expired_markers,
    );
    single(
        out,
        "stocksync_holds_taken_total",
        "counter",
        "Holds created.",
        s.holds.taken_total,
    );
    single(
        out,
        "stocksync_holds_committed_total",
        "counter",
        "Holds committed.",
        m.holds_committed_total,
    );
    single(
        out,
        "stocksync_holds_released_total",
        "counter",
        "Holds released.",
        m.holds_released_total,
    );
    single(
        out,
        "stocksync_holds_expired_total",
        "counter",
        "Holds expired.",
        m.holds_expired_total,
    );
    m.hold_expiry_lag.render(
        out,
        "stocksync_hold_expiry_lag_seconds",
        "Time from a hold's deadline to its release being durable.",
    );
}

pub fn render(s: &Snapshot<'_>) -> String {
    let mut out = String::with_capacity(8 * 1024);
    render_holds(&mut out, s);
    let l = s.loop_stats;
    single(
        &mut out,
        "stocksync_connections_open",
        "gauge",
        "Open connections.",
        s.connections_open,
    );
    single(
        &mut out,
        "stocksync_connections_accepted_total",
        "counter",
        "Connections accepted.",
        l.accepted_total,
    );
    family(
        &mut out,
        "stocksync_connections_rejected_total",
        "counter",
        "Connections refused at accept, by limit.",
    );
    let _ = writeln!(
        out,
        "stocksync_connections_rejected_total{{reason=\"connections_max\"}} {}",
        l.rejected_limit_total
    );
    let _ = writeln!(
        out,
        "stocksync_connections_rejected_total{{reason=\"per_ip\"}} {}",
        l.rejected_per_ip_total
    );
    single(
        &mut out,
        "stocksync_connections_closed_total",
        "counter",
        "Connections closed.",
        l.closed_total,
    );
    single(
        &mut out,
        "stocksync_websocket_upgrades_total",
        "counter",
        "WebSocket connections opened.",
        s.service.ws_opened_total,
    );
    single(
        &mut out,
        "stocksync_messages_in_total",
        "counter",
        "WebSocket messages received.",
        s.service.ws_messages_in_total,
    );
    single(
        &mut out,
        "stocksync_http_requests_total",
        "counter",
        "HTTP requests served (not upgrades).",
        s.service.http_requests_total,
    );
    single(
        &mut out,
        "stocksync_bytes_in_total",
        "counter",
        "Bytes read from clients.",
        l.bytes_in_total,
    );
    single(
        &mut out,
        "stocksync_bytes_out_total",
        "counter",
        "Bytes written to clients.",
        l.bytes_out_total,
    );
    single(
        &mut out,
        "stocksync_socket_writes_total",
        "counter",
        "Vectored socket writes.",
        l.writes_total,
    );
    single(
        &mut out,
        "stocksync_socket_reads_total",
        "counter",
        "Reads from client sockets (including those that found nothing).",
        l.reads_total,
    );
    single(
        &mut out,
        "stocksync_loop_iterations_total",
        "counter",
        "Turns of the event loop.",
        l.loop_iterations_total,
    );
    single(
        &mut out,
        "stocksync_loop_wakeups_total",
        "counter",
        "Event loop turns woken by the log thread (a batch made durable) or another helper.",
        l.loop_wakeups_total,
    );
    single(
        &mut out,
        "stocksync_frames_broadcast_total",
        "counter",
        "Stock updates framed for broadcast (once each).",
        s.fanout.frames_built_total,
    );
    single(
        &mut out,
        "stocksync_broadcast_deliveries_total",
        "counter",
        "Broadcast frames queued to subscribers.",
        s.fanout.deliveries_total,
    );
    family(
        &mut out,
        "stocksync_slow_consumer_actions_total",
        "counter",
        "What slow consumers cost: conflated updates, full/closed connections.",
    );
    let _ = writeln!(
        out,
        "stocksync_slow_consumer_actions_total{{action=\"conflated\"}} {}",
        s.fanout.conflated_total
    );
    let _ = writeln!(
        out,
        "stocksync_slow_consumer_actions_total{{action=\"conflated_sent\"}} {}",
        s.fanout.conflated_sent_total
    );
    let _ = writeln!(
        out,
        "stocksync_slow_consumer_actions_total{{action=\"buffer_full\"}} {}",
        s.service.slow_consumer_full_total
    );
    let _ = writeln!(
        out,
        "stocksync_slow_consumer_actions_total{{action=\"closed\"}} {}",
        s.service.slow_consumer_closed_total
    );
    single(
        &mut out,
        "stocksync_changes_total",
        "counter",
        "Accepted changes made durable and broadcast.",
        s.service.changes_total,
    );
    single(
        &mut out,
        "stocksync_idempotent_duplicates_total",
        "counter",
        "Writes answered from the idempotency cache.",
        s.service.duplicates_total,
    );
    single(
        &mut out,
        "stocksync_rolled_back_total",
        "counter",
        "Changes undone because the log failed.",
        s.service.rolled_back_total,
    );
    single(
        &mut out,
        "stocksync_rate_limited_total",
        "counter",
        "Writes refused by a rate limit.",
        s.service.rate_limited_total,
    );
    family(
        &mut out,
        "stocksync_limit_hits_total",
        "counter",
        "Times a client ran into a configured limit, by limit.",
    );
    let loop_limits = [
        ("connections_max", l.rejected_limit_total),
        ("connections_per_ip_max", l.rejected_per_ip_total),
        ("read_buffer", l.read_overflow_total),
    ];
    let service_limits = LimitHit::ALL
        .iter()
        .map(|&limit| (limit.name(), s.service.limits.count(limit)));
    for (limit, n) in loop_limits.into_iter().chain(service_limits) {
        let _ = writeln!(out, "stocksync_limit_hits_total{{limit=\"{limit}\"}} {n}");
    }
    single(
        &mut out,
        "stocksync_origin_rejected_total",
        "counter",
        "WebSocket handshakes refused for their Origin.",
        s.service.rejected_origin_total,
    );
    single(
        &mut out,
        "stocksync_handler_panics_total",
        "counter",
        "Callbacks that panicked (each closed its connection).",
        l.handler_panics_total,
    );
    single(
        &mut out,
        "stocksync_tls_failures_total",
        "counter",
        "TLS connections that failed their handshake or a record (plain text on the TLS port too).",
        l.tls_failures_total,
    );
    family(
        &mut out,
        "stocksync_ops_total",
        "counter",
        "Ops by action and result.",
    );
    for ((action, result), n) in &s.service.ops {
        let _ = writeln!(
            out,
            "stocksync_ops_total{{action=\"{action}\",result=\"{result}\"}} {n}"
        );
    }
    family(
        &mut out,
        "stocksync_errors_total",
        "counter",
        "Error replies by code.",
    );
    for (code, n) in &s.service.errors {
        let _ = writeln!(out, "stocksync_errors_total{{code=\"{code}\"}} {n}");
    }
    s.service.ack_latency.render(
        &mut out,
        "stocksync_ack_latency_seconds",
        "From receiving a write to sending its ack (includes the log fsync).",
    );
    single(
        &mut out,
        "stocksync_skus_known",
        "gauge",
        "SKUs ever written.",
        s.skus_known,
    );
    single(
        &mut out,
        "stocksync_idempotency_keys",
        "gauge",
        "Idempotency keys remembered.",
        s.idempotency_keys,
    );
    single(
        &mut out,
        "stocksync_writes_refused",
        "gauge",
        "1 while the store refuses writes (log failing).",
        u8::from(s.writes_refused),
    );
    single(
        &mut out,
        "stocksync_log_records_total",
        "counter",
        "Records appended to the write-ahead log.",
        s.log.records_total,
    );
    single(
        &mut out,
        "stocksync_log_batches_total",
        "counter",
        "Group-commit batches written.",
        s.log.batches_total,
    );
    single(
        &mut out,
        "stocksync_log_fsyncs_total",
        "counter",
        "fdatasync calls on the log.",
        s.log.fsyncs_total,
    );
    single(
        &mut out,
        "stocksync_log_written_bytes_total",
        "counter",
        "Bytes written to the log.",
        s.log.bytes_total,
    );
    single(
        &mut out,
        "stocksync_log_failures_total",
        "counter",
        "Failed log writes or fsyncs.",
        s.log.failures_total,
    );
    single(
        &mut out,
        "stocksync_log_snapshots_total",
        "counter",
        "Snapshots written.",
        s.log.snapshots_total,
    );
    single(
        &mut out,
        "stocksync_log_bytes",
        "gauge",
        "Current size of the log files.",
        s.log.log_bytes,
    );
    single(
        &mut out,
        "stocksync_uptime_seconds",
        "gauge",
        "Seconds since start.",
        s.uptime_seconds,
    );
    out
}
