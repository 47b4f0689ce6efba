//! The Redis engine when Redis fails (PROTOCOL.md "Several processes, one inventory"), against a
//! real `redis-server`:
//! - SIGKILL and restart (appendonly yes, appendfsync always) under keyed write load: writes fail
//!   fast while it is down, no acknowledged op is lost, retries with the same idempotency key
//!   apply at most once, and every subscriber converges without restarting stocksync;
//! - `CLIENT KILL TYPE pubsub` while writes go on: every process catches up within 2 s;
//! - a write Redis never answers (CLIENT PAUSE) is `unavailable` within 1 s and its retry
//!   applies once;
//! - Redis losing its data (FLUSHALL, a restart without persistence) is noticed.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::{RedisServer, SilencingProxy};
use common::watch::{alive, recv_within, request_within, Watcher};
use common::*;
use serde_json::{json, Value};

/// PROTOCOL.md: writes are answered `unavailable` within 1 s while Redis is unreachable; the
/// rest is slack for a loaded machine.
const UNAVAILABLE_WITHIN: Duration = Duration::from_millis(1500);
/// PROTOCOL.md: a lost or stopped change feed is noticed and caught up within 2 s.
const CATCH_UP_WITHIN: Duration = Duration::from_secs(2);
/// How long a reply may take before the test calls the write hanging.
const HANGING: Duration = Duration::from_secs(5);
/// Bound on the retry phase.
const RETRY_FOR_MAX: Duration = Duration::from_secs(30);

/// Sends `message` with `"id": id` and waits for the reply carrying that id, skipping late
/// replies to earlier requests; `None` after `timeout`. Returns the time it took too.
fn call(ws: &mut Ws, mut message: Value, id: &str, timeout: Duration) -> (Option<Value>, Duration) {
    message["id"] = json!(id);
    let sent = Instant::now();
    send(ws, message);
    loop {
        let left = timeout.saturating_sub(sent.elapsed());
        match recv_within(ws, left.max(Duration::from_millis(1))) {
            Some(reply) if reply["id"] == id => return (Some(reply), sent.elapsed()),
            Some(_) => continue,
            None => return (None, sent.elapsed()),
        }
    }
}

fn is_unavailable(reply: &Value) -> bool {
    reply["type"] == "error" && reply["code"] == "unavailable"
}

fn get(server: &Server, skus: &[&str]) -> BTreeMap<String, Value> {
    let skus: Vec<String> = skus.iter().map(|s| s.to_string()).collect();
    read_states(server, &skus)
}

/// A metric's value, 0 when absent.
fn metric(server: &Server, series: &str) -> f64 {
    scrape_metric(server, series).map_or(0.0, |v| v.parse().expect("a number"))
}

/// `stocksync_redis_resyncs_total + stocksync_redis_reconnects_total`.
fn recoveries(server: &Server) -> f64 {
    metric(server, "stocksync_redis_resyncs_total")
        + metric(server, "stocksync_redis_reconnects_total")
}

/// Waits until `f` holds; false on timeout.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- SIGKILL and restart under keyed load -----------------------------------------------------

const SKUS: [&str; 3] = ["f-0", "f-1", "f-2"];
const WRITERS: usize = 4;
/// Acks wanted before Redis is killed.
const ACKS_BEFORE_KILL: usize = 200;
/// New writes each writer makes once Redis is back.
const WRITES_AFTER_RESTART: usize = 20;

const LOAD: u8 = 0;
const DOWN: u8 = 1;
const BACK: u8 = 2;

/// A keyed write: one increase, or a batch of two increases on different SKUs.
#[derive(Clone, Debug)]
struct Write {
    key: String,
    increases: Vec<(&'static str, u64)>,
}

impl Write {
    fn new(writer: usize, n: usize) -> Write {
        let key = format!("w{writer}-{n}");
        let (first, change) = (SKUS[(writer + n) % SKUS.len()], 1 + (n % 5) as u64);
        let increases = if n % 4 == 3 {
            vec![(first, change), (SKUS[(writer + n + 1) % SKUS.len()], 1)]
        } else {
            vec![(first, change)]
        };
        Write { key, increases }
    }

    fn message(&self) -> Value {
        let ops: Vec<Value> = self
            .increases
            .iter()
            .map(|(sku, change)| stock_op(sku, "increase", *change))
            .collect();
        if ops.len() == 1 {
            json!({"type":"stock_update","idempotency_key":self.key,"stock":ops[0]})
        } else {
            json!({"type":"stock_batch","idempotency_key":self.key,"ops":ops})
        }
    }
}

/// What one writer did.
#[derive(Default)]
struct Log {
    /// Every write, with its final ack (None if it never got one).
    writes: Vec<(Write, Option<Value>)>,
    /// Time to each `unavailable` reply.
    unavailable_after: Vec<Duration>,
    /// Replies that were neither an ack nor `unavailable`, and requests left hanging.
    wrong: Vec<String>,
}

/// Sends `write` once: the ack, or None after an `unavailable` (anything else is logged).
fn attempt(ws: &mut Ws, write: &Write, id: &str, log: &mut Log) -> Option<Value> {
    let (reply, took) = call(ws, write.message(), id, HANGING);
    match reply {
        Some(reply) if reply["type"] == "ack" => Some(reply),
        Some(reply) if is_unavailable(&reply) => {
            log.unavailable_after.push(took);
            None
        }
        Some(reply) => {
            log.wrong.push(format!("{}: {reply}", write.key));
            None
        }
        None => {
            log.wrong
                .push(format!("{}: no reply within {HANGING:?}", write.key));
            None
        }
    }
}

/// Retries `write` with its key until it is acked (or the bound).
fn until_acked(ws: &mut Ws, write: &Write, log: &mut Log) -> Option<Value> {
    let deadline = Instant::now() + RETRY_FOR_MAX;
    for attempt_no in 0.. {
        if let Some(ack) = attempt(ws, write, &format!("{}-r{attempt_no}", write.key), log) {
            return Some(ack);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    unreachable!()
}

fn writer_loop(
    w: usize,
    mut ws: Ws,
    phase: &AtomicU8,
    acks: &AtomicUsize,
    fails: &AtomicUsize,
) -> Log {
    let mut log = Log::default();
    let mut unacked = Vec::new();
    let mut n = 0;
    // Until Redis is back: new writes, one at a time; each one acked or not.
    while phase.load(Ordering::SeqCst) != BACK {
        let write = Write::new(w, n);
        n += 1;
        match attempt(&mut ws, &write, &write.key, &mut log) {
            Some(ack) => {
                acks.fetch_add(1, Ordering::SeqCst);
                log.writes.push((write, Some(ack)));
            }
            None => {
                fails.fetch_add(1, Ordering::SeqCst);
                unacked.push(write);
                // Down: keep trying now and then, not in a tight loop.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    // Back: every unacknowledged write again, with its own key, until acked.
    for write in unacked {
        let ack = until_acked(&mut ws, &write, &mut log);
        log.writes.push((write, ack));
    }
    // And new writes work again.
    for _ in 0..WRITES_AFTER_RESTART {
        let write = Write::new(w, n);
        n += 1;
        let ack = until_acked(&mut ws, &write, &mut log);
        log.writes.push((write, ack));
    }
    log
}

#[test]
fn redis_sigkill_and_restart_under_keyed_load_loses_no_acked_op_and_subscribers_converge() {
    let mut redis = RedisServer::start_persistent();
    let a = Server::start_redis(&redis.url(), &[]);
    let b = Server::start_redis(&redis.url(), &[]);
    let mut watchers = vec![
        Watcher::subscribe("a-1", a.ws("/ws"), &SKUS),
        Watcher::subscribe("a-2", a.ws("/ws"), &SKUS),
        Watcher::subscribe("b-1", b.ws("/ws"), &SKUS),
        Watcher::subscribe("b-*", b.ws("/ws"), &["*"]),
    ];

    let phase = Arc::new(AtomicU8::new(LOAD));
    let acks = Arc::new(AtomicUsize::new(0));
    let fails = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let ws = if w % 2 == 0 { a.writer() } else { b.writer() };
            let (phase, acks, fails) = (Arc::clone(&phase), Arc::clone(&acks), Arc::clone(&fails));
            std::thread::spawn(move || writer_loop(w, ws, &phase, &acks, &fails))
        })
        .collect();

    assert!(
        eventually(Duration::from_secs(60), || acks.load(Ordering::SeqCst)
            >= ACKS_BEFORE_KILL),
        "only {} acks before the kill",
        acks.load(Ordering::SeqCst)
    );
    redis.kill();
    phase.store(DOWN, Ordering::SeqCst);
    let killed = Instant::now();
    println!("redis killed after {} acks", acks.load(Ordering::SeqCst));

    // While it is down: /healthz says so, with the reason; reads and subscriptions go on.
    for server in [&a, &b] {
        let mut last = (0, Value::Null);
        assert!(
            eventually(Duration::from_secs(3), || {
                last = server.healthz();
                last.0 == 503
            }),
            "healthz of pid {} while Redis is down: {last:?}",
            server.pid()
        );
        let body = &last.1;
        assert_eq!(body["writable"], false, "{body}");
        assert!(
            body["reason"].as_str().is_some_and(|r| !r.is_empty()),
            "503 says why: {body}"
        );
        assert_eq!(body["engine"], "redis", "{body}");
        assert!(
            eventually(Duration::from_secs(3), || metric(
                server,
                "stocksync_redis_connected"
            ) == 0.0),
            "stocksync_redis_connected still 1 on pid {}",
            server.pid()
        );
        let states = get(server, &SKUS);
        assert!(
            states.values().all(|s| s["version"].as_u64().unwrap() > 0),
            "reads serve the last known state: {states:?}"
        );
    }
    // A subscriber that arrives now gets the last known state, and will converge like the rest.
    let late = Watcher::subscribe("b-late", b.ws("/ws"), &SKUS);
    assert!(late.with(|s| s
        .snapshot
        .values()
        .all(|v| v["version"].as_u64().unwrap() > 0)));
    watchers.push(late);
    // Every writer fails a few times while it is down.
    assert!(
        eventually(Duration::from_secs(20), || fails.load(Ordering::SeqCst)
            >= 3 * WRITERS),
        "only {} failed writes while down",
        fails.load(Ordering::SeqCst)
    );
    // Down for at least a second and a half, so every process notices.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(killed.elapsed()));

    redis.restart();
    phase.store(BACK, Ordering::SeqCst);
    println!("redis back after {:?}", killed.elapsed());
    let logs: Vec<Log> = threads
        .into_iter()
        .map(|t| t.join().expect("writer thread"))
        .collect();

    // Writes failed fast and cleanly.
    let wrong: Vec<&String> = logs.iter().flat_map(|l| &l.wrong).collect();
    assert!(
        wrong.is_empty(),
        "replies other than ack/unavailable: {wrong:?}"
    );
    let slowest = logs
        .iter()
        .flat_map(|l| &l.unavailable_after)
        .max()
        .copied()
        .expect("some write was refused while Redis was down");
    println!(
        "{} unavailable replies, slowest after {slowest:?}",
        logs.iter()
            .map(|l| l.unavailable_after.len())
            .sum::<usize>()
    );
    assert!(
        slowest < UNAVAILABLE_WITHIN,
        "an `unavailable` took {slowest:?}"
    );

    // Every write was eventually acked; each applied exactly once: the sum of its increases and
    // one version per write that touches a SKU.
    let mut sums: BTreeMap<&str, u64> = SKUS.iter().map(|s| (*s, 0)).collect();
    let mut versions: BTreeMap<&str, u64> = SKUS.iter().map(|s| (*s, 0)).collect();
    let mut never_acked = Vec::new();
    let mut duplicates = 0;
    for (write, ack) in logs.iter().flat_map(|l| &l.writes) {
        match ack {
            None => never_acked.push(write.key.clone()),
            Some(ack) => duplicates += usize::from(ack["duplicate"] == true),
        }
        for (sku, change) in &write.increases {
            *sums.get_mut(sku).unwrap() += change;
            *versions.get_mut(sku).unwrap() += 1;
        }
    }
    assert!(
        never_acked.is_empty(),
        "never acked after the restart: {never_acked:?}"
    );
    println!("{duplicates} retries answered as duplicates; expected {sums:?} at {versions:?}");
    let expected = |sku: &str| (sums[sku], 0, sums[sku], versions[sku]);

    for server in [&a, &b] {
        let mut last = (0, Value::Null);
        assert!(
            eventually(Duration::from_secs(10), || {
                last = server.healthz();
                last.0 == 200
            }),
            "healthz of pid {} after the restart: {last:?}",
            server.pid()
        );
        assert_eq!(last.1["writable"], true, "{}", last.1);
        assert!(last.1["reason"].is_null(), "{}", last.1);
        let mut states = BTreeMap::new();
        let converged = eventually(CATCH_UP_WITHIN, || {
            states = get(server, &SKUS);
            SKUS.iter().all(|sku| {
                let s = &states[*sku];
                (
                    s["on_hand"].as_u64().unwrap(),
                    s["reserved"].as_u64().unwrap(),
                    s["quantity"].as_u64().unwrap(),
                    s["version"].as_u64().unwrap(),
                ) == expected(sku)
            })
        });
        assert!(
            converged,
            "pid {} reads {states:?}, expected {sums:?} at {versions:?}",
            server.pid()
        );
        assert!(metric(server, "stocksync_redis_reconnects_total") >= 1.0);
        assert_eq!(metric(server, "stocksync_redis_connected"), 1.0);
    }
    assert!(
        alive(a.pid()) && alive(b.pid()),
        "stocksync was not restarted"
    );

    for watcher in watchers {
        for sku in SKUS {
            assert!(
                watcher.wait_version(sku, versions[sku], CATCH_UP_WITHIN),
                "{} stopped at {sku} v{} of {}",
                watcher.label,
                watcher.version(sku),
                versions[sku]
            );
        }
        let label = watcher.label.clone();
        let seen = watcher.finish();
        seen.check_states();
        assert!(seen.closed.is_none(), "{label}: {:?}", seen.closed);
        assert!(seen.other.is_empty(), "{label}: {:?}", seen.other);
        assert_eq!(seen.regressions(), [], "{label}: a version went back");
        for sku in SKUS {
            let last = seen.last(sku).unwrap();
            assert_eq!(last["on_hand"], sums[sku], "{label}: {last}");
        }
    }
}

// ---- the pub/sub link dropped -----------------------------------------------------------------

#[test]
fn killed_pubsub_links_are_noticed_and_every_process_catches_up_within_two_seconds() {
    const PS: [&str; 2] = ["ps-0", "ps-1"];
    let redis = RedisServer::start();
    let servers: Vec<Server> = (0..3)
        .map(|_| Server::start_redis(&redis.url(), &[]))
        .collect();
    let watchers: Vec<Watcher> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Watcher::subscribe(format!("process {i} (pid {})", s.pid()), s.ws("/ws"), &PS)
        })
        .collect();
    let before: Vec<f64> = servers.iter().map(recoveries).collect();

    // One writer, on the first process: the others learn of its writes only from the feed.
    let stop = Arc::new(AtomicU8::new(0));
    let last_acked = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let writer = {
        let mut ws = servers[0].writer();
        let (stop, last_acked) = (Arc::clone(&stop), Arc::clone(&last_acked));
        std::thread::spawn(move || {
            let mut k = 0u64;
            while stop.load(Ordering::SeqCst) == 0 {
                k += 1;
                let sku = PS[(k % 2) as usize];
                let reply = request(
                    &mut ws,
                    json!({"type":"stock_update","stock":stock_op(sku, "set", k)}),
                );
                assert_eq!(
                    reply["type"], "ack",
                    "a write while only pub/sub broke: {reply}"
                );
                let version = reply["stock"]["version"].as_u64().unwrap();
                last_acked.lock().unwrap().insert(sku.to_string(), version);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    assert!(eventually(Duration::from_secs(10), || {
        last_acked.lock().unwrap().values().all(|v| *v >= 20)
            && last_acked.lock().unwrap().len() == 2
    }));
    let killed = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).int();
    println!("CLIENT KILL TYPE pubsub closed {killed} connections");
    assert!(
        killed >= 3,
        "each process holds a pub/sub connection; killed {killed}"
    );
    // Writes go on for a while, then stop.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(1, Ordering::SeqCst);
    writer.join().expect("writer");
    let stopped = Instant::now();
    let last = last_acked.lock().unwrap().clone();

    for watcher in &watchers {
        for sku in PS {
            let left = CATCH_UP_WITHIN.saturating_sub(stopped.elapsed());
            assert!(
                watcher.wait_version(sku, last[sku], left),
                "{}: {sku} at v{} {:?} after the writes stopped, last written v{}",
                watcher.label,
                watcher.version(sku),
                stopped.elapsed(),
                last[sku]
            );
        }
    }
    println!(
        "every subscriber caught up {:?} after the writes stopped",
        stopped.elapsed()
    );
    for (i, server) in servers.iter().enumerate() {
        let mut now = 0.0;
        assert!(
            eventually(CATCH_UP_WITHIN, || {
                now = recoveries(server);
                now > before[i]
            }),
            "process {i}: resyncs + reconnects {} before, {now} after",
            before[i]
        );
        assert_eq!(metric(server, "stocksync_redis_connected"), 1.0);
    }
    // The new links deliver: one more write, from another process, reaches everyone.
    let ack = request(
        &mut servers[2].writer(),
        json!({"type":"stock_update","stock":stock_op("ps-0","increase",1)}),
    );
    let version = ack["stock"]["version"].as_u64().unwrap();
    for watcher in &watchers {
        assert!(
            watcher.wait_version("ps-0", version, CATCH_UP_WITHIN),
            "{}: live updates after the catch-up",
            watcher.label
        );
    }
    for watcher in watchers {
        let label = watcher.label.clone();
        let seen = watcher.finish();
        seen.check_states();
        assert!(seen.closed.is_none(), "{label}: {:?}", seen.closed);
        assert_eq!(seen.regressions(), [], "{label}: a version went back");
    }
}

/// The feed goes silent with its connection still open (nothing to notice on the socket): the
/// process must see that changes go on without it (a periodic cheap read of the global
/// sequence) and rebuild within 2 s, with no write of its own to hint at it.
#[test]
fn a_silent_pubsub_feed_is_noticed_and_rebuilt_within_two_seconds() {
    const SKU: &str = "silent";
    let redis = RedisServer::start();
    let proxy = SilencingProxy::start(redis.port);
    let writer_side = Server::start_redis(&redis.url(), &[]);
    let quiet_side = Server::start_redis(&proxy.url(), &[]);
    let watcher = Watcher::subscribe("behind the proxy", quiet_side.ws("/ws"), &[SKU]);
    let before = recoveries(&quiet_side);

    let mut writer = writer_side.writer();
    let mut write = |k: u64| -> u64 {
        let ack = request(
            &mut writer,
            json!({"type":"stock_update","stock":stock_op(SKU, "set", k)}),
        );
        assert_eq!(ack["type"], "ack", "{ack}");
        ack["stock"]["version"].as_u64().unwrap()
    };
    let first = write(1);
    assert!(
        watcher.wait_version(SKU, first, CATCH_UP_WITHIN),
        "the feed works at first"
    );
    let silenced = proxy.silence_pubsub();
    assert!(
        silenced >= 1,
        "no pub/sub connection went through the proxy"
    );
    let silent_since = Instant::now();

    // Writes go on for 3 s; from 2.5 s on, the quiet side must have what was written before
    // the silence began plus whatever it caught up since.
    let mut acked: Vec<(Instant, u64)> = Vec::new();
    let mut k = 1;
    while silent_since.elapsed() < Duration::from_secs(3) {
        k += 1;
        acked.push((Instant::now(), write(k)));
        std::thread::sleep(Duration::from_millis(10));
    }
    let last = acked.last().unwrap().1;
    // Every version acked at least 2 s (+0.5 s slack) ago must have arrived by now.
    let due = acked
        .iter()
        .filter(|(at, _)| at.elapsed() >= Duration::from_millis(2500))
        .map(|(_, v)| *v)
        .max()
        .unwrap_or(first);
    assert!(
        watcher.version(SKU) >= due,
        "{:?} into the silence the subscriber is at v{}, though v{due} was acked more than 2.5 s ago",
        silent_since.elapsed(),
        watcher.version(SKU)
    );
    assert!(
        watcher.wait_version(SKU, last, CATCH_UP_WITHIN),
        "the subscriber is at v{} 2 s after the writes stopped, last written v{last}",
        watcher.version(SKU)
    );
    assert!(
        recoveries(&quiet_side) > before,
        "no resync or reconnect was counted"
    );
    // And the rebuilt feed delivers live again.
    let next = write(k + 1);
    assert!(watcher.wait_version(SKU, next, CATCH_UP_WITHIN));
    let seen = watcher.finish();
    let versions = seen.versions(SKU);
    let skipped = versions.windows(2).filter(|w| w[1] > w[0] + 1).count();
    println!(
        "{} updates for {next} versions, {skipped} jumps (versions lost in the silence, then caught up)",
        versions.len()
    );
    assert_eq!(seen.regressions(), [], "a version went back");
    assert!(seen.closed.is_none(), "{:?}", seen.closed);
}

// ---- a write whose reply never comes ----------------------------------------------------------

#[test]
fn a_write_redis_does_not_answer_is_unavailable_within_a_second_and_its_retry_applies_once() {
    let redis = RedisServer::start();
    let server = Server::start_redis(&redis.url(), &[]);
    let watcher = Watcher::subscribe("sub", server.ws("/ws"), &["paused"]);
    let mut writer = server.writer();
    let set = request(
        &mut writer,
        json!({"type":"stock_update","stock":stock_op("paused","set",0)}),
    );
    assert_eq!(set["stock"]["version"], 1, "{set}");

    // Redis takes the script but runs nothing that writes until unpaused.
    let mut control = redis.client();
    assert_eq!(
        control
            .cmd(&["CLIENT", "PAUSE", "5000", "WRITE"])
            .unwrap()
            .text(),
        "OK"
    );
    let write = json!({"type":"stock_update","idempotency_key":"lost-reply",
                       "stock":stock_op("paused","increase",5)});
    let (reply, took) = request_within(&mut writer, write.clone(), HANGING);
    let reply = reply.expect("a reply while Redis does not answer");
    assert!(is_unavailable(&reply), "{reply}");
    assert!(took < UNAVAILABLE_WITHIN, "unavailable after {took:?}");
    control.cmd(&["CLIENT", "UNPAUSE"]).unwrap();

    // Its outcome was unknown: the retry with the same key applies it at most once.
    let deadline = Instant::now() + RETRY_FOR_MAX;
    let ack = loop {
        let reply = request(&mut writer, write.clone());
        if reply["type"] == "ack" {
            break reply;
        }
        assert!(is_unavailable(&reply), "{reply}");
        assert!(Instant::now() < deadline, "never acked: {reply}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ack["stock"]["on_hand"], 5, "{ack}");
    assert_eq!(ack["stock"]["version"], 2, "{ack}");
    let again = request(&mut writer, write);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["stock"], ack["stock"]);
    let state = &get(&server, &["paused"])["paused"];
    assert_eq!(
        (state["on_hand"].clone(), state["version"].clone()),
        (json!(5), json!(2))
    );
    assert!(watcher.wait_version("paused", 2, CATCH_UP_WITHIN));
    let seen = watcher.finish();
    assert_eq!(seen.regressions(), []);
    assert!(
        seen.versions("paused").iter().all(|v| *v <= 2),
        "{:?}",
        seen.updates
    );
}

// ---- Redis unreachable ------------------------------------------------------------------------

#[test]
fn while_redis_is_down_writes_fail_fast_reads_go_on_and_healthz_says_why() {
    let mut redis = RedisServer::start_persistent();
    let server = Server::start_redis(&redis.url(), &[]);
    let watcher = Watcher::subscribe("sub", server.ws("/ws"), &["down"]);
    let mut writer = server.writer();
    let set = request(
        &mut writer,
        json!({"type":"stock_update","stock":stock_op("down","set",4)}),
    );
    assert_eq!(set["type"], "ack", "{set}");
    assert_eq!(server.healthz().0, 200);

    redis.stop();
    for i in 0..3 {
        let (reply, took) = request_within(
            &mut writer,
            json!({"type":"stock_update","id":i,"stock":stock_op("down","increase",1)}),
            HANGING,
        );
        let reply = reply.expect("a reply while Redis is down");
        assert!(is_unavailable(&reply), "{reply}");
        assert_eq!(reply["id"], i);
        assert!(took < UNAVAILABLE_WITHIN, "unavailable after {took:?}");
    }
    let bearer = format!("Bearer {TOKEN}");
    let sent = Instant::now();
    let (status, body) = http_json(
        "POST",
        &server.http("/stock/down"),
        &[("Authorization", &bearer)],
        Some(r#"{"action":"increase","change":1}"#),
    );
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (503, json!("unavailable")),
        "{body}"
    );
    assert!(sent.elapsed() < UNAVAILABLE_WITHIN, "{:?}", sent.elapsed());
    let (status, body) = server.healthz();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["writable"], false, "{body}");
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    // Reads: the last known state, over WebSocket and HTTP; a new subscriber gets it too.
    assert_eq!(get(&server, &["down"])["down"]["on_hand"], 4);
    let (status, body) = http_json("GET", &server.http("/stock/down"), &[], None);
    assert_eq!((status, body["on_hand"].clone()), (200, json!(4)), "{body}");
    let mut late = server.ws("/ws");
    let reply = request(&mut late, json!({"type":"subscribe","skus":["down"]}));
    assert_eq!(reply["stock"][0]["on_hand"], 4, "{reply}");

    redis.restart();
    let mut last = Value::Null;
    assert!(
        eventually(Duration::from_secs(10), || {
            last = request(
                &mut writer,
                json!({"type":"stock_update","stock":stock_op("down","increase",1)}),
            );
            last["type"] == "ack"
        }),
        "writes never resumed: {last}"
    );
    assert_eq!(
        last["stock"]["on_hand"], 5,
        "only the acked write applied: {last}"
    );
    assert_eq!(last["stock"]["version"], 2, "{last}");
    assert!(eventually(Duration::from_secs(5), || server.healthz().0 == 200));
    assert!(watcher.wait_version("down", 2, CATCH_UP_WITHIN));
    let seen = watcher.finish();
    assert_eq!(seen.regressions(), []);
    assert!(seen.closed.is_none(), "{:?}", seen.closed);
}

// ---- Redis lost its data ----------------------------------------------------------------------

/// Evidence that the server noticed a data loss: a `/healthz` reason, or a metric about it.
fn data_loss_noticed(server: &Server) -> Option<String> {
    let (status, body) = server.healthz();
    if let Some(reason) = body["reason"].as_str() {
        return Some(format!("/healthz {status}: reason {reason:?}"));
    }
    let text = ureq::get(&server.http("/metrics"))
        .call()
        .ok()?
        .into_string()
        .ok()?;
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, value)| {
            ["epoch", "data_loss", "data_lost", "lost"]
                .iter()
                .any(|word| name.contains(word))
                && value.parse::<f64>().is_ok_and(|v| v > 0.0)
        })
        .map(|(name, value)| format!("metric {name} = {value}"))
}

fn check_data_loss_noticed(server: &Server, what: &str) {
    // A write (whatever its answer) gives the server a chance to look, besides its own probes.
    let mut writer = server.writer();
    let (reply, _) = request_within(
        &mut writer,
        json!({"type":"stock_update","stock":stock_op("after-loss","set",1)}),
        HANGING,
    );
    assert!(reply.is_some(), "a write after {what} was left hanging");
    let mut evidence = None;
    assert!(
        eventually(Duration::from_secs(5), || {
            evidence = data_loss_noticed(server);
            evidence.is_some()
        }),
        "{what}: neither /healthz nor /metrics shows that Redis lost its data"
    );
    println!("{what} noticed: {}", evidence.unwrap());
}

fn server_with_stock(redis: &RedisServer) -> Server {
    let server = Server::start_redis(&redis.url(), &[]);
    let mut writer = server.writer();
    for sku in ["kept-1", "kept-2"] {
        let ack = request(
            &mut writer,
            json!({"type":"stock_update","stock":stock_op(sku, "set", 10)}),
        );
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    assert!(data_loss_noticed(&server).is_none(), "nothing lost yet");
    server
}

#[test]
fn flushall_is_noticed_as_data_loss() {
    let redis = RedisServer::start();
    let server = server_with_stock(&redis);
    assert_eq!(redis.cmd(&["FLUSHALL"]).text(), "OK");
    check_data_loss_noticed(&server, "FLUSHALL");
}

#[test]
fn a_restart_without_persistence_is_noticed_as_data_loss() {
    let mut redis = RedisServer::start();
    let server = server_with_stock(&redis);
    redis.kill();
    redis.restart();
    // Reconnected first: "Redis is unreachable" is not the evidence wanted here.
    assert!(
        eventually(Duration::from_secs(10), || metric(
            &server,
            "stocksync_redis_connected"
        ) == 1.0),
        "never reconnected"
    );
    check_data_loss_noticed(&server, "a restart without persistence");
}

#[test]
fn start_warns_when_redis_does_not_persist() {
    let redis = RedisServer::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", "127.0.0.1:0", "--write-token", TOKEN])
        .args(["--redis", &redis.url(), "--data-dir", "none"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start stocksync");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    let server = Server {
        addr: read_listen_addr(&mut child),
        child,
        data_dir: None,
        redis: None,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lines = Vec::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
            let lower = line.to_lowercase();
            if lower.contains("appendonly") || lower.contains("persist") {
                println!("warned: {line}");
                drop(server);
                return;
            }
            lines.push(line);
        }
    }
    panic!("no warning that Redis does not persist; stderr was {lines:#?}");
}
