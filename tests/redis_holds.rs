//! Holds with the Redis engine across processes (PROTOCOL.md "Holds", docs/SCALING.md): a hold
//! taken on one process expires once, whichever process fires first, and every process's
//! subscribers see that one change; a hold taken on one process is committed or extended on
//! another; a hold outlives its process, and a deadline that passed while no process ran is
//! released at the next start.

mod common;

use std::time::{Duration, Instant};

use common::holds::{hold_msg, q, state};
use common::redis::RedisServer;
use common::watch::recv_within;
use common::{request, scrape_metric, subscribed_client, Server, Ws};
use serde_json::{json, Value};

/// Slack for a change to reach every process on a loaded 2-core machine.
const FEED: Duration = Duration::from_secs(10);

fn set(ws: &mut Ws, sku: &str, quantity: u64) {
    let reply = request(
        ws,
        json!({"type":"stock_update","stock":{"id":sku,"action":"set","quantity":quantity}}),
    );
    assert_eq!(reply["type"], "ack", "{reply}");
}

fn hold_op(sku: &str, change: u64, hold: &str, ttl_ms: u64) -> Value {
    json!({"id": sku, "action": "reserve", "change": change, "hold": hold, "ttl_ms": ttl_ms})
}

/// The next message of `kind`, skipping others, within [`FEED`].
fn recv_kind(ws: &mut Ws, kind: &str) -> Value {
    let deadline = Instant::now() + FEED;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = recv_within(ws, left).unwrap_or_else(|| panic!("no {kind} within {FEED:?}"));
        if message["type"] == kind {
            return message;
        }
    }
}

/// Polls `read` until it returns `want` (a change reaches the other process through the feed).
fn eventually<T: PartialEq + std::fmt::Debug>(mut read: impl FnMut() -> T, want: T) {
    let deadline = Instant::now() + FEED;
    loop {
        let got = read();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "got {got:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_hold_taken_on_one_process_expires_once_and_every_process_broadcasts_it() {
    let redis = RedisServer::start();
    let a = Server::start_redis(&redis.url(), &[]);
    let b = Server::start_redis(&redis.url(), &[]);
    let mut holder = a.writer();
    set(&mut holder, "x", 10);
    set(&mut holder, "y", 10);
    // B has both SKUs before its subscriber joins (else it might hear version 1 late).
    let mut on_b = b.writer();
    eventually(|| q(&state(&mut on_b, "y")), (10, 10, 0, 1));
    let mut watchers = [
        subscribed_client(&a, &["x", "y"]),
        subscribed_client(&b, &["x", "y"]),
    ];
    let batch = json!({"type":"stock_batch",
        "ops":[hold_op("x", 2, "cart", 400), hold_op("y", 3, "cart", 400)]});
    let ack = request(&mut holder, batch);
    assert_eq!(ack["type"], "ack", "{ack}");
    let pushed = recv_kind(&mut holder, "hold_expired");
    assert_eq!(pushed["hold"], "cart");
    let pushed: Vec<_> = pushed["stock"].as_array().unwrap().iter().map(q).collect();
    assert_eq!(pushed, [(10, 10, 0, 3), (10, 10, 0, 3)]);
    for watcher in &mut watchers {
        // Each SKU: the take (version 2), the expiry (version 3), and nothing after it.
        let mut seen = Vec::new();
        while seen.len() < 4 {
            let update = recv_kind(watcher, "stock_update");
            seen.push((
                update["stock"]["id"].as_str().unwrap().to_string(),
                q(&update["stock"]),
            ));
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                ("x".to_string(), (8, 10, 2, 2)),
                ("x".to_string(), (10, 10, 0, 3)),
                ("y".to_string(), (7, 10, 3, 2)),
                ("y".to_string(), (10, 10, 0, 3)),
            ]
        );
        assert!(
            recv_within(watcher, Duration::from_millis(500)).is_none(),
            "one expiry, one version per SKU"
        );
    }
    // Both processes know it expired; Redis has no trace of its units.
    for server in [&a, &b] {
        let mut ws = server.writer();
        eventually(
            || hold_msg(&mut ws, "get", "cart")["code"].clone(),
            json!("hold_expired"),
        );
        let err = hold_msg(&mut ws, "commit", "cart");
        assert_eq!(err["code"], "hold_expired", "{err}");
        assert_eq!(
            scrape_metric(server, "stocksync_holds_expired_total").as_deref(),
            Some("1")
        );
    }
    assert_eq!(redis.cmd(&["HLEN", "stocksync:{inventory}:holds"]).int(), 0);
    assert_eq!(redis.cmd(&["HLEN", "stocksync:{inventory}:held"]).int(), 0);
    let ttl = redis
        .cmd(&["PTTL", "stocksync:{inventory}:expired:cart"])
        .int();
    assert!(ttl > 3_500_000, "marker kept for an hour: {ttl}");
}

#[test]
fn a_hold_taken_on_one_process_is_extended_and_committed_on_another() {
    let redis = RedisServer::start();
    let a = Server::start_redis(&redis.url(), &[]);
    let b = Server::start_redis(&redis.url(), &[]);
    let mut on_a = a.writer();
    let mut on_b = b.writer();
    set(&mut on_a, "x", 10);
    let ack = request(
        &mut on_a,
        json!({"type":"stock_update","stock": hold_op("x", 4, "order-7", 1_500)}),
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    // B learns the hold from the feed.
    eventually(
        || hold_msg(&mut on_b, "get", "order-7")["hold"]["lines"].clone(),
        json!([{"id":"x","units":4}]),
    );
    let extended = request(
        &mut on_b,
        json!({"type":"hold","action":"extend","hold":"order-7","ttl_ms":60_000}),
    );
    assert!(
        extended["hold"]["expires_in_ms"].as_u64().unwrap() > 50_000,
        "{extended}"
    );
    // A sees the new deadline too: past the first one, the hold is still live.
    eventually(
        || hold_msg(&mut on_a, "get", "order-7")["hold"]["expires_in_ms"].as_u64() > Some(50_000),
        true,
    );
    std::thread::sleep(Duration::from_millis(1_700));
    let got = hold_msg(&mut on_a, "get", "order-7");
    assert_eq!(got["type"], "hold", "{got}");
    let committed = hold_msg(&mut on_b, "commit", "order-7");
    assert_eq!(committed["type"], "ack", "{committed}");
    assert_eq!(q(&committed["stock"][0]), (6, 6, 0, 3));
    eventually(|| q(&state(&mut on_a, "x")), (6, 6, 0, 3));
    eventually(
        || hold_msg(&mut on_a, "get", "order-7")["code"].clone(),
        json!("unknown_hold"),
    );
    // The anonymous reserve on A may now take what the hold had.
    let ack = request(
        &mut on_a,
        json!({"type":"stock_update","stock":{"id":"x","action":"reserve","change":6}}),
    );
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[test]
fn holds_outlive_their_process_and_a_deadline_passed_while_down_is_released_at_start() {
    let redis = RedisServer::start();
    let server = Server::start_redis(&redis.url(), &[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    for (hold, units, ttl_ms) in [("lapsed", 4, 300), ("alive", 1, 60_000)] {
        let ack = request(
            &mut ws,
            json!({"type":"stock_update","stock": hold_op("a", units, hold, ttl_ms)}),
        );
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    drop(ws);
    let mut server = server;
    server.signal(libc::SIGKILL);
    let _ = server.child.wait();
    std::thread::sleep(Duration::from_millis(600));
    let server = Server::start_redis(&redis.url(), &[]);
    let mut ws = server.writer();
    // Released before the port opened: the first read already sees it.
    assert_eq!(q(&state(&mut ws, "a")), (9, 10, 1, 4));
    let err = hold_msg(&mut ws, "commit", "lapsed");
    assert_eq!(err["code"], "hold_expired", "{err}");
    // A process started later still knows it expired (the expired index in Redis).
    let late = Server::start_redis(&redis.url(), &[]);
    let err = hold_msg(&mut late.writer(), "get", "lapsed");
    assert_eq!(err["code"], "hold_expired", "{err}");
    let got = hold_msg(&mut ws, "get", "alive");
    assert_eq!(got["hold"]["lines"], json!([{"id":"a","units":1}]), "{got}");
    let ack = hold_msg(&mut ws, "commit", "alive");
    assert_eq!(q(&ack["stock"][0]), (9, 9, 0, 5), "{ack}");
    // Nothing is pushed to this connection: it did not take those holds.
    assert!(recv_within(&mut ws, Duration::from_millis(300)).is_none());
}

#[test]
fn a_hold_whose_deadline_passes_while_redis_is_down_expires_once_redis_is_back() {
    let mut redis = RedisServer::start_persistent();
    let a = Server::start_redis(&redis.url(), &[]);
    let b = Server::start_redis(&redis.url(), &[]);
    let mut holder = a.writer();
    set(&mut holder, "x", 10);
    let mut on_b = b.writer();
    eventually(|| q(&state(&mut on_b, "x")), (10, 10, 0, 1));
    let mut watcher = subscribed_client(&b, &["x"]);
    let ack = request(
        &mut holder,
        json!({"type":"stock_update","stock": hold_op("x", 5, "during-outage", 300)}),
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(next_version(&mut watcher, 2), (5, 10, 5, 2));
    redis.kill();
    std::thread::sleep(Duration::from_millis(800));
    redis.restart();
    // Expired by whichever process reconnects first; pushed to the holder; seen on B once.
    let pushed = recv_kind(&mut holder, "hold_expired");
    assert_eq!(q(&pushed["stock"][0]), (10, 10, 0, 3), "{pushed}");
    assert_eq!(next_version(&mut watcher, 3), (10, 10, 0, 3));
    assert!(recv_within(&mut watcher, Duration::from_millis(500)).is_none());
    // Once B's link is back too (its reconnect backoff may still run).
    eventually(
        || hold_msg(&mut on_b, "commit", "during-outage")["code"].clone(),
        json!("hold_expired"),
    );
}

/// The first `stock_update` at `version` or later (a subscriber may first hear an older
/// version its process learned late).
fn next_version(ws: &mut Ws, version: u64) -> (u64, u64, u64, u64) {
    loop {
        let got = q(&recv_kind(ws, "stock_update")["stock"]);
        if got.3 >= version {
            return got;
        }
    }
}
