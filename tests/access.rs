//! Access control against the real server: roles over HTTP and WebSocket, `--public-read
//! false`, the Origin allow-list, token reload on SIGHUP, and tokens kept out of the logs.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;

const READER: &str = "reader-secret-1234";
const WRITER: &str = "writer-secret-5678";

/// A server started with a tokens file and its stderr captured in a file, killed on drop.
struct Logged {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Logged {
    fn start(tokens: &str, args: &[&str]) -> Logged {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokens"), tokens).unwrap();
        let stderr = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--write-token")
            .arg(TOKEN)
            .arg("--data-dir")
            .arg("none")
            .arg("--tokens")
            .arg(dir.path().join("tokens"))
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start stocksync");
        wait_listening(addr);
        Logged { child, addr, dir }
    }

    fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    fn tokens_path(&self) -> std::path::PathBuf {
        self.dir.path().join("tokens")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap()
    }

    fn hangup(&self) {
        // SAFETY: kill(2) on the pid of a child we spawned and still own; no memory involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0);
    }

    /// Connects a WebSocket at `path` with optional extra headers; the HTTP status of a refusal.
    fn ws(&self, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
        ws_at(self.addr, path, headers)
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ws_at(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut request = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (name, value) in headers {
        let name = tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap();
        request.headers_mut().insert(name, value.parse().unwrap());
    }
    match tungstenite::connect(request) {
        Ok((ws, _)) => {
            set_timeout(&ws, Duration::from_secs(10));
            Ok(ws)
        }
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("websocket connect failed: {e}"),
    }
}

fn tokens_file(entries: &[(&str, &str, &str)]) -> String {
    entries
        .iter()
        .map(|(name, role, secret)| format!("{name} {role} {secret}\n"))
        .collect()
}

fn http_call(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let auth = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http_json(method, url, &headers, body)
}

/// One op of each action. Applied in this order, each up to three times, all are valid:
/// reservations of 2 leave enough for three releases and three commits of 1.
fn every_op(sku: &str) -> Vec<Value> {
    vec![
        json!({"id": sku, "action": "set", "quantity": 10}),
        json!({"id": sku, "action": "increase", "change": 1}),
        json!({"id": sku, "action": "decrease", "change": 1}),
        json!({"id": sku, "action": "reserve", "change": 2}),
        json!({"id": sku, "action": "release", "change": 1}),
        json!({"id": sku, "action": "commit", "change": 1}),
    ]
}

fn without_id(op: &Value) -> String {
    let mut op = op.clone();
    op.as_object_mut().unwrap().remove("id");
    op.to_string()
}

/// Tries every write path (HTTP single op with header and with `?token=`, HTTP batch, WS
/// stock_update, WS stock_batch, for every action) with `token`; returns the statuses / reply
/// codes.
fn try_every_write(server: &Logged, token: &str) -> Vec<String> {
    let mut outcomes = Vec::new();
    for op in every_op("guarded") {
        let (status, body) = http_call(
            "POST",
            &server.http("/stock/guarded"),
            Some(token),
            Some(&without_id(&op)),
        );
        outcomes.push(format!("{status} {}", body["error"]["code"]));
        let (status, body) = http_call(
            "POST",
            &server.http(&format!("/stock/guarded?token={token}")),
            None,
            Some(&without_id(&op)),
        );
        outcomes.push(format!("{status} {}", body["error"]["code"]));
        let (status, body) = http_call(
            "POST",
            &server.http("/stock/batch"),
            Some(token),
            Some(&json!({ "ops": [op] }).to_string()),
        );
        outcomes.push(format!("{status} {}", body["error"]["code"]));
    }
    let mut ws = server.ws(&format!("/ws?token={token}"), &[]).unwrap();
    for op in every_op("guarded") {
        let reply = request(&mut ws, json!({"type":"stock_update","stock": op}));
        outcomes.push(format!("ws {} {}", reply["type"], reply["code"]));
        let reply = request(
            &mut ws,
            json!({"type":"stock_batch","idempotency_key": format!("k-{}", op["action"]), "ops":[op]}),
        );
        outcomes.push(format!("ws {} {}", reply["type"], reply["code"]));
    }
    let mut bearer = server
        .ws("/ws", &[("Authorization", &format!("Bearer {token}"))])
        .unwrap();
    let reply = request(
        &mut bearer,
        json!({"type":"stock_update","stock": every_op("guarded")[0]}),
    );
    outcomes.push(format!("ws {} {}", reply["type"], reply["code"]));
    outcomes
}

#[test]
fn each_role_can_do_exactly_what_it_may() {
    let server = Logged::start(
        &tokens_file(&[("shop", "read", READER), ("erp", "write", WRITER)]),
        &[],
    );
    // The SKU exists with room for every action.
    let (status, _) = http_call(
        "POST",
        &server.http("/stock/guarded"),
        Some(WRITER),
        Some(r#"{"action":"set","quantity":100}"#),
    );
    assert_eq!(status, 200);
    let (_, before) = http_call("GET", &server.http("/stock/guarded"), None, None);

    let refused = try_every_write(&server, READER);
    for outcome in &refused {
        assert!(
            outcome == "401 \"unauthorized\"" || outcome == "ws \"error\" \"unauthorized\"",
            "a read-only token wrote: {refused:?}"
        );
    }
    let (_, after) = http_call("GET", &server.http("/stock/guarded"), None, None);
    assert_eq!(before, after, "nothing changed");

    // The read token reads, over both protocols.
    let (status, body) = http_call("GET", &server.http("/stock/guarded"), Some(READER), None);
    assert_eq!((status, body["on_hand"].clone()), (200, json!(100)));
    let mut ws = server.ws(&format!("/ws?token={READER}"), &[]).unwrap();
    let reply = request(&mut ws, json!({"type":"subscribe","skus":["guarded"]}));
    assert_eq!(reply["type"], "subscribed");

    // The write token does all of it.
    let accepted = try_every_write(&server, WRITER);
    for outcome in &accepted {
        assert!(
            outcome.starts_with("200") || outcome.starts_with("ws \"ack\""),
            "a write token was refused: {accepted:?}"
        );
    }
    let (_, last) = http_call("GET", &server.http("/stock/guarded"), None, None);
    assert_eq!(last["version"].as_u64().unwrap(), 1 + accepted.len() as u64);
}

#[test]
fn public_read_off_requires_a_token_for_reads() {
    let server = Logged::start(
        &tokens_file(&[("shop", "read", READER)]),
        &["--public-read", "false"],
    );
    let (status, body) = http_call("GET", &server.http("/stock/a"), None, None);
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, _) = http_call("GET", &server.http("/stock?skus=a,b"), None, None);
    assert_eq!(status, 401);
    let (status, _) = http_call("GET", &server.http("/stock/a"), Some("not-a-token"), None);
    assert_eq!(status, 401);
    let (status, _) = http_call("GET", &server.http("/stock/a"), Some(READER), None);
    assert_eq!(status, 200);
    let (status, _) = http_call(
        "GET",
        &server.http(&format!("/stock/a?token={READER}")),
        None,
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(server.ws("/ws", &[]).err(), Some(401));
    assert_eq!(server.ws("/", &[]).err(), Some(401));
    assert_eq!(server.ws("/ws?token=nope-nope", &[]).err(), Some(401));
    let mut ws = server.ws(&format!("/ws?token={READER}"), &[]).unwrap();
    assert_eq!(request(&mut ws, json!({"type":"ping"}))["type"], "pong");
    // Operators' endpoints stay open.
    assert_eq!(
        http_call("GET", &server.http("/healthz"), None, None).0,
        200
    );
    assert_eq!(
        http_call("GET", &server.http("/metrics"), None, None).0,
        200
    );
}

#[test]
fn only_allowed_origins_may_open_a_websocket() {
    let server = Logged::start(
        "",
        &[
            "--allowed-origin",
            "https://shop.example",
            "--allowed-origin",
            "https://admin.example",
        ],
    );
    assert_eq!(
        server
            .ws("/ws", &[("Origin", "https://evil.example")])
            .err(),
        Some(403)
    );
    assert_eq!(
        server
            .ws("/", &[("Origin", "https://shop.example.evil")])
            .err(),
        Some(403)
    );
    for origin in ["https://shop.example", "https://admin.example"] {
        let mut ws = server.ws("/ws", &[("Origin", origin)]).unwrap();
        assert_eq!(request(&mut ws, json!({"type":"ping"}))["type"], "pong");
    }
    // Non-browser clients send no Origin and are not subject to it.
    assert!(server.ws("/ws", &[]).is_ok());
    let (_, metrics) = http_call("GET", &server.http("/metrics"), None, None);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("stocksync_origin_rejected_total 2"),
        "refusals are counted"
    );
}

fn write_status(server: &Logged, token: &str) -> u16 {
    http_call(
        "POST",
        &server.http("/stock/reload"),
        Some(token),
        Some(r#"{"action":"increase","change":1}"#),
    )
    .0
}

fn replace_file(path: &Path, text: &str) {
    // Write-then-rename, as an operator's tooling would, so the server never reads half a file.
    let tmp = path.with_extension("new");
    let mut file = std::fs::File::create(&tmp).unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file.sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn sighup_reloads_tokens_removed_ones_are_refused() {
    const NEW: &str = "new-writer-secret-999";
    let server = Logged::start(
        &tokens_file(&[("old", "write", WRITER), ("kept", "read", READER)]),
        &[],
    );
    assert_eq!(write_status(&server, WRITER), 200);
    assert_eq!(write_status(&server, NEW), 401);
    // Open sessions: one on the token about to go, one on a token that stays.
    let mut doomed = server.ws(&format!("/ws?token={WRITER}"), &[]).unwrap();
    let mut kept = server.ws(&format!("/ws?token={READER}"), &[]).unwrap();
    assert_eq!(request(&mut doomed, json!({"type":"ping"}))["type"], "pong");

    replace_file(
        &server.tokens_path(),
        &tokens_file(&[("new", "write", NEW), ("kept", "read", READER)]),
    );
    server.hangup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while write_status(&server, NEW) != 200 {
        assert!(Instant::now() < deadline, "reload did not take effect");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(write_status(&server, WRITER), 401);
    assert_eq!(
        server.ws(&format!("/ws?token={WRITER}"), &[]).err(),
        Some(401)
    );
    let mut ws = server.ws(&format!("/ws?token={NEW}"), &[]).unwrap();
    let ack = request(
        &mut ws,
        json!({"type":"stock_update","stock":{"id":"reload","action":"increase","change":1}}),
    );
    assert_eq!(ack["type"], "ack");
    // The session opened with the removed token is closed with 1008 by the reload itself.
    let close = loop {
        match doomed.read() {
            Ok(tungstenite::Message::Close(frame)) => break frame,
            Ok(_) => continue,
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(
        close.map(|f| u16::from(f.code)),
        Some(1008),
        "revoked token's session closed"
    );
    assert_eq!(request(&mut kept, json!({"type":"ping"}))["type"], "pong");
    // The --write-token is not from the file and survives the reload.
    assert_eq!(write_status(&server, TOKEN), 200);

    // A broken file is refused and the tokens in force are kept.
    replace_file(&server.tokens_path(), "new superuser x\n");
    server.hangup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("tokens not reloaded") {
        assert!(Instant::now() < deadline, "bad file not reported");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(write_status(&server, NEW), 200);
}

#[test]
fn tokens_never_appear_in_logs() {
    let server = Logged::start(
        &tokens_file(&[("shop", "read", READER), ("erp", "write", WRITER)]),
        &[
            "--public-read",
            "false",
            "--allowed-origin",
            "https://ok.example",
        ],
    );
    let wrong = "wrong-secret-abcdef";
    // Every way a token can travel, accepted and refused, over both protocols.
    for token in [READER, WRITER, TOKEN, wrong] {
        http_call("GET", &server.http("/stock/a"), Some(token), None);
        http_call(
            "GET",
            &server.http(&format!("/stock/a?token={token}")),
            None,
            None,
        );
        http_call(
            "POST",
            &server.http("/stock/a"),
            Some(token),
            Some(r#"{"action":"set","quantity":1}"#),
        );
        http_call(
            "POST",
            &server.http(&format!("/nowhere?token={token}")),
            None,
            Some("{"),
        );
        let _ = server.ws(&format!("/ws?token={token}"), &[]);
        let _ = server.ws(
            &format!("/ws?token={token}"),
            &[("Origin", "https://bad.example")],
        );
        let _ = server.ws("/ws", &[("Authorization", &format!("Bearer {token}"))]);
        // A malformed request carrying the token in its head.
        let mut stream = raw(server.addr);
        stream
            .write_all(
                format!(
                    "POST /stock/a?token={token} HTTP/1.1\r\nAuthorization: Bearer {token}\r\n\
                     Transfer-Encoding: chunked\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        read_to_close(&mut stream);
        // A bad WebSocket message after a handshake with the token.
        if let Ok(mut ws) = server.ws(&format!("/ws?token={token}"), &[]) {
            request(
                &mut ws,
                json!({"type":"stock_update","stock":{"id":"a","action":"set","quantity":token}}),
            );
        }
    }
    server.hangup();
    // Wait for the reload line so the logger has certainly run, then look.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log_text().contains("tokens reloaded") {
        assert!(Instant::now() < deadline, "no reload line");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = server.log_text();
    assert!(log.contains("open from"), "debug logging is on: {log}");
    for secret in [READER, WRITER, TOKEN, wrong] {
        assert!(!log.contains(secret), "{secret} leaked into the log");
    }
}
