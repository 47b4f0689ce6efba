//! Heartbeats, timeouts and abuse limits against the real server: idle clients, a peer that
//! vanishes, server pings, slowloris, connection limits (total and per IP), write rates (per
//! connection and per token), subscriptions and message size.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Reads one server frame: `(opcode, payload)`, or `None` at EOF / timeout.
fn read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    try_read_frame(stream).map(|(first, payload)| (first & 0x0f, payload))
}

/// Reads frames until a close frame; returns its code and the opcodes seen before it.
fn read_until_close(stream: &mut TcpStream) -> (Option<u16>, Vec<u8>) {
    let mut seen = Vec::new();
    while let Some((opcode, payload)) = read_frame(stream) {
        if opcode == 0x8 {
            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            return (code, seen);
        }
        seen.push(opcode);
    }
    (None, seen)
}

fn ws_raw(server: &Server, path: &str) -> TcpStream {
    let mut stream = raw(server.addr);
    let rest = raw_handshake(&mut stream, path);
    assert!(rest.is_empty());
    stream
}

fn send_text(stream: &mut TcpStream, value: Value) {
    stream
        .write_all(&client_frame(true, 0x1, value.to_string().as_bytes()))
        .unwrap();
}

/// The next text message, skipping pings.
fn recv_text(stream: &mut TcpStream) -> Value {
    loop {
        let (opcode, payload) = read_frame(stream).expect("a frame");
        match opcode {
            0x1 => return serde_json::from_slice(&payload).unwrap(),
            0x9 | 0xA => continue,
            other => panic!("unexpected opcode {other}"),
        }
    }
}

fn healthz(server: &Server) -> Option<Value> {
    let response = ureq::get(&server.http("/healthz")).call().ok()?;
    serde_json::from_str(&response.into_string().ok()?).ok()
}

/// Polls until `f` holds (bounded); panics with `what` otherwise.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn limit_hits(server: &Server, limit: &str) -> u64 {
    scrape_metric(
        server,
        &format!("stocksync_limit_hits_total{{limit=\"{limit}\"}}"),
    )
    .map_or(0, |v| v.parse().unwrap())
}

#[test]
fn idle_timeout_closes_a_silent_client() {
    let server = Server::start(&["--idle-timeout", "1", "--ping-interval", "0"]);
    let mut silent = ws_raw(&server, "/ws");
    let started = Instant::now();
    let (code, seen) = read_until_close(&mut silent);
    assert_eq!(code, Some(1001), "going away: idle timeout");
    assert!(seen.is_empty(), "no pings with --ping-interval 0: {seen:?}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        read_to_close(&mut silent).is_empty(),
        "then the server closes TCP"
    );
    assert_eq!(limit_hits(&server, "idle_timeout"), 1);
}

#[test]
fn app_pings_and_websocket_pongs_count_as_traffic() {
    let server = Server::start(&["--idle-timeout", "1", "--ping-interval", "0"]);
    let mut app_ping = ws_raw(&server, "/ws");
    let mut ws_pong = ws_raw(&server, "/ws");
    // 2.5 idle timeouts of paced traffic: each client sends something every 250 ms.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        send_text(&mut app_ping, json!({"type":"ping"}));
        assert_eq!(recv_text(&mut app_ping)["type"], "pong");
        // An unsolicited pong is a valid heartbeat (RFC 6455 §5.5.3).
        ws_pong.write_all(&client_frame(true, 0xA, b"hb")).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    send_text(&mut ws_pong, json!({"type":"ping","id":7}));
    let reply = recv_text(&mut ws_pong);
    assert_eq!(
        (reply["type"].clone(), reply["id"].clone()),
        (json!("pong"), json!(7))
    );
    assert_eq!(limit_hits(&server, "idle_timeout"), 0);
}

/// A peer that vanishes without a FIN (cable pulled, phone out of coverage) looks to the
/// server exactly like a client that stops reading and writing: no FIN, no RST, no pong. We
/// simulate it with a socket we never touch again (the kernel still ACKs, which a vanished
/// peer would not, but the server sees no traffic either way). Its pings go unanswered and it
/// is closed at the idle timeout.
#[test]
fn a_vanished_peer_is_dropped_at_the_idle_timeout() {
    let server = Server::start(&["--idle-timeout", "2", "--ping-interval", "1"]);
    let mut vanished = ws_raw(&server, "/ws");
    let started = Instant::now();
    // Without touching the client socket, the server lets go of it.
    wait_for("the server to drop the vanished peer", || {
        limit_hits(&server, "idle_timeout") == 1
    });
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(healthz(&server).unwrap()["status"], "ok");
    // What it would have seen: pings it never answered, then a 1001 close.
    let (code, seen) = read_until_close(&mut vanished);
    assert_eq!(code, Some(1001));
    assert!(seen.contains(&0x9), "it was pinged: {seen:?}");
}

#[test]
fn server_pings_at_the_ping_interval() {
    let server = Server::start(&["--ping-interval", "1", "--idle-timeout", "30"]);
    let mut client = ws_raw(&server, "/ws");
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let (opcode, payload) = read_frame(&mut client).expect("pings keep coming");
        assert_eq!(opcode, 0x9, "only pings on a quiet connection");
        // Answer like a browser does.
        client
            .write_all(&client_frame(true, 0xA, &payload))
            .unwrap();
        pings += 1;
    }
    // Three pings at a one-second interval take about three seconds (bounded loosely: this
    // checks the interval is honoured at all, not its precision).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2500) && elapsed < Duration::from_secs(8),
        "{elapsed:?}"
    );
}

#[test]
fn slowloris_handshake_is_cut_at_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "1"]);
    let mut slow = raw(server.addr);
    let started = Instant::now();
    // A head that never ends, one header line at a time.
    slow.write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    slow.write_all(b"Upgrade: websocket\r\n").unwrap();
    let answer = read_to_close(&mut slow);
    assert!(
        answer.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(limit_hits(&server, "handshake_timeout"), 1);
    // A client that completes its handshake in time is unaffected past the timeout.
    let mut ws = server.ws("/ws");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(request(&mut ws, json!({"type":"ping"}))["type"], "pong");
}

fn connect_from(local: &str, server: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{local}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&server.into()).unwrap();
    let stream: TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

#[test]
fn per_ip_connection_limit() {
    let server = Server::start(&["--max-connections-per-ip", "5"]);
    let mut held: Vec<Ws> = (0..5).map(|_| server.ws("/ws")).collect();
    // The 6th from 127.0.0.1 is closed at accept without a byte.
    let mut sixth = connect_from("127.0.0.1", server.addr);
    let _ = sixth.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(read_to_close(&mut sixth).is_empty());
    // Another address is another budget.
    let mut other = connect_from("127.0.0.2", server.addr);
    let rest = raw_handshake(&mut other, "/ws");
    assert!(rest.is_empty());
    send_text(&mut other, json!({"type":"ping"}));
    assert_eq!(recv_text(&mut other)["type"], "pong");
    // The held ones still work, and a slot frees when one leaves.
    assert_eq!(
        request(&mut held[0], json!({"type":"ping"}))["type"],
        "pong"
    );
    let mut gone = held.pop().unwrap();
    gone.close(None).unwrap();
    while gone.read().is_ok() {}
    wait_for("a freed slot", || {
        let mut probe = connect_from("127.0.0.1", server.addr);
        probe
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .is_ok()
            && read_to_close(&mut probe).starts_with(b"HTTP/1.1 200")
    });
}

#[test]
fn total_connection_limit() {
    let server = Server::start(&["--max-connections", "3"]);
    let _held: Vec<Ws> = (0..3).map(|_| server.ws("/ws")).collect();
    for from in ["127.0.0.1", "127.0.0.3"] {
        let mut refused = connect_from(from, server.addr);
        let _ = refused.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(read_to_close(&mut refused).is_empty(), "{from}");
    }
}

#[test]
fn write_rate_limit_per_connection() {
    let server = Server::start(&["--write-rate", "5"]);
    let mut writer = server.writer();
    let mut acks = 0;
    let mut limited = 0;
    for i in 0..12 {
        let reply = request(
            &mut writer,
            json!({"type":"stock_update","id":i,"stock":{"id":"rate","action":"set","quantity":i}}),
        );
        match reply["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                assert_eq!(reply["code"], "rate_limited");
                assert_eq!(reply["id"], i, "the refusal answers its request");
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // Twelve quick writes span at most two one-second windows of 5.
    assert!((5..=10).contains(&acks), "{acks}");
    assert_eq!(acks + limited, 12);
    // Another connection has its own budget.
    let mut second = server.writer();
    let ack = request(
        &mut second,
        json!({"type":"stock_update","stock":{"id":"rate","action":"set","quantity":1}}),
    );
    assert_eq!(ack["type"], "ack");
}

#[test]
fn write_rate_limit_per_token() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "erp write erp-secret-0001\n").unwrap();
    let server = Server::start(&[
        "--token-write-rate",
        "4",
        "--tokens",
        tokens.to_str().unwrap(),
    ]);
    // Two connections and HTTP share the token's budget.
    let mut a = server.ws("/ws?token=erp-secret-0001");
    let mut b = server.ws("/ws?token=erp-secret-0001");
    let mut outcomes = Vec::new();
    for i in 0..6 {
        for ws in [&mut a, &mut b] {
            let reply = request(
                ws,
                json!({"type":"stock_update","stock":{"id":"tok","action":"set","quantity":i}}),
            );
            outcomes.push(reply["code"].as_str().unwrap_or("ack").to_string());
        }
    }
    let acks = outcomes.iter().filter(|o| *o == "ack").count();
    assert!(
        acks <= 8,
        "12 quick writes span at most two windows of 4: {outcomes:?}"
    );
    assert!(outcomes.iter().all(|o| o == "ack" || o == "rate_limited"));
    let status = match ureq::post(&server.http("/stock/tok"))
        .set("Authorization", "Bearer erp-secret-0001")
        .send_string(r#"{"action":"set","quantity":1}"#)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(status, _)) => status,
        Err(e) => panic!("{e}"),
    };
    assert!(status == 200 || status == 429);
    // Another token is not affected.
    let mut other = server.writer();
    for _ in 0..4 {
        let reply = request(
            &mut other,
            json!({"type":"stock_update","stock":{"id":"tok2","action":"increase","change":1}}),
        );
        assert_eq!(reply["type"], "ack");
    }
    assert_eq!(
        limit_hits(&server, "write_rate_token"),
        outcomes.iter().filter(|o| *o == "rate_limited").count() as u64 + u64::from(status == 429)
    );
}

#[test]
fn max_subscriptions_per_connection() {
    let server = Server::start(&["--max-subscriptions", "3"]);
    let mut ws = server.ws("/ws");
    let reply = request(&mut ws, json!({"type":"subscribe","skus":["a","b"]}));
    assert_eq!(reply["type"], "subscribed");
    let reply = request(&mut ws, json!({"type":"subscribe","id":2,"skus":["c","d"]}));
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "too_large");
    assert_eq!(reply["id"], 2);
    // The connection stays usable and may fill its last slot.
    let reply = request(&mut ws, json!({"type":"subscribe","skus":["c"]}));
    assert_eq!(reply["type"], "subscribed");
    let reply = request(&mut ws, json!({"type":"subscribe","skus":["d"]}));
    assert_eq!(reply["code"], "too_large");
    assert_eq!(limit_hits(&server, "subscriptions_max"), 2);
}

#[test]
fn max_message_size_closes_with_1009() {
    let server = Server::start(&["--max-message-bytes", "1024"]);
    let mut ok = ws_raw(&server, "/ws");
    let padding = "x".repeat(900);
    send_text(&mut ok, json!({"type":"ping","pad":padding}));
    assert_eq!(recv_text(&mut ok)["type"], "pong");
    let mut big = ws_raw(&server, "/ws");
    let padding = "x".repeat(2000);
    send_text(&mut big, json!({"type":"ping","pad":padding}));
    let (code, _) = read_until_close(&mut big);
    assert_eq!(code, Some(1009));
    // Fragments count together.
    let mut fragmented = ws_raw(&server, "/ws");
    fragmented
        .write_all(&client_frame(false, 0x1, &[b' '; 700]))
        .unwrap();
    fragmented
        .write_all(&client_frame(true, 0x0, &[b' '; 700]))
        .unwrap();
    let (code, _) = read_until_close(&mut fragmented);
    assert_eq!(code, Some(1009));
    assert_eq!(limit_hits(&server, "message_too_big"), 2);
}

/// With few file descriptors (RLIMIT_NOFILE 100), the connection limit is lowered to fit
/// under them: connections past it are refused cleanly and counted, never left hanging in
/// the backlog by EMFILE, and the server keeps serving once some close.
#[test]
fn the_connection_limit_fits_under_the_descriptor_limit() {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_stocksync"));
    command
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "none",
            "--write-token",
            TOKEN,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and only calls setrlimit,
    // which is async-signal-safe, on a stack value.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 100,
                rlim_max: 100,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let addr = read_listen_addr(&mut child);
    let server = Server {
        child,
        addr,
        data_dir: None,
        redis: None,
    };
    wait_listening(addr);
    // 100 descriptors minus the 64 kept aside: 36 connections fit (wait_listening used one,
    // already closed). Open 60 WebSockets: the first ones work, the rest are closed at once.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        match tungstenite::connect(server.url("/ws")) {
            Ok((ws, _)) => open.push(ws),
            Err(_) => refused += 1,
        }
    }
    assert!(open.len() <= 36, "{} connections accepted", open.len());
    assert!(open.len() >= 30, "only {} connections accepted", open.len());
    assert_eq!(open.len() + refused, 60);
    for ws in &mut open {
        assert_eq!(
            request(ws, serde_json::json!({"type":"ping"}))["type"],
            "pong"
        );
    }
    open.truncate(10);
    // Room again once the server has read the closes (dropping a socket only queues its FIN):
    // a new connection works, and the refusals were counted.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while tungstenite::connect(server.url("/ws")).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no room after closing connections"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let rejected: f64 = scrape_metric(
        &server,
        "stocksync_connections_rejected_total{reason=\"connections_max\"}",
    )
    .expect("the rejection counter")
    .parse()
    .unwrap();
    assert!(
        rejected >= refused as f64,
        "{rejected} counted, {refused} refused"
    );
}
