//! Memory per idle WebSocket connection, measured on the release echo example.
//!
//! `cargo bench --bench idle_connections` (IDLE_CONNECTIONS=N to change the default 10,000):
//! builds `examples/echo_server` in release if needed, starts it, opens N WebSocket connections
//! from source addresses 127.0.0.2.. (so no per-IP limit or ephemeral-port range is hit),
//! completes every handshake, and reads the server's VmRSS from /proc/PID/status before, at
//! N/10 and at N connections. Then it checks that every connection still echoes, and prints a
//! report (method and results in docs/BENCHMARKS.md).
//!
//! The echo server sends pings every 25 s and closes connections silent for 60 s, so the whole
//! run must stay well inside a minute; it does (a few seconds for 10,000 on loopback).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

const DEFAULT_CONNECTIONS: usize = 10_000;
/// Connections per client source address.
const PER_SOURCE_ADDRESS: usize = 2_500;
const HANDSHAKE: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";
const KEY: [u8; 4] = [1, 2, 3, 4];

/// The echo server, killed on drop.
struct Echo(Child);

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn echo_binary() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let binary = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("release/examples/echo_server");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--example", "echo_server"])
        .current_dir(&root)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "building the echo example failed");
    binary
}

/// A value in kB from /proc/PID/status.
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|line| {
            line.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Kernel slab memory in kB (sockets, epoll items, files live there).
fn slab_kb() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read meminfo");
    meminfo
        .lines()
        .find_map(|line| {
            line.strip_prefix("Slab:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("Slab in /proc/meminfo")
}

/// Pages the kernel holds for TCP socket buffers (/proc/net/sockstat "TCP: ... mem N").
fn tcp_buffer_pages() -> u64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").expect("read sockstat");
    let line = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .expect("TCP line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let at = fields.iter().position(|f| *f == "mem").expect("mem field");
    fields[at + 1].parse().expect("mem pages")
}

fn connect_from(source: Ipv4Addr, server: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::V4(SocketAddrV4::new(source, 0)).into())
        .expect("bind source address");
    socket.connect(&server.into()).expect("connect");
    let mut stream: TcpStream = socket.into();
    stream.set_nodelay(true).expect("nodelay");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(HANDSHAKE).expect("send handshake");
    // The 101 is about 130 bytes and nothing follows it until we send something.
    let mut response = Vec::with_capacity(256);
    let mut buf = [0u8; 256];
    while !response.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).expect("read handshake");
        assert!(n > 0, "closed during handshake");
        response.extend_from_slice(&buf[..n]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101 "), "handshake refused");
    stream
}

fn masked_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&KEY);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    frame
}

/// Sends one message and reads its echo, skipping any server pings that arrived meanwhile.
fn echoes(stream: &mut TcpStream, payload: &[u8]) -> bool {
    if stream.write_all(&masked_text(payload)).is_err() {
        return false;
    }
    loop {
        let mut head = [0u8; 2];
        if stream.read_exact(&mut head).is_err() {
            return false;
        }
        let mut body = vec![0u8; (head[1] & 0x7f) as usize];
        if stream.read_exact(&mut body).is_err() {
            return false;
        }
        match head[0] {
            0x89 => continue,
            0x81 => return body == payload,
            _ => return false,
        }
    }
}

fn kib(bytes: f64) -> String {
    format!("{:.2} KiB", bytes / 1024.0)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and this is no test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("idle_connections: skipped (run with `cargo bench --bench idle_connections`)");
        return;
    }
    let connections: usize = std::env::var("IDLE_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CONNECTIONS);
    let binary = echo_binary();
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let echo = Echo(
        Command::new(&binary)
            .args(["--listen", &server.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start echo server"),
    );
    let pid = echo.0.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(server).is_err() {
        assert!(Instant::now() < deadline, "echo server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // That probe connection was accepted and closed; let the server reap it.
    std::thread::sleep(Duration::from_millis(200));

    let rss_start = status_kb(pid, "VmRSS:");
    let slab_start = slab_kb();
    let tcp_pages_start = tcp_buffer_pages();
    let started = Instant::now();
    let checkpoint = connections / 10;
    let mut rss_checkpoint = rss_start;
    let mut clients = Vec::with_capacity(connections);
    for i in 0..connections {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE_ADDRESS) as u8);
        clients.push(connect_from(source, server));
        if i + 1 == checkpoint {
            rss_checkpoint = status_kb(pid, "VmRSS:");
        }
    }
    let open_time = started.elapsed();
    let rss_open = status_kb(pid, "VmRSS:");
    let rss_hwm = status_kb(pid, "VmHWM:");
    let slab_open = slab_kb();
    let tcp_pages_open = tcp_buffer_pages();

    // Every connection still answers.
    let verify_started = Instant::now();
    let mut echoed = 0;
    for (i, stream) in clients.iter_mut().enumerate() {
        if echoes(stream, format!("still here {i}").as_bytes()) {
            echoed += 1;
        }
    }
    let verify_time = verify_started.elapsed();
    let rss_after_echo = status_kb(pid, "VmRSS:");
    drop(clients);
    drop(echo);

    let n = connections as f64;
    let per_conn = (rss_open.saturating_sub(rss_start) * 1024) as f64 / n;
    let later = (connections - checkpoint) as f64;
    let slope = (rss_open.saturating_sub(rss_checkpoint) * 1024) as f64 / later;
    // Both ends of every connection are on this machine: halve the kernel's growth.
    let slab_per_socket = (slab_open.saturating_sub(slab_start) * 1024) as f64 / (2.0 * n);
    println!("idle WebSocket connections to the release echo example: {connections}");
    println!(
        "  opened and upgraded in {open_time:.2?}; {PER_SOURCE_ADDRESS} per source address from 127.0.0.2"
    );
    println!("  echo server VmRSS: start {rss_start} kB, at {checkpoint} conns {rss_checkpoint} kB, at {connections} conns {rss_open} kB (VmHWM {rss_hwm} kB)");
    println!("  user-space memory per idle connection: {} (whole run), {} (slope from {checkpoint} to {connections})", kib(per_conn), kib(slope));
    println!("  after one echo on every connection: VmRSS {rss_after_echo} kB; {echoed}/{connections} echoed in {verify_time:.2?}");
    println!("  kernel (both ends of each connection, for context): Slab +{} kB (~{} per socket), TCP buffer pages {tcp_pages_start} -> {tcp_pages_open}", slab_open.saturating_sub(slab_start), kib(slab_per_socket));
    println!(
        "  sizes: Connection {} B, Decoder {} B, SendQueue {} B",
        std::mem::size_of::<stocksync::net::connection::Connection>(),
        std::mem::size_of::<stocksync::ws::Decoder>(),
        std::mem::size_of::<stocksync::net::send_queue::SendQueue>(),
    );
    assert_eq!(echoed, connections, "some connections stopped echoing");
}
