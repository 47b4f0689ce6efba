//! The Redis engine at the protocol level (PROTOCOL.md "Several processes, one inventory"):
//! several `stocksync` processes started with one Redis serve ONE inventory, so every rule of
//! the contract holds across them as if they were one server. Each test starts its own
//! `redis-server` (tests/common/redis.rs) and two or more processes on it.

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, Value as Resp};
use common::watch::Watcher;
use common::*;
use serde_json::{json, Value};

/// How long a change may take to reach another process's subscribers (the change feed's delay
/// is milliseconds; this is slack for a loaded 2-core machine).
const FEED: Duration = Duration::from_secs(5);

/// The idempotency TTL the issue asks for: at least 24 hours.
const IDEMPOTENCY_TTL_SECONDS_MIN: i64 = 24 * 3600;

fn update(stock: Value) -> Value {
    json!({"type":"stock_update","stock":stock})
}

fn keyed(key: &str, stock: Value) -> Value {
    json!({"type":"stock_update","idempotency_key":key,"stock":stock})
}

fn ack(ws: &mut Ws, message: Value) -> Value {
    let reply = request(ws, message.clone());
    assert_eq!(reply["type"], "ack", "{message}: {reply}");
    reply
}

fn error(ws: &mut Ws, message: Value, code: &str) -> Value {
    let reply = request(ws, message.clone());
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some(code)),
        "{message}: {reply}"
    );
    reply
}

fn get(ws: &mut Ws, sku: &str) -> Value {
    let reply = request(ws, json!({"type":"get","skus":[sku]}));
    assert_eq!(reply["type"], "stock", "{reply}");
    reply["stock"][0].clone()
}

/// (on_hand, reserved, quantity, version)
fn st(state: &Value) -> (u64, u64, u64, u64) {
    let field = |name: &str| state[name].as_u64().unwrap_or_else(|| panic!("{state}"));
    (
        field("on_hand"),
        field("reserved"),
        field("quantity"),
        field("version"),
    )
}

/// Waits until `server` (a process other than the writer's) reads `sku` at `version` or newer.
fn wait_read(server: &Server, sku: &str, version: u64) -> Value {
    let mut reader = server.ws("/ws");
    let deadline = Instant::now() + FEED;
    loop {
        let state = get(&mut reader, sku);
        if state["version"].as_u64().unwrap() >= version {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{sku} never reached version {version} on {}: {state}",
            server.addr
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Two processes on one fresh Redis.
fn pair(redis: &RedisServer) -> (Server, Server) {
    (
        Server::start_redis(&redis.url(), &[]),
        Server::start_redis(&redis.url(), &[]),
    )
}

// ---- the harness itself -----------------------------------------------------------------------

#[test]
fn redis_harness_starts_kills_and_restarts_on_the_same_port_and_dir() {
    let mut durable = RedisServer::start_persistent();
    let port = durable.port;
    assert_eq!(durable.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    durable.kill();
    assert!(!durable.is_running());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after a kill"
    );
    durable.restart();
    assert_eq!(durable.port, port);
    assert_eq!(
        durable.cmd(&["GET", "k"]),
        Resp::Bulk(b"v".to_vec()),
        "appendfsync always keeps a write across SIGKILL"
    );
    assert_eq!(
        durable.cmd(&["CONFIG", "GET", "appendonly"]).array()[1].text(),
        "yes"
    );

    let mut volatile = RedisServer::start();
    volatile.cmd(&["SET", "k", "v"]);
    assert_eq!(volatile.keys("*"), ["k"]);
    volatile.stop();
    assert!(!volatile.is_running());
    volatile.restart();
    assert_eq!(
        volatile.cmd(&["GET", "k"]),
        Resp::Nil,
        "no persistence: a restart is empty"
    );
    assert!(volatile.cmd(&["NOSUCHCOMMAND"]).is_error());
}

// ---- one inventory ----------------------------------------------------------------------------

#[test]
fn a_write_on_one_process_reaches_subscribers_and_reads_on_another() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    let on_b = Watcher::subscribe("b", b.ws("/ws"), &["shared"]);
    let on_a = Watcher::subscribe("a", a.ws("/ws"), &["shared"]);
    assert_eq!(on_b.version("shared"), 0);

    let mut writer_a = a.writer();
    let first = ack(&mut writer_a, update(stock_op("shared", "set", 10)));
    assert_eq!(st(&first["stock"]), (10, 0, 10, 1));
    assert!(
        on_b.wait_version("shared", 1, FEED),
        "B's subscriber never got A's write"
    );
    assert_eq!(st(&get(&mut b.ws("/ws"), "shared")), (10, 0, 10, 1));

    // The other way round, over HTTP this time.
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http_json(
        "POST",
        &b.http("/stock/shared"),
        &[("Authorization", &bearer)],
        Some(r#"{"action":"reserve","change":3}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(st(&body["stock"]), (10, 3, 7, 2));
    assert!(
        on_a.wait_version("shared", 2, FEED),
        "A's subscriber never got B's write"
    );
    let (status, body) = http_json("GET", &a.http("/stock/shared"), &[], None);
    assert_eq!((status, st(&body)), (200, (10, 3, 7, 2)), "{body}");

    for watcher in [on_a, on_b] {
        let label = watcher.label.clone();
        let seen = watcher.finish();
        seen.check_states();
        assert_eq!(seen.versions("shared"), [1, 2], "subscriber on {label}");
        assert!(seen.other.is_empty(), "{:?}", seen.other);
        assert!(seen.closed.is_none(), "{:?}", seen.closed);
    }
}

#[test]
fn a_process_started_later_loads_the_inventory_already_in_redis() {
    let redis = RedisServer::start();
    let a = Server::start_redis(&redis.url(), &[]);
    let mut writer = a.writer();
    for i in 0..50 {
        ack(&mut writer, update(stock_op(&format!("old-{i}"), "set", i)));
    }
    ack(&mut writer, update(stock_op("old-7", "reserve", 2)));

    let b = Server::start_redis(&redis.url(), &[]);
    // Its first read already has everything: the replica is loaded before it serves.
    let mut reader = b.ws("/ws");
    assert_eq!(st(&get(&mut reader, "old-7")), (7, 2, 5, 2));
    assert_eq!(st(&get(&mut reader, "old-49")), (49, 0, 49, 1));
    let reply = request(&mut reader, json!({"type":"subscribe","skus":["*"]}));
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let all = reply["stock"].as_array().unwrap();
    assert_eq!(all.len(), 50, "every known SKU in the `*` snapshot");
}

#[test]
fn a_star_subscriber_on_one_process_sees_skus_created_on_another() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    let star = Watcher::subscribe("b*", b.ws("/ws"), &["*"]);
    let mut writer = a.writer();
    for sku in ["new-1", "new-2", "new-3"] {
        ack(&mut writer, update(stock_op(sku, "set", 5)));
    }
    for sku in ["new-1", "new-2", "new-3"] {
        assert!(
            star.wait_version(sku, 1, FEED),
            "{sku} never reached B's `*`"
        );
    }
}

#[test]
fn idempotency_keys_are_shared_across_processes() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    let (mut on_a, mut on_b) = (a.writer(), b.writer());
    ack(&mut on_a, update(stock_op("idem", "set", 10)));

    let order = keyed("order-1", stock_op("idem", "reserve", 3));
    let first = ack(&mut on_a, order.clone());
    assert!(first.get("duplicate").is_none(), "{first}");
    assert_eq!(st(&first["stock"]), (10, 3, 7, 2));
    // A retry that lands on the other process is the same key: the original result, once.
    let retry = ack(&mut on_b, order.clone());
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["stock"], first["stock"]);
    ack(&mut on_b, update(stock_op("idem", "increase", 1)));
    let again = ack(&mut on_a, order);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["stock"], first["stock"], "the original result");
    assert_eq!(st(&wait_read(&a, "idem", 3)), (11, 3, 8, 3), "applied once");

    // The same key with a different request, on the other process: refused, nothing changes.
    error(
        &mut on_b,
        keyed("order-1", stock_op("idem", "reserve", 4)),
        "bad_request",
    );
    // A rejected write records no key: once it can succeed, its retry elsewhere applies.
    let big = keyed("order-2", stock_op("idem", "reserve", 20));
    error(&mut on_a, big.clone(), "insufficient_stock");
    ack(&mut on_a, update(stock_op("idem", "increase", 20)));
    let applied = ack(&mut on_b, big.clone());
    assert!(applied.get("duplicate").is_none(), "{applied}");
    assert_eq!(st(&applied["stock"]), (31, 23, 8, 5));
    assert_eq!(ack(&mut on_a, big)["duplicate"], true);

    // Batches share the key space too.
    let batch = json!({"type":"stock_batch","idempotency_key":"cart-1","ops":[
        stock_op("idem", "release", 1), stock_op("idem-2", "set", 4),
    ]});
    let first = ack(&mut on_b, batch.clone());
    let retry = ack(&mut on_a, batch);
    assert_eq!(retry["duplicate"], true, "{retry}");
    assert_eq!(retry["stock"], first["stock"]);
    assert_eq!(st(&wait_read(&a, "idem", 6)), (31, 22, 9, 6));
    assert_eq!(st(&wait_read(&a, "idem-2", 1)), (4, 0, 4, 1));
}

#[test]
fn batches_are_atomic_across_processes() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    let on_a = Watcher::subscribe("a", a.ws("/ws"), &["left", "right"]);
    let (mut writer_a, mut writer_b) = (a.writer(), b.writer());
    ack(
        &mut writer_a,
        json!({"type":"stock_batch","ops":[stock_op("left","set",5), stock_op("right","set",5)]}),
    );
    assert!(on_a.wait_version("right", 1, FEED));

    // All or none: the second op fails, so the first is not applied either.
    let refused = error(
        &mut writer_b,
        json!({"type":"stock_batch","ops":[
            stock_op("left","reserve",2), stock_op("right","reserve",10),
        ]}),
        "insufficient_stock",
    );
    assert_eq!(refused["index"], 1, "{refused}");
    // Ops apply in order, each seeing the ones before it; one version per SKU per batch.
    let done = ack(
        &mut writer_b,
        json!({"type":"stock_batch","ops":[
            stock_op("left","reserve",2), stock_op("right","reserve",3), stock_op("left","reserve",3),
        ]}),
    );
    let states: Vec<_> = done["stock"].as_array().unwrap().iter().map(st).collect();
    assert_eq!(states, [(5, 5, 0, 2), (5, 3, 2, 2), (5, 5, 0, 2)]);
    assert!(on_a.wait_version("left", 2, FEED) && on_a.wait_version("right", 2, FEED));
    assert_eq!(st(&get(&mut writer_a, "left")), (5, 5, 0, 2));

    let seen = on_a.finish();
    assert_eq!(seen.versions("left"), [1, 2], "one update per batch");
    assert_eq!(seen.versions("right"), [1, 2]);
    let left_1 = seen.updates.iter().find(|s| s["id"] == "left").unwrap();
    assert_eq!(st(left_1), (5, 0, 5, 1));
}

/// Concurrent batches from two processes, each moving one unit from `from` to `to`: the total is
/// conserved, and each batch gave both SKUs exactly one version.
#[test]
fn concurrent_batches_on_two_processes_conserve_stock() {
    const WRITERS_PER_PROCESS: usize = 4;
    const BATCHES: usize = 50;
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    let mut setter = a.writer();
    ack(
        &mut setter,
        json!({"type":"stock_batch","ops":[stock_op("from","set",1000), stock_op("to","set",0)]}),
    );
    let start = Arc::new(Barrier::new(2 * WRITERS_PER_PROCESS));
    let threads: Vec<_> = (0..2 * WRITERS_PER_PROCESS)
        .map(|w| {
            let mut ws = if w % 2 == 0 { a.writer() } else { b.writer() };
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..BATCHES {
                    let reply = ack(
                        &mut ws,
                        json!({"type":"stock_batch","ops":[
                            stock_op("from","decrease",1), stock_op("to","increase",1),
                        ]}),
                    );
                    let (from, to) = (&reply["stock"][0], &reply["stock"][1]);
                    assert_eq!(
                        from["on_hand"].as_u64().unwrap() + to["on_hand"].as_u64().unwrap(),
                        1000,
                        "{reply}"
                    );
                    assert_eq!(from["version"], to["version"], "{reply}");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer");
    }
    let moved = (2 * WRITERS_PER_PROCESS * BATCHES) as u64;
    let version = moved + 1;
    assert_eq!(
        st(&wait_read(&b, "from", version)),
        (1000 - moved, 0, 1000 - moved, version)
    );
    assert_eq!(
        st(&wait_read(&b, "to", version)),
        (moved, 0, moved, version)
    );
    assert_eq!(
        st(&wait_read(&a, "to", version)),
        (moved, 0, moved, version)
    );
}

#[test]
fn if_version_is_decided_in_redis_across_processes() {
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    let (mut writer_a, mut writer_b) = (a.writer(), b.writer());
    ack(&mut writer_a, update(stock_op("iv", "set", 10)));
    let mut guarded = stock_op("iv", "reserve", 1);
    guarded["if_version"] = json!(1);
    // B applies at version 1; A, right after, compares with Redis, not with its replica.
    assert_eq!(
        st(&ack(&mut writer_b, update(guarded.clone()))["stock"]),
        (10, 1, 9, 2)
    );
    let conflict = error(&mut writer_a, update(guarded), "version_conflict");
    assert_eq!(
        st(&conflict["stock"]),
        (10, 1, 9, 2),
        "the conflict carries the current state: {conflict}"
    );
    let mut next = stock_op("iv", "reserve", 1);
    next["if_version"] = json!(2);
    assert_eq!(
        st(&ack(&mut writer_a, update(next))["stock"]),
        (10, 2, 8, 3)
    );
    // In a batch, `if_version` compares with the version before the batch.
    let mut first = stock_op("iv", "release", 1);
    first["if_version"] = json!(3);
    let mut second = stock_op("iv", "release", 1);
    second["if_version"] = json!(3);
    let done = ack(
        &mut writer_b,
        json!({"type":"stock_batch","ops":[first.clone(), second]}),
    );
    assert_eq!(st(&done["stock"][1]), (10, 0, 10, 4));
    let stale = error(
        &mut writer_a,
        json!({"type":"stock_batch","ops":[first]}),
        "version_conflict",
    );
    assert_eq!(stale["stock"]["version"], 4, "{stale}");
}

#[test]
fn redis_prefix_isolates_inventories_on_one_redis() {
    let redis = RedisServer::start();
    let shop_a = Server::start_redis(&redis.url(), &["--redis-prefix", "shop-a:"]);
    let shop_a_too = Server::start_redis(&redis.url(), &["--redis-prefix", "shop-a:"]);
    let shop_b = Server::start_redis(&redis.url(), &["--redis-prefix", "shop-b:"]);
    let watch_b = Watcher::subscribe("shop-b", shop_b.ws("/ws"), &["same-id"]);

    ack(&mut shop_a.writer(), update(stock_op("same-id", "set", 7)));
    assert_eq!(st(&wait_read(&shop_a_too, "same-id", 1)), (7, 0, 7, 1));
    assert_eq!(
        st(&get(&mut shop_b.ws("/ws"), "same-id")),
        (0, 0, 0, 0),
        "another prefix is another inventory"
    );
    let own = ack(&mut shop_b.writer(), update(stock_op("same-id", "set", 3)));
    assert_eq!(st(&own["stock"]), (3, 0, 3, 1));
    assert_eq!(st(&get(&mut shop_a.ws("/ws"), "same-id")), (7, 0, 7, 1));
    // An idempotency key of one inventory means nothing in the other.
    let key = keyed("k-1", stock_op("same-id", "increase", 1));
    ack(&mut shop_a.writer(), key.clone());
    let other = ack(&mut shop_b.writer(), key);
    assert!(other.get("duplicate").is_none(), "{other}");
    assert_eq!(st(&other["stock"]), (4, 0, 4, 2));

    assert!(watch_b.wait_version("same-id", 2, FEED));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        watch_b.finish().versions("same-id"),
        [1, 2],
        "shop-a's changes never reach shop-b's subscribers"
    );
    let all = redis.keys("*");
    assert!(
        all.iter()
            .all(|k| k.starts_with("shop-a:") || k.starts_with("shop-b:")),
        "every key is under one of the prefixes: {all:?}"
    );
    assert!(!redis.keys("shop-a:*").is_empty() && !redis.keys("shop-b:*").is_empty());
}

#[test]
fn the_writer_never_reads_older_than_its_ack() {
    const ROUNDS: usize = 200;
    let redis = RedisServer::start();
    let (a, b) = pair(&redis);
    // B writes the same SKU all along, so A's replica is fed by the change feed concurrently
    // with A's own acks.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noise = {
        let mut ws = b.writer();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                ack(&mut ws, update(stock_op("mine", "increase", 1)));
            }
        })
    };
    let mut writer = a.writer();
    for round in 0..ROUNDS {
        let acked = ack(&mut writer, update(stock_op("mine", "increase", 1)));
        let version = acked["stock"]["version"].as_u64().unwrap();
        let read = get(&mut writer, "mine");
        assert!(
            read["version"].as_u64().unwrap() >= version,
            "round {round}: acked {acked}, then read {read}"
        );
        // The HTTP read of the same process is served from the same replica.
        let (_, over_http) = http_json("GET", &a.http("/stock/mine"), &[], None);
        assert!(
            over_http["version"].as_u64().unwrap() >= version,
            "round {round}: acked {acked}, then GET {over_http}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    noise.join().expect("noise writer");
}

#[test]
fn keys_live_under_the_prefix_and_idempotency_keys_last_a_day() {
    let redis = RedisServer::start();
    let server = Server::start_redis(&redis.url(), &[]);
    let mut writer = server.writer();
    ack(&mut writer, update(stock_op("layout-1", "set", 3)));
    ack(
        &mut writer,
        json!({"type":"stock_batch","ops":[stock_op("layout-2","set",1), stock_op("layout-1","reserve",1)]}),
    );
    let before = redis.keys("*");
    assert!(!before.is_empty(), "no keys written to Redis");
    assert!(
        before.iter().all(|k| k.starts_with("stocksync:")),
        "a key outside the default prefix `stocksync:`: {before:?}"
    );

    ack(
        &mut writer,
        keyed("ttl-key-1", stock_op("layout-1", "increase", 1)),
    );
    let ttls: Vec<(String, i64)> = redis
        .keys("stocksync:*")
        .into_iter()
        .map(|k| {
            let ttl = redis.cmd(&["TTL", &k]).int();
            (k, ttl)
        })
        .collect();
    assert!(
        ttls.iter()
            .any(|(_, ttl)| *ttl >= IDEMPOTENCY_TTL_SECONDS_MIN - 60),
        "no key with a TTL of at least 24 h after a keyed write (idempotency keys must last \
         24 h): {ttls:?}"
    );
}

#[test]
fn healthz_reports_pid_and_engine() {
    let redis = RedisServer::start();
    let server = Server::start_redis(&redis.url(), &[]);
    let (status, body) = server.healthz();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pid"], server.pid(), "{body}");
    assert_eq!(body["engine"], "redis", "{body}");
    assert_eq!(body["writable"], true, "{body}");
    assert!(body["reason"].is_null(), "{body}");
    assert_eq!(body["status"], "ok", "{body}");

    let embedded = Server::start_durable(&[]);
    let (status, body) = embedded.healthz();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pid"], embedded.pid(), "{body}");
    assert_eq!(body["engine"], "embedded", "{body}");
    assert_eq!(body["writable"], true, "{body}");
}

#[test]
fn more_than_one_worker_without_redis_is_refused_at_start() {
    for workers in ["2", "auto"] {
        if workers == "auto" && std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
            continue;
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
            .args(["--workers", workers, "--listen", "127.0.0.1:0"])
            .args(["--write-token", TOKEN, "--data-dir", "none"])
            .env_remove("STOCKSYNC_REDIS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start stocksync");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("--workers {workers} without --redis is still running after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(!status.success(), "--workers {workers}: {status}");
        assert!(
            stderr.contains("--redis"),
            "--workers {workers}: the message says why: {stderr:?}"
        );
    }
}

#[test]
fn the_url_may_carry_a_password_and_a_database_and_come_from_the_environment() {
    let redis = RedisServer::start();
    assert_eq!(
        redis
            .cmd(&["CONFIG", "SET", "requirepass", "s3cret"])
            .text(),
        "OK"
    );
    let url = format!("redis://default:s3cret@127.0.0.1:{}/3", redis.port);
    let server = Server::start_redis(&url, &[]);
    let acked = ack(&mut server.writer(), update(stock_op("in-db-3", "set", 1)));
    assert_eq!(acked["stock"]["version"], 1, "{acked}");
    let mut client = redis.client();
    assert_eq!(client.cmd(&["AUTH", "s3cret"]).unwrap().text(), "OK");
    assert_eq!(client.cmd(&["SELECT", "3"]).unwrap().text(), "OK");
    assert!(
        client.cmd(&["DBSIZE"]).unwrap().int() > 0,
        "nothing in db 3"
    );
    assert_eq!(client.cmd(&["SELECT", "0"]).unwrap().text(), "OK");
    assert_eq!(
        client.cmd(&["DBSIZE"]).unwrap().int(),
        0,
        "db 0 was written"
    );

    // STOCKSYNC_REDIS instead of --redis: the same inventory.
    let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", "127.0.0.1:0", "--write-token", TOKEN])
        .args(["--data-dir", "none"])
        .env("STOCKSYNC_REDIS", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start stocksync");
    let addr = read_listen_addr(&mut child);
    wait_listening(addr);
    let from_env = Server {
        child,
        addr,
        data_dir: None,
        redis: None,
    };
    let (status, body) = from_env.healthz();
    assert_eq!(
        (status, body["engine"].clone()),
        (200, json!("redis")),
        "{body}"
    );
    assert_eq!(st(&get(&mut from_env.ws("/ws"), "in-db-3")), (1, 0, 1, 1));
}
