//! Shared helpers for integration tests: start the real `stocksync` binary (or the echo
//! service in-process) on a free port, and connect real clients to it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stocksync::app::echo::Echo;
use stocksync::app::Protocol;
use stocksync::config::Limits;
use stocksync::net::EventLoop;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::WebSocket;

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// The write token every test server is started with.
pub const TOKEN: &str = "test-write-token";

/// A port nobody listens on right now, and never handed out before in this process.
///
/// The server binds with SO_REUSEPORT, so two test servers given the same port both start and
/// the kernel splits connections between them (tests then see each other's SKUs). Parallel
/// tests calling `bind(0)` and dropping the listener at once do get the same port back, hence
/// the record of ports already given out.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Reads the server's `stocksync: listening on ADDR` line from its stdout, then keeps
/// draining stdout on a thread so the server never blocks on a full pipe.
pub fn read_listen_addr(child: &mut Child) -> SocketAddr {
    use std::io::BufRead;
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { return };
            if let Some(addr) = line.strip_prefix("stocksync: listening on ") {
                let _ = tx.send(addr.trim().parse::<SocketAddr>().expect("address"));
                break;
            }
        }
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(_) => {
            let status = child.try_wait().ok().flatten();
            panic!("stocksync did not report its address (exit status: {status:?})");
        }
    }
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            Instant::now() < deadline,
            "server did not start listening on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `stocksync` process, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts the binary with `--listen` on a free port, `--write-token TOKEN`, no data dir
    /// (unless `args` gives one) and `args`.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, true)
    }

    /// Like `start`, with a fresh temporary data dir.
    pub fn start_durable(args: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut all: Vec<String> = vec!["--data-dir".into(), dir.path().to_str().unwrap().into()];
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        let mut server = Self::start_with(&refs, false);
        server.data_dir = Some(dir);
        server
    }

    fn start_with(args: &[&str], memory_only: bool) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stocksync"));
        // Port 0: the kernel picks a free port and the server prints it, so concurrent tests
        // can never race for one (SO_REUSEPORT would otherwise let two servers share it).
        command
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--write-token")
            .arg(TOKEN);
        if memory_only && !args.contains(&"--data-dir") {
            command.arg("--data-dir").arg("none");
        }
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if std::env::var("STOCKSYNC_TEST_LOG").is_ok() {
            command.stderr(Stdio::inherit()).env("RUST_LOG", "debug");
        }
        let mut child = command.spawn().expect("start stocksync");
        let addr = read_listen_addr(&mut child);
        wait_listening(addr);
        Server {
            child,
            addr,
            data_dir: None,
        }
    }

    /// Starts the binary on an existing data dir (a restart after a crash reuses it).
    pub fn start_on_dir(dir: &std::path::Path, extra: &[&str]) -> Server {
        let mut args = vec!["--data-dir", dir.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start_with(&args, false)
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A WebSocket client at `path` (e.g. "/ws", "/ws?token=..").
    pub fn ws(&self, path: &str) -> Ws {
        let (ws, _) = tungstenite::connect(self.url(path)).expect("websocket connect");
        set_timeout(&ws, Duration::from_secs(10));
        ws
    }

    /// A client with write rights.
    pub fn writer(&self) -> Ws {
        self.ws(&format!("/ws?token={TOKEN}"))
    }

    pub fn data_path(&self) -> PathBuf {
        self.data_dir
            .as_ref()
            .expect("durable server")
            .path()
            .to_path_buf()
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and own; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn set_timeout(ws: &Ws, timeout: Duration) {
    if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
        stream.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Sends a JSON text message.
pub fn send(ws: &mut Ws, value: serde_json::Value) {
    ws.send(tungstenite::Message::text(value.to_string()))
        .expect("send");
}

/// Receives the next text message as JSON, skipping pings/pongs.
pub fn recv(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(text) => return serde_json::from_str(&text).expect("json"),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Sends `value` and returns the reply.
pub fn request(ws: &mut Ws, value: serde_json::Value) -> serde_json::Value {
    send(ws, value);
    recv(ws)
}

/// Starts the echo service in-process on a free port with `limits`; the loop runs on its own
/// thread until the test process ends.
pub fn start_echo(limits: Limits) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let l2 = limits.clone();
        let event_loop = EventLoop::bind("127.0.0.1:0".parse().unwrap(), limits, |_| {
            Protocol::new(Echo, &l2)
        })
        .expect("bind echo");
        tx.send(event_loop.local_addr()).unwrap();
        let _ = event_loop.run();
    });
    rx.recv().unwrap()
}

/// Raw socket helpers for malformed input.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads until the peer closes (or the timeout) and returns everything read.
pub fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => return out,
        }
    }
}

/// Performs a raw WebSocket handshake on `stream` at `path`; returns bytes read past the 101.
pub fn raw_handshake(stream: &mut TcpStream, path: &str) -> Vec<u8> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed during handshake");
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(
                got.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            return got[end + 4..].to_vec();
        }
    }
}

/// A masked client frame.
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}
