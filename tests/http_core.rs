//! The HTTP/1.1 side of the core against the real `stocksync` binary: each refusal has its
//! status (400, 404, 405, 413, 426, 431), keep-alive and `Connection: close` behave, and a client
//! that never finishes its request head is cut off after the handshake timeout (slowloris), and
//! connections over the configured limit are closed at once and counted.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

struct Response {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Reads one response: the head a byte at a time, then a `Content-Length` body (none for HEAD).
fn read_response(stream: &mut TcpStream, head_request: bool) -> Response {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).unwrap();
        assert_eq!(n, 1, "closed before a response; got {bytes:?}");
        bytes.push(byte[0]);
    }
    let head = String::from_utf8(bytes).unwrap();
    let status = head[9..12].parse().unwrap();
    let mut response = Response {
        status,
        head,
        body: Vec::new(),
    };
    if !head_request {
        let length: usize = response
            .header("Content-Length")
            .map_or(0, |v| v.parse().unwrap());
        response.body = vec![0u8; length];
        stream.read_exact(&mut response.body).unwrap();
    }
    response
}

fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    let n = stream.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "{what}: expected the server to close, got {rest:?}");
}

/// Sends `request` on a new connection and returns the single response.
fn exchange(server: &Server, request: &[u8]) -> (Response, TcpStream) {
    let mut stream = raw(server.addr);
    stream.write_all(request).unwrap();
    let response = read_response(&mut stream, false);
    (response, stream)
}

#[test]
fn refusals_have_their_status_and_close_when_the_framing_is_lost() {
    let server = Server::start(&[]);
    let many_headers: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(9 * 1024));
    // (case, request, status, connection must close afterwards)
    let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
        ("garbage request line", b"HELLO\r\n\r\n".to_vec(), 400, true),
        (
            "space in the target",
            b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "control byte in the target",
            b"GET /a\x01b HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "HTTP/2.0 request line",
            b"GET / HTTP/2.0\r\nHost: t\r\n\r\n".to_vec(),
            505,
            true,
        ),
        (
            "bad header name",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n".to_vec(),
            400,
            true,
        ),
        (
            "unknown route",
            b"GET /definitely/not/here HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            404,
            false,
        ),
        (
            "DELETE /healthz",
            b"DELETE /healthz HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            405,
            false,
        ),
        (
            "body over the limit",
            b"POST /stock/sku-1 HTTP/1.1\r\nHost: t\r\nContent-Length: 999999999\r\n\r\n".to_vec(),
            413,
            true,
        ),
        (
            "too many headers",
            format!("GET /healthz HTTP/1.1\r\n{many_headers}\r\n").into_bytes(),
            431,
            true,
        ),
        (
            "head too large",
            format!("GET /healthz HTTP/1.1\r\n{huge_header}\r\n").into_bytes(),
            431,
            true,
        ),
        (
            "GET /ws without Upgrade",
            b"GET /ws HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(),
            426,
            true,
        ),
    ];
    for (case, request, status, closes) in cases {
        let (response, mut stream) = exchange(&server, &request);
        assert_eq!(response.status, status, "{case}: {}", response.head);
        if closes {
            assert_closed(&mut stream, case);
        }
        if status == 405 {
            let allow = response.header("Allow").unwrap_or_default();
            assert!(allow.contains("GET"), "{case}: Allow is {allow:?}");
            assert!(!allow.contains("DELETE"), "{case}: Allow is {allow:?}");
        }
        if status == 426 {
            assert_eq!(response.header("Upgrade"), Some("websocket"), "{case}");
        }
    }
}

#[test]
fn the_server_keeps_serving_after_refusals() {
    let server = Server::start(&[]);
    for _ in 0..3 {
        let (response, _) = exchange(&server, b"HELLO\r\n\r\n");
        assert_eq!(response.status, 400);
    }
    let (response, _) = exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(response.status, 200);
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    for i in 0..3 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let response = read_response(&mut stream, false);
        assert_eq!(response.status, 200, "request {i}");
        assert_ne!(response.header("Connection"), Some("close"), "request {i}");
    }
    // A 404 is an answer, not a framing error: the connection stays usable.
    stream
        .write_all(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream, false).status, 404);
    stream
        .write_all(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let head = read_response(&mut stream, true);
    assert_eq!(head.status, 200);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream, false).status, 200);
}

#[test]
fn connection_close_is_honoured() {
    let server = Server::start(&[]);
    let (response, mut stream) = exchange(
        &server,
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Connection"), Some("close"));
    assert_closed(&mut stream, "Connection: close");

    // HTTP/1.0 without keep-alive closes by default (RFC 9112 §9.3).
    let (response, mut stream) = exchange(&server, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert_eq!(response.status, 200);
    assert_closed(&mut stream, "HTTP/1.0");
}

#[test]
fn body_is_read_by_content_length_and_the_next_request_follows() {
    let server = Server::start(&[]);
    let mut stream = raw(server.addr);
    // A write without a token is refused (401), but its body is consumed exactly, so the
    // pipelined request after it is parsed from the right byte.
    let body = r#"{"action":"set","quantity":1}"#;
    let request = format!(
        "POST /stock/sku-1 HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}\
         GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let first = read_response(&mut stream, false);
    assert_eq!(first.status, 401, "{}", first.head);
    let second = read_response(&mut stream, false);
    assert_eq!(second.status, 200, "{}", second.head);
    assert!(!second.body.is_empty());
}

#[test]
fn slowloris_partial_head_is_closed_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout", "1"]);
    // Taken before connecting, so the server's deadline (set at accept) comes after it.
    let started = Instant::now();
    let mut stream = raw(server.addr);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    // The head never ends; the server must give up on its own (`raw` reads time out at 10 s).
    let bytes = read_to_close(&mut stream);
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408 "),
        "unexpected answer {text:?}"
    );
    assert!(elapsed < Duration::from_secs(9), "not closed: {elapsed:?}");
    // The deadline cannot fire before it is due.
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed early: {elapsed:?}"
    );
}

#[test]
fn slowloris_dribbling_bytes_does_not_extend_the_deadline() {
    let server = Server::start(&["--handshake-timeout", "1"]);
    let mut stream = raw(server.addr);
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    // One header byte every ~100 ms (the read timeout paces it) until the server hangs up.
    let mut closed = false;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(8) {
        if stream.write_all(b"X").is_err() {
            closed = true;
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "a dribbling client kept its connection for 8 s");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408 "),
        "{text:?}"
    );
}

#[test]
fn a_complete_request_is_not_cut_by_the_handshake_timeout() {
    // The timeout bounds the first request, not a keep-alive connection that completed one.
    let server = Server::start(&["--handshake-timeout", "1"]);
    let mut stream = raw(server.addr);
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream, false).status, 200);
    // Past the handshake timeout, the same connection still answers.
    std::thread::sleep(Duration::from_millis(1500));
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut stream, false).status, 200);
}

#[test]
fn connections_over_the_limit_are_closed_and_counted() {
    let server = Server::start(&["--max-connections", "3"]);
    let held: Vec<Ws> = (0..3).map(|_| server.ws("/ws")).collect();
    // The kernel completes the TCP handshake; the server then closes the socket unanswered.
    let mut refused = raw(server.addr);
    let _ = refused.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    let mut buf = [0u8; 64];
    let answer = refused.read(&mut buf);
    assert!(
        matches!(answer, Ok(0) | Err(_)),
        "over the limit yet answered: {:?}",
        answer.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    // Free a slot and read the counter (the slot is free once the server reaped the closed one).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let mut stream = raw(server.addr);
        let sent = stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        let mut first = [0u8; 1];
        if sent.is_ok() && matches!(stream.peek(&mut first), Ok(1)) {
            break read_response(&mut stream, false);
        }
        assert!(Instant::now() < deadline, "no slot freed");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = String::from_utf8(metrics.body).unwrap();
    let rejected: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("stocksync_connections_rejected_total{reason=\"connections_max\"} ")
        })
        .expect("rejected counter")
        .trim()
        .parse()
        .unwrap();
    assert!(rejected >= 1, "{text}");
}
