//! Many clients reserve the same SKU at once (PROTOCOL.md "Operations": no way to oversell):
//! exactly the available units are acknowledged, the rest refused with `insufficient_stock`,
//! and a subscriber sees every version once, in order.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};

use common::*;
use serde_json::{json, Value};

const UNITS: u64 = 200;
const WRITERS: usize = 20;
const RESERVES_PER_WRITER: usize = 20;

#[test]
fn concurrent_reserves_never_oversell_and_subscribers_see_every_version_in_order() {
    run_against(&Server::start(&[]));
}

/// The same with the write-ahead log: concurrent writes are group-committed, and acks and
/// broadcasts wait for the fsync.
#[test]
fn concurrent_reserves_on_a_durable_server() {
    run_against(&Server::start_durable(&[]));
}

fn run_against(server: &Server) {
    let mut sub = subscribed_client(server, &["hot"]);
    let mut setter = server.writer();
    let ack = request(
        &mut setter,
        json!({"type":"stock_update","stock":{"id":"hot","action":"set","quantity":UNITS}}),
    );
    assert_eq!(ack["stock"]["version"], 1, "{ack}");

    // Every writer connects first, then all start sending at the same moment, each pipelining
    // its reserves without waiting for replies.
    let start = Arc::new(Barrier::new(WRITERS));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let mut ws = server.writer();
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                for i in 0..RESERVES_PER_WRITER {
                    send(
                        &mut ws,
                        json!({"type":"stock_update","id":format!("{w}-{i}"),
                               "stock":{"id":"hot","action":"reserve","change":1}}),
                    );
                }
                (0..RESERVES_PER_WRITER)
                    .map(|i| {
                        let reply = recv(&mut ws);
                        assert_eq!(reply["id"], format!("{w}-{i}"), "replies in order");
                        reply
                    })
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    let replies: Vec<Value> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("writer thread"))
        .collect();

    let mut acked_versions = BTreeSet::new();
    let mut refused = 0;
    for reply in &replies {
        match reply["type"].as_str() {
            Some("ack") => {
                let stock = &reply["stock"];
                let version = stock["version"].as_u64().unwrap();
                // The nth reserve to be applied leaves reserved = n at version n + 1.
                assert_eq!(stock["reserved"].as_u64(), Some(version - 1), "{reply}");
                assert_eq!(stock["on_hand"], UNITS);
                assert!(
                    acked_versions.insert(version),
                    "version {version} acked twice"
                );
            }
            Some("error") => {
                assert_eq!(reply["code"], "insufficient_stock", "{reply}");
                refused += 1;
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    assert_eq!(acked_versions.len() as u64, UNITS);
    assert_eq!(refused, WRITERS * RESERVES_PER_WRITER - UNITS as usize);
    assert_eq!(acked_versions, (2..=UNITS + 1).collect());

    // The subscriber heard versions 1 ..= 201, each once, in order, each consistent.
    let mut seen = Vec::new();
    while seen.last() != Some(&(UNITS + 1)) {
        let update = recv(&mut sub);
        assert_eq!(update["type"], "stock_update", "{update}");
        let stock = &update["stock"];
        let version = stock["version"].as_u64().unwrap();
        assert_eq!(stock["on_hand"], UNITS);
        assert_eq!(stock["reserved"].as_u64(), Some(version - 1), "{update}");
        assert_eq!(stock["quantity"].as_u64(), Some(UNITS + 1 - version));
        seen.push(version);
    }
    assert_eq!(seen, (1..=UNITS + 1).collect::<Vec<u64>>());
    // Nothing after the last one.
    assert_eq!(
        request(&mut sub, json!({"type":"ping","id":"end"})),
        json!({"type":"pong","id":"end"})
    );

    let state = request(&mut setter, json!({"type":"get","skus":["hot"]}));
    assert_eq!(
        state["stock"][0],
        json!({"id":"hot","quantity":0,"on_hand":UNITS,"reserved":UNITS,"version":UNITS + 1})
    );
}
