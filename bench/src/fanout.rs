//! `fanout`: C subscribers to `*`, P publishers sending `set quantity K` for K = 1, 2, 3, ...;
//! every subscriber must receive every K. Measured only from what subscribers receive (peers do
//! not ack), so the same run works against stocksync and against any re-broadcasting server.
//!
//! Two modes:
//! - `--rate R`: K is sent on a fixed schedule of R per second (latency at a known load);
//! - `--window W` (saturation): K is sent only once every subscriber has received K - W, so at
//!   most W updates are in flight and the server's per-subscriber queues stay far below its
//!   conflation mark (W x ~110 bytes); the delivered rate is then the server's fan-out capacity.
//!
//! Latency is receive time minus send time of K, both from this process's monotonic clock, taken
//! once per read (every frame in one read arrived at the same moment).

use crate::args::Args;
use crate::net::{Conn, Phase, Target};
use crate::pool::{self, Looper};
use crate::stats;
use crate::wire;
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

pub const FLAGS: &[&str] = &[
    "addr",
    "path",
    "token",
    "subscribers",
    "publishers",
    "sources",
    "source-first",
    "rate",
    "window",
    "duration",
    "count",
    "sku",
    "label",
    "connect-concurrency",
    "warmup-timeout",
    "drain",
];

/// `--subscribe-sku`: subscribers subscribe to `--sku` only instead of `*` (several tool
/// processes, each with its own SKU, on one inventory). `--deflate`: every connection offers
/// permessage-deflate (compressed messages are inflated before they are read).
pub const SWITCHES: &[&str] = &["subscribe-sku", "deflate"];

/// Send times and completion counts are kept for the last RING updates: far more than can be
/// in flight (a window of W, or R x the worst latency in rate mode).
const RING: usize = 1 << 20;
const RING_MASK: u64 = RING as u64 - 1;

/// Publisher output past this is not added to: the server is not reading, sending more would
/// only measure our own buffer.
const PUBLISHER_OUT_BYTES_MAX: usize = 1 << 20;

#[derive(Default)]
struct Peer {
    publisher: bool,
    /// First K this subscriber has not yet received, in the measured range.
    next_expected: u64,
    received: u64,
    missing: u64,
    out_of_order: u64,
    seen_any: bool,
}

struct Measure {
    t0: Instant,
    measuring: bool,
    k_start: u64,
    /// Next K to send.
    next_k: u64,
    /// Every subscriber has received (or given up on) every K <= complete_upto.
    complete_upto: u64,
    send_ns: Vec<u64>,
    receive_counts: Vec<u32>,
    histogram: hdrhistogram::Histogram<u64>,
    deliveries: u64,
    subscribers_seen: usize,
    acks: u64,
    errors: u64,
    publisher_echoes: u64,
    unexpected: u64,
    stalls: u64,
}

impl Measure {
    fn on_text(&mut self, peer: &mut Peer, payload: &[u8], read_at: Instant) {
        let Some(k) = wire::stock_update_quantity(payload) else {
            if peer.publisher {
                match wire::string_field(payload, "type") {
                    Some("ack") => self.acks += 1,
                    Some("error") => {
                        if self.errors == 0 {
                            eprintln!(
                                "publisher got an error: {}",
                                String::from_utf8_lossy(payload)
                            );
                        }
                        self.errors += 1;
                    }
                    _ => {}
                }
            }
            return;
        };
        if peer.publisher {
            // Peers broadcast to every connection, the publisher included.
            self.publisher_echoes += 1;
            return;
        }
        if !peer.seen_any {
            peer.seen_any = true;
            self.subscribers_seen += 1;
        }
        if !self.measuring || k < self.k_start {
            return;
        }
        if k >= self.next_k {
            self.unexpected += 1;
            return;
        }
        let now_ns = (read_at - self.t0).as_nanos() as u64;
        let sent_ns = self.send_ns[(k & RING_MASK) as usize];
        let _ = self.histogram.record(now_ns.saturating_sub(sent_ns).max(1));
        self.deliveries += 1;
        peer.received += 1;
        if k >= peer.next_expected {
            peer.missing += k - peer.next_expected;
            peer.next_expected = k + 1;
        } else {
            peer.out_of_order += 1;
        }
        if k > self.complete_upto {
            self.receive_counts[(k & RING_MASK) as usize] += 1;
        }
    }

    /// Moves `complete_upto` past every K all `subscribers` received; a K older than `stall`
    /// is given up on (someone missed it) so the window cannot deadlock.
    fn advance(&mut self, subscribers: u32, now: Instant, stall: Duration) -> bool {
        let mut moved = false;
        let now_ns = (now - self.t0).as_nanos() as u64;
        while self.complete_upto + 1 < self.next_k {
            let k = self.complete_upto + 1;
            let slot = (k & RING_MASK) as usize;
            if self.receive_counts[slot] < subscribers {
                if now_ns.saturating_sub(self.send_ns[slot]) < stall.as_nanos() as u64 {
                    break;
                }
                self.stalls += 1;
            }
            self.receive_counts[slot] = 0;
            self.complete_upto = k;
            moved = true;
        }
        moved
    }
}

struct Settings {
    target: Target,
    path: String,
    publisher_path: String,
    subscribers: usize,
    publishers: usize,
    rate: Option<f64>,
    window: u64,
    duration: Duration,
    count: u64,
    sku: String,
    label: String,
    in_flight_max: usize,
    warmup_timeout: Duration,
    drain: Duration,
}

fn settings(args: &Args) -> Result<Settings, String> {
    let target = crate::target(args)?;
    let path = args.string("path", "/ws");
    let token = args.string("token", "");
    let publisher_path = crate::with_token(&path, &token);
    let rate: Option<f64> = args.opt("rate")?;
    let window: Option<u64> = args.opt("window")?;
    if rate.is_some() == window.is_some() {
        return Err(
            "fanout needs exactly one of --rate R (latency) or --window W (saturation)".into(),
        );
    }
    Ok(Settings {
        target,
        path,
        publisher_path,
        subscribers: args.get("subscribers", 1000)?,
        publishers: args.get::<usize>("publishers", 1)?.max(1),
        rate,
        window: window.unwrap_or(0).max(1),
        duration: Duration::from_secs_f64(args.get("duration", 10.0)?),
        count: args.get("count", 100_000_000)?,
        sku: args.string("sku", "sku-1"),
        label: args.string("label", "server"),
        in_flight_max: args.get("connect-concurrency", 256)?,
        warmup_timeout: Duration::from_secs_f64(args.get("warmup-timeout", 30.0)?),
        drain: Duration::from_secs_f64(args.get("drain", 5.0)?),
    })
}

pub fn run(args: &Args) -> Result<Value, String> {
    let settings = settings(args)?;
    let cpu_at_start = stats::own_cpu();
    let mut looper = Looper::new()?;
    looper.offer_deflate = args.switch("deflate");
    let mut conns: Vec<Conn<Peer>> = Vec::with_capacity(settings.subscribers + settings.publishers);
    let mut measure = Measure {
        t0: Instant::now(),
        measuring: false,
        k_start: 1,
        next_k: 1,
        complete_upto: 0,
        send_ns: vec![0; RING],
        receive_counts: vec![0; RING],
        histogram: stats::latency_histogram(),
        deliveries: 0,
        subscribers_seen: 0,
        acks: 0,
        errors: 0,
        publisher_echoes: 0,
        unexpected: 0,
        stalls: 0,
    };
    let open_deadline = Instant::now() + Duration::from_secs(120);
    let subscribe = if args.switch("subscribe-sku") {
        wire::subscribe_one_frame(&settings.sku, [1, 2, 3, 4])
    } else {
        wire::subscribe_all_frame([1, 2, 3, 4])
    };
    let opened = pool::open_many(
        &mut looper,
        &mut conns,
        &settings.target,
        0,
        settings.subscribers,
        settings.in_flight_max,
        open_deadline,
        &settings.label,
        |_| (settings.path.clone(), Peer::default()),
        |conn| conn.out.extend_from_slice(&subscribe),
        |peer, _, payload, at| measure.on_text(peer, payload, at),
    );
    let publishers = pool::open_many(
        &mut looper,
        &mut conns,
        &settings.target,
        settings.subscribers,
        settings.publishers,
        settings.in_flight_max,
        open_deadline,
        &settings.label,
        |_| {
            let peer = Peer {
                publisher: true,
                ..Peer::default()
            };
            (settings.publisher_path.clone(), peer)
        },
        |_| {},
        |peer, _, payload, at| measure.on_text(peer, payload, at),
    );
    eprintln!(
        "[{}] {} subscribers open ({} failed) in {:.2}s ({:.0}/s), {} publishers",
        settings.label,
        opened.open,
        opened.failed,
        opened.elapsed.as_secs_f64(),
        opened.rate_per_s(),
        publishers.open
    );
    let publisher_tokens: Vec<usize> = (settings.subscribers..conns.len())
        .filter(|index| conns[*index].phase == Phase::Open)
        .collect();
    if publisher_tokens.is_empty() || opened.open == 0 {
        return Err(format!(
            "no publisher or no subscriber could connect (closes: {:?})",
            looper.closes
        ));
    }

    let mut frame_payload = Vec::with_capacity(128);
    let mut send = |conns: &mut Vec<Conn<Peer>>, measure: &mut Measure, now: Instant| {
        let k = measure.next_k;
        let token = publisher_tokens[(k as usize - 1) % publisher_tokens.len()];
        let conn = &mut conns[token];
        if conn.out.len() > PUBLISHER_OUT_BYTES_MAX || conn.phase != Phase::Open {
            return false;
        }
        frame_payload.clear();
        let _ = write!(
            frame_payload,
            r#"{{"type":"stock_update","stock":{{"id":"{}","action":"set","quantity":{k}}}}}"#,
            settings.sku
        );
        let mask = (k as u32).wrapping_mul(2_654_435_761).to_le_bytes();
        wire::encode_client_frame(&mut conn.out, wire::OPCODE_TEXT, &frame_payload, mask);
        measure.send_ns[(k & RING_MASK) as usize] = (now - measure.t0).as_nanos() as u64;
        measure.next_k += 1;
        true
    };
    let flush_publishers = |conns: &mut Vec<Conn<Peer>>| {
        for token in &publisher_tokens {
            let conn = &mut conns[*token];
            if !conn.out.is_empty() && conn.flush().is_err() {
                conn.phase = Phase::Closed;
            }
        }
    };

    // Warm-up: one update per interval until every open subscriber has received one, so the
    // measurement starts with every subscription in effect. The interval grows with C (20 us per
    // subscriber) so a slow server is not buried under a backlog before measuring starts.
    let warm_interval = Duration::from_millis(20) + Duration::from_micros(20) * opened.open as u32;
    let warmup_started = Instant::now();
    let mut last_warm_send = warmup_started - Duration::from_secs(1);
    while measure.subscribers_seen < opened.open
        && warmup_started.elapsed() < settings.warmup_timeout
    {
        let now = Instant::now();
        if now - last_warm_send >= warm_interval {
            send(&mut conns, &mut measure, now);
            flush_publishers(&mut conns);
            last_warm_send = now;
        }
        looper.turn(
            &mut conns[..],
            Duration::from_millis(5),
            |_| {},
            |peer, _, payload, at| measure.on_text(peer, payload, at),
        );
    }
    if measure.subscribers_seen < opened.open {
        eprintln!(
            "[{}] warm-up timed out: {}/{} subscribers received an update",
            settings.label, measure.subscribers_seen, opened.open
        );
    }
    // Let warm-up stragglers arrive before measuring.
    let settle_until = Instant::now() + warm_interval * 2 + Duration::from_millis(200);
    while Instant::now() < settle_until {
        looper.turn(
            &mut conns[..],
            Duration::from_millis(20),
            |_| {},
            |peer, _, payload, at| measure.on_text(peer, payload, at),
        );
    }

    measure.measuring = true;
    measure.k_start = measure.next_k;
    measure.complete_upto = measure.next_k - 1;
    for conn in conns.iter_mut() {
        conn.state.next_expected = measure.k_start;
    }
    let subscribers_open = conns[..settings.subscribers]
        .iter()
        .filter(|conn| conn.phase == Phase::Open)
        .count() as u32;
    // An update not complete after this is taken as missed by someone (conflation or loss), so
    // the window moves on; long enough that a merely slow server is not mistaken for that.
    let stall = Duration::from_secs(5);
    let started = Instant::now();
    let send_until = started + settings.duration;
    let last_k = measure.k_start + settings.count - 1;
    let mut next_progress = started + Duration::from_secs(1);
    let mut progress_deliveries = 0;
    let mut progress: Vec<Value> = Vec::new();
    eprintln!(
        "[{}] measuring for {:.1}s",
        settings.label,
        settings.duration.as_secs_f64()
    );
    loop {
        let now = Instant::now();
        if now >= send_until || measure.next_k > last_k {
            break;
        }
        let mut timeout = Duration::from_millis(100);
        match settings.rate {
            Some(rate) => {
                let due = measure.k_start + ((now - started).as_secs_f64() * rate) as u64;
                while measure.next_k <= due.min(last_k) && send(&mut conns, &mut measure, now) {}
                let next_at = started
                    + Duration::from_secs_f64((measure.next_k - measure.k_start + 1) as f64 / rate);
                timeout = next_at.saturating_duration_since(Instant::now());
            }
            None => {
                let allowed = measure.complete_upto + settings.window;
                while measure.next_k <= allowed.min(last_k) && send(&mut conns, &mut measure, now) {
                }
            }
        }
        flush_publishers(&mut conns);
        looper.turn(
            &mut conns[..],
            timeout.min(Duration::from_millis(100)),
            |_| {},
            |peer, _, payload, at| measure.on_text(peer, payload, at),
        );
        let now = Instant::now();
        measure.advance(subscribers_open, now, stall);
        if now >= next_progress {
            let window = measure.deliveries - progress_deliveries;
            progress_deliveries = measure.deliveries;
            let line = json!({
                "t_s": stats::round3((now - started).as_secs_f64()),
                "sent": measure.next_k - measure.k_start,
                "delivered_per_s": window,
                "p99_us": measure.histogram.value_at_quantile(0.99) as f64 / 1000.0,
            });
            eprintln!(
                "[{}] t={:.0}s sent={} delivered/s={} p99={:.0}us closed={}",
                settings.label,
                (now - started).as_secs_f64(),
                measure.next_k - measure.k_start,
                window,
                measure.histogram.value_at_quantile(0.99) as f64 / 1000.0,
                looper.closes.total()
            );
            progress.push(line);
            next_progress += Duration::from_secs(1);
        }
    }
    let sending_elapsed = started.elapsed();
    // Drain: wait for the updates in flight, bounded.
    let drain_until = Instant::now() + settings.drain;
    let mut last_delivery_at = Instant::now();
    while measure.complete_upto + 1 < measure.next_k && Instant::now() < drain_until {
        let before = measure.deliveries;
        flush_publishers(&mut conns);
        looper.turn(
            &mut conns[..],
            Duration::from_millis(20),
            |_| {},
            |peer, _, payload, at| measure.on_text(peer, payload, at),
        );
        if measure.deliveries > before {
            last_delivery_at = Instant::now();
        }
        measure.advance(subscribers_open, Instant::now(), Duration::from_secs(3600));
    }
    let elapsed = last_delivery_at.max(started + sending_elapsed) - started;
    let cpu = stats::cpu_report(cpu_at_start, started.elapsed() + opened.elapsed);

    let sent = measure.next_k - measure.k_start;
    let (mut missing, mut out_of_order, mut subscribers_closed) = (0u64, 0u64, 0u64);
    for conn in conns[..settings.subscribers].iter_mut() {
        if conn.phase != Phase::Open {
            subscribers_closed += 1;
            continue;
        }
        let peer = &mut conn.state;
        peer.missing += measure.next_k.saturating_sub(peer.next_expected);
        missing += peer.missing;
        out_of_order += peer.out_of_order;
    }
    let expected = sent * u64::from(subscribers_open);
    Ok(json!({
        "scenario": "fanout",
        "label": settings.label,
        "mode": if settings.rate.is_some() { "rate" } else { "window" },
        "rate": settings.rate,
        "window": settings.rate.is_none().then_some(settings.window),
        "subscribers": subscribers_open,
        "subscribers_failed": opened.failed,
        "subscribers_closed": subscribers_closed,
        "publishers": publisher_tokens.len(),
        "connect_per_s": stats::round3(opened.rate_per_s()),
        "elapsed_s": stats::round3(elapsed.as_secs_f64()),
        "updates_sent": sent,
        "updates_per_s": stats::round3(sent as f64 / elapsed.as_secs_f64()),
        "deliveries": measure.deliveries,
        "deliveries_expected": expected,
        "delivered_per_s": stats::round3(measure.deliveries as f64 / elapsed.as_secs_f64()),
        "missing": missing,
        "out_of_order": out_of_order,
        "unexpected": measure.unexpected,
        "stalls": measure.stalls,
        "acks": measure.acks,
        "errors": measure.errors,
        "publisher_echoes": measure.publisher_echoes,
        "latency_us": stats::latency_summary_us(&measure.histogram),
        "tool_cpu": cpu,
        "closes": looper.closes.to_json(),
        "deflate": looper.deflate_json(),
        "bytes_read": looper.bytes_read,
        "progress": progress,
    }))
}
