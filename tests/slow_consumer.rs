//! One client that stops reading must cost bounded memory and never hold back the others
//! (issue 6). 100 normal subscribers and 1 stalled client subscribe to 50 SKUs while 20,000
//! updates are published; the normal ones get every version in order, the server's RSS stays
//! bounded, and the stalled one, when it reads again, converges to the newest state of each SKU.
//!
//! Latency (p99 of normal subscribers, with and without the stalled client) is measured by the
//! ignored `slow_consumer_latency_benchmark`, never asserted:
//! `cargo test --release --test slow_consumer -- --ignored --nocapture`.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const SKUS: usize = 50;
const UPDATES: usize = 20_000;
const SUBSCRIBERS: usize = 100;
/// Acks the publisher may wait for at once: enough to keep the server busy, bounded.
const PUBLISH_WINDOW: usize = 64;
const FINAL_VERSION: u64 = (UPDATES / SKUS) as u64;
/// Publishing pace. Unpaced, 100 client threads sharing two cores with the server cannot parse
/// 2 million messages as fast as one publisher produces them: every subscriber would fall
/// behind by up to the whole stream and rightly be conflated too. 5,000 updates/s (4 s in all)
/// is a flash sale's worth of changes that a normal subscriber keeps up with.
const PUBLISH_RATE_PER_SEC: u64 = 5_000;
/// Conflation mark for these runs: 1 MiB of headroom for normal subscribers that a busy
/// machine delays briefly, still half the ~2.1 MB the stalled client would otherwise be owed.
const SEND_HIGH_BYTES: usize = 1024 * 1024;
const SOCKET_SEND_BUFFER_BYTES: usize = 128 * 1024;

fn sku(i: usize) -> String {
    format!("flash-{i}")
}

fn sku_list() -> Vec<String> {
    (0..SKUS).map(sku).collect()
}

/// Pulls `"name":NUMBER` out of our own compact JSON without a full parse (the 100 subscriber
/// threads share two cores with the server; parsing 2 million messages in full would dominate).
fn field_u64(text: &str, name: &str) -> Option<u64> {
    let key = format!("\"{name}\":");
    let start = text.find(&key)? + key.len();
    let digits: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

fn field_str<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("\"{name}\":\"");
    let start = text.find(&key)? + key.len();
    let len = text[start..].find('"')?;
    Some(&text[start..start + len])
}

fn metric(server: &Server, key: &str) -> f64 {
    scrape_metric(server, key).map_or(0.0, |v| v.parse().unwrap())
}

/// Reads one server frame: `(opcode, payload)`, or `None` at EOF / timeout.
fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    try_read_frame(stream).map(|(first, payload)| (first & 0x0f, payload))
}

/// A raw WebSocket client with a small receive buffer, so the kernel cannot hide much of what
/// the server queues for it.
fn small_buffer_client(addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    assert!(raw_handshake(&mut stream, "/ws").is_empty());
    stream
}

struct RunResult {
    /// Latency of every update at every normal subscriber, microseconds.
    latencies_us: Vec<u64>,
    rss_start_kb: u64,
    rss_max_kb: u64,
    publish_elapsed: Duration,
    conflated: f64,
    /// Vectored socket writes the server made (each a syscall).
    socket_writes: f64,
    /// What the stalled client received after resuming: frames, bytes, last version per SKU.
    stalled: Option<(usize, usize, HashMap<String, u64>)>,
}

/// One subscriber: checks it receives every version of every SKU in order, and records the
/// latency of each from the publisher's send time (looked up by the update's quantity).
fn subscriber(
    server_url: String,
    ready: Arc<Barrier>,
    sent_at_ns: Arc<Vec<AtomicU64>>,
    epoch: Instant,
) -> Vec<u64> {
    let (mut ws, _) = tungstenite::connect(server_url).expect("subscriber connect");
    set_timeout(&ws, Duration::from_secs(30));
    let reply = request(&mut ws, json!({"type":"subscribe","skus": sku_list()}));
    assert_eq!(reply["type"], "subscribed");
    ready.wait();
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut latencies = Vec::with_capacity(UPDATES);
    let mut done = 0;
    while done < SKUS {
        let text = match ws.read().expect("subscriber read") {
            tungstenite::Message::Text(text) => text,
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        };
        let now_ns = epoch.elapsed().as_nanos() as u64;
        assert_eq!(field_str(&text, "type"), Some("stock_update"), "{text}");
        let id = field_str(&text, "id").unwrap().to_string();
        let version = field_u64(&text, "version").unwrap();
        let quantity = field_u64(&text, "quantity").unwrap() as usize;
        let previous = last.insert(id.clone(), version).unwrap_or(0);
        assert_eq!(
            version,
            previous + 1,
            "a normal subscriber gets every version of {id} in order"
        );
        if version == FINAL_VERSION {
            done += 1;
        }
        let sent = sent_at_ns[quantity].load(Ordering::Acquire);
        if sent > 0 {
            latencies.push(now_ns.saturating_sub(sent) / 1000);
        }
    }
    latencies
}

fn run(with_stalled_client: bool, extra_args: &[&str], rate_per_sec: u64) -> RunResult {
    let high = SEND_HIGH_BYTES.to_string();
    let socket_buffer = SOCKET_SEND_BUFFER_BYTES.to_string();
    let mut args = vec![
        "--send-high-bytes",
        high.as_str(),
        "--socket-send-buffer",
        socket_buffer.as_str(),
    ];
    args.extend_from_slice(extra_args);
    let server = Server::start(&args);
    let pid = server.child.id();
    let epoch = Instant::now();
    let sent_at_ns: Arc<Vec<AtomicU64>> =
        Arc::new((0..UPDATES).map(|_| AtomicU64::new(0)).collect());

    let mut stalled = with_stalled_client.then(|| {
        let mut stream = small_buffer_client(server.addr);
        let subscribe = json!({"type":"subscribe","skus": sku_list()}).to_string();
        stream
            .write_all(&client_frame(true, 0x1, subscribe.as_bytes()))
            .unwrap();
        let (opcode, payload) = read_frame(&mut stream).expect("subscribed");
        assert_eq!(opcode, 0x1);
        assert!(String::from_utf8_lossy(&payload).contains("\"subscribed\""));
        // From here on it reads nothing until the publishing is over.
        stream
    });

    let ready = Arc::new(Barrier::new(SUBSCRIBERS + 1));
    let subscribers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let (url, ready, sent, epoch) =
                (server.url("/ws"), ready.clone(), sent_at_ns.clone(), epoch);
            thread::spawn(move || subscriber(url, ready, sent, epoch))
        })
        .collect();
    ready.wait();

    let rss_start_kb = rss_kb(pid);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        thread::spawn(move || {
            let mut max = 0;
            while sampling.load(Ordering::Relaxed) {
                max = max.max(rss_kb(pid));
                thread::sleep(Duration::from_millis(20));
            }
            max.max(rss_kb(pid))
        })
    };

    // The publisher: update k sets SKU k % 50 to quantity k, with a bounded window of
    // unacknowledged writes.
    let started = Instant::now();
    let mut writer = server.writer();
    set_timeout(&writer, Duration::from_secs(30));
    let mut in_flight = 0;
    for k in 0..UPDATES {
        // Paced: update k goes out no earlier than k / rate after the start.
        let due = Duration::from_micros(k as u64 * 1_000_000 / rate_per_sec);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            thread::sleep(wait);
        }
        sent_at_ns[k].store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
        let message = json!({"type":"stock_update","stock":{"id": sku(k % SKUS),"action":"set","quantity":k}});
        writer
            .send(tungstenite::Message::text(message.to_string()))
            .unwrap();
        in_flight += 1;
        while in_flight >= PUBLISH_WINDOW {
            assert_eq!(recv(&mut writer)["type"], "ack");
            in_flight -= 1;
        }
    }
    while in_flight > 0 {
        assert_eq!(recv(&mut writer)["type"], "ack");
        in_flight -= 1;
    }
    let publish_elapsed = started.elapsed();

    let mut latencies_us = Vec::with_capacity(UPDATES * SUBSCRIBERS);
    for handle in subscribers {
        latencies_us.extend(handle.join().expect("a normal subscriber failed"));
    }
    sampling.store(false, Ordering::Relaxed);
    let rss_max_kb = sampler.join().unwrap();
    let conflated = metric(
        &server,
        "stocksync_slow_consumer_actions_total{action=\"conflated\"}",
    );
    let socket_writes = metric(&server, "stocksync_socket_writes_total");

    // The stalled client reads again: it must converge to the newest state of every SKU, and
    // never see a version go back.
    let stalled = stalled.as_mut().map(|stream| {
        let mut last: HashMap<String, u64> = HashMap::new();
        let (mut frames, mut bytes) = (0, 0);
        while last.len() < SKUS || last.values().any(|&v| v < FINAL_VERSION) {
            let (opcode, payload) = read_frame(stream).expect("the stalled client catches up");
            if opcode != 0x1 {
                continue;
            }
            frames += 1;
            bytes += payload.len();
            let text = String::from_utf8(payload).unwrap();
            let id = field_str(&text, "id").unwrap().to_string();
            let version = field_u64(&text, "version").unwrap();
            let previous = last.insert(id.clone(), version).unwrap_or(0);
            assert!(
                version > previous,
                "{id}: version {version} after {previous}"
            );
        }
        (frames, bytes, last)
    });
    RunResult {
        latencies_us,
        rss_start_kb,
        rss_max_kb,
        publish_elapsed,
        conflated,
        socket_writes,
        stalled,
    }
}

#[test]
fn a_stalled_client_costs_bounded_memory_and_converges() {
    let result = run(true, &[], PUBLISH_RATE_PER_SEC);
    assert_eq!(result.latencies_us.len(), UPDATES * SUBSCRIBERS);
    assert!(
        result.rss_max_kb < 200 * 1024,
        "server RSS {} kB",
        result.rss_max_kb
    );
    let (frames, bytes, last) = result.stalled.unwrap();
    // The newest state of each SKU, and no more than one pending state per SKU beyond what
    // was queued before it went over its high mark: far fewer than the 20,000 updates.
    assert_eq!(last.len(), SKUS);
    assert!(last.values().all(|&v| v == FINAL_VERSION), "{last:?}");
    assert!(result.conflated > 0.0, "the stalled client was conflated");
    assert!(frames < UPDATES, "it was sent {frames} frames");
    // What it was sent is capped by the conflation mark: the high mark, plus what the kernel
    // holds (SO_SNDBUF, doubled by the kernel, and its 4 KiB receive buffer), plus one newest
    // state per SKU, plus slack for the frame that crossed the mark. Without conflation it
    // would be all 20,000 updates, about 2.1 MB.
    let cap = SEND_HIGH_BYTES + 2 * SOCKET_SEND_BUFFER_BYTES + 64 * 1024 + SKUS * 128;
    assert!(
        bytes < cap,
        "{bytes} bytes sent to the stalled client, cap {cap}"
    );
}

#[test]
fn a_client_sending_requests_but_never_reading_is_closed_with_1008() {
    let server = Server::start(&["--send-high-bytes", "16384", "--send-max-bytes", "65536"]);
    let mut client = small_buffer_client(server.addr);
    // Each `get` of 50 SKUs is answered with ~4.5 KB; a few hundred of them, never read,
    // push the unsent replies past the 64 KiB hard limit.
    let get = client_frame(
        true,
        0x1,
        json!({"type":"get","skus": sku_list()})
            .to_string()
            .as_bytes(),
    );
    client
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    for _ in 0..200 {
        if client.write_all(&get).is_err() {
            break; // the server stopped reading us: that is the point
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        &server,
        "stocksync_limit_hits_total{limit=\"send_queue_hard\"}",
    ) < 1.0
    {
        assert!(Instant::now() < deadline, "hard limit never hit");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        metric(
            &server,
            "stocksync_slow_consumer_actions_total{action=\"closed\"}"
        ),
        1.0
    );
    // When it finally reads: its replies (none dropped, up to the close), then 1008.
    let mut replies = 0;
    let code = loop {
        let (opcode, payload) = read_frame(&mut client).expect("a close frame");
        match opcode {
            0x1 => replies += 1,
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    assert_eq!(code, 1008);
    assert!(replies > 0);
    // The server is fine and serving others.
    let mut other = server.ws("/ws");
    assert_eq!(request(&mut other, json!({"type":"ping"}))["type"], "pong");
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Measures p50/p99/max delivery latency of the normal subscribers and the server's RSS, with
/// and without the stalled client. Writes nothing; prints a table for docs/BENCHMARKS.md.
#[test]
#[ignore]
fn slow_consumer_latency_benchmark() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    println!("| run | stalled client | publish s | updates/s | p50 ms | p99 ms | max ms | RSS start MB | RSS max MB | conflated | socket writes | stalled frames after resume |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let rate: u64 = std::env::var("PUBLISH_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(PUBLISH_RATE_PER_SEC);
    // Extra server flags (later ones win), e.g. BENCH_SERVER_ARGS="--socket-send-buffer 0".
    let extra = std::env::var("BENCH_SERVER_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    for round in 0..rounds {
        for stalled in [false, true] {
            let mut result = run(stalled, &extra, rate);
            result.latencies_us.sort_unstable();
            let l = &result.latencies_us;
            let frames = result
                .stalled
                .as_ref()
                .map_or("-".to_string(), |(f, b, _)| format!("{f} ({b} B)"));
            println!(
                "| {round} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} | {} |",
                if stalled { "yes" } else { "no" },
                result.publish_elapsed.as_secs_f64(),
                UPDATES as f64 / result.publish_elapsed.as_secs_f64(),
                percentile(l, 0.50) as f64 / 1000.0,
                percentile(l, 0.99) as f64 / 1000.0,
                percentile(l, 1.0) as f64 / 1000.0,
                result.rss_start_kb as f64 / 1024.0,
                result.rss_max_kb as f64 / 1024.0,
                result.conflated,
                result.socket_writes,
                frames,
            );
        }
    }
}
