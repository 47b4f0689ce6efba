//! An idle WebSocket holds no heap block of its own: what the server keeps per connection lives
//! in arrays indexed by connection slot (the loop's slab, the protocol's and the service's
//! per-connection state, the subscription index), which grow by doubling, so opening more
//! connections adds no blocks, only bigger arrays. Transient state (a snapshot being sent, a
//! send queue's burst storage, a partial message) is given back when it is done.
//!
//! Pins the leak where every connection kept its snapshot queue's buffer (~350 bytes, one
//! block) after its first `subscribed` reply, which doubled idle memory per connection. The
//! server runs in-process on a thread whose heap blocks are counted; real clients subscribe to
//! `*` and then stay quiet.

use std::net::SocketAddr;

use serde_json::json;

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use common::{request, start_in_process, ws_at, Ws};

/// Connections opened first: the arrays and lists reach a working size.
const WARMUP_CONNECTIONS: usize = 100;
/// Connections then added and measured.
const ADDED_CONNECTIONS: usize = 400;

fn open_subscribers(addr: SocketAddr, clients: &mut Vec<Ws>, count: usize) {
    for _ in 0..count {
        let mut ws = ws_at(addr, "/ws");
        let reply = request(&mut ws, json!({"type": "subscribe", "skus": ["*"]}));
        // The reply is the last (and only) chunk of the snapshot: the server is done with it.
        assert_eq!(reply["type"], "subscribed", "{reply}");
        clients.push(ws);
    }
}

#[test]
fn an_idle_subscriber_holds_no_heap_block_of_its_own() {
    let addr = start_in_process(&[], counting_alloc::count_this_thread);
    let mut clients = Vec::new();
    open_subscribers(addr, &mut clients, WARMUP_CONNECTIONS);
    let (blocks, bytes) = (
        counting_alloc::counted_live_blocks(),
        counting_alloc::counted_live_bytes(),
    );
    open_subscribers(addr, &mut clients, ADDED_CONNECTIONS);
    let added_blocks = counting_alloc::counted_live_blocks() - blocks;
    let added_bytes = counting_alloc::counted_live_bytes() - bytes;
    eprintln!(
        "{ADDED_CONNECTIONS} more idle `*` subscribers: {added_blocks} more heap blocks, \
         {added_bytes} more heap bytes ({:.0} per connection, array capacity included)",
        added_bytes as f64 / ADDED_CONNECTIONS as f64
    );
    // The few blocks that do appear are per loop tick, not per connection: the timer wheel
    // gives each 50 ms slot its own list the first time a deadline lands in it. One block per
    // connection would be 400.
    assert!(
        added_blocks * 4 < ADDED_CONNECTIONS as isize,
        "{added_blocks} heap blocks held for {ADDED_CONNECTIONS} idle connections"
    );
    drop(clients);
}
