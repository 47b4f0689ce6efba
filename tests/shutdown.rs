//! Graceful shutdown: on SIGTERM (and SIGINT) the server stops accepting, says close 1001
//! ("going away", RFC 6455 §7.4.1) to every WebSocket client, and exits with status 0 within its
//! grace period, even when a client never answers the close.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

/// The server's default shutdown grace period (config `shutdown_grace_ms`), plus slack for a
/// loaded machine.
const GRACE: Duration = Duration::from_secs(5);
const SLACK: Duration = Duration::from_secs(3);

/// Waits for the process to exit, at most `limit`; returns its status.
fn wait_exit(server: &mut Server, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "server still running {limit:?} after the signal"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads until the close frame; returns its code.
fn close_code(ws: &mut Ws) -> CloseCode {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return frame.code,
            Ok(Message::Close(None)) => panic!("close without a code"),
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

/// A raw WebSocket client that will never read or answer anything.
fn silent_client(server: &Server) -> TcpStream {
    let mut stream = raw(server.addr);
    raw_handshake(&mut stream, "/ws");
    stream
}

fn check_graceful(signal: i32) {
    let mut server = Server::start(&[]);
    let mut clients: Vec<Ws> = (0..3).map(|_| server.ws("/ws")).collect();
    for ws in &mut clients {
        let reply = request(ws, json!({"type": "subscribe", "skus": ["sku-1"]}));
        assert_eq!(reply["type"], "subscribed");
    }
    let mut writer = server.writer();
    assert_eq!(
        request(&mut writer, json!({"type": "ping"}))["type"],
        "pong"
    );
    clients.push(writer);
    let silent = silent_client(&server);
    // A keep-alive HTTP connection with no request in flight.
    let mut idle_http = raw(server.addr);
    idle_http
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 12];
    idle_http.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    let signalled = Instant::now();
    server.signal(signal);
    for ws in &mut clients {
        assert_eq!(close_code(ws), CloseCode::Away);
    }
    // The listener is gone before anyone is told goodbye.
    assert!(
        TcpStream::connect(server.addr).is_err(),
        "still accepting after the signal"
    );
    // Answer the close like a real client would; the silent one never does.
    for ws in &mut clients {
        let _ = ws.flush();
    }
    let status = wait_exit(&mut server, GRACE + SLACK);
    assert!(status.success(), "exit status {status:?}");
    println!("exited {:?} after the signal", signalled.elapsed());
    drop(silent);
}

#[test]
fn sigterm_closes_websockets_with_1001_and_exits_0() {
    check_graceful(libc::SIGTERM);
}

#[test]
fn sigint_does_the_same() {
    check_graceful(libc::SIGINT);
}
