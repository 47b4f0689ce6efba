//! Limits that protect the server (PROTOCOL.md): `--max-skus`, and writes in flight bounded
//! per connection while the log is slow.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn set(ws: &mut Ws, sku: &str) -> serde_json::Value {
    request(
        ws,
        json!({"type":"stock_update","stock":{"id":sku,"action":"set","quantity":5}}),
    )
}

#[test]
fn max_skus_refuses_new_skus_past_it_and_lets_existing_ones_change() {
    let server = Server::start(&["--max-skus", "3"]);
    let mut ws = server.writer();
    for sku in ["a", "b", "c"] {
        assert_eq!(set(&mut ws, sku)["type"], "ack");
    }
    // Each row: what is sent, and the code expected (None = ack).
    let table: Vec<(serde_json::Value, Option<&str>)> = vec![
        (
            json!({"type":"stock_update","stock":{"id":"d","action":"set","quantity":1}}),
            Some("too_large"),
        ),
        (
            json!({"type":"stock_update","stock":{"id":"a","action":"increase","change":1}}),
            None,
        ),
        // A batch that would create one: refused whole, `a` keeps its version.
        (
            json!({"type":"stock_batch","ops":[
            {"id":"a","action":"increase","change":1},
            {"id":"e","action":"set","quantity":1}]}),
            Some("too_large"),
        ),
        (
            json!({"type":"stock_batch","ops":[
            {"id":"b","action":"increase","change":1},
            {"id":"c","action":"increase","change":1}]}),
            None,
        ),
    ];
    for (message, code) in table {
        let reply = request(&mut ws, message.clone());
        match code {
            Some(code) => assert_eq!(reply["code"], code, "{message} -> {reply}"),
            None => assert_eq!(reply["type"], "ack", "{message} -> {reply}"),
        }
    }
    let a = request(&mut ws, json!({"type":"get","skus":["a","e"]}));
    assert_eq!(a["stock"][0]["version"], 2, "{a}");
    assert_eq!(a["stock"][1]["version"], 0, "{a}");
    // Over HTTP: 413 too_large.
    let (status, body) = http_json(
        "POST",
        &server.http("/stock/f"),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        Some(r#"{"action":"set","quantity":1}"#),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
}

/// A client pipelining writes as fast as it can for `seconds` (reading its acks on another
/// thread, so only writes in flight can bound it) against a log that takes 300 ms per batch.
/// Returns (outbox peak, RSS growth kB, acks received).
fn pipelining_writer(extra: &[&str], seconds: u64) -> (u64, u64, u64) {
    // A slow disk on demand: the server (a child process) inherits it.
    std::env::set_var("STOCKSYNC_TEST_SYNC_DELAY_MS", "300");
    let server = Server::start_durable(extra);
    std::env::remove_var("STOCKSYNC_TEST_SYNC_DELAY_MS");
    let (stream, _) = raw_ws_at(server.addr, &format!("/ws?token={TOKEN}"));
    // Blocking reads (a timeout could cut a frame in half); ended by shutting the socket.
    let mut reader = stream.try_clone().unwrap();
    let acks = Arc::new(AtomicU64::new(0));
    let reading = {
        let acks = acks.clone();
        std::thread::spawn(move || {
            while let Some((_, payload)) = try_read_frame(&mut reader) {
                if payload.starts_with(br#"{"type":"ack""#) {
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut writer = stream;
    writer
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let rss_start_kb = rss_kb(server.pid());
    let mut rss_max_kb = rss_start_kb;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut burst = Vec::new();
    let mut i = 0u64;
    while Instant::now() < deadline {
        burst.clear();
        for _ in 0..100 {
            let message = format!(
                r#"{{"type":"stock_update","stock":{{"id":"sku-{}","action":"increase","change":1}}}}"#,
                i % 1000
            );
            burst.extend_from_slice(&client_frame(true, opcode::TEXT, message.as_bytes()));
            i += 1;
        }
        // A timeout means the server stopped reading us: that is the point.
        let _ = writer.write_all(&burst);
        rss_max_kb = rss_max_kb.max(rss_kb(server.pid()));
    }
    let peak: u64 = scrape_metric(&server, "stocksync_outbox_entries_peak")
        .unwrap()
        .parse()
        .unwrap();
    let _ = writer.shutdown(std::net::Shutdown::Both);
    reading.join().unwrap();
    (
        peak,
        rss_max_kb.saturating_sub(rss_start_kb),
        acks.load(Ordering::Relaxed),
    )
}

#[test]
fn pipelining_writer_during_slow_syncs_is_held_to_its_writes_in_flight() {
    let (peak, growth_kb, acks) = pipelining_writer(&[], 4);
    eprintln!("bounded: outbox peak {peak}, RSS +{growth_kb} kB, {acks} acks");
    // 256 in flight, plus what one read (64 KiB, about 800 of these writes) had delivered
    // before the hold.
    assert!(peak <= 256 + 1_000, "outbox peak {peak}");
    assert!(acks >= 256, "the held writer still progresses: {acks} acks");

    // The same client with the bound lifted (as before it existed): the outbox and the log's
    // batch grow with whatever the client sends while the disk is slow.
    let (peak, growth_kb, acks) = pipelining_writer(&["--max-writes-in-flight", "1000000000"], 4);
    eprintln!("unbounded: outbox peak {peak}, RSS +{growth_kb} kB, {acks} acks");
    assert!(peak > 5_000, "outbox peak {peak} without the bound");
}

/// Writes in flight at once: the embedded store counts them as they are submitted, the Redis
/// engine's script counts them with HLEN (its replica only learns of them later). Either way
/// exactly `--max-skus` of them create SKUs.
#[test]
fn pipelined_creates_never_pass_max_skus() {
    let server = Server::start(&["--max-skus", "3"]);
    let mut ws = server.writer();
    for i in 0..10 {
        send(
            &mut ws,
            json!({"type":"stock_update","id":i,"stock":{"id":format!("new-{i}"),"action":"set","quantity":1}}),
        );
    }
    let mut acks = 0;
    for _ in 0..10 {
        let reply = recv(&mut ws);
        match reply["type"].as_str() {
            Some("ack") => acks += 1,
            _ => assert_eq!(reply["code"], "too_large", "{reply}"),
        }
    }
    assert_eq!(acks, 3);
    let (_, health) = server.healthz();
    assert_eq!(health["store"]["skus"], 3, "{health}");
}
