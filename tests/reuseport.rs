//! SO_REUSEPORT: two independent `stocksync` processes bind the same port, and the kernel spreads
//! new connections over both. Which process holds a connection is read from the kernel itself
//! (/proc/PID/fd and /proc/net/tcp), so the count does not depend on which process answers a
//! metrics request.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::watch::{held, ESTABLISHED, LISTEN};
use common::*;
use serde_json::json;

const CONNECTIONS: usize = 200;

/// Starts a second `stocksync` on the same address as `first`.
fn start_second(first: &Server) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", &first.addr.to_string()])
        .args(["--write-token", TOKEN, "--data-dir", "none"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let second = Server {
        child,
        addr: first.addr,
        data_dir: None,
        redis: None,
    };
    // It is listening once it holds its own LISTEN socket on the port (the first one answers
    // connects either way, so a connect proves nothing).
    let deadline = Instant::now() + Duration::from_secs(20);
    while held(second.child.id(), first.addr.port(), LISTEN) == 0 {
        assert!(Instant::now() < deadline, "second process never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    second
}

#[test]
fn two_processes_on_one_port_both_accept() {
    let first = Server::start(&[]);
    let mut second = start_second(&first);
    let port = first.addr.port();
    assert!(
        second.child.try_wait().unwrap().is_none(),
        "second process exited: SO_REUSEPORT bind failed?"
    );
    assert_eq!(held(first.child.id(), port, LISTEN), 1);

    let addr: SocketAddr = first.addr;
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for i in 0..CONNECTIONS {
        let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).unwrap();
        set_timeout(&ws, Duration::from_secs(10));
        // Every connection is served, whichever process has it.
        let reply = request(&mut ws, json!({"type": "ping", "id": i}));
        assert_eq!(reply["type"], "pong");
        clients.push(ws);
    }

    // All handshakes completed, so each connection is held by one process.
    let (a, b) = (
        held(first.child.id(), port, ESTABLISHED),
        held(second.child.id(), port, ESTABLISHED),
    );
    assert_eq!(a + b, CONNECTIONS, "first holds {a}, second {b}");
    // With a fair hash the chance that one process gets none of 200 is 2^-199.
    assert!(
        a > 0 && b > 0,
        "kernel did not spread: first {a}, second {b}"
    );
    println!("first process holds {a} connections, second {b}");
    drop(clients);
}
