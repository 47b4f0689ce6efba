//! `handshake`: connect, upgrade, close, with `--concurrency` loops in flight, for `--duration`
//! seconds or `--count` handshakes. Reports handshakes/s and the connect-to-101 latency.
//!
//! The tool closes first, so its side holds the TIME_WAIT state: spread over `--sources`
//! (default 16) so ~28k ports per source address do not run out.

use crate::args::Args;
use crate::net::{self, Conn, Phase};
use crate::pool::Looper;
use crate::stats;
use mio::{Interest, Token};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

pub const FLAGS: &[&str] = &[
    "addr",
    "path",
    "sources",
    "source-first",
    "concurrency",
    "duration",
    "count",
    "label",
];

pub fn run(args: &Args) -> Result<Value, String> {
    let mut target = crate::target(args)?;
    if args.opt::<u8>("sources")?.is_none() {
        target.source_count = 16;
    }
    let path = args.string("path", "/ws");
    let concurrency: usize = args.get("concurrency", 64)?;
    let duration = Duration::from_secs_f64(args.get("duration", 5.0)?);
    let count: u64 = args.get("count", 1_000_000)?;
    let label = args.string("label", "server");
    let cpu_at_start = stats::own_cpu();
    let mut looper = Looper::new()?;
    let mut histogram = stats::latency_histogram();
    // One slot per loop: the connection in flight and when it started.
    let mut slots: Vec<Option<(Conn<()>, Instant)>> = (0..concurrency).map(|_| None).collect();
    let host = target.host();
    let (mut started, mut done, mut failed) = (0u64, 0u64, 0u64);
    let mut closes = net::CloseCounts::default();
    let begin = Instant::now();
    let until = begin + duration;
    let mut next_progress = begin + Duration::from_secs(1);
    let mut last_done = 0;
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        for (index, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() || started >= count {
                continue;
            }
            let source = target.source(started as usize);
            started += 1;
            let mut stream = match net::connect(source, target.addr) {
                Ok(stream) => stream,
                Err(error) => {
                    if failed == 0 {
                        eprintln!("connect from {source}: {error}");
                    }
                    failed += 1;
                    continue;
                }
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            if looper
                .poll
                .registry()
                .register(&mut stream, Token(index), interest)
                .is_err()
            {
                failed += 1;
                continue;
            }
            *slot = Some((Conn::new(stream, &host, &path, false, ()), Instant::now()));
        }
        if slots.iter().all(Option::is_none) {
            break;
        }
        if let Err(error) = looper
            .poll
            .poll(&mut looper.events, Some(Duration::from_millis(50)))
        {
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(format!("poll: {error}"));
            }
        }
        for event in looper.events.iter() {
            let index = event.token().0;
            let Some(Some((conn, opened_at))) = slots.get_mut(index) else {
                continue;
            };
            let pumped = conn.pump(&mut looper.buf, &mut looper.inflater, |_, _, _, _| {});
            let finished = if pumped.opened {
                let _ = histogram.record((opened_at.elapsed().as_nanos() as u64).max(1));
                done += 1;
                true
            } else if let Some(reason) = pumped.closed {
                closes.add(reason);
                failed += 1;
                true
            } else {
                false
            };
            if finished {
                if let Some((mut conn, _)) = slots[index].take() {
                    let _ = looper.poll.registry().deregister(&mut conn.stream);
                    // Dropping the stream closes it (FIN), like a client that got what it wanted.
                    debug_assert!(conn.phase == Phase::Open || conn.phase == Phase::Closed);
                }
            }
        }
        let now = Instant::now();
        if now >= next_progress {
            eprintln!(
                "[{label}] t={:.0}s handshakes/s={} failed={failed}",
                (now - begin).as_secs_f64(),
                done - last_done
            );
            last_done = done;
            next_progress += Duration::from_secs(1);
        }
    }
    let elapsed = begin.elapsed();
    if closes.total() > 0 && closes.refused > 0 {
        eprintln!(
            "[{label}] refused upgrades, last status {}",
            closes.last_refused_status
        );
    }
    Ok(json!({
        "scenario": "handshake",
        "label": label,
        "concurrency": concurrency,
        "elapsed_s": stats::round3(elapsed.as_secs_f64()),
        "handshakes": done,
        "failed": failed,
        "handshakes_per_s": stats::round3(done as f64 / elapsed.as_secs_f64()),
        "latency_us": stats::latency_summary_us(&histogram),
        "tool_cpu": stats::cpu_report(cpu_at_start, elapsed),
        "closes": closes.to_json(),
    }))
}
