//! The WebSocket stock protocol against the real server (PROTOCOL.md "Stock model",
//! "Operations", "WebSocket"): every message type and its reply, every action, batches,
//! `if_version`, idempotency (shared with HTTP), subscriptions, the Workerman-style `/`
//! connection and auth. The contract is the oracle, not the implementation.

mod common;

use std::time::Duration;

// `op` keeps the many ops written inside `json!` tables short.
use common::stock_op as op;
use common::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;

// ---- helpers ---------------------------------------------------------------------------------

/// `(on_hand, reserved, quantity, version)` of a state object, after checking that it has the
/// contract's five fields and that `quantity = on_hand - reserved`.
fn st(state: &Value) -> (u64, u64, u64, u64) {
    for field in ["id", "quantity", "on_hand", "reserved", "version"] {
        assert!(state.get(field).is_some(), "state lacks `{field}`: {state}");
    }
    let n = |f: &str| {
        state[f]
            .as_u64()
            .unwrap_or_else(|| panic!("{f} in {state}"))
    };
    let (on_hand, reserved, quantity) = (n("on_hand"), n("reserved"), n("quantity"));
    assert!(reserved <= on_hand, "reserved > on_hand: {state}");
    assert_eq!(quantity, on_hand - reserved, "quantity: {state}");
    (on_hand, reserved, quantity, n("version"))
}

fn update(sku: &str, action: &str, amount: u64) -> Value {
    json!({"type": "stock_update", "stock": op(sku, action, amount)})
}

/// Sends a single op written out in full (extra or conditional fields); returns the reply.
fn send_op(ws: &mut Ws, stock: Value) -> Value {
    request(ws, json!({"type": "stock_update", "stock": stock}))
}

/// Sends a single op and asserts it was acknowledged; returns the ack's state.
fn apply(ws: &mut Ws, sku: &str, action: &str, amount: u64) -> Value {
    let ack = request(ws, update(sku, action, amount));
    assert_eq!(ack["type"], "ack", "{action} {amount} on {sku}: {ack}");
    assert!(ack.get("duplicate").is_none(), "{ack}");
    ack["stock"].clone()
}

/// A fresh server and a writer that has `set` each SKU to its quantity (version 1 each).
fn start_with_stock(sets: &[(&str, u64)]) -> (Server, Ws) {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    for &(sku, quantity) in sets {
        apply(&mut ws, sku, "set", quantity);
    }
    (server, ws)
}

/// The SKU ids of a reply's `stock` list, sorted.
fn sorted_ids(reply: &Value) -> Vec<&str> {
    let mut ids: Vec<&str> = reply["stock"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

fn get(ws: &mut Ws, sku: &str) -> Value {
    let reply = request(ws, json!({"type":"get","skus":[sku]}));
    assert_eq!(reply["type"], "stock", "{reply}");
    reply["stock"][0].clone()
}

/// Everything the server sent before answering a ping: since a connection's frames leave in
/// order, this is every update queued for it so far (a writer's broadcasts are queued in the
/// same step as its ack, so after the ack a barrier sees them).
fn barrier(ws: &mut Ws) -> Vec<Value> {
    send(ws, json!({"type":"ping","id":"barrier"}));
    let mut before = Vec::new();
    loop {
        let message = recv(ws);
        if message["type"] == "pong" && message["id"] == "barrier" {
            return before;
        }
        before.push(message);
    }
}

/// The `(sku, version)` of each `stock_update` in `messages`; panics on any other type.
fn updates(messages: &[Value]) -> Vec<(String, u64)> {
    messages
        .iter()
        .map(|m| {
            assert_eq!(m["type"], "stock_update", "{m}");
            let (_, _, _, version) = st(&m["stock"]);
            (m["stock"]["id"].as_str().unwrap().to_string(), version)
        })
        .collect()
}

fn subscribe(ws: &mut Ws, skus: &[&str]) -> Value {
    let reply = request(ws, json!({"type":"subscribe","skus":skus}));
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

fn unsubscribe(ws: &mut Ws, skus: &[&str]) {
    let reply = request(ws, json!({"type":"unsubscribe","skus":skus}));
    assert_eq!(reply, json!({"type":"unsubscribed"}));
}

/// An HTTP request; returns status and JSON body.
fn http(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let mut all = headers.to_vec();
    if body.is_some() {
        all.push(("Content-Type", "application/json"));
    }
    http_json(method, url, &all, body)
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// A tokens file with a read-only token, for `--tokens`.
fn tokens_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        "shop read read-only-secret\nerp write erp-write-secret\n",
    )
    .unwrap();
    file
}

/// A handshake request for `path`, with an `Authorization` header if given.
fn ws_request(server: &Server, path: &str, authorization: Option<&str>) -> Request {
    let mut req = server.url(path).into_client_request().unwrap();
    if let Some(value) = authorization {
        req.headers_mut()
            .insert("Authorization", value.parse().unwrap());
    }
    req
}

/// A client at `/ws` sending `authorization`, and the handshake's status.
fn ws_with_auth(server: &Server, authorization: &str) -> (Ws, u16) {
    let req = ws_request(server, "/ws", Some(authorization));
    let (ws, response) = tungstenite::connect(req).unwrap();
    set_timeout(&ws, Duration::from_secs(10));
    (ws, response.status().as_u16())
}

fn connect_err_status(server: &Server, path: &str, header: Option<&str>) -> u16 {
    match tungstenite::connect(ws_request(server, path, header)) {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("handshake at {path} should have been refused"),
    }
}

// ---- every message type and its reply ---------------------------------------------------------

#[test]
fn every_message_type_gets_its_reply_and_echoes_string_and_number_ids() {
    let (_server, mut ws) = start_with_stock(&[]);
    for id in [json!("req-1"), json!(42), json!(-7), json!(1.5)] {
        let pong = request(&mut ws, json!({"type":"ping","id":id}));
        assert_eq!(pong, json!({"type":"pong","id":id}));

        let reply = request(&mut ws, json!({"type":"get","id":id,"skus":["m-1"]}));
        assert_eq!(reply["type"], "stock");
        assert_eq!(reply["id"], id);

        let reply = request(&mut ws, json!({"type":"subscribe","id":id,"skus":["m-1"]}));
        assert_eq!(reply["type"], "subscribed");
        assert_eq!(reply["id"], id);

        let reply = request(
            &mut ws,
            json!({"type":"unsubscribe","id":id,"skus":["m-1"]}),
        );
        assert_eq!(reply, json!({"type":"unsubscribed","id":id}));

        let reply = request(
            &mut ws,
            json!({"type":"stock_update","id":id,"stock":op("m-1","increase",1)}),
        );
        assert_eq!(reply["type"], "ack");
        assert_eq!(reply["id"], id);
        assert!(
            reply["stock"].is_object(),
            "single op acks one state: {reply}"
        );

        let reply = request(
            &mut ws,
            json!({"type":"stock_batch","id":id,"ops":[op("m-1","increase",1)]}),
        );
        assert_eq!(reply["type"], "ack");
        assert_eq!(reply["id"], id);
        assert!(reply["stock"].is_array(), "a batch acks a list: {reply}");

        let reply = request(&mut ws, json!({"type":"no_such","id":id}));
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["id"], id);
    }
    // Without an id, the reply carries none.
    assert_eq!(
        request(&mut ws, json!({"type":"ping"})),
        json!({"type":"pong"})
    );
    let reply = request(&mut ws, update("m-1", "increase", 1));
    assert!(reply.get("id").is_none(), "{reply}");
}

#[test]
fn a_never_written_sku_reads_as_zero_and_does_not_become_known() {
    let server = Server::start(&[]);
    let mut ws = server.ws("/ws");
    let reply = request(&mut ws, json!({"type":"get","skus":["ghost","other"]}));
    assert_eq!(
        reply,
        json!({"type":"stock","stock":[
            {"id":"ghost","quantity":0,"on_hand":0,"reserved":0,"version":0},
            {"id":"other","quantity":0,"on_hand":0,"reserved":0,"version":0},
        ]})
    );
    // Reading it, or subscribing to it by name, does not make it known.
    subscribe(&mut ws, &["ghost"]);
    let all = subscribe(&mut ws, &["*"]);
    assert_eq!(all["stock"], json!([]));
    assert_eq!(
        http("GET", &server.http("/stock/ghost"), &[], None),
        (
            200,
            json!({"id":"ghost","quantity":0,"on_hand":0,"reserved":0,"version":0})
        )
    );
}

// ---- actions ----------------------------------------------------------------------------------

#[test]
fn each_action_changes_the_state_as_the_contract_says_and_bumps_the_version() {
    let server = Server::start(&[]);
    let mut sub = server.ws("/ws");
    subscribe(&mut sub, &["act"]);
    let mut ws = server.writer();
    // (action, amount, on_hand, reserved, quantity, version) after the op.
    let steps: &[(&str, u64, u64, u64, u64, u64)] = &[
        ("set", 10, 10, 0, 10, 1),
        ("increase", 5, 15, 0, 15, 2),
        ("decrease", 3, 12, 0, 12, 3),
        ("reserve", 4, 12, 4, 8, 4),
        ("release", 1, 12, 3, 9, 5),
        ("commit", 2, 10, 1, 9, 6),
        // A set to the current value is still a change: new version, broadcast.
        ("set", 10, 10, 1, 9, 7),
        // Emptying to exactly the reserved units is allowed.
        ("set", 1, 1, 1, 0, 8),
        ("commit", 1, 0, 0, 0, 9),
        ("set", 0, 0, 0, 0, 10),
    ];
    for &(action, amount, on_hand, reserved, quantity, version) in steps {
        let state = apply(&mut ws, "act", action, amount);
        assert_eq!(state["id"], "act");
        assert_eq!(
            st(&state),
            (on_hand, reserved, quantity, version),
            "{action} {amount}"
        );
        let broadcast = recv(&mut sub);
        assert_eq!(
            broadcast,
            json!({"type":"stock_update","stock":state}),
            "every accepted op is broadcast with the acked state"
        );
    }
    assert_eq!(barrier(&mut sub), Vec::<Value>::new());
    assert_eq!(st(&get(&mut ws, "act")), (0, 0, 0, 10));
}

#[test]
fn fields_an_action_does_not_use_are_ignored() {
    let (_server, mut ws) = start_with_stock(&[("f", 3)]);
    let ack = send_op(
        &mut ws,
        json!({"id":"f","action":"increase","change":2,"quantity":99,"note":"x"}),
    );
    assert_eq!(st(&ack["stock"]), (5, 0, 5, 2), "{ack}");
    let ack = send_op(
        &mut ws,
        json!({"id":"f","action":"set","quantity":7,"change":1}),
    );
    assert_eq!(st(&ack["stock"]), (7, 0, 7, 3), "{ack}");
}

// ---- batches ----------------------------------------------------------------------------------

#[test]
fn a_failing_op_leaves_the_whole_batch_unapplied_and_names_its_index() {
    let (server, mut ws) = start_with_stock(&[("ba", 5), ("bb", 5)]);
    let mut sub = server.ws("/ws");
    subscribe(&mut sub, &["*"]);
    let reply = request(
        &mut ws,
        json!({"type":"stock_batch","id":"b1","ops":[
            op("ba","reserve",2), op("bc","set",9), op("bb","reserve",10), op("ba","reserve",1),
        ]}),
    );
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["id"], "b1");
    assert_eq!(reply["code"], "insufficient_stock");
    assert_eq!(reply["index"], 2);
    assert!(reply["message"].is_string());
    // Nothing changed, nothing was broadcast, and the SKU only named in the batch is unknown.
    assert_eq!(st(&get(&mut ws, "ba")), (5, 0, 5, 1));
    assert_eq!(st(&get(&mut ws, "bb")), (5, 0, 5, 1));
    assert_eq!(st(&get(&mut ws, "bc")), (0, 0, 0, 0));
    assert_eq!(barrier(&mut sub), Vec::<Value>::new());
    let all = subscribe(&mut sub, &["*"]);
    assert_eq!(all["stock"].as_array().unwrap().len(), 2, "{all}");
}

#[test]
fn a_batch_gives_one_version_and_one_update_per_changed_sku_and_acks_each_op() {
    let (server, mut ws) = start_with_stock(&[("x", 5), ("y", 5)]);
    let mut sub = server.ws("/ws");
    subscribe(&mut sub, &["x", "y", "z"]);
    // Ops apply in order: the decrease of 6 only fits after the increase.
    let reply = request(
        &mut ws,
        json!({"type":"stock_batch","ops":[
            op("x","increase",1), op("x","decrease",6), op("y","reserve",2),
            op("z","set",4), op("y","reserve",1), op("z","reserve",4),
        ]}),
    );
    assert_eq!(reply["type"], "ack", "{reply}");
    let states = reply["stock"].as_array().unwrap();
    let ids: Vec<&str> = states.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        ["x", "x", "y", "z", "y", "z"],
        "one state per op, in order"
    );
    // Each holds its SKU's state after the whole batch.
    for s in states {
        let expected = match s["id"].as_str().unwrap() {
            "x" => (0, 0, 0, 2),
            "y" => (5, 3, 2, 2),
            _ => (4, 4, 0, 1),
        };
        assert_eq!(st(s), expected, "{s}");
    }
    let mut got = updates(&barrier(&mut sub));
    got.sort();
    assert_eq!(
        got,
        [("x".into(), 2), ("y".into(), 2), ("z".into(), 1)],
        "one stock_update per changed SKU"
    );
}

#[test]
fn if_version_in_a_batch_compares_with_the_version_before_the_batch() {
    let (_server, mut ws) = start_with_stock(&[("iv", 5)]);
    let reply = request(
        &mut ws,
        json!({"type":"stock_batch","ops":[
            {"id":"iv","action":"set","quantity":1,"if_version":1},
            {"id":"iv","action":"set","quantity":2,"if_version":1},
        ]}),
    );
    assert_eq!(reply["type"], "ack", "{reply}");
    assert_eq!(st(&reply["stock"][1]), (2, 0, 2, 2));
    let reply = request(
        &mut ws,
        json!({"type":"stock_batch","ops":[
            {"id":"iv","action":"increase","change":1},
            {"id":"iv","action":"increase","change":1,"if_version":3},
        ]}),
    );
    assert_eq!(reply["code"], "version_conflict", "{reply}");
    assert_eq!(reply["index"], 1);
    assert_eq!(
        st(&reply["stock"]),
        (2, 0, 2, 2),
        "the state before the batch"
    );
    assert_eq!(st(&get(&mut ws, "iv")), (2, 0, 2, 2));
}

// ---- if_version -------------------------------------------------------------------------------

#[test]
fn if_version_applies_on_a_match_and_returns_the_current_state_on_a_mismatch() {
    let (server, mut ws) = start_with_stock(&[]);
    // Version 0: a SKU never written.
    let ack = send_op(
        &mut ws,
        json!({"id":"v","action":"set","quantity":8,"if_version":0}),
    );
    assert_eq!(st(&ack["stock"]), (8, 0, 8, 1), "{ack}");
    apply(&mut ws, "v", "reserve", 3);
    let mut sub = server.ws("/ws");
    subscribe(&mut sub, &["v"]);
    let reply = request(
        &mut ws,
        json!({"type":"stock_update","id":9,"stock":{"id":"v","action":"set","quantity":1,"if_version":1}}),
    );
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["id"], 9);
    assert_eq!(reply["code"], "version_conflict");
    assert_eq!(reply["stock"]["id"], "v");
    assert_eq!(st(&reply["stock"]), (8, 3, 5, 2));
    assert!(
        reply.get("index").is_none(),
        "no index outside a batch: {reply}"
    );
    assert_eq!(barrier(&mut sub), Vec::<Value>::new());
    let ack = send_op(
        &mut ws,
        json!({"id":"v","action":"decrease","change":5,"if_version":2}),
    );
    assert_eq!(st(&ack["stock"]), (3, 3, 0, 3), "{ack}");
}

// ---- idempotency ------------------------------------------------------------------------------

#[test]
fn a_repeated_key_returns_the_original_result_marked_duplicate_and_changes_nothing() {
    let (server, mut ws) = start_with_stock(&[("k", 10)]);
    let mut sub = server.ws("/ws");
    subscribe(&mut sub, &["k"]);
    let message =
        json!({"type":"stock_update","idempotency_key":"order-1","stock":op("k","reserve",3)});
    let first = request(&mut ws, message.clone());
    assert_eq!(first["type"], "ack");
    assert!(first.get("duplicate").is_none(), "{first}");
    assert_eq!(st(&first["stock"]), (10, 3, 7, 2));
    assert_eq!(updates(&barrier(&mut sub)), [("k".into(), 2)]);
    // A later change, then the repeat: the repeat answers with the original state.
    apply(&mut ws, "k", "increase", 1);
    assert_eq!(updates(&barrier(&mut sub)), [("k".into(), 3)]);
    let mut repeat = message.clone();
    repeat["id"] = json!("again");
    let second = request(&mut ws, repeat);
    assert_eq!(second["type"], "ack");
    assert_eq!(second["id"], "again");
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["stock"], first["stock"]);
    assert_eq!(
        st(&get(&mut ws, "k")),
        (11, 3, 8, 3),
        "the repeat changed nothing"
    );
    assert_eq!(
        barrier(&mut sub),
        Vec::<Value>::new(),
        "and broadcast nothing"
    );
    // The key may also sit inside the op; it means the same.
    let in_op = send_op(
        &mut ws,
        json!({"id":"k","action":"reserve","change":3,"idempotency_key":"order-1"}),
    );
    assert_eq!(in_op["duplicate"], true, "{in_op}");
    assert_eq!(in_op["stock"], first["stock"]);
}

#[test]
fn a_repeated_batch_key_returns_the_original_states() {
    let (_server, mut ws) = start_with_stock(&[]);
    let batch = json!({"type":"stock_batch","idempotency_key":"cart-7","ops":[
        op("p","set",4), op("q","set",6), op("p","reserve",1),
    ]});
    let first = request(&mut ws, batch.clone());
    assert_eq!(first["type"], "ack", "{first}");
    let second = request(&mut ws, batch);
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["stock"], first["stock"]);
    assert_eq!(st(&get(&mut ws, "p")), (4, 1, 3, 1));
    assert_eq!(st(&get(&mut ws, "q")), (6, 0, 6, 1));
}

#[test]
fn the_same_key_with_a_different_request_or_two_keys_is_a_bad_request() {
    let (_server, mut ws) = start_with_stock(&[("d", 10)]);
    let ack = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"k1","stock":op("d","reserve",1)}),
    );
    assert_eq!(ack["type"], "ack");
    for different in [
        json!({"type":"stock_update","idempotency_key":"k1","stock":op("d","reserve",2)}),
        json!({"type":"stock_update","idempotency_key":"k1","stock":op("d","release",1)}),
        json!({"type":"stock_update","idempotency_key":"k1","stock":op("e","reserve",1)}),
        json!({"type":"stock_batch","idempotency_key":"k1","ops":[op("d","reserve",1)]}),
    ] {
        let reply = request(&mut ws, different.clone());
        assert_eq!(reply["code"], "bad_request", "{different}: {reply}");
    }
    // Two different keys on one request (message and op).
    let reply = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"k2","stock":{"id":"d","action":"reserve","change":1,"idempotency_key":"k3"}}),
    );
    assert_eq!(reply["code"], "bad_request", "{reply}");
    assert_eq!(st(&get(&mut ws, "d")), (10, 1, 9, 2), "nothing changed");
    // Neither k2 nor k3 was recorded.
    for key in ["k2", "k3"] {
        let reply = request(
            &mut ws,
            json!({"type":"stock_update","idempotency_key":key,"stock":op("d","increase",1)}),
        );
        assert_eq!(reply["type"], "ack", "{reply}");
        assert!(reply.get("duplicate").is_none(), "{reply}");
    }
    // The same key in both places is one key.
    let reply = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"k4","stock":{"id":"d","action":"increase","change":1,"idempotency_key":"k4"}}),
    );
    assert_eq!(reply["type"], "ack", "{reply}");
}

#[test]
fn a_rejected_write_does_not_record_its_key() {
    let (_server, mut ws) = start_with_stock(&[("r", 2)]);
    let message =
        json!({"type":"stock_update","idempotency_key":"retry-me","stock":op("r","reserve",5)});
    let reply = request(&mut ws, message.clone());
    assert_eq!(reply["code"], "insufficient_stock", "{reply}");
    apply(&mut ws, "r", "increase", 3);
    let reply = request(&mut ws, message.clone());
    assert_eq!(reply["type"], "ack", "{reply}");
    assert!(reply.get("duplicate").is_none(), "{reply}");
    assert_eq!(st(&reply["stock"]), (5, 5, 0, 3));
    let reply = request(&mut ws, message);
    assert_eq!(reply["duplicate"], true, "{reply}");
}

#[test]
fn websocket_and_http_share_one_key_space() {
    let (server, mut ws) = start_with_stock(&[("h", 10)]);
    let url = server.http("/stock/h");
    let auth = bearer();
    let headers = [
        ("Authorization", auth.as_str()),
        ("Idempotency-Key", "http-first"),
    ];
    let body = r#"{"action":"reserve","change":2}"#;
    let (status, first) = http("POST", &url, &headers, Some(body));
    assert_eq!(status, 200, "{first}");
    assert_eq!(st(&first["stock"]), (10, 2, 8, 2));
    let reply = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"http-first","stock":op("h","reserve",2)}),
    );
    assert_eq!(reply["duplicate"], true, "{reply}");
    assert_eq!(reply["stock"], first["stock"]);

    // And the other way round, with the key in the HTTP body this time.
    let ack = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"ws-first","stock":op("h","release",1)}),
    );
    assert_eq!(st(&ack["stock"]), (10, 1, 9, 3));
    let (status, again) = http(
        "POST",
        &url,
        &[("Authorization", auth.as_str())],
        Some(r#"{"action":"release","change":1,"idempotency_key":"ws-first"}"#),
    );
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["stock"], ack["stock"]);
    // Header and body naming different keys: refused, nothing applied.
    let (status, reply) = http(
        "POST",
        &url,
        &[("Authorization", auth.as_str()), ("Idempotency-Key", "one")],
        Some(r#"{"action":"release","change":1,"idempotency_key":"two"}"#),
    );
    assert_eq!(
        (status, &reply["error"]["code"]),
        (400, &json!("bad_request"))
    );
    // A different request under an HTTP key is refused over WebSocket.
    let reply = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"http-first","stock":op("h","reserve",3)}),
    );
    assert_eq!(reply["code"], "bad_request", "{reply}");
    assert_eq!(st(&get(&mut ws, "h")), (10, 1, 9, 3));
}

// ---- subscriptions ----------------------------------------------------------------------------

#[test]
fn subscribe_snapshots_named_skus_and_delivers_only_their_updates() {
    let (server, mut ws) = start_with_stock(&[("a", 3), ("b", 4)]);
    let mut sub = server.ws("/ws");
    let reply = request(
        &mut sub,
        json!({"type":"subscribe","id":"s","skus":["a","never"]}),
    );
    assert_eq!(
        reply,
        json!({"type":"subscribed","id":"s","stock":[
            {"id":"a","quantity":3,"on_hand":3,"reserved":0,"version":1},
            {"id":"never","quantity":0,"on_hand":0,"reserved":0,"version":0},
        ]})
    );
    apply(&mut ws, "b", "increase", 1);
    apply(&mut ws, "a", "increase", 1);
    apply(&mut ws, "never", "set", 1);
    assert_eq!(
        updates(&barrier(&mut sub)),
        [("a".into(), 2), ("never".into(), 1)]
    );
    unsubscribe(&mut sub, &["a"]);
    apply(&mut ws, "a", "increase", 1);
    assert_eq!(barrier(&mut sub), Vec::<Value>::new());
    // Unsubscribing something not subscribed (or unknown) is fine.
    unsubscribe(&mut sub, &["a", "nobody"]);
}

#[test]
fn the_wildcard_snapshots_known_skus_and_covers_named_ones_until_unsubscribed() {
    let (server, mut ws) = start_with_stock(&[("w1", 1), ("w2", 2)]);
    let mut sub = server.ws("/ws");
    // Read (but never write) a third SKU: not known, not in the snapshot.
    get(&mut sub, "w3");
    subscribe(&mut sub, &["w1"]);
    let reply = subscribe(&mut sub, &["*"]);
    let ids = sorted_ids(&reply);
    assert_eq!(ids, ["w1", "w2"], "{reply}");
    // Both subscribed to w1 and to `*`: still one update per change.
    apply(&mut ws, "w1", "increase", 1);
    apply(&mut ws, "w3", "set", 3);
    assert_eq!(
        updates(&barrier(&mut sub)),
        [("w1".into(), 2), ("w3".into(), 1)]
    );
    // Unsubscribing a SKU still covered by `*` keeps its updates.
    unsubscribe(&mut sub, &["w1"]);
    apply(&mut ws, "w1", "increase", 1);
    assert_eq!(updates(&barrier(&mut sub)), [("w1".into(), 3)]);
    // Named w2 again, then unsubscribe `*`: w2 stays, the rest stop.
    subscribe(&mut sub, &["w2"]);
    unsubscribe(&mut sub, &["*"]);
    apply(&mut ws, "w1", "increase", 1);
    apply(&mut ws, "w2", "increase", 1);
    apply(&mut ws, "w3", "increase", 1);
    assert_eq!(updates(&barrier(&mut sub)), [("w2".into(), 2)]);
}

#[test]
fn a_connection_at_slash_hears_every_update_without_subscribing_or_a_reply() {
    let (server, mut ws) = start_with_stock(&[("old", 1)]);
    let mut page = server.ws("/");
    // No `subscribed` reply: the first thing it hears is the pong.
    assert_eq!(barrier(&mut page), Vec::<Value>::new());
    apply(&mut ws, "s1", "set", 1);
    apply(&mut ws, "s2", "set", 2);
    let got = barrier(&mut page);
    assert_eq!(updates(&got), [("s1".into(), 1), ("s2".into(), 1)]);
    assert_eq!(got[1]["stock"]["quantity"], 2);
    // A plain `/ws` connection hears nothing until it subscribes.
    let mut plain = server.ws("/ws");
    apply(&mut ws, "s1", "increase", 1);
    assert_eq!(barrier(&mut plain), Vec::<Value>::new());
    assert_eq!(updates(&barrier(&mut page)), [("s1".into(), 2)]);
}

#[test]
fn skus_in_the_url_subscribe_at_connect_and_send_subscribed() {
    let (server, mut ws) = start_with_stock(&[("u1", 5), ("u3", 7)]);
    for (path, fresh) in [("/ws?skus=u1,u2", "u2"), ("/?skus=u1,v2", "v2")] {
        let mut sub = server.ws(path);
        let first = recv(&mut sub);
        assert_eq!(
            first,
            json!({"type":"subscribed","stock":[
                {"id":"u1","quantity":5,"on_hand":5,"reserved":0,"version":1},
                {"id":fresh,"quantity":0,"on_hand":0,"reserved":0,"version":0},
            ]}),
            "{path}"
        );
        // At `/`, `?skus=` replaces the implicit `*`: u3 is not heard.
        apply(&mut ws, "u3", "increase", 1);
        apply(&mut ws, fresh, "set", 1);
        assert_eq!(updates(&barrier(&mut sub)), [(fresh.into(), 1)], "{path}");
    }
    let mut known = vec!["u1", "u2", "u3", "v2"];
    for (path, fresh) in [("/ws?skus=*", "u9"), ("/?skus=*", "w9")] {
        let mut all = server.ws(path);
        let first = recv(&mut all);
        assert_eq!(first["type"], "subscribed", "{path}");
        let ids = sorted_ids(&first);
        assert_eq!(ids, known, "{path}: {first}");
        apply(&mut ws, fresh, "set", 1);
        assert_eq!(updates(&barrier(&mut all)), [(fresh.into(), 1)], "{path}");
        known.push(fresh);
        known.sort_unstable();
    }
}

#[test]
fn the_writer_gets_its_ack_before_its_own_update() {
    let (_server, mut ws) = start_with_stock(&[]);
    subscribe(&mut ws, &["own"]);
    for (i, id) in [json!(1), json!("two"), json!(3)].into_iter().enumerate() {
        send(
            &mut ws,
            json!({"type":"stock_update","id":id,"stock":op("own","set",i as u64)}),
        );
        let ack = recv(&mut ws);
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["id"], id);
        let own = recv(&mut ws);
        assert_eq!(own, json!({"type":"stock_update","stock":ack["stock"]}));
    }
}

// ---- auth -------------------------------------------------------------------------------------

#[test]
fn writes_need_a_write_token_by_query_or_bearer_header() {
    let tokens = tokens_file();
    let server = Server::start(&["--tokens", tokens.path().to_str().unwrap()]);
    // ?token=
    let mut by_query = server.ws(&format!("/ws?token={TOKEN}"));
    apply(&mut by_query, "t", "set", 1);
    // Authorization: Bearer (the write token and a write token from the file)
    for secret in [TOKEN, "erp-write-secret"] {
        let (mut by_header, status) = ws_with_auth(&server, &format!("Bearer {secret}"));
        assert_eq!(status, 101);
        apply(&mut by_header, "t", "increase", 1);
    }
    // No token, or a read-only token: reads work, writes are unauthorized, the connection stays.
    for path in ["/ws".to_string(), "/ws?token=read-only-secret".to_string()] {
        let mut reader = server.ws(&path);
        for write in [
            json!({"type":"stock_update","id":"w","stock":op("t","increase",1)}),
            json!({"type":"stock_batch","id":"w","ops":[op("t","increase",1)]}),
        ] {
            let reply = request(&mut reader, write);
            assert_eq!(reply["type"], "error", "{path}");
            assert_eq!(reply["code"], "unauthorized", "{path}: {reply}");
            assert_eq!(reply["id"], "w");
        }
        assert_eq!(st(&get(&mut reader, "t")), (3, 0, 3, 3), "{path}");
    }
    // The read-only token by header, too.
    let (mut reader, _) = ws_with_auth(&server, "Bearer read-only-secret");
    let reply = request(&mut reader, update("t", "increase", 1));
    assert_eq!(reply["code"], "unauthorized", "{reply}");
}

#[test]
fn an_invalid_token_is_refused_at_the_handshake() {
    let server = Server::start(&[]);
    assert_eq!(connect_err_status(&server, "/ws?token=wrong", None), 401);
    assert_eq!(connect_err_status(&server, "/?token=wrong", None), 401);
    assert_eq!(
        connect_err_status(&server, "/ws", Some("Bearer wrong")),
        401
    );
    // A token one byte short of the real one is just as wrong.
    let short = &TOKEN[..TOKEN.len() - 1];
    assert_eq!(
        connect_err_status(&server, &format!("/ws?token={short}"), None),
        401
    );
}

#[test]
fn without_public_read_reading_needs_a_token() {
    let tokens = tokens_file();
    let server = Server::start(&[
        "--public-read",
        "false",
        "--tokens",
        tokens.path().to_str().unwrap(),
    ]);
    assert_eq!(connect_err_status(&server, "/ws", None), 401);
    assert_eq!(connect_err_status(&server, "/", None), 401);
    let (status, body) = http("GET", &server.http("/stock/a"), &[], None);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let mut writer = server.writer();
    apply(&mut writer, "a", "set", 2);
    let mut reader = server.ws("/ws?token=read-only-secret");
    assert_eq!(
        st(&subscribe(&mut reader, &["a"])["stock"][0]),
        (2, 0, 2, 1)
    );
    let reply = request(&mut reader, update("a", "set", 1));
    assert_eq!(reply["code"], "unauthorized");
    let (status, body) = http(
        "GET",
        &server.http("/stock/a"),
        &[("Authorization", "Bearer read-only-secret")],
        None,
    );
    assert_eq!((status, st(&body)), (200, (2, 0, 2, 1)));
}
