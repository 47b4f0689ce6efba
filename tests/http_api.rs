//! The HTTP API (PROTOCOL.md "HTTP API") against the real server: every route and status with a
//! real HTTP client (ureq), and malformed, pipelined and slow requests over raw sockets.
//!
//! 503 is not covered here: with `--data-dir none` the in-memory log never refuses writes, so
//! the store cannot become unwritable. `tests/wal_disk_full.rs` covers it (writes refused
//! with `unavailable`, /healthz 503) on a full tmpfs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
}

/// Sends a request and returns status, headers of interest and the body as JSON (or as a JSON
/// string when it is not JSON). 4xx/5xx are answers here, not errors.
fn call(req: ureq::Request, body: Option<&str>) -> (u16, ureq::Response) {
    let result = match body {
        Some(body) => req.send_string(body),
        None => req.call(),
    };
    match result {
        Ok(response) => (response.status(), response),
        Err(ureq::Error::Status(status, response)) => (status, response),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn json_of(response: ureq::Response) -> Value {
    let text = response.into_string().unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
}

fn post(server: &Server, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut req = agent().post(&server.http(path));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    let (status, response) = call(req, Some(body));
    (status, json_of(response))
}

/// A write with the write token that must answer 200; returns the body.
fn post_ok(server: &Server, path: &str, body: &str) -> Value {
    let (status, reply) = post(server, path, Some(TOKEN), body);
    assert_eq!(status, 200, "{reply}");
    reply
}

fn get(server: &Server, path: &str) -> (u16, Value) {
    let (status, response) = call(agent().get(&server.http(path)), None);
    (status, json_of(response))
}

/// The contract's error body: `{"error":{"code":CODE,"message":TEXT}}`.
fn assert_error(body: &Value, code: &str) {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// One HTTP/1.1 response read from a raw socket: status, lower-cased headers, body.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response (Content-Length framed) from `stream`, keeping extra bytes in `buf`.
/// `None` if the peer closed before a whole response arrived.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawResponse> {
    let mut chunk = [0u8; 16384];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end].to_vec()).unwrap();
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap();
            let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
            let headers: Vec<(String, String)> = lines
                .map(|l| {
                    let (n, v) = l.split_once(':').unwrap();
                    (n.trim().to_ascii_lowercase(), v.trim().to_string())
                })
                .collect();
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| v.parse().unwrap());
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            buf.drain(..end + 4 + length);
            return Some(RawResponse {
                status,
                headers,
                body,
            });
        }
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn post_request(path: &str, body: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn every_route_answers_as_the_contract_says() {
    let server = Server::start(&[]);
    let body = post_ok(&server, "/stock/sku-1", r#"{"action":"set","quantity":7}"#);
    assert_eq!(
        body["stock"],
        json!({"id":"sku-1","quantity":7,"on_hand":7,"reserved":0,"version":1})
    );
    let body = post_ok(
        &server,
        "/stock/batch",
        r#"{"ops":[{"id":"sku-1","action":"reserve","change":2},{"id":"sku-2","action":"set","quantity":3}]}"#,
    );
    assert_eq!(body["stock"][0]["quantity"], 5);
    assert_eq!(body["stock"][0]["reserved"], 2);
    assert_eq!(body["stock"][1]["on_hand"], 3);

    let (status, body) = get(&server, "/stock/sku-1");
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"id":"sku-1","quantity":5,"on_hand":7,"reserved":2,"version":2})
    );
    let (status, body) = get(&server, "/stock/never-written");
    assert_eq!(status, 200);
    assert_eq!(body["version"], 0);
    let (status, body) = get(&server, "/stock?skus=sku-2,sku-1");
    assert_eq!(status, 200);
    assert_eq!(body["stock"][0]["id"], "sku-2");
    assert_eq!(body["stock"][1]["id"], "sku-1");

    let (status, body) = get(&server, "/healthz");
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert!(body["role"].is_string(), "{body}");
    assert!(body["uptime_seconds"].is_u64(), "{body}");
    assert!(body["connections"].as_u64().unwrap() >= 1, "{body}");
    assert_eq!(body["store"]["writable"], true);
    assert_eq!(body["store"]["skus"], 2);

    let (status, response) = call(agent().get(&server.http("/metrics")), None);
    assert_eq!(status, 200);
    assert!(response.content_type().starts_with("text/plain"));
    assert!(response
        .into_string()
        .unwrap()
        .contains("stocksync_connections_open"));
}

#[test]
fn errors_have_the_contract_status_and_json_body() {
    let server = Server::start(&["--write-rate", "1000"]);
    let set = r#"{"action":"set","quantity":1}"#;
    // 400: malformed JSON, a bad SKU, a bad change, an unknown action.
    for (path, body) in [
        ("/stock/a", "{not json"),
        ("/stock/a", "[1,2]"),
        ("/stock/bad%20sku", set),
        ("/stock/a", r#"{"action":"increase","change":0}"#),
        ("/stock/a", r#"{"action":"explode","change":1}"#),
        ("/stock/batch", r#"{"ops":"nope"}"#),
    ] {
        let (status, reply) = post(&server, path, Some(TOKEN), body);
        assert_eq!(status, 400, "{path} {body}: {reply}");
        assert!(reply["error"]["code"].is_string(), "{reply}");
    }
    // 401: no token, a wrong token.
    let (status, reply) = post(&server, "/stock/a", None, set);
    assert_eq!(status, 401);
    assert_error(&reply, "unauthorized");
    let (status, reply) = post(&server, "/stock/a", Some("wrong-token"), set);
    assert_eq!(status, 401);
    assert_error(&reply, "unauthorized");
    // 404 and 405 (with Allow).
    let (status, reply) = get(&server, "/nothing/here");
    assert_eq!(status, 404);
    assert_error(&reply, "not_found");
    let (status, response) = call(agent().delete(&server.http("/stock/a")), None);
    assert_eq!(status, 405);
    assert!(response.header("allow").is_some_and(|a| a.contains("GET")));
    assert_error(&json_of(response), "method_not_allowed");
    let (status, reply) = post(&server, "/healthz", Some(TOKEN), "{}");
    assert_eq!(status, 405);
    assert_error(&reply, "method_not_allowed");
    // 409: stock rules and version conflicts (which carry the current state).
    post(&server, "/stock/a", Some(TOKEN), set);
    let (status, reply) = post(
        &server,
        "/stock/a",
        Some(TOKEN),
        r#"{"action":"decrease","change":5}"#,
    );
    assert_eq!(status, 409);
    assert_error(&reply, "insufficient_stock");
    let (status, reply) = post(
        &server,
        "/stock/a",
        Some(TOKEN),
        r#"{"action":"set","quantity":3,"if_version":99}"#,
    );
    assert_eq!(status, 409);
    assert_error(&reply, "version_conflict");
    // 413: a body over the 1 MiB limit is refused from its Content-Length alone.
    let mut stream = raw(server.addr);
    stream
        .write_all(
            format!(
                "POST /stock/a HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Length: {}\r\n\r\n",
                4 << 20
            )
            .as_bytes(),
        )
        .unwrap();
    let response = read_response(&mut stream, &mut Vec::new()).expect("a 413");
    assert_eq!(response.status, 413);
    assert_error(&response.json(), "too_large");
    // 413 too for a batch with more ops than allowed.
    let ops: Vec<Value> = (0..2000)
        .map(|i| json!({"id": format!("s{i}"), "action":"set","quantity":1}))
        .collect();
    let (status, reply) = post(
        &server,
        "/stock/batch",
        Some(TOKEN),
        &json!({ "ops": ops }).to_string(),
    );
    assert_eq!(status, 413, "{reply}");
    assert_error(&reply, "too_large");
}

#[test]
fn write_rate_limit_answers_429() {
    let server = Server::start(&["--write-rate", "3"]);
    // One keep-alive connection (ureq pools it): the limit is per connection.
    let agent = agent();
    let mut statuses = Vec::new();
    for i in 0..6 {
        let (status, response) = call(
            agent
                .post(&server.http("/stock/r"))
                .set("Authorization", &format!("Bearer {TOKEN}")),
            Some(&format!(r#"{{"action":"set","quantity":{i}}}"#)),
        );
        if status == 429 {
            assert_error(&json_of(response), "rate_limited");
        }
        statuses.push(status);
    }
    // Six requests cannot straddle more than two one-second windows quickly enough to all
    // pass: at least one is refused, and the first three of a window pass.
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}

#[test]
fn idempotency_key_header_repeats_and_conflicts() {
    let server = Server::start(&[]);
    let send = |key: &str, body: &str| {
        let req = agent()
            .post(&server.http("/stock/idem"))
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .set("Idempotency-Key", key);
        let (status, response) = call(req, Some(body));
        (status, json_of(response))
    };
    let (status, first) = send("order-1", r#"{"action":"increase","change":5}"#);
    assert_eq!(status, 200);
    assert_eq!(first["stock"]["version"], 1);
    assert_ne!(first["duplicate"], true, "{first}");
    let (status, repeat) = send("order-1", r#"{"action":"increase","change":5}"#);
    assert_eq!(status, 200);
    assert_eq!(repeat["duplicate"], true);
    assert_eq!(repeat["stock"], first["stock"], "the original result");
    // The same key with a different request.
    let (status, reply) = send("order-1", r#"{"action":"increase","change":6}"#);
    assert_eq!(status, 400);
    assert_error(&reply, "bad_request");
    // Header and body keys that disagree.
    let (status, reply) = send(
        "order-2",
        r#"{"action":"increase","change":1,"idempotency_key":"order-3"}"#,
    );
    assert_eq!(status, 400);
    assert_error(&reply, "bad_request");
    // The same key in header and body is one key.
    let (status, _) = send(
        "order-4",
        r#"{"action":"increase","change":1,"idempotency_key":"order-4"}"#,
    );
    assert_eq!(status, 200);
    // Nothing but the two applied writes changed the SKU.
    let (_, state) = get(&server, "/stock/idem");
    assert_eq!(state["on_hand"], 6);
    assert_eq!(state["version"], 2);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    // A write, then a read of what it wrote, then health, in one write on one connection.
    let batch = format!(
        "{}GET /stock/pipe HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        post_request("/stock/pipe", r#"{"action":"set","quantity":42}"#, "")
    );
    stream.write_all(batch.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let first = read_response(&mut stream, &mut buf).unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["stock"]["quantity"], 42);
    let second = read_response(&mut stream, &mut buf).unwrap();
    assert_eq!(second.status, 200);
    assert_eq!(
        second.json()["quantity"],
        42,
        "the read after a write sees it"
    );
    let third = read_response(&mut stream, &mut buf).unwrap();
    assert_eq!(third.status, 200);
    assert_eq!(third.json()["status"], "ok");
    // Still alive: a fourth request on the same connection, asking to close.
    stream
        .write_all(b"GET /stock/pipe HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let fourth = read_response(&mut stream, &mut buf).unwrap();
    assert_eq!(fourth.status, 200);
    assert_eq!(fourth.header("connection"), Some("close"));
    assert!(read_to_close(&mut stream).is_empty());
}

#[test]
fn malformed_requests_get_clear_errors() {
    let server = Server::start(&[]);
    let huge_header = format!(
        "GET /stock/a HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "x".repeat(16 * 1024)
    );
    let many_headers = format!(
        "GET /stock/a HTTP/1.1\r\n{}\r\n",
        (0..100)
            .map(|i| format!("X-H{i}: v\r\n"))
            .collect::<String>()
    );
    let chunked = format!(
        "POST /stock/a HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let no_length =
        format!("POST /stock/a HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    let cases: [(&str, &str, u16, &str); 6] = [
        ("bad request line", "GARBAGE\r\n\r\n", 400, "bad_request"),
        ("huge header", &huge_header, 431, "too_large"),
        ("too many headers", &many_headers, 431, "too_large"),
        ("chunked body", &chunked, 411, "bad_request"),
        ("no Content-Length", &no_length, 411, "bad_request"),
        (
            "bad Content-Length",
            "POST /stock/a HTTP/1.1\r\nContent-Length: 12abc\r\n\r\n",
            400,
            "bad_request",
        ),
    ];
    for (what, request, status, code) in cases {
        let mut stream = raw(server.addr);
        stream.write_all(request.as_bytes()).unwrap();
        let response = read_response(&mut stream, &mut Vec::new())
            .unwrap_or_else(|| panic!("{what}: no response"));
        assert_eq!(response.status, status, "{what}");
        assert_error(&response.json(), code);
        // A request the server cannot frame ends the connection.
        assert!(read_to_close(&mut stream).is_empty(), "{what}");
    }
}

#[test]
fn wrong_content_length_and_slow_bodies() {
    let server = Server::start(&[]);
    let body = r#"{"action":"set","quantity":9}"#;
    // Too short: the server takes the first 10 bytes as the body (not JSON: 400) and then
    // parses the rest as a request line, which is malformed.
    let mut stream = raw(server.addr);
    let request = format!(
        "POST /stock/short HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 10\r\n\r\n{body}"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let first = read_response(&mut stream, &mut buf).unwrap();
    assert_eq!(first.status, 400);
    assert_error(&first.json(), "bad_request");
    let second = read_response(&mut stream, &mut buf).unwrap();
    assert_eq!(second.status, 400);
    assert!(read_to_close(&mut stream).is_empty());
    assert_eq!(get(&server, "/stock/short").1["version"], 0);

    // Too long: the server waits for the missing bytes and answers nothing meanwhile; when
    // they come (slowly), the request completes with the extra bytes as part of its body.
    let mut stream = raw(server.addr);
    let padded = format!("{body}     ");
    let head = format!(
        "POST /stock/long HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: {}\r\n\r\n",
        padded.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut probe = [0u8; 1];
    let waited = stream.read(&mut probe);
    assert!(
        matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no answer before the body is complete: {waited:?}"
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    for byte in padded[body.len()..].bytes() {
        stream.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let response = read_response(&mut stream, &mut Vec::new()).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["stock"]["quantity"], 9);

    // A slow body: one byte at a time, well within the timeouts, is served normally.
    let mut stream = raw(server.addr);
    let request = post_request("/stock/slow", r#"{"action":"set","quantity":4}"#, "");
    let started = Instant::now();
    for byte in request.bytes() {
        stream.write_all(&[byte]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let response = read_response(&mut stream, &mut Vec::new()).unwrap();
    assert_eq!(response.status, 200, "after {:?}", started.elapsed());
    assert_eq!(response.json()["stock"]["quantity"], 4);
}

#[test]
fn a_write_over_http_reaches_websocket_subscribers() {
    let server = Server::start(&[]);
    let mut sub = subscribed_client(&server, &["bridge"]);
    let mut everything = server.ws("/");
    post_ok(
        &server,
        "/stock/bridge",
        r#"{"action":"set","quantity":11}"#,
    );
    for ws in [&mut sub, &mut everything] {
        let update = recv(ws);
        assert_eq!(update["type"], "stock_update");
        assert_eq!(
            update["stock"],
            json!({"id":"bridge","quantity":11,"on_hand":11,"reserved":0,"version":1})
        );
    }
    // A batch over HTTP: one update per changed SKU.
    post_ok(
        &server,
        "/stock/batch",
        r#"{"ops":[{"id":"bridge","action":"reserve","change":1},{"id":"bridge","action":"reserve","change":2}]}"#,
    );
    let update = recv(&mut sub);
    assert_eq!(update["stock"]["reserved"], 3);
    assert_eq!(update["stock"]["version"], 2);
}

/// `Expect: 100-continue` (curl's default for larger bodies): the server answers the head with
/// `100 Continue`, once, then the final response after the body.
#[test]
fn expect_100_continue_gets_an_interim_response_before_the_body() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    let body = r#"{"action":"set","quantity":7}"#;
    let head = format!(
        "POST /stock/sku-c HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(body.as_bytes()).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains(r#""version":1"#) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&response));
        response.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!text.contains("100 Continue"), "sent twice: {text}");
}
