//! Fan-out allocates nothing per subscriber: the real server runs in-process on a thread whose
//! allocations are counted, real WebSocket subscribers on loopback hear every update, and one
//! update goes out per loop turn (the next is written only once every subscriber has read the
//! last). The allocations made while K updates reach N subscribers must not grow with N: all
//! the per-update work (parsing the write, building the frame once, the ack) is the same for 20
//! subscribers as for 200, so any difference is per-subscriber work.
//!
//! Half the subscribers name the SKU and half hear `*`, and the updates alternate between that
//! SKU and one only `*` hears, so both paths are covered: named and `*` subscribers of one
//! update (`Fanout::deliver`), and `*`-only updates gathered into a run per subscriber
//! (`Fanout::deliver_to_wildcard`).

use std::net::SocketAddr;

use serde_json::json;

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use common::{recv, request, send, start_in_process, stock_op, ws_at, Ws, TOKEN};

/// Updates before each measurement: the server's lists and buffers reach their working size.
const WARMUP_UPDATES: u64 = 50;
/// Updates measured at each subscriber count.
const MEASURED_UPDATES: u64 = 200;
const FEW_SUBSCRIBERS: usize = 20;
const MANY_SUBSCRIBERS: usize = 200;

/// Adds subscribers until there are `count`: even ones name `named`, odd ones hear `*`.
fn subscribe_up_to(addr: SocketAddr, subscribers: &mut Vec<Ws>, count: usize, named: &str) {
    while subscribers.len() < count {
        let mut ws = ws_at(addr, "/ws");
        let skus = if subscribers.len() % 2 == 0 {
            json!([named])
        } else {
            json!(["*"])
        };
        let reply = request(&mut ws, json!({"type": "subscribe", "skus": skus}));
        assert_eq!(reply["type"], "subscribed", "{reply}");
        subscribers.push(ws);
    }
}

/// Writes `quantity` to `sku`, waits for the ack, then for every subscriber that hears `sku`
/// to read the update, so the next update is another loop turn.
fn update(writer: &mut Ws, subscribers: &mut [Ws], sku: &str, quantity: u64, named: &str) {
    send(
        writer,
        json!({"type": "stock_update", "id": format!("w{quantity}"),
               "stock": stock_op(sku, "set", quantity)}),
    );
    let ack = recv(writer);
    assert_eq!(ack["type"], "ack", "{ack}");
    for (i, ws) in subscribers.iter_mut().enumerate() {
        if sku != named && i % 2 == 0 {
            continue; // names only `named`: does not hear this SKU
        }
        let message = recv(ws);
        assert_eq!(message["type"], "stock_update", "{message}");
        assert_eq!(message["stock"]["id"], sku, "{message}");
        assert_eq!(message["stock"]["quantity"], quantity, "{message}");
    }
}

/// Allocations the server made while `MEASURED_UPDATES` updates (after `WARMUP_UPDATES`)
/// reached the current subscribers, and the deliveries that took.
fn measure(
    writer: &mut Ws,
    subscribers: &mut [Ws],
    quantity: &mut u64,
    named: &str,
    other: &str,
) -> (u64, u64) {
    let mut deliveries = 0;
    let mut before = 0;
    for round in 0..WARMUP_UPDATES + MEASURED_UPDATES {
        if round == WARMUP_UPDATES {
            before = counting_alloc::allocations();
            deliveries = 0;
        }
        *quantity += 1;
        let sku = if round % 2 == 0 { named } else { other };
        update(writer, subscribers, sku, *quantity, named);
        deliveries += if sku == named {
            subscribers.len() as u64
        } else {
            subscribers.len() as u64 / 2
        };
    }
    (counting_alloc::allocations() - before, deliveries)
}

#[test]
fn a_delivery_allocates_nothing_per_subscriber() {
    let addr = start_in_process(&[], counting_alloc::count_this_thread);
    let (named, other) = ("alloc-named", "alloc-other");
    let mut writer = ws_at(addr, &format!("/ws?token={TOKEN}"));
    let mut subscribers = Vec::new();
    let mut quantity = 0;

    subscribe_up_to(addr, &mut subscribers, FEW_SUBSCRIBERS, named);
    let (few, few_deliveries) = measure(&mut writer, &mut subscribers, &mut quantity, named, other);
    subscribe_up_to(addr, &mut subscribers, MANY_SUBSCRIBERS, named);
    let (many, many_deliveries) =
        measure(&mut writer, &mut subscribers, &mut quantity, named, other);

    let extra_deliveries = many_deliveries - few_deliveries;
    let extra_allocations = many.saturating_sub(few);
    eprintln!(
        "{MEASURED_UPDATES} updates: {few} allocations with {FEW_SUBSCRIBERS} subscribers \
         ({few_deliveries} deliveries), {many} with {MANY_SUBSCRIBERS} ({many_deliveries}); \
         {:.4} allocations per extra delivery, {:.2} per update",
        extra_allocations as f64 / extra_deliveries as f64,
        many as f64 / MEASURED_UPDATES as f64,
    );
    // Exactly equal in practice; the slack covers a list growing once when the count rises,
    // and a measurement read while the loop is still finishing a turn. One allocation per
    // delivery would be 27,000 more here.
    assert!(
        extra_allocations <= MEASURED_UPDATES / 20,
        "{extra_allocations} more allocations for {extra_deliveries} more deliveries \
         ({few} with {FEW_SUBSCRIBERS} subscribers, {many} with {MANY_SUBSCRIBERS})"
    );
}
