//! Per-connection order when updates are gathered for `*` subscribers: a connection never sees
//! an older version of a SKU after a newer one (acks count as seeing), and a writer's ack comes
//! before the broadcast of its own change.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use serde_json::json;

#[test]
fn pipelined_writers_that_hear_everything_never_see_a_version_go_back() {
    let server = Server::start(&[]);
    let mut writers: Vec<Ws> = (0..3).map(|_| server.writer()).collect();
    for w in &mut writers {
        assert_eq!(
            request(w, json!({"type":"subscribe","skus":["*"]}))["type"],
            "subscribed"
        );
    }
    const WRITES: usize = 60;
    // Every writer pipelines its writes without waiting, over a few shared SKUs, so several
    // changes are released in one loop turn and reach `*` as one gathered run.
    for i in 0..WRITES {
        for (n, w) in writers.iter_mut().enumerate() {
            let sku = format!("sku-{}", i % 4);
            send(
                w,
                json!({"type":"stock_update","id":format!("{n}-{i}"),"stock":{"id":sku,"action":"increase","change":1}}),
            );
        }
    }
    let total_updates = WRITES * writers.len();
    for (n, w) in writers.iter_mut().enumerate() {
        let mut seen: HashMap<String, u64> = HashMap::new();
        let mut updated: HashSet<(String, u64)> = HashSet::new();
        let (mut acks, mut updates) = (0, 0);
        while acks < WRITES || updates < total_updates {
            let message = recv(w);
            let state = &message["stock"];
            let sku = state["id"].as_str().unwrap().to_string();
            let version = state["version"].as_u64().unwrap();
            let last = seen.entry(sku.clone()).or_insert(0);
            assert!(
                version >= *last,
                "writer {n}: {sku} went back from {last} to {version}"
            );
            *last = version;
            match message["type"].as_str().unwrap() {
                "ack" => {
                    acks += 1;
                    // Our own change: its broadcast must not have come before this ack.
                    assert!(
                        !updated.contains(&(sku.clone(), version)),
                        "writer {n}: update of {sku} v{version} came before its ack"
                    );
                }
                "stock_update" => {
                    updates += 1;
                    updated.insert((sku, version));
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(acks, WRITES);
        assert_eq!(
            updates, total_updates,
            "every change reaches every `*` subscriber once"
        );
    }
}
