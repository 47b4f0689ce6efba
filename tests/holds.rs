//! Holds: reservations that expire (PROTOCOL.md "Holds"), against the real server and real
//! clients: taken, added to, committed, released, extended, expired; across restarts; batches;
//! subscribers; idempotent retries; HTTP routes; limits.

mod common;

use std::time::{Duration, Instant};

use common::holds::{hold_msg, q, state};
use common::{http_json, recv, request, scrape_metric, send, Server, Ws, TOKEN};
use serde_json::{json, Value};

fn set(ws: &mut Ws, sku: &str, quantity: u64) {
    let reply = request(
        ws,
        json!({"type":"stock_update","stock":{"id":sku,"action":"set","quantity":quantity}}),
    );
    assert_eq!(reply["type"], "ack", "{reply}");
}

fn hold_op(sku: &str, change: u64, hold: &str, ttl_ms: Option<u64>) -> Value {
    let mut op = json!({"id": sku, "action": "reserve", "change": change, "hold": hold});
    if let Some(ttl) = ttl_ms {
        op["ttl_ms"] = json!(ttl);
    }
    op
}

fn take(ws: &mut Ws, sku: &str, change: u64, hold: &str, ttl_ms: Option<u64>) -> Value {
    request(
        ws,
        json!({"type":"stock_update","stock": hold_op(sku, change, hold, ttl_ms)}),
    )
}

/// Sends `message` and returns its answer, skipping `hold_expired` pushes (the holder may hear
/// one of an earlier hold before the answer).
fn answer(ws: &mut Ws, message: Value) -> Value {
    send(ws, message);
    loop {
        let message = recv(ws);
        if message["type"] != "hold_expired" {
            return message;
        }
    }
}

/// Reads messages until one of `kind` arrives (skipping others), within `timeout`.
fn recv_kind(ws: &mut Ws, kind: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        assert!(Instant::now() < deadline, "no {kind} within {timeout:?}");
        let message = recv(ws);
        if message["type"] == kind {
            return message;
        }
    }
}

#[test]
fn taken_added_to_and_committed() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    set(&mut ws, "b", 5);
    let ack = take(&mut ws, "a", 3, "cart-1", Some(60_000));
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(q(&ack["stock"]), (7, 10, 3, 2));
    // Added to: another SKU, and more of the same one, without ttl_ms.
    let ack = take(&mut ws, "b", 2, "cart-1", None);
    assert_eq!(q(&ack["stock"]), (3, 5, 2, 2));
    let ack = take(&mut ws, "a", 1, "cart-1", None);
    assert_eq!(q(&ack["stock"]), (6, 10, 4, 3));
    let got = hold_msg(&mut ws, "get", "cart-1");
    assert_eq!(got["type"], "hold", "{got}");
    assert_eq!(got["hold"]["id"], "cart-1");
    assert_eq!(
        got["hold"]["lines"],
        json!([{"id":"a","units":4},{"id":"b","units":2}])
    );
    let left = got["hold"]["expires_in_ms"].as_u64().unwrap();
    assert!(left > 50_000 && left <= 60_000, "{got}");
    let ack = hold_msg(&mut ws, "commit", "cart-1");
    assert_eq!(
        (ack["type"].as_str(), ack["hold"].as_str()),
        (Some("ack"), Some("cart-1"))
    );
    let states = ack["stock"].as_array().unwrap();
    assert_eq!(states.len(), 2, "{ack}");
    assert_eq!(q(&states[0]), (6, 6, 0, 4));
    assert_eq!(q(&states[1]), (3, 3, 0, 3));
    // Gone: its id is free again.
    let err = hold_msg(&mut ws, "get", "cart-1");
    assert_eq!(err["code"], "unknown_hold", "{err}");
    let err = hold_msg(&mut ws, "commit", "cart-1");
    assert_eq!(err["code"], "unknown_hold", "{err}");
    let ack = take(&mut ws, "a", 1, "cart-1", Some(1000));
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[test]
fn released_and_anonymous_ops_cannot_take_held_units() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    take(&mut ws, "a", 4, "h", Some(60_000));
    let anon = request(
        &mut ws,
        json!({"type":"stock_update","stock":{"id":"a","action":"reserve","change":2}}),
    );
    assert_eq!(q(&anon["stock"]), (4, 10, 6, 3));
    for action in ["release", "commit"] {
        let err = request(
            &mut ws,
            json!({"type":"stock_update","stock":{"id":"a","action":action,"change":3}}),
        );
        assert_eq!(err["code"], "insufficient_reserved", "{err}");
    }
    // `set` below the reserved units (held included) is refused as before.
    let err = request(
        &mut ws,
        json!({"type":"stock_update","stock":{"id":"a","action":"set","quantity":5}}),
    );
    assert_eq!(err["code"], "below_reserved", "{err}");
    let ack = hold_msg(&mut ws, "release", "h");
    assert_eq!(q(&ack["stock"][0]), (8, 10, 2, 4), "{ack}");
    let err = hold_msg(&mut ws, "release", "h");
    assert_eq!(err["code"], "unknown_hold", "never released twice: {err}");
    assert_eq!(q(&state(&mut ws, "a")), (8, 10, 2, 4));
}

#[test]
fn expired_pushes_to_holder_and_subscribers_and_a_late_commit_changes_nothing() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    let mut watcher = common::subscribed_client(&server, &["a"]);
    set(&mut ws, "a", 10);
    recv_kind(&mut watcher, "stock_update", Duration::from_secs(5));
    let started = Instant::now();
    let ack = take(&mut ws, "a", 3, "short", Some(300));
    assert_eq!(ack["type"], "ack");
    let update = recv_kind(&mut watcher, "stock_update", Duration::from_secs(5));
    assert_eq!(q(&update["stock"]), (7, 10, 3, 2));
    // The expiry: one change, seen by the subscriber, pushed to the holder.
    let update = recv_kind(&mut watcher, "stock_update", Duration::from_secs(5));
    assert_eq!(q(&update["stock"]), (10, 10, 0, 3));
    let pushed = recv_kind(&mut ws, "hold_expired", Duration::from_secs(5));
    assert_eq!(pushed["hold"], "short");
    assert_eq!(q(&pushed["stock"][0]), (10, 10, 0, 3));
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1300),
        "within 1 s of the deadline: {elapsed:?}"
    );
    // Expired, for an hour: commit, release, extend, get and adding to it all say so.
    for action in ["commit", "release", "get"] {
        let err = hold_msg(&mut ws, action, "short");
        assert_eq!(err["code"], "hold_expired", "{action}: {err}");
    }
    let err = request(
        &mut ws,
        json!({"type":"hold","action":"extend","hold":"short","ttl_ms":1000}),
    );
    assert_eq!(err["code"], "hold_expired", "{err}");
    let err = take(&mut ws, "a", 1, "short", Some(1000));
    assert_eq!(err["code"], "hold_expired", "{err}");
    assert_eq!(q(&state(&mut ws, "a")), (10, 10, 0, 3), "nothing changed");
    let expired = scrape_metric(&server, "stocksync_holds_expired_total");
    assert_eq!(expired.as_deref(), Some("1"));
    let lag = scrape_metric(&server, "stocksync_hold_expiry_lag_seconds_count");
    assert_eq!(lag.as_deref(), Some("1"));
}

#[test]
fn extended_holds_live_past_their_first_deadline() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    take(&mut ws, "a", 1, "h", Some(400));
    let reply = request(
        &mut ws,
        json!({"type":"hold","action":"extend","hold":"h","ttl_ms":60_000}),
    );
    assert_eq!(reply["type"], "hold", "{reply}");
    assert!(reply["hold"]["expires_in_ms"].as_u64().unwrap() > 59_000);
    // Past the first deadline the hold is still there (waiting out real time is the point).
    std::thread::sleep(Duration::from_millis(700));
    let got = hold_msg(&mut ws, "get", "h");
    assert_eq!(got["hold"]["lines"], json!([{"id":"a","units":1}]), "{got}");
    assert_eq!(q(&state(&mut ws, "a")).2, 1);
    // A hold re-armed by a reserve with ttl_ms.
    let ack = take(&mut ws, "a", 1, "h", Some(100_000));
    assert_eq!(ack["type"], "ack");
    let got = hold_msg(&mut ws, "get", "h");
    assert!(
        got["hold"]["expires_in_ms"].as_u64().unwrap() > 90_000,
        "{got}"
    );
}

#[test]
fn a_batch_holds_several_skus_atomically_and_expires_as_one_change() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    for sku in ["x", "y", "z"] {
        set(&mut ws, sku, 5);
    }
    let mut watcher = common::subscribed_client(&server, &["*"]);
    // All or nothing: the third line cannot be held, so nothing is.
    let err = request(
        &mut ws,
        json!({"type":"stock_batch","ops":[
            hold_op("x", 2, "checkout", Some(300)),
            hold_op("y", 1, "checkout", None),
            hold_op("z", 9, "checkout", None)]}),
    );
    assert_eq!(
        (err["code"].as_str(), err["index"].as_u64()),
        (Some("insufficient_stock"), Some(2))
    );
    let err = hold_msg(&mut ws, "get", "checkout");
    assert_eq!(err["code"], "unknown_hold");
    let ack = request(
        &mut ws,
        json!({"type":"stock_batch","ops":[
            hold_op("x", 2, "checkout", Some(300)),
            hold_op("y", 1, "checkout", None),
            hold_op("z", 5, "checkout", None),
            hold_op("x", 1, "checkout", None)]}),
    );
    assert_eq!(ack["type"], "ack", "{ack}");
    let held: Vec<_> = ack["stock"].as_array().unwrap().iter().map(q).collect();
    assert_eq!(
        held,
        [(2, 5, 3, 2), (4, 5, 1, 2), (0, 5, 5, 2), (2, 5, 3, 2)]
    );
    // Three updates for the take, then three for the expiry: one version per SKU each.
    let mut versions = std::collections::BTreeMap::new();
    for _ in 0..6 {
        let update = recv_kind(&mut watcher, "stock_update", Duration::from_secs(5));
        versions
            .entry(update["stock"]["id"].as_str().unwrap().to_string())
            .or_insert_with(Vec::new)
            .push(q(&update["stock"]));
    }
    assert_eq!(versions["x"], [(2, 5, 3, 2), (5, 5, 0, 3)]);
    assert_eq!(versions["y"], [(4, 5, 1, 2), (5, 5, 0, 3)]);
    assert_eq!(versions["z"], [(0, 5, 5, 2), (5, 5, 0, 3)]);
    let pushed = recv_kind(&mut ws, "hold_expired", Duration::from_secs(5));
    assert_eq!(pushed["stock"].as_array().unwrap().len(), 3, "{pushed}");
}

#[test]
fn hold_messages_are_idempotent_in_one_key_space_with_http() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    let keyed_take = json!({"type":"stock_update","idempotency_key":"take-1",
        "stock": hold_op("a", 2, "h", Some(60_000))});
    let first = request(&mut ws, keyed_take.clone());
    let again = request(&mut ws, keyed_take);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["stock"], first["stock"]);
    assert_eq!(q(&state(&mut ws, "a")), (8, 10, 2, 2), "taken once");
    let commit = json!({"type":"hold","action":"commit","hold":"h","idempotency_key":"commit-1"});
    let first = request(&mut ws, commit.clone());
    assert_eq!(first["type"], "ack", "{first}");
    let again = request(&mut ws, commit);
    assert_eq!(
        (again["type"].as_str(), again["duplicate"].as_bool()),
        (Some("ack"), Some(true))
    );
    assert_eq!(again["stock"], first["stock"]);
    assert_eq!(again["hold"], "h");
    // The same key over HTTP is the same request: answered as the original.
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Idempotency-Key", "commit-1"),
    ];
    let (status, body) = http_json("POST", &server.http("/holds/h/commit"), &headers, Some(""));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["hold"].as_str(), body["duplicate"].as_bool()),
        (Some("h"), Some(true))
    );
    // The same key on a different request is refused.
    let (status, body) = http_json("POST", &server.http("/holds/h/release"), &headers, Some(""));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    assert_eq!(q(&state(&mut ws, "a")), (8, 8, 0, 3), "committed once");
}

#[test]
fn http_routes() {
    let server = Server::start(&[]);
    let auth = format!("Bearer {TOKEN}");
    let writer = [("Authorization", auth.as_str())];
    let post =
        |path: &str, body: Option<&str>| http_json("POST", &server.http(path), &writer, body);
    let (status, _) = post("/stock/a", Some(r#"{"action":"set","quantity":10}"#));
    assert_eq!(status, 200);
    let (status, body) = post(
        "/stock/a",
        Some(r#"{"action":"reserve","change":2,"hold":"web/cart:1","ttl_ms":60000}"#),
    );
    assert_eq!(
        (status, body["stock"]["reserved"].as_u64()),
        (200, Some(2)),
        "{body}"
    );
    let (status, body) = post(
        "/stock/batch",
        Some(
            r#"{"ops":[{"id":"b","action":"set","quantity":3},
                 {"id":"b","action":"reserve","change":3,"hold":"web/cart:1"}]}"#,
        ),
    );
    assert_eq!(status, 200, "{body}");
    // Reading is public.
    let (status, body) = http_json("GET", &server.http("/holds/web/cart:1"), &[], None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["hold"]["lines"],
        json!([{"id":"a","units":2},{"id":"b","units":3}])
    );
    let (status, body) = http_json("GET", &server.http("/holds/nope"), &[], None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_hold"))
    );
    // Writing is not.
    let (status, _) = http_json(
        "POST",
        &server.http("/holds/web/cart:1/release"),
        &[],
        Some(""),
    );
    assert_eq!(status, 401);
    let (status, body) = post("/holds/web/cart:1/extend", Some(r#"{"ttl_ms":5000}"#));
    assert_eq!(status, 200, "{body}");
    assert!(body["hold"]["expires_in_ms"].as_u64().unwrap() <= 5000);
    let (status, body) = post("/holds/web/cart:1/extend", Some(r#"{"ttl_ms":"5"}"#));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let (status, body) = post("/holds/web/cart:1/release", Some(""));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hold"], "web/cart:1");
    assert_eq!(body["stock"].as_array().unwrap().len(), 2);
    let (status, body) = post("/holds/web/cart:1/release", Some(""));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_hold"))
    );
    // A hold that expired is 409.
    post(
        "/stock/a",
        Some(r#"{"action":"reserve","change":1,"hold":"brief","ttl_ms":100}"#),
    );
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = post("/holds/brief/commit", Some(""));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("hold_expired"))
    );
}

#[test]
fn malformed_hold_requests_are_bad_requests() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    let cases = [
        json!({"type":"stock_update","stock":hold_op("a", 1, "h", None)}),
        json!({"type":"stock_update","stock":hold_op("a", 1, "h", Some(99))}),
        json!({"type":"stock_update","stock":hold_op("a", 1, "h", Some(86_400_001))}),
        json!({"type":"stock_update","stock":{"id":"a","action":"reserve","change":1,"hold":"h","ttl_ms":"100"}}),
        json!({"type":"stock_update","stock":{"id":"a","action":"reserve","change":1,"hold":"bad id","ttl_ms":1000}}),
        json!({"type":"stock_update","stock":{"id":"a","action":"increase","change":1,"hold":"h","ttl_ms":1000}}),
        json!({"type":"hold","action":"extend","hold":"h"}),
        json!({"type":"hold","action":"commit"}),
    ];
    for case in cases {
        let err = request(&mut ws, case.clone());
        assert_eq!(err["code"], "bad_request", "{case} -> {err}");
    }
    let err = request(&mut ws, json!({"type":"hold","action":"steal","hold":"h"}));
    assert_eq!(err["code"], "unknown_action");
    assert_eq!(q(&state(&mut ws, "a")), (10, 10, 0, 1), "nothing changed");
    // Reads are public; writes need rights.
    let mut reader = server.ws("/ws");
    let err = hold_msg(&mut reader, "get", "h");
    assert_eq!(err["code"], "unknown_hold");
    let err = hold_msg(&mut reader, "commit", "h");
    assert_eq!(err["code"], "unauthorized");
}

#[test]
fn limits_refuse_clearly() {
    let server = Server::start(&[
        "--holds-max",
        "1",
        "--hold-lines-max",
        "2",
        "--hold-ttl-max-ms",
        "1000",
    ]);
    let mut ws = server.writer();
    for sku in ["a", "b", "c"] {
        set(&mut ws, sku, 10);
    }
    let ack = take(&mut ws, "a", 1, "one", Some(1000));
    assert_eq!(ack["type"], "ack");
    let err = take(&mut ws, "a", 1, "two", Some(1000));
    assert_eq!(err["code"], "too_large", "{err}");
    take(&mut ws, "b", 1, "one", None);
    let err = take(&mut ws, "c", 1, "one", None);
    assert_eq!(err["code"], "too_large", "{err}");
    let err = request(
        &mut ws,
        json!({"type":"hold","action":"extend","hold":"one","ttl_ms":1001}),
    );
    assert_eq!(err["code"], "bad_request", "{err}");
    assert_eq!(
        scrape_metric(&server, "stocksync_holds_live").as_deref(),
        Some("1")
    );
    assert_eq!(
        scrape_metric(&server, "stocksync_holds_taken_total").as_deref(),
        Some("1")
    );
}

#[test]
fn holds_survive_a_clean_restart() {
    let server = Server::start_durable(&[]);
    let dir = server.data_path();
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    take(&mut ws, "a", 3, "kept", Some(60_000));
    drop(ws);
    server.signal(libc::SIGTERM);
    let mut server = server;
    let _ = server.child.wait();
    let keep_dir = server.data_dir.take();
    let server = Server::start_on_dir(&dir, &[]);
    let mut ws = server.writer();
    let got = hold_msg(&mut ws, "get", "kept");
    assert_eq!(got["hold"]["lines"], json!([{"id":"a","units":3}]), "{got}");
    assert_eq!(q(&state(&mut ws, "a")), (7, 10, 3, 2));
    let ack = hold_msg(&mut ws, "commit", "kept");
    assert_eq!(q(&ack["stock"][0]), (7, 7, 0, 3));
    drop(keep_dir);
}

#[test]
fn a_deadline_that_passes_while_down_is_released_at_start_and_stays_expired() {
    let server = Server::start_durable(&[]);
    let dir = server.data_path();
    let mut ws = server.writer();
    set(&mut ws, "a", 10);
    take(&mut ws, "a", 4, "lapsed", Some(300));
    take(&mut ws, "a", 1, "alive", Some(60_000));
    let mut server = server;
    server.signal(libc::SIGKILL);
    let _ = server.child.wait();
    let keep_dir = server.data_dir.take();
    std::thread::sleep(Duration::from_millis(500));
    let server = Server::start_on_dir(&dir, &[]);
    let mut ws = server.writer();
    // Released before the port opened: the first read already sees it.
    assert_eq!(q(&state(&mut ws, "a")), (9, 10, 1, 4));
    let err = hold_msg(&mut ws, "commit", "lapsed");
    assert_eq!(err["code"], "hold_expired", "{err}");
    // The expired marker survives another restart, this time through a snapshot too.
    drop(ws);
    let mut server = server;
    server.signal(libc::SIGKILL);
    let _ = server.child.wait();
    let server = Server::start_on_dir(&dir, &["--snapshot-log-bytes", "1"]);
    let mut ws = server.writer();
    // Writes to roll the log over and take a snapshot, then restart once more.
    for i in 0..20 {
        set(&mut ws, &format!("s{i}"), i);
    }
    std::thread::sleep(Duration::from_millis(300));
    drop(ws);
    let mut server = server;
    server.signal(libc::SIGTERM);
    let _ = server.child.wait();
    let server = Server::start_on_dir(&dir, &[]);
    let mut ws = server.writer();
    let err = hold_msg(&mut ws, "commit", "lapsed");
    assert_eq!(err["code"], "hold_expired", "{err}");
    let got = hold_msg(&mut ws, "get", "alive");
    assert_eq!(got["hold"]["lines"], json!([{"id":"a","units":1}]), "{got}");
    assert_eq!(q(&state(&mut ws, "a")), (9, 10, 1, 4));
    drop(keep_dir);
}

#[test]
fn a_commit_racing_with_expiry_gets_one_clear_answer() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    set(&mut ws, "a", 1000);
    // Many short holds, each committed right around its deadline: every answer is either a
    // full commit or hold_expired, and the units add up.
    let mut committed = 0;
    for i in 0..40 {
        let hold = format!("race-{i}");
        let taken = answer(
            &mut ws,
            json!({"type":"stock_update","stock":hold_op("a", 1, &hold, Some(100))}),
        );
        assert_eq!(taken["type"], "ack", "{taken}");
        std::thread::sleep(Duration::from_millis(95 + (i % 10)));
        let reply = answer(
            &mut ws,
            json!({"type":"hold","action":"commit","hold":hold}),
        );
        match reply["type"].as_str() {
            Some("ack") => committed += 1,
            _ => assert_eq!(reply["code"], "hold_expired", "{reply}"),
        }
    }
    let mut reader = server.ws("/ws");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (quantity, on_hand, reserved, _) = q(&state(&mut reader, "a"));
        if reserved == 0 {
            assert_eq!(on_hand, 1000 - committed);
            assert_eq!(quantity, on_hand);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "units leaked: reserved {reserved}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
