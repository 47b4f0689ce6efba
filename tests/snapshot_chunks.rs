//! Big snapshots in chunks (PROTOCOL.md "Limits that protect the server"): anonymous clients
//! that subscribe to `*` and never read must not exhaust the server's memory or slow others
//! down, and a client that reads gets every state, in chunks, never going back in version.
//!
//! Both tests run on either engine (`STOCKSYNC_TEST_ENGINE=redis`).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SKUS: usize = 100_000;
/// Long ids, as a real catalogue has: about 110 bytes per state, 11 MB per full snapshot.
const PREFIX: &str = "warehouse-eu-central/catalogue:item.";

/// The two 100,000-SKU tests run one at a time: side by side on a small machine (each with its
/// own Redis in Redis mode) they starve each other past the Redis engine's reply timeout.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn sku(i: usize) -> String {
    format!("{PREFIX}{i:07}")
}

/// Creates `SKUS` SKUs in pipelined batches of 100.
fn fill(server: &Server) {
    let mut writer = server.writer();
    set_timeout(&writer, Duration::from_secs(60));
    let batches = SKUS / 100;
    // A small window: the Redis engine treats a reply later than 800 ms as a lost link, and
    // 64 batches of 100 long-id ops queued in Redis take about that long.
    let window = 8;
    let mut sent = 0;
    let mut acked = 0;
    while acked < batches {
        while sent < batches && sent - acked < window {
            let ops: Vec<Value> = (sent * 100..sent * 100 + 100)
                .map(|i| json!({"id": sku(i), "action": "set", "quantity": i as u64 % 1000}))
                .collect();
            send(&mut writer, json!({"type":"stock_batch","ops":ops}));
            sent += 1;
        }
        let reply = recv(&mut writer);
        assert_eq!(reply["type"], "ack", "{reply}");
        acked += 1;
    }
}

fn ping_rtts(ws: &mut Ws, count: usize) -> Vec<Duration> {
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        let reply = request(ws, json!({"type":"ping","id":i}));
        assert_eq!(reply["type"], "pong", "{reply}");
        rtts.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    rtts.sort();
    rtts
}

#[test]
fn non_reading_wildcard_subscribers_cost_about_one_chunk_each() {
    let _heavy = heavy();
    let server = Server::start(&[]);
    fill(&server);
    let mut pinger = server.ws("/ws");
    let rtt_before = ping_rtts(&mut pinger, 50);
    let rss_before_kb = rss_kb(server.pid());

    // Anonymous (reads are public), subscribe to everything, never read a byte.
    let stalled: Vec<_> = (0..20)
        .map(|_| {
            let (mut stream, _) = raw_ws_at(server.addr, "/ws");
            let subscribe = br#"{"type":"subscribe","id":"all","skus":["*"]}"#;
            stream
                .write_all(&client_frame(true, opcode::TEXT, subscribe))
                .unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let rtt_during = ping_rtts(&mut pinger, 100);
    let rss_after_kb = rss_kb(server.pid());
    let growth_kb = rss_after_kb.saturating_sub(rss_before_kb);
    let p99 = |rtts: &[Duration]| rtts[rtts.len() * 99 / 100 - 1];
    eprintln!(
        "RSS {rss_before_kb} kB -> {rss_after_kb} kB (+{growth_kb} kB) with 20 stalled `*` \
         subscribers on {SKUS} SKUs; ping p99 {:?} before, {:?} during",
        p99(&rtt_before),
        p99(&rtt_during)
    );
    // Unchunked, each stalled client held a whole 11 MB snapshot: +220 MB. Chunked, each
    // holds about one 256 KiB chunk (plus what the kernel takes).
    assert!(
        growth_kb < 40 * 1024,
        "server grew {growth_kb} kB for 20 stalled subscribers"
    );
    assert!(
        p99(&rtt_during) < Duration::from_millis(50),
        "ping p99 {:?} while stalled subscribers hold snapshots",
        p99(&rtt_during)
    );
    drop(stalled);
}

#[test]
fn reading_wildcard_subscriber_gets_every_state_in_chunks_never_older() {
    let _heavy = heavy();
    let server = Server::start(&[]);
    fill(&server);
    let mut subscriber = server.ws("/ws");
    set_timeout(&subscriber, Duration::from_secs(30));
    // A writer keeps changing SKUs spread over the whole catalogue while chunks go out, so
    // updates land before, between and after the chunks that carry those SKUs.
    let addr = server.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer = std::thread::spawn(move || {
        let (mut writer, _) =
            tungstenite::connect(format!("ws://{addr}/ws?token={TOKEN}")).unwrap();
        let mut rng = Rng(7);
        let mut writes = 0u64;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            let ops: Vec<Value> = (0..20)
                .map(|_| json!({"id": sku(rng.index(SKUS)), "action": "increase", "change": 1}))
                .collect();
            let reply = request(&mut writer, json!({"type":"stock_batch","ops":ops}));
            assert_eq!(reply["type"], "ack", "{reply}");
            writes += 1;
        }
        writes
    });
    std::thread::sleep(Duration::from_millis(100));

    send(
        &mut subscriber,
        json!({"type":"subscribe","id":"all","skus":["*"]}),
    );
    let mut newest: HashMap<String, u64> = HashMap::new();
    let observe = |state: &Value, newest: &mut HashMap<String, u64>| {
        let id = state["id"].as_str().unwrap().to_string();
        let version = state["version"].as_u64().unwrap();
        let seen = newest.entry(id.clone()).or_insert(0);
        assert!(
            version >= *seen,
            "{id}: version {version} after {seen} had been received"
        );
        *seen = version;
    };
    let mut chunks = 0;
    let mut updates = 0;
    let mut in_snapshot = true;
    while in_snapshot {
        let message = match subscriber.read().expect("read") {
            tungstenite::Message::Text(text) => text,
            _ => continue,
        };
        assert!(
            message.len() <= 256 * 1024 + 1024,
            "a message of {} bytes",
            message.len()
        );
        let value: Value = serde_json::from_str(&message).unwrap();
        match value["type"].as_str().unwrap() {
            "stock_update" => {
                updates += 1;
                observe(&value["stock"], &mut newest);
            }
            kind @ ("subscribed" | "snapshot") => {
                assert_eq!(
                    kind == "subscribed",
                    chunks == 0,
                    "{kind} as chunk {chunks}"
                );
                assert_eq!(value["id"], "all");
                chunks += 1;
                for state in value["stock"].as_array().unwrap() {
                    observe(state, &mut newest);
                }
                in_snapshot = value["more"] == json!(true);
                if !in_snapshot {
                    assert_eq!(value["more"], json!(false), "last chunk says more: false");
                }
            }
            other => panic!("unexpected {other}: {value}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    eprintln!("{chunks} chunks, {updates} updates between them, {writes} writes meanwhile");
    assert!(
        chunks >= 30,
        "11 MB should take over 30 chunks, took {chunks}"
    );
    assert_eq!(newest.len(), SKUS, "every known SKU arrives");
    // Updates of the last writes may still be on their way: drain them, still in order.
    set_timeout(&subscriber, Duration::from_millis(500));
    while let Ok(tungstenite::Message::Text(text)) = subscriber.read() {
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["type"], "stock_update", "{value}");
        observe(&value["stock"], &mut newest);
    }
}

#[test]
fn replies_of_one_chunk_are_unchanged() {
    let server = Server::start(&[]);
    let mut writer = server.writer();
    let reply = request(
        &mut writer,
        json!({"type":"stock_update","stock":{"id":"a","action":"set","quantity":3}}),
    );
    assert_eq!(reply["type"], "ack", "{reply}");
    let mut ws = server.ws("/ws");
    for (kind, skus) in [("subscribe", json!(["*", "a"])), ("get", json!(["a", "b"]))] {
        let reply = request(&mut ws, json!({"type":kind,"id":1,"skus":skus}));
        assert!(reply.get("more").is_none(), "{reply}");
        assert!(!reply["stock"].as_array().unwrap().is_empty(), "{reply}");
    }
}
