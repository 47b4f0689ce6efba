//! Every error code of PROTOCOL.md reached over WebSocket against the real server, each reply
//! checked for its code, `id`, `message` (and `index` / `stock` where the contract says), and
//! the connection checked to still work after it. Plus the HTTP status of each code.
//!
//! `unavailable` is reached here through a full idempotency key store (`--idempotency-keys-max`);
//! the write-ahead log refusing (a full disk) is covered by tests/wal_disk_full.rs. `internal`
//! is never sent by this server: no request maps to it, and a panic
//! in a handler closes that connection instead (the loop's guard), so there is nothing to send
//! it on.

mod common;

use std::time::{Duration, Instant};

// `op` keeps the many ops written inside `json!` tables short.
use common::stock_op as op;
use common::*;
use serde_json::{json, Value};

fn update(stock: Value) -> Value {
    json!({"type":"stock_update","id":"e","stock":stock})
}

/// Sends `message`, asserts an error reply with `code` (echoing `id` "e" when the message is an
/// object carrying it), then checks the connection still answers a ping.
fn expect_error(ws: &mut Ws, message: &str, code: &str) -> Value {
    ws.send(tungstenite::Message::text(message)).unwrap();
    let reply = recv(ws);
    assert_eq!(reply["type"], "error", "{message}: {reply}");
    assert_eq!(reply["code"], code, "{message}: {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    if message.contains(r#""id":"e""#) {
        assert_eq!(reply["id"], "e", "{message}: {reply}");
    }
    assert_eq!(
        request(ws, json!({"type":"ping","id":"alive"})),
        json!({"type":"pong","id":"alive"}),
        "the connection survives {message}"
    );
    reply
}

fn expect_error_json(ws: &mut Ws, message: Value, code: &str) -> Value {
    expect_error(ws, &message.to_string(), code)
}

fn ack(ws: &mut Ws, message: Value) -> Value {
    let reply = request(ws, message.clone());
    assert_eq!(reply["type"], "ack", "{message}: {reply}");
    reply
}

fn get(ws: &mut Ws, sku: &str) -> Value {
    request(ws, json!({"type":"get","skus":[sku]}))["stock"][0].clone()
}

#[test]
fn bad_request_for_malformed_messages() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    let long_key = "k".repeat(129);
    for message in [
        "not json",
        "{\"type\":\"ping\"",
        "[1,2]",
        "\"ping\"",
        "null",
        r#"{"id":"e"}"#,
        r#"{"id":"e","type":5}"#,
        r#"{"id":"e","type":null}"#,
        r#"{"id":"e","type":"subscribe"}"#,
        r#"{"id":"e","type":"subscribe","skus":"a"}"#,
        r#"{"id":"e","type":"get","skus":{"a":1}}"#,
        r#"{"id":"e","type":"unsubscribe"}"#,
        r#"{"id":"e","type":"stock_update"}"#,
        r#"{"id":"e","type":"stock_update","stock":[1]}"#,
        r#"{"id":"e","type":"stock_update","stock":{"id":"a","change":1}}"#,
        r#"{"id":"e","type":"stock_update","stock":{"id":"a","action":7,"change":1}}"#,
        r#"{"id":"e","type":"stock_update","stock":{"id":"a","action":"set","quantity":1,"if_version":-1}}"#,
        r#"{"id":"e","type":"stock_update","stock":{"id":"a","action":"set","quantity":1,"if_version":"3"}}"#,
        r#"{"id":"e","type":"stock_update","idempotency_key":"","stock":{"id":"a","action":"set","quantity":1}}"#,
        r#"{"id":"e","type":"stock_update","idempotency_key":5,"stock":{"id":"a","action":"set","quantity":1}}"#,
        &format!(
            r#"{{"id":"e","type":"stock_update","idempotency_key":"{long_key}","stock":{{"id":"a","action":"set","quantity":1}}}}"#
        ),
        r#"{"id":"e","type":"stock_update","idempotency_key":"x","stock":{"id":"a","action":"set","quantity":1,"idempotency_key":"y"}}"#,
        r#"{"id":"e","type":"stock_batch"}"#,
        r#"{"id":"e","type":"stock_batch","ops":[]}"#,
        r#"{"id":"e","type":"stock_batch","ops":{"id":"a"}}"#,
    ] {
        expect_error(&mut ws, message, "bad_request");
    }
    // A binary frame is not a JSON text message.
    ws.send(tungstenite::Message::binary(
        b"{\"type\":\"ping\"}".to_vec(),
    ))
    .unwrap();
    assert_eq!(recv(&mut ws)["code"], "bad_request");
    // A key of exactly 128 bytes is fine; nothing above was applied.
    let key = "k".repeat(128);
    ack(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":key,"stock":op("b","set",1)}),
    );
    assert_eq!(get(&mut ws, "a")["version"], 0);
}

#[test]
fn unknown_type_and_unknown_action() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    for kind in ["launch", "Subscribe", "PING", "", "stock"] {
        expect_error_json(&mut ws, json!({"id":"e","type":kind}), "unknown_type");
    }
    for action in ["steal", "SET", "Increase", "", "sell"] {
        expect_error_json(
            &mut ws,
            update(json!({"id":"a","action":action,"change":1})),
            "unknown_action",
        );
    }
    let reply = expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":[op("a","set",1),{"id":"a","action":"x","change":1}]}),
        "unknown_action",
    );
    assert_eq!(reply["index"], 1);
}

#[test]
fn invalid_sku_for_every_malformed_id() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    let too_long = "x".repeat(129);
    let bad: Vec<Value> = vec![
        json!(""),
        json!(too_long),
        json!("a b"),
        json!("a,b"),
        json!("a*"),
        json!("é"),
        json!("a?b"),
        json!("batch"),
        json!(5),
        json!(null),
    ];
    for id in &bad {
        expect_error_json(
            &mut ws,
            update(json!({"id":id,"action":"set","quantity":1})),
            "invalid_sku",
        );
        expect_error_json(
            &mut ws,
            json!({"id":"e","type":"get","skus":[id]}),
            "invalid_sku",
        );
        expect_error_json(
            &mut ws,
            json!({"id":"e","type":"subscribe","skus":["ok",id]}),
            "invalid_sku",
        );
        let reply = expect_error_json(
            &mut ws,
            json!({"id":"e","type":"stock_batch","ops":[op("ok","set",1),{"id":id,"action":"set","quantity":1}]}),
            "invalid_sku",
        );
        assert_eq!(reply["index"], 1);
    }
    expect_error_json(
        &mut ws,
        update(json!({"action":"set","quantity":1})),
        "invalid_sku",
    );
    // `?skus=` at connect is answered as a subscribe would be.
    let mut by_url = server.ws("/ws?skus=ok,a%20b");
    assert_eq!(recv(&mut by_url)["code"], "invalid_sku");
    assert_eq!(request(&mut by_url, json!({"type":"ping"}))["type"], "pong");
    // `*` means "all" only for subscribe/unsubscribe; it is no SKU to read or write.
    expect_error_json(
        &mut ws,
        json!({"id":"e","type":"get","skus":["*"]}),
        "invalid_sku",
    );
    expect_error_json(&mut ws, update(op("*", "set", 1)), "invalid_sku");
    // The edges that are valid, and none of the refused writes happened.
    let longest = "x".repeat(128);
    for id in [longest.as_str(), "A.b_c:d/e-f", "Batch", "batch/1"] {
        ack(&mut ws, update(op(id, "set", 1)));
    }
    assert_eq!(get(&mut ws, "ok")["version"], 0);
}

#[test]
fn invalid_change_for_missing_non_integer_and_out_of_range_amounts() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    let mut cases: Vec<Value> = Vec::new();
    for action in ["increase", "decrease", "reserve", "release", "commit"] {
        cases.push(json!({"id":"c","action":action}));
        for change in [
            json!(null),
            json!(1.5),
            json!("1"),
            json!(true),
            json!([1]),
            json!(0),
            json!(-1),
            json!(1_000_000_001u64),
            json!(1e20),
        ] {
            cases.push(json!({"id":"c","action":action,"change":change}));
        }
        // The amount must be in `change`, not `quantity`.
        cases.push(json!({"id":"c","action":action,"quantity":1}));
    }
    cases.push(json!({"id":"c","action":"set"}));
    for quantity in [
        json!(null),
        json!(2.5),
        json!("3"),
        json!(-1),
        json!(1_000_000_000_001u64),
        json!(u64::MAX),
    ] {
        cases.push(json!({"id":"c","action":"set","quantity":quantity}));
    }
    cases.push(json!({"id":"c","action":"set","change":1}));
    for case in cases {
        expect_error_json(&mut ws, update(case), "invalid_change");
    }
    assert_eq!(get(&mut ws, "c")["version"], 0, "nothing was applied");

    // The edges of the ranges are accepted ...
    ack(&mut ws, update(op("c", "set", 1_000_000_000_000)));
    ack(&mut ws, update(op("c", "set", 0)));
    ack(&mut ws, update(op("c", "increase", 1_000_000_000)));
    // ... and an increase past 1e12 on_hand is invalid_change (in a batch, with its index).
    ack(&mut ws, update(op("c", "set", 999_999_999_999)));
    ack(&mut ws, update(op("c", "increase", 1)));
    expect_error_json(&mut ws, update(op("c", "increase", 1)), "invalid_change");
    let reply = expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":[op("c","decrease",5),op("c","increase",3),op("c","increase",3)]}),
        "invalid_change",
    );
    assert_eq!(reply["index"], 2);
    let state = get(&mut ws, "c");
    assert_eq!(
        (state["on_hand"].clone(), state["version"].clone()),
        (json!(1_000_000_000_000u64), json!(5))
    );
}

#[test]
fn stock_rules_insufficient_stock_insufficient_reserved_below_reserved() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    ack(&mut ws, update(op("s", "set", 10)));
    ack(&mut ws, update(op("s", "reserve", 4)));
    let rejected = [
        // available 6, reserved 4
        ("s", "decrease", 7, "insufficient_stock"),
        ("s", "reserve", 7, "insufficient_stock"),
        ("s", "release", 5, "insufficient_reserved"),
        ("s", "commit", 5, "insufficient_reserved"),
        ("s", "set", 3, "below_reserved"),
        // Never written: nothing available, nothing reserved.
        ("n", "decrease", 1, "insufficient_stock"),
        ("n", "reserve", 1, "insufficient_stock"),
        ("n", "release", 1, "insufficient_reserved"),
        ("n", "commit", 1, "insufficient_reserved"),
    ];
    for (sku, action, amount, code) in rejected {
        expect_error_json(&mut ws, update(op(sku, action, amount)), code);
    }
    let state = get(&mut ws, "s");
    assert_eq!(
        (
            state["on_hand"].clone(),
            state["reserved"].clone(),
            state["version"].clone()
        ),
        (json!(10), json!(4), json!(2)),
        "rejections change nothing"
    );
    assert_eq!(get(&mut ws, "n")["version"], 0);
    // The limits themselves are fine.
    ack(&mut ws, update(op("s", "set", 4)));
    ack(&mut ws, update(op("s", "commit", 4)));
    let state = get(&mut ws, "s");
    assert_eq!(
        (state["on_hand"].clone(), state["quantity"].clone()),
        (json!(0), json!(0))
    );
}

#[test]
fn version_conflict_carries_the_current_state() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    ack(&mut ws, update(op("v", "set", 3)));
    let reply = expect_error_json(
        &mut ws,
        update(json!({"id":"v","action":"increase","change":1,"if_version":7})),
        "version_conflict",
    );
    assert_eq!(
        reply["stock"],
        json!({"id":"v","quantity":3,"on_hand":3,"reserved":0,"version":1})
    );
    let reply = expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":[op("w","set",1),{"id":"v","action":"set","quantity":1,"if_version":0}]}),
        "version_conflict",
    );
    assert_eq!(reply["index"], 1);
    assert_eq!(reply["stock"]["id"], "v");
    assert_eq!(reply["stock"]["version"], 1);
    assert_eq!(get(&mut ws, "w")["version"], 0);
}

#[test]
fn unauthorized_writes_without_write_rights() {
    let server = Server::start(&[]);
    let mut ws = server.ws("/ws");
    expect_error_json(&mut ws, update(op("a", "set", 1)), "unauthorized");
    expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":[op("a","set",1)]}),
        "unauthorized",
    );
    assert_eq!(get(&mut ws, "a")["version"], 0);
}

#[test]
fn too_large_batches_and_sku_lists() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    let ops: Vec<Value> = (0..101).map(|i| op(&format!("t{i}"), "set", 1)).collect();
    let reply = expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":ops}),
        "too_large",
    );
    assert!(reply.get("index").is_none(), "{reply}");
    assert_eq!(get(&mut ws, "t0")["version"], 0);
    ack(
        &mut ws,
        json!({"type":"stock_batch","ops":ops[..100].to_vec()}),
    );
    let names: Vec<String> = (0..1001).map(|i| format!("n{i}")).collect();
    for kind in ["subscribe", "unsubscribe", "get"] {
        expect_error_json(
            &mut ws,
            json!({"id":"e","type":kind,"skus":names}),
            "too_large",
        );
    }
    let reply = request(&mut ws, json!({"type":"get","skus":names[..1000].to_vec()}));
    assert_eq!(reply["stock"].as_array().unwrap().len(), 1000);
    // The same limit on `?skus=` at connect.
    let mut sub = server.ws(&format!("/ws?skus={}", names.join(",")));
    assert_eq!(recv(&mut sub)["code"], "too_large");
    assert_eq!(request(&mut sub, json!({"type":"ping"}))["type"], "pong");
}

#[test]
fn too_large_past_the_subscriptions_per_connection() {
    let server = Server::start(&["--max-subscriptions", "3"]);
    let mut ws = server.writer();
    assert_eq!(
        request(&mut ws, json!({"type":"subscribe","skus":["a","b"]}))["type"],
        "subscribed"
    );
    expect_error_json(
        &mut ws,
        json!({"id":"e","type":"subscribe","skus":["c","d"]}),
        "too_large",
    );
    // The refused subscribe added nothing: c is not heard.
    ack(&mut ws, update(op("c", "set", 1)));
    assert_eq!(request(&mut ws, json!({"type":"ping"}))["type"], "pong");
    assert_eq!(
        request(&mut ws, json!({"type":"subscribe","skus":["c"]}))["type"],
        "subscribed"
    );
    expect_error_json(
        &mut ws,
        json!({"id":"e","type":"subscribe","skus":["d"]}),
        "too_large",
    );
    // Freeing one makes room again.
    assert_eq!(
        request(&mut ws, json!({"type":"unsubscribe","skus":["a"]}))["type"],
        "unsubscribed"
    );
    assert_eq!(
        request(&mut ws, json!({"type":"subscribe","skus":["d"]}))["type"],
        "subscribed"
    );
    let mut over = server.ws("/ws?skus=a,b,c,d");
    assert_eq!(recv(&mut over)["code"], "too_large");
}

#[test]
fn resubscribing_a_sku_already_held_does_not_count_against_the_limit() {
    let server = Server::start(&["--max-subscriptions", "2"]);
    let mut ws = server.ws("/ws");
    for _ in 0..3 {
        let reply = request(&mut ws, json!({"type":"subscribe","skus":["a","b"]}));
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }
}

#[test]
fn rate_limited_past_the_write_rate_and_reads_still_answered() {
    let server = Server::start(&["--write-rate", "5"]);
    let mut ws = server.writer();
    let started = Instant::now();
    for i in 0..20 {
        send(
            &mut ws,
            json!({"type":"stock_update","id":i,"stock":op("r","increase",1)}),
        );
    }
    let mut acked = 0;
    let mut limited = 0;
    for i in 0..20 {
        let reply = recv(&mut ws);
        assert_eq!(reply["id"], i, "replies in order");
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            Some("error") => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                limited += 1;
            }
            _ => panic!("{reply}"),
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(acked + limited, 20);
    // At most 5 writes per one-second window: all 20 fit in one or two windows.
    if elapsed < Duration::from_millis(900) {
        assert_eq!(acked, 5, "{elapsed:?}");
    }
    assert!(limited >= 10, "acked {acked} in {elapsed:?}");
    // Reads are not limited, and the refused writes changed nothing.
    let state = get(&mut ws, "r");
    assert_eq!(state["on_hand"], acked);
    assert_eq!(request(&mut ws, json!({"type":"ping"}))["type"], "pong");
}

#[test]
fn frame_level_violations_close_with_the_rfc_6455_code() {
    let server = Server::start(&["--max-message-bytes", "1024"]);
    let mut ws = server.writer();
    let big = format!(r#"{{"type":"get","skus":["{}"]}}"#, "x".repeat(2000));
    ws.send(tungstenite::Message::text(big)).unwrap();
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1009);
                break;
            }
            Ok(tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_)) => {}
            other => panic!("expected a 1009 close, got {other:?}"),
        }
    }
}

/// (method, path, body, with a write token, expected status, expected code)
type HttpCase<'a> = (&'a str, &'a str, Option<&'a str>, bool, u16, &'a str);

#[test]
fn each_error_code_has_its_http_status() {
    let server = Server::start(&["--write-rate", "1"]);
    let auth = format!("Bearer {TOKEN}");
    let call = |method: &str, path: &str, body: Option<&str>, token: bool| -> (u16, Value) {
        let headers: &[(&str, &str)] = if token {
            &[("Authorization", &auth)]
        } else {
            &[]
        };
        http_json(method, &server.http(path), headers, body)
    };
    // Each call is a fresh connection, so the per-connection write rate (1/s) only bites below.
    let cases: &[HttpCase] = &[
        ("POST", "/stock/a", Some("{"), true, 400, "bad_request"),
        (
            "POST",
            "/stock/a",
            Some(r#"{"action":"x","change":1}"#),
            true,
            400,
            "unknown_action",
        ),
        ("GET", "/stock/a%20b", None, false, 400, "invalid_sku"),
        (
            "POST",
            "/stock/a",
            Some(r#"{"action":"increase","change":0}"#),
            true,
            400,
            "invalid_change",
        ),
        (
            "POST",
            "/stock/a",
            Some(r#"{"action":"set","quantity":1}"#),
            false,
            401,
            "unauthorized",
        ),
        ("GET", "/nowhere", None, false, 404, "not_found"),
        ("DELETE", "/stock/a", None, true, 405, "method_not_allowed"),
        (
            "POST",
            "/stock/a",
            Some(r#"{"action":"reserve","change":1}"#),
            true,
            409,
            "insufficient_stock",
        ),
        (
            "POST",
            "/stock/a",
            Some(r#"{"action":"release","change":1}"#),
            true,
            409,
            "insufficient_reserved",
        ),
        (
            "POST",
            "/stock/a",
            Some(r#"{"action":"set","quantity":1,"if_version":4}"#),
            true,
            409,
            "version_conflict",
        ),
    ];
    for &(method, path, body, token, status, code) in cases {
        let (got, reply) = call(method, path, body, token);
        assert_eq!(
            (got, reply["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path} {body:?}: {reply}"
        );
        assert!(reply["error"]["message"].is_string());
    }
    let (_, reply) = call(
        "POST",
        "/stock/a",
        Some(r#"{"action":"set","quantity":1,"if_version":4}"#),
        true,
    );
    assert_eq!(reply["error"]["stock"]["version"], 0, "{reply}");
    let ops: Vec<Value> = (0..101).map(|i| op(&format!("t{i}"), "set", 1)).collect();
    let (got, reply) = call(
        "POST",
        "/stock/batch",
        Some(&json!({"ops":ops}).to_string()),
        true,
    );
    assert_eq!(
        (got, reply["error"]["code"].as_str()),
        (413, Some("too_large"))
    );
    // below_reserved and rate_limited need state, and one keep-alive connection.
    let agent = ureq::agent();
    let post = |body: &str| -> (u16, Value) {
        let result = agent
            .post(&server.http("/stock/b"))
            .set("Authorization", &auth)
            .send_string(body);
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        (response.status(), response.into_json().unwrap())
    };
    let (status, _) = post(r#"{"action":"set","quantity":1}"#);
    assert_eq!(status, 200);
    let (status, reply) = post(r#"{"action":"set","quantity":2}"#);
    assert_eq!(
        (status, reply["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{reply}"
    );
    let mut ws = server.writer();
    ack(&mut ws, update(op("c", "set", 2)));
    let mut ws = server.writer();
    ack(&mut ws, update(op("c", "reserve", 2)));
    let (got, reply) = call(
        "POST",
        "/stock/c",
        Some(r#"{"action":"set","quantity":1}"#),
        true,
    );
    assert_eq!(
        (got, reply["error"]["code"].as_str()),
        (409, Some("below_reserved"))
    );
}

/// Regression: a refused batch naming a never-written SKU twice used to forget that SKU twice,
/// which hit a dead store slot, panicked the handler and dropped the connection without a reply.
#[test]
fn a_refused_batch_naming_a_new_sku_twice_is_answered_and_the_connection_kept() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    let reply = expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":[op("fresh","set",0),op("fresh","decrease",1)]}),
        "insufficient_stock",
    );
    assert_eq!(reply["index"], 1);
    let reply = expect_error_json(
        &mut ws,
        json!({"id":"e","type":"stock_batch","ops":[op("fresh","set",1),op("fresh2","set",1),op("fresh","increase",0)]}),
        "invalid_change",
    );
    assert_eq!(reply["index"], 2);
    let response = ureq::post(&server.http("/stock/batch"))
        .set("Authorization", &format!("Bearer {TOKEN}"))
        .send_string(&json!({"ops":[op("fresh","set",0),op("fresh","reserve",1)]}).to_string());
    match response {
        Err(ureq::Error::Status(409, _)) => {}
        other => panic!("expected 409, got {other:?}"),
    }
    ack(&mut ws, update(op("fresh", "set", 2)));
    assert_eq!(get(&mut ws, "fresh")["version"], 1);
}

#[test]
fn unavailable_when_the_idempotency_key_store_is_full_and_nothing_changes() {
    // The embedded engine's key cache is what this bounds (`--data-dir none` pins it); in Redis
    // the keys live in Redis with their TTL, bounded by Redis' own maxmemory.
    let server = Server::start(&["--idempotency-keys-max", "2", "--data-dir", "none"]);
    let mut ws = server.writer();
    let keyed = |key: &str| json!({"type":"stock_update","id":"e","idempotency_key":key,"stock":op("k-1","increase",1)});
    assert_eq!(ack(&mut ws, keyed("one"))["stock"]["version"], 1);
    assert_eq!(ack(&mut ws, keyed("two"))["stock"]["version"], 2);
    // A third key would push out one younger than 24 h: refused, and nothing applied.
    let refused = expect_error_json(&mut ws, keyed("three"), "unavailable");
    assert!(refused.get("stock").is_none(), "{refused}");
    assert_eq!(get(&mut ws, "k-1")["version"], 2);
    // Keys already held still answer as duplicates, and unkeyed writes go on.
    let repeat = ack(&mut ws, keyed("one"));
    assert_eq!(
        (
            repeat["duplicate"].clone(),
            repeat["stock"]["version"].clone()
        ),
        (json!(true), json!(1))
    );
    assert_eq!(
        ack(&mut ws, update(op("k-1", "increase", 1)))["stock"]["version"],
        3
    );
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http_json(
        "POST",
        &server.http("/stock/k-1"),
        &[("Authorization", &bearer), ("Idempotency-Key", "four")],
        Some(r#"{"action":"increase","change":1}"#),
    );
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (503, json!("unavailable")),
        "{body}"
    );
}
