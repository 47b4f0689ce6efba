//! Strictness at the edge (PROTOCOL.md "Limits that protect the server, and strictness at the
//! edge"): each rule a table of raw requests or messages and what the server must answer.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Sends raw bytes, reads to close: (status, body as JSON; `Value::Null` if not JSON).
fn exchange(server: &Server, bytes: &str) -> (u16, Value) {
    let mut stream = raw(server.addr);
    stream.write_all(bytes.as_bytes()).unwrap();
    let response = String::from_utf8_lossy(&read_to_close(&mut stream)).to_string();
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn http_requests_table() {
    let server = Server::start(&[]);
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let set = r#"{"action":"set","quantity":4}"#;
    // (request, status, error code or None for success, what is being checked)
    let table: Vec<(String, u16, Option<&str>, &str)> = vec![
        (post("/stock/shop%3A1%2Fred", &auth, set), 200, None, "percent-decoded path"),
        (post("/stock/sku%2", &auth, set), 400, Some("invalid_sku"), "broken escape"),
        (post("/stock/a", &format!("{auth}{auth}"), set), 400, Some("bad_request"), "two Authorization"),
        (post("/stock/a", &format!("{auth}Idempotency-Key: k1\r\nIdempotency-Key: k2\r\n"), set),
            400, Some("bad_request"), "two Idempotency-Key"),
        (post("/stock/a", &format!("{auth}Origin: http://a\r\nOrigin: http://b\r\n"), set),
            400, Some("bad_request"), "two Origin"),
        ("GET /stock/a HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n".into(),
            400, Some("bad_request"), "two Host"),
        ("POST /stock/a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}".into(),
            400, Some("bad_request"), "two Content-Length"),
        ("GET /stock/a HTTP/1.1\r\nConnection: close\r\n\r\n".into(), 400, Some("bad_request"), "HTTP/1.1 without Host"),
        ("GET /stock/a HTTP/1.0\r\n\r\n".into(), 200, None, "HTTP/1.0 needs no Host"),
        (post("/stock/a", &auth, r#"{"id":"b","action":"set","quantity":1}"#), 400, Some("bad_request"), "body id differs"),
        (post("/stock/a", &auth, r#"{"id":"a","action":"set","quantity":1}"#), 200, None, "body id repeats the path"),
        (post("/stock/a", "Authorization: Basic dXNlcjpwYXNz\r\n", set), 401, Some("unauthorized"), "Basic auth"),
        (post("/stock/a", "Authorization: Bearer \r\n", set), 401, Some("unauthorized"), "empty Bearer"),
        ("GET /stock/a HTTP/1.1\r\nHost: t\r\nAuthorization: Basic eA==\r\nConnection: close\r\n\r\n".into(),
            401, Some("unauthorized"), "Basic auth on a public read"),
        (post("/stock/a", &auth, r#"{"action":"set","quantity":1,"if_version":null}"#), 400, Some("bad_request"), "if_version null"),
        ("GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".into(),
            426, Some("bad_request"), "handshake error is JSON"),
        (upgrade_request("/ws").replace("Host: test\r\n", "Host: test\r\nAuthorization: Basic eA==\r\n"),
            401, Some("unauthorized"), "Basic auth on upgrade"),
    ];
    for (request, status, code, what) in table {
        let (got_status, body) = exchange(&server, &request);
        assert_eq!(got_status, status, "{what}: {body}");
        match code {
            Some(code) => assert_eq!(body["error"]["code"], code, "{what}: {body}"),
            None => assert!(body.get("error").is_none(), "{what}: {body}"),
        }
    }
    let (_, body) = http_json("GET", &server.http("/stock/shop:1%2Fred"), &[], None);
    assert_eq!(body["id"], "shop:1/red", "{body}");
    assert_eq!(body["on_hand"], 4, "{body}");
}

#[test]
fn handshake_timeout_answers_408_with_json() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(b"GET /stock/a HTTP/1.1\r\n").unwrap();
    let response = String::from_utf8_lossy(&read_to_close(&mut stream)).to_string();
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    let body: Value = serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
}

#[test]
fn websocket_messages_table() {
    let server = Server::start(&[]);
    let mut ws = server.writer();
    // (message, expected reply type or error code, whether the id is echoed)
    let table: Vec<(Value, &str, Option<Value>)> = vec![
        (json!({"type":"ping","id":{"a":1}}), "bad_request", None),
        (json!({"type":"ping","id":[1]}), "bad_request", None),
        (json!({"type":"ping","id":true}), "bad_request", None),
        (json!({"type":"ping","id":null}), "bad_request", None),
        (json!({"type":"ping","id":"x"}), "pong", Some(json!("x"))),
        (json!({"type":"ping","id":7}), "pong", Some(json!(7))),
        (
            json!({"type":"stock_update","id":1,"stock":{"id":"a","action":"set","quantity":1,"if_version":null}}),
            "bad_request",
            Some(json!(1)),
        ),
        (
            json!({"type":"stock_update","id":2,"stock":{"id":"a","action":"set","quantity":1,"if_version":0}}),
            "ack",
            Some(json!(2)),
        ),
        (
            json!({"type":"stock_update","id":3,"idempotency_key":null,"stock":{"id":"a","action":"set","quantity":1}}),
            "bad_request",
            Some(json!(3)),
        ),
    ];
    for (message, expected, id) in table {
        let reply = request(&mut ws, message.clone());
        let got = if reply["type"] == "error" {
            &reply["code"]
        } else {
            &reply["type"]
        };
        assert_eq!(got, expected, "{message} -> {reply}");
        assert_eq!(reply.get("id"), id.as_ref(), "{message} -> {reply}");
    }
}

#[test]
fn healthz_says_unwritable_when_the_key_store_is_full() {
    if redis_engine() {
        return; // Redis expires keys itself; the embedded engine is the one with a bound.
    }
    let server = Server::start(&["--idempotency-keys-max", "2"]);
    assert_eq!(server.healthz().0, 200);
    let mut ws = server.writer();
    for key in ["k1", "k2"] {
        let reply = request(
            &mut ws,
            json!({"type":"stock_update","idempotency_key":key,"stock":{"id":"a","action":"increase","change":1}}),
        );
        assert_eq!(reply["type"], "ack", "{reply}");
    }
    let (status, body) = server.healthz();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["writable"], false, "{body}");
    let reply = request(
        &mut ws,
        json!({"type":"stock_update","idempotency_key":"k3","stock":{"id":"a","action":"increase","change":1}}),
    );
    assert_eq!(
        reply["code"], "unavailable",
        "healthz told the truth: {reply}"
    );
}

#[test]
fn tokens_file_with_one_secret_under_two_names_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens");
    std::fs::write(&path, "erp write secret-one-1\nshop read secret-one-1\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", "none", "--tokens"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!output.status.success(), "started with a duplicate secret");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("same secret"), "{stderr}");

    // On SIGHUP the old tokens stay.
    std::fs::write(&path, "erp write secret-one-1\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", "none", "--tokens"])
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr = read_listen_addr(&mut child);
    wait_listening(addr);
    std::fs::write(&path, "erp write secret-one-1\nshop read secret-one-1\n").unwrap();
    // SAFETY: kill(2) on the child we spawned.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = http_json(
        "POST",
        &format!("http://{addr}/stock/a"),
        &[("Authorization", "Bearer secret-one-1")],
        Some(r#"{"action":"set","quantity":1}"#),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "the old write token still works: {body}");
}
