//! Native TLS (`--tls-cert`, `--tls-key`): the real binary with a certificate made at test time,
//! real rustls clients (wss:// through tungstenite, HTTPS by hand) running the protocol cases,
//! certificate reload on SIGHUP, plain HTTP on the TLS port, bad pairs at start.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::{self, SelfSigned};
use common::{Server, TOKEN};
use serde_json::json;

fn tls_server(cert: &SelfSigned, dir: &std::path::Path, extra: &[&str]) -> Server {
    let (cert_path, key_path) = cert.write(dir);
    let mut args = vec![
        "--tls-cert",
        cert_path.to_str().unwrap(),
        "--tls-key",
        key_path.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn wss_and_https_run_the_protocol_cases() {
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let server = tls_server(&cert, dir.path(), &[]);
    let config = cert.client_config();
    let auth = format!("Bearer {TOKEN}");

    let mut subscriber = tls::wss(server.addr, None, &config, "/ws", &[]).unwrap();
    tls::send(
        &mut subscriber,
        json!({"type": "subscribe", "skus": ["sku-1"]}),
    );
    let reply = tls::recv(&mut subscriber);
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["stock"][0]["version"], 0);

    let mut writer = tls::wss(
        server.addr,
        None,
        &config,
        &format!("/ws?token={TOKEN}"),
        &[],
    )
    .unwrap();
    tls::send(
        &mut writer,
        json!({"type": "stock_update", "id": 1,
               "stock": {"id": "sku-1", "action": "set", "quantity": 5}}),
    );
    let ack = tls::recv(&mut writer);
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["stock"]["quantity"], 5);
    let update = tls::recv(&mut subscriber);
    assert_eq!(update["type"], "stock_update");
    assert_eq!(update["stock"]["quantity"], 5);

    // HTTPS writes and reads on one kept-alive connection, broadcast to the wss subscriber.
    let mut https = tls::tls_connect(server.addr, None, &config).unwrap();
    let (status, body) = tls::http(
        &mut https,
        "POST",
        "/stock/sku-1",
        &[("Authorization", &auth), ("Idempotency-Key", "tls-1")],
        Some(r#"{"action":"increase","change":2}"#),
    );
    assert_eq!(status, 200, "{body}");
    let update = tls::recv(&mut subscriber);
    assert_eq!(update["stock"]["quantity"], 7);
    let (status, body) = tls::http(&mut https, "GET", "/stock/sku-1", &[], None);
    assert_eq!(status, 200);
    let state: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(state["quantity"], 7);
    assert_eq!(state["version"], 2);
    let (status, body) = tls::http(
        &mut https,
        "POST",
        "/stock/sku-1",
        &[("Authorization", &auth)],
        Some(r#"{"action":"decrease","change":100}"#),
    );
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("insufficient_stock"), "{body}");

    // Bigger than a TLS record and than the session's 64 KiB buffer, both ways: 1500 ops in
    // one body (read whole, then refused: batches hold at most 100 ops), then the SKUs in
    // batches of 100, and a `*` snapshot of them out.
    let ops: Vec<_> = (0..1500)
        .map(|i| json!({"id": format!("bulk-{i:04}"), "action": "set", "quantity": i}))
        .collect();
    let batch = json!({ "ops": ops }).to_string();
    assert!(batch.len() > 64 * 1024);
    let (status, body) = tls::http(
        &mut https,
        "POST",
        "/stock/batch",
        &[("Authorization", &auth)],
        Some(&batch),
    );
    assert_eq!(status, 413, "{body}");
    let mut https = tls::tls_connect(server.addr, None, &config).unwrap();
    for chunk in ops.chunks(100) {
        let batch = json!({ "ops": chunk }).to_string();
        let (status, body) = tls::http(
            &mut https,
            "POST",
            "/stock/batch",
            &[("Authorization", &auth)],
            Some(&batch),
        );
        assert_eq!(status, 200, "{body}");
    }
    let mut everything = tls::wss(server.addr, None, &config, "/ws", &[]).unwrap();
    tls::send(&mut everything, json!({"type": "subscribe", "skus": ["*"]}));
    let reply = tls::recv(&mut everything);
    assert_eq!(reply["type"], "subscribed");
    assert_eq!(reply["stock"].as_array().unwrap().len(), 1501);
    assert!(reply.to_string().len() > 64 * 1024);

    // Ping/pong and a clean close over TLS.
    tls::send(&mut subscriber, json!({"type": "ping", "id": "p"}));
    assert_eq!(tls::recv(&mut subscriber)["type"], "pong");
    subscriber.close(None).unwrap();
    loop {
        match subscriber.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("close over TLS ended with {e}"),
        }
    }
}

#[test]
fn certificate_reload_on_sighup_is_seen_by_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = SelfSigned::new();
    let second = SelfSigned::new();
    let server = tls_server(&first, dir.path(), &[]);
    // Trust both, so the handshake succeeds either way and we compare what was presented.
    let config = tls::client_config(&[first.cert_der.clone(), second.cert_der.clone()]);

    let mut before = tls::wss(server.addr, None, &config, "/ws", &[]).unwrap();
    assert_eq!(tls::presented(before.get_ref()), first.cert_der);

    second.write(dir.path());
    server.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stream = tls::tls_connect(server.addr, None, &config).unwrap();
        if tls::presented(&stream) == second.cert_der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new connections never saw the new certificate"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connection opened before the reload goes on with its session.
    tls::send(&mut before, json!({"type": "ping"}));
    assert_eq!(tls::recv(&mut before)["type"], "pong");

    // A bad pair on SIGHUP keeps the one in force.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    server.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    let stream = tls::tls_connect(server.addr, None, &config).unwrap();
    assert_eq!(tls::presented(&stream), second.cert_der);
    let (status, _) = tls::https(server.addr, &config, "GET", "/healthz", &[], None);
    assert_eq!(status, 200);
}

#[test]
fn plain_http_on_the_tls_port_is_refused_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let server = tls_server(&cert, dir.path(), &[]);
    let config = cert.client_config();
    for _ in 0..20 {
        let started = Instant::now();
        let mut plain = TcpStream::connect(server.addr).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        plain
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        plain
            .read_to_end(&mut answer)
            .expect("a clean close, not a timeout or a reset");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("this port speaks TLS"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // Garbage that starts like a TLS record fails in rustls, and only that connection.
    let mut junk = TcpStream::connect(server.addr).unwrap();
    junk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let mut sink = Vec::new();
    let _ = junk.read_to_end(&mut sink);

    let (status, _) = tls::https(server.addr, &config, "GET", "/healthz", &[], None);
    assert_eq!(status, 200);
    let (status, metrics) = tls::https(server.addr, &config, "GET", "/metrics", &[], None);
    assert_eq!(status, 200);
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stocksync_tls_failures_total "))
        .expect("the TLS failure counter");
    assert!(failures.trim().parse::<u64>().unwrap() >= 21, "{failures}");
}

#[test]
fn a_silent_client_on_the_tls_port_hits_the_handshake_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let server = tls_server(&cert, dir.path(), &["--handshake-timeout", "1"]);
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut sink = Vec::new();
    let _ = silent.read_to_end(&mut sink);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}"
    );
}

/// Runs the binary with `args` and expects a quick non-zero exit whose stderr names `needle`.
fn refused_at_start(args: &[&str], needle: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", "127.0.0.1:0", "--data-dir", "none"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "started with {args:?}");
    assert!(stderr.contains(needle), "{args:?}: stderr was {stderr}");
}

#[test]
fn a_bad_pair_at_start_is_a_clear_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let other = SelfSigned::new();
    let (cert_path, key_path) = cert.write(dir.path());
    let (cert_path, key_path) = (cert_path.to_str().unwrap(), key_path.to_str().unwrap());
    let missing = dir.path().join("missing.pem");
    let missing = missing.to_str().unwrap();
    refused_at_start(
        &["--tls-cert", missing, "--tls-key", key_path],
        "cannot read",
    );
    refused_at_start(&["--tls-cert", cert_path], "--tls-key");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "hello").unwrap();
    refused_at_start(
        &[
            "--tls-cert",
            garbage.to_str().unwrap(),
            "--tls-key",
            key_path,
        ],
        "no PEM certificate",
    );
    refused_at_start(
        &[
            "--tls-cert",
            cert_path,
            "--tls-key",
            garbage.to_str().unwrap(),
        ],
        "no usable private key",
    );
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, &other.key_pem).unwrap();
    refused_at_start(
        &[
            "--tls-cert",
            cert_path,
            "--tls-key",
            other_key.to_str().unwrap(),
        ],
        "refused",
    );
}

#[test]
fn x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    // No --trusted-proxy: one connection per IP, whatever the header says.
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let server = tls_server(&cert, dir.path(), &["--max-connections-per-ip", "1"]);
    let config = cert.client_config();
    // The start-up probe's connection may still be counted for a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let _first = loop {
        match tls::wss(
            server.addr,
            None,
            &config,
            "/ws",
            &[("X-Forwarded-For", "10.0.0.1")],
        ) {
            Ok(ws) => break ws,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("first connection refused: {e}"),
        }
    };
    // Refused at accept (the socket is closed before the handshake can finish).
    let second = tls::wss(
        server.addr,
        None,
        &config,
        "/ws",
        &[("X-Forwarded-For", "10.0.0.2")],
    );
    assert!(
        second.is_err(),
        "a second connection from one IP got through"
    );
}

#[test]
fn a_slow_tls_subscriber_is_conflated_and_converges() {
    // Small kernel buffers on both sides, so a subscriber that stops reading backs up through
    // the TLS session's buffer into the send queue, where conflation applies.
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let server = tls_server(
        &cert,
        dir.path(),
        &["--socket-send-buffer", "4096", "--send-high-bytes", "16384"],
    );
    let config = cert.client_config();
    let mut slow = tls::wss_small_window(server.addr, &config, "/ws", 4096);
    tls::send(&mut slow, json!({"type": "subscribe", "skus": ["*"]}));
    assert_eq!(tls::recv(&mut slow)["type"], "subscribed");
    let mut fast = tls::wss(server.addr, None, &config, "/ws", &[]).unwrap();
    tls::send(&mut fast, json!({"type": "subscribe", "skus": ["hot-0"]}));
    assert_eq!(tls::recv(&mut fast)["type"], "subscribed");

    // 100 rounds of a 100-SKU batch: 10,000 updates of ~120 bytes, far past every buffer.
    let mut writer = tls::wss(
        server.addr,
        None,
        &config,
        &format!("/ws?token={TOKEN}"),
        &[],
    )
    .unwrap();
    const ROUNDS: u64 = 100;
    for round in 1..=ROUNDS {
        let ops: Vec<_> = (0..100)
            .map(|i| json!({"id": format!("hot-{i}"), "action": "set", "quantity": round}))
            .collect();
        tls::send(&mut writer, json!({"type": "stock_batch", "ops": ops}));
        let ack = tls::recv(&mut writer);
        assert_eq!(ack["type"], "ack", "{ack}");
        // The fast subscriber keeps up meanwhile.
        assert_eq!(tls::recv(&mut fast)["stock"]["quantity"], round);
    }

    // The slow one now reads: versions per SKU never go back, and it ends at the last round.
    let mut last_version = std::collections::HashMap::new();
    let mut at_last_round = std::collections::HashSet::new();
    let mut received = 0;
    while at_last_round.len() < 100 {
        let update = tls::recv(&mut slow);
        assert_eq!(update["type"], "stock_update", "{update}");
        let id = update["stock"]["id"].as_str().unwrap().to_string();
        let version = update["stock"]["version"].as_u64().unwrap();
        let previous = last_version.insert(id.clone(), version).unwrap_or(0);
        assert!(
            version > previous,
            "{id}: version {version} after {previous}"
        );
        if update["stock"]["quantity"] == ROUNDS {
            at_last_round.insert(id);
        }
        received += 1;
    }
    assert!(
        received < 100 * ROUNDS,
        "all {received} updates were queued: nothing was conflated"
    );
}

#[test]
fn sigterm_says_going_away_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = SelfSigned::new();
    let server = tls_server(&cert, dir.path(), &[]);
    let config = cert.client_config();
    let mut client = tls::wss(server.addr, None, &config, "/ws", &[]).unwrap();
    tls::send(&mut client, json!({"type": "ping"}));
    assert_eq!(tls::recv(&mut client)["type"], "pong");
    server.signal(libc::SIGTERM);
    match client.read() {
        Ok(tungstenite::Message::Close(Some(frame))) => {
            assert_eq!(u16::from(frame.code), 1001, "{frame:?}")
        }
        other => panic!("expected a 1001 close, got {other:?}"),
    }
}

/// A `stocksync --workers N` supervisor; SIGTERM on drop stops it and its workers.
struct Supervisor(std::process::Child);

impl Drop for Supervisor {
    fn drop(&mut self) {
        // SAFETY: kill(2) on a pid we spawned; no memory is involved.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

#[test]
fn workers_serve_tls_and_each_takes_the_new_certificate_on_sighup() {
    let redis = common::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let first = SelfSigned::new();
    let second = SelfSigned::new();
    let (cert_path, key_path) = first.write(dir.path());
    let port = common::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let supervisor = Supervisor(
        Command::new(env!("CARGO_BIN_EXE_stocksync"))
            .args(["--workers", "2", "--listen", &addr.to_string()])
            .args(["--redis", &redis.url(), "--data-dir", "none"])
            .args(["--write-token", TOKEN])
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = tls::client_config(&[first.cert_der.clone(), second.cert_der.clone()]);
    // Both workers answer over TLS (each /healthz names its pid).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pids = std::collections::HashSet::new();
    while pids.len() < 2 {
        assert!(Instant::now() < deadline, "workers answering: {pids:?}");
        if TcpStream::connect(addr).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue; // no worker listening yet
        }
        let Ok(mut stream) = tls::tls_connect(addr, None, &config) else {
            continue;
        };
        let (status, body) = tls::http(&mut stream, "GET", "/healthz", &[], None);
        if status == 200 {
            let health: serde_json::Value = serde_json::from_str(&body).unwrap();
            pids.insert(health["pid"].as_u64().unwrap());
        }
    }
    // SIGHUP to the supervisor reaches every worker: soon no connection sees the old pair.
    second.write(dir.path());
    // SAFETY: kill(2) on a pid we spawned.
    unsafe {
        libc::kill(supervisor.0.id() as i32, libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut new_in_a_row = 0;
    let mut new_pids = std::collections::HashSet::new();
    while new_in_a_row < 20 || new_pids.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "an old certificate is still served"
        );
        let mut stream = tls::tls_connect(addr, None, &config).unwrap();
        if tls::presented(&stream) == second.cert_der {
            new_in_a_row += 1;
            let (_, body) = tls::http(&mut stream, "GET", "/healthz", &[], None);
            let health: serde_json::Value = serde_json::from_str(&body).unwrap();
            new_pids.insert(health["pid"].as_u64().unwrap());
        } else {
            new_in_a_row = 0;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
