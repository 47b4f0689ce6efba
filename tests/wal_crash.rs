//! Crash test: the real server under a concurrent keyed write load is killed with SIGKILL at
//! random moments, restarted on the same data dir each time, and checked:
//! - every acknowledged op is present (its versions are there, with the acked states);
//! - no batch is half applied and versions continue without gaps: every version 1..=V of
//!   every SKU was produced by exactly one op we know of, and replaying those ops in version
//!   order gives exactly the states the server acked and now shows;
//! - retrying each unacknowledged op with its idempotency key applies it exactly once: the
//!   retry is either `duplicate` (it had been made durable) or applied now, and a second
//!   retry is always a duplicate with the same result.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SKUS: usize = 20;
const WRITERS: usize = 4;
const KILLS: usize = 22;
/// Bounds on one round's load, whatever happens.
const ROUND_REQUESTS_MAX: usize = 20_000;

fn sku(i: usize) -> String {
    format!("c-{}", i % SKUS)
}

#[derive(Clone, Debug)]
struct Op {
    sku: String,
    action: &'static str,
    amount: u64,
}

/// A keyed write and what we know of its fate.
#[derive(Clone, Debug)]
struct Write {
    key: String,
    batch: bool,
    ops: Vec<Op>,
}

impl Write {
    fn message(&self, id: u64) -> Value {
        let op = |op: &Op| stock_op(&op.sku, op.action, op.amount);
        if self.batch {
            json!({"type":"stock_batch","id":id,"idempotency_key":self.key,
                   "ops":self.ops.iter().map(op).collect::<Vec<_>>()})
        } else {
            json!({"type":"stock_update","id":id,"idempotency_key":self.key,
                   "stock":op(&self.ops[0])})
        }
    }
}

fn random_write(rng: &mut Rng, key: String) -> Write {
    let batch = rng.below(3) == 0;
    let count = if batch { 2 + rng.below(4) as usize } else { 1 };
    let ops = (0..count)
        .map(|_| {
            let (action, amount) = match rng.below(10) {
                0 => ("set", rng.below(1000)),
                1..=2 => ("decrease", 1 + rng.below(3)),
                _ => ("increase", 1 + rng.below(5)),
            };
            Op {
                sku: sku(rng.below(SKUS as u64) as usize),
                action,
                amount,
            }
        })
        .collect();
    Write { key, batch, ops }
}

/// States of an ack, one per op, in op order.
fn ack_states(write: &Write, reply: &Value) -> Vec<Value> {
    if write.batch {
        reply["stock"].as_array().unwrap().clone()
    } else {
        vec![reply["stock"].clone()]
    }
}

/// Everything learnt about applied ops: which op produced each (SKU, version), and the state
/// it acked for it.
#[derive(Default)]
struct Ledger {
    /// (sku, version) -> (key, state)
    claims: HashMap<(String, u64), (String, Value)>,
    writes: HashMap<String, Write>,
}

impl Ledger {
    /// Records an ack (fresh or duplicate) of `write`.
    fn applied(&mut self, write: &Write, reply: &Value) {
        for state in ack_states(write, reply) {
            let name = state["id"].as_str().unwrap().to_string();
            let version = state["version"].as_u64().unwrap();
            let claim = (write.key.clone(), state.clone());
            match self.claims.get(&(name.clone(), version)) {
                None => {
                    self.claims.insert((name, version), claim);
                }
                Some(existing) => assert_eq!(
                    existing, &claim,
                    "two different writes (or states) claim {name} version {version}"
                ),
            }
        }
        self.writes.insert(write.key.clone(), write.clone());
    }

    /// Replays every claimed op in version order per SKU and checks it against the acked
    /// states and the server's current ones; every version from 1 to the current one must be
    /// accounted for by exactly one op, all of whose SKUs moved together.
    fn check(&self, current: &BTreeMap<String, Value>) {
        for (name, state) in current {
            let top = state["version"].as_u64().unwrap();
            // A half-applied batch shows up here: the SKU it skipped has a version missing
            // (an acked one) or a state that does not follow from its ops.
            let mut on_hand = 0u64;
            for version in 1..=top {
                let Some((key, acked)) = self.claims.get(&(name.clone(), version)) else {
                    panic!(
                        "{name} version {version} was applied by no op we know of (gap or lost op)"
                    );
                };
                let write = &self.writes[key];
                for op in write.ops.iter().filter(|op| &op.sku == name) {
                    match op.action {
                        "set" => on_hand = op.amount,
                        "increase" => on_hand += op.amount,
                        "decrease" => on_hand -= op.amount,
                        other => panic!("unexpected action {other}"),
                    }
                }
                assert_eq!(
                    (
                        acked["on_hand"].as_u64().unwrap(),
                        acked["reserved"].as_u64().unwrap()
                    ),
                    (on_hand, 0),
                    "{name} version {version} (write {key}) does not follow from version {}",
                    version - 1
                );
            }
            assert_eq!(
                (state["on_hand"].as_u64().unwrap(), top),
                (on_hand, top),
                "{name}: the server's state is not the replay of the acked ops"
            );
            let claimed_top = self
                .claims
                .keys()
                .filter(|(sku, _)| sku == name)
                .map(|(_, v)| *v)
                .max()
                .unwrap_or(0);
            assert_eq!(
                claimed_top, top,
                "{name}: an acknowledged version is missing"
            );
        }
    }
}

fn read_all(server: &Server) -> BTreeMap<String, Value> {
    read_states(server, &(0..SKUS).map(sku).collect::<Vec<_>>())
}

enum Outcome {
    Acked(Value),
    Rejected,
    Unknown,
}

/// One writer's run until the connection dies or `stop`: returns each write with its fate.
fn writer_loop(
    server_addr: String,
    seed: u64,
    round: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(Write, Outcome)> {
    let url = format!("ws://{server_addr}/ws?token={TOKEN}");
    let Ok((mut ws, _)) = tungstenite::connect(url) else {
        return Vec::new();
    };
    set_timeout(&ws, Duration::from_secs(10));
    let mut rng = Rng(seed);
    let mut done = Vec::new();
    for n in 0..ROUND_REQUESTS_MAX {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let write = random_write(&mut rng, format!("w{seed}-r{round}-{n}"));
        if ws
            .send(tungstenite::Message::text(
                write.message(n as u64).to_string(),
            ))
            .is_err()
        {
            done.push((write, Outcome::Unknown));
            break;
        }
        let reply = loop {
            match ws.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    break Some(serde_json::from_str::<Value>(&text).unwrap())
                }
                Ok(_) => continue,
                Err(_) => break None,
            }
        };
        match reply {
            Some(reply) if reply["type"] == "ack" => {
                assert_ne!(reply["duplicate"], true, "a fresh key came back duplicate");
                done.push((write, Outcome::Acked(reply)));
            }
            Some(reply) => {
                assert_eq!(reply["type"], "error", "{reply}");
                assert_eq!(reply["code"], "insufficient_stock", "{reply}");
                done.push((write, Outcome::Rejected));
            }
            None => {
                done.push((write, Outcome::Unknown));
                break;
            }
        }
    }
    done
}

/// Retries `write` with its key: it must apply exactly once. Returns whether the first retry
/// was a duplicate (the write had been made durable before the crash).
fn retry(ws: &mut Ws, ledger: &mut Ledger, write: &Write) -> bool {
    let first = request(ws, write.message(0));
    match first["type"].as_str() {
        Some("ack") => {
            ledger.applied(write, &first);
            let second = request(ws, write.message(1));
            assert_eq!(
                second["duplicate"], true,
                "second retry of {}: {second}",
                write.key
            );
            assert_eq!(
                second["stock"], first["stock"],
                "retry of {} changed",
                write.key
            );
            first["duplicate"] == true
        }
        Some("error") => {
            // Not applied before the crash, and not applicable now.
            assert_eq!(first["code"], "insufficient_stock", "{first}");
            false
        }
        _ => panic!("unexpected reply {first}"),
    }
}

/// A small snapshot threshold, so snapshots are taken (and crashed into) under the load.
const SNAPSHOT_FLAGS: [&str; 2] = ["--snapshot-log-bytes", "65536"];

#[test]
fn sigkill_under_keyed_write_load_loses_no_ack_and_retries_apply_exactly_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    let mut ledger = Ledger::default();
    let mut server = Server::start_on_dir(dir.path(), &SNAPSHOT_FLAGS);
    let mut acked_total = 0;
    let mut unknown_total = 0;
    let mut durable_unacked_total = 0;
    for round in 0..KILLS {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let addr = server.addr.to_string();
                let stop = stop.clone();
                let results = results.clone();
                let seed = 1 + (round * WRITERS + w) as u64 * 7919;
                std::thread::spawn(move || {
                    let done = writer_loop(addr, seed, round, stop);
                    results.lock().unwrap().extend(done);
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + rng.below(350)));
        server.signal(libc::SIGKILL);
        let _ = server.child.wait();
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.join().unwrap();
        }
        drop(server);
        server = Server::start_on_dir(dir.path(), &SNAPSHOT_FLAGS);
        let results = std::mem::take(&mut *results.lock().unwrap());
        let mut unknown = Vec::new();
        for (write, outcome) in results {
            match outcome {
                Outcome::Acked(reply) => {
                    acked_total += 1;
                    ledger.applied(&write, &reply);
                }
                Outcome::Rejected => {}
                Outcome::Unknown => unknown.push(write),
            }
        }
        // Everything acked before the kill is there.
        let current = read_all(&server);
        for ((name, version), (key, _)) in &ledger.claims {
            let now = current[name]["version"].as_u64().unwrap();
            assert!(
                now >= *version,
                "round {round}: {name} v{version} ({key}) lost, now v{now}"
            );
        }
        let mut ws = server.writer();
        unknown_total += unknown.len();
        for write in &unknown {
            if retry(&mut ws, &mut ledger, write) {
                durable_unacked_total += 1;
            }
        }
        ledger.check(&read_all(&server));
    }
    assert!(
        acked_total > 100,
        "too little load to mean anything: {acked_total} acks"
    );
    let snapshots = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "snap")
        })
        .count();
    assert_eq!(
        snapshots, 1,
        "snapshots were taken under the load (and older ones removed)"
    );
    eprintln!(
        "{KILLS} kills, {acked_total} acked writes, {unknown_total} unacknowledged retried \
         ({durable_unacked_total} of them were durable: duplicate), {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
