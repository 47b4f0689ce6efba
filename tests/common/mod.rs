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

pub mod holds;
pub mod redis;
pub mod tls;
pub mod watch;

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

/// A `stocksync` process, killed on drop (before its Redis, if it has one of its own).
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: Option<tempfile::TempDir>,
    /// The Redis this server was given by `start` in Redis mode (`STOCKSYNC_TEST_ENGINE=redis`).
    pub redis: Option<redis::RedisServer>,
}

/// True when `STOCKSYNC_TEST_ENGINE=redis`: memory-only test servers then keep their stock in
/// a Redis of their own, so the protocol suites run against the Redis engine.
pub fn redis_engine() -> bool {
    std::env::var("STOCKSYNC_TEST_ENGINE").is_ok_and(|engine| engine == "redis")
}

impl Server {
    /// Starts the binary with `--listen` on a free port, `--write-token TOKEN`, no data dir
    /// (unless `args` gives one) and `args`. With `STOCKSYNC_TEST_ENGINE=redis` (and no data dir
    /// or `--redis` in `args`), it runs on a fresh `redis-server` of its own instead.
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

    /// The Redis engine on `redis_url`, on a free port, no data dir.
    pub fn start_redis(redis_url: &str, args: &[&str]) -> Server {
        Self::start_redis_on("127.0.0.1:0", redis_url, args)
    }

    /// The Redis engine on `redis_url`, listening on `listen` (a fixed port lets several
    /// processes share it through SO_REUSEPORT).
    pub fn start_redis_on(listen: &str, redis_url: &str, args: &[&str]) -> Server {
        let mut all = vec!["--redis", redis_url, "--data-dir", "none"];
        all.extend_from_slice(args);
        Self::spawn(listen, &all, None)
    }

    fn start_with(args: &[&str], memory_only: bool) -> Server {
        let mut all = args.to_vec();
        let mut redis = None;
        if memory_only && !args.contains(&"--data-dir") {
            all.extend(["--data-dir", "none"]);
            if redis_engine() && !args.contains(&"--redis") {
                redis = Some(redis::RedisServer::start());
            }
        }
        let url = redis.as_ref().map(redis::RedisServer::url);
        if let Some(url) = &url {
            all.extend(["--redis", url.as_str()]);
        }
        // Port 0: the kernel picks a free port and the server prints it, so concurrent tests
        // can never race for one (SO_REUSEPORT would otherwise let two servers share it).
        Self::spawn("127.0.0.1:0", &all, redis)
    }

    fn spawn(listen: &str, args: &[&str], redis: Option<redis::RedisServer>) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_stocksync"));
        command
            .arg("--listen")
            .arg(listen)
            .arg("--write-token")
            .arg(TOKEN)
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
            redis,
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

    /// The process id, as `/healthz` reports it in `pid`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /healthz`: status and JSON body.
    pub fn healthz(&self) -> (u16, serde_json::Value) {
        http_json("GET", &self.http("/healthz"), &[], None)
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

/// A `/ws` client subscribed to `skus`, its `subscribed` reply checked.
pub fn subscribed_client(server: &Server, skus: &[&str]) -> Ws {
    let mut ws = server.ws("/ws");
    let reply = request(&mut ws, serde_json::json!({"type":"subscribe","skus":skus}));
    assert_eq!(reply["type"], "subscribed", "{reply}");
    ws
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

/// Starts the stock server in-process, the way the binary does (`start::run` with
/// `--listen 127.0.0.1:PORT --data-dir none --write-token TOKEN` and `args`), on a thread of
/// its own that first calls `on_thread` (e.g. to have its allocations counted). It runs until
/// the test process ends.
pub fn start_in_process(args: &[&str], on_thread: impl FnOnce() + Send + 'static) -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let listen = addr.to_string();
    let mut all = vec![
        "--listen",
        &listen,
        "--data-dir",
        "none",
        "--write-token",
        TOKEN,
    ];
    all.extend_from_slice(args);
    let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    let settings = stocksync::cli::Settings::parse(&all, |_| None)
        .expect("valid flags")
        .expect("settings, not usage");
    std::thread::spawn(move || {
        on_thread();
        if let Err(e) = stocksync::server::start::run(settings) {
            panic!("server failed: {e}");
        }
    });
    wait_listening(addr);
    addr
}

/// A WebSocket client of the server at `addr`, with a 10 s read timeout.
pub fn ws_at(addr: SocketAddr, path: &str) -> Ws {
    let (ws, _) = tungstenite::connect(format!("ws://{addr}{path}")).expect("websocket connect");
    set_timeout(&ws, Duration::from_secs(10));
    ws
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

/// RFC 6455 §1.3's `Sec-WebSocket-Accept` for the sample key every raw handshake here sends.
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket upgrade request for `path` with RFC 6455 §1.3's sample key.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads an HTTP response head a byte at a time, so nothing after it is consumed.
pub fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "closed before a response"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A raw connection to `addr` upgraded at `path` (101 checked), and the response head; no
/// frame bytes are consumed with the head.
pub fn raw_ws_at(addr: SocketAddr, path: &str) -> (TcpStream, String) {
    let mut stream = raw(addr);
    stream.write_all(upgrade_request(path).as_bytes()).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    (stream, head)
}

/// Performs a raw WebSocket handshake on `stream` at `path`; returns bytes read past the 101.
pub fn raw_handshake(stream: &mut TcpStream, path: &str) -> Vec<u8> {
    stream.write_all(upgrade_request(path).as_bytes()).unwrap();
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

/// WebSocket opcodes (RFC 6455 §5.2).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xa;
}

/// Reads one server frame: `(first byte, payload)`; `None` at EOF or timeout, panics if masked.
pub fn try_read_frame(stream: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).ok()?;
    // RFC 6455 §5.1: "A server MUST NOT mask any frames that it sends to the client."
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).ok()?;
            u16::from_be_bytes(ext) as usize
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).ok()?;
            u64::from_be_bytes(ext) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).ok()?;
    Some((head[0], payload))
}

/// Reads one server frame: `(first byte, payload)`; panics at EOF, timeout or a masked frame.
pub fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    try_read_frame(stream).expect("a server frame before EOF or timeout")
}

/// The value of `series` (name and labels as written) in a `/metrics` scrape, if it is there.
pub fn scrape_metric(server: &Server, series: &str) -> Option<String> {
    let text = ureq::get(&server.http("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
}

/// An HTTP call with `headers`; returns the status (error statuses included) and the body as
/// JSON, or as a JSON string when it is not JSON.
pub fn http_json(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build()
        .request(method, url);
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let result = match body {
        Some(body) => req.send_string(body),
        None => req.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// Every state of `skus` as the server reports them to a `get`, by SKU id.
pub fn read_states(
    server: &Server,
    skus: &[String],
) -> std::collections::BTreeMap<String, serde_json::Value> {
    let mut reader = server.ws("/ws");
    let reply = request(&mut reader, serde_json::json!({"type":"get","skus":skus}));
    assert_eq!(reply["type"], "stock", "{reply}");
    reply["stock"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_str().unwrap().to_string(), s.clone()))
        .collect()
}

/// One stock op: `quantity` for a `set`, `change` for every other action.
pub fn stock_op(sku: &str, action: &str, amount: u64) -> serde_json::Value {
    let field = if action == "set" {
        "quantity"
    } else {
        "change"
    };
    serde_json::json!({"id": sku, "action": action, field: amount})
}

/// A small deterministic xorshift generator, so a failing run can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    /// The next number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// `below` for lengths and indices.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
}

/// Python 3 in the project's virtualenv (`.venv-autobahn` at the repository root) with
/// `packages` importable: created and installed here if missing (`.ci/run` does it up front).
/// Panics with what to install when it cannot be done; a test that needs a real Python client
/// never skips silently.
pub fn python_with(packages: &[&str]) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join(".venv-autobahn");
    let python = venv.join("bin/python");
    let help = "these tests need Python 3 with the venv module (Debian/Ubuntu: \
                `apt-get install -y python3 python3-venv`) and the PyPI packages kosoku and \
                websockets in .venv-autobahn: `python3 -m venv .venv-autobahn && \
                .venv-autobahn/bin/pip install kosoku websockets` (.ci/run does this)";
    // One process at a time: test binaries run in parallel and would race to create it.
    let lock_path = std::env::temp_dir().join("stocksync-venv.lock");
    let lock = std::fs::File::create(&lock_path).expect("venv lock file");
    // SAFETY: flock on a descriptor this function owns for its whole duration; no memory is
    // passed to the kernel.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(locked, 0, "locking {}", lock_path.display());
    let imports = |python: &std::path::Path| {
        let script = packages
            .iter()
            .map(|p| format!("import {p}"))
            .collect::<Vec<_>>()
            .join("; ");
        Command::new(python)
            .args(["-c", &script])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !imports(&python) {
        if !python.exists() {
            let created = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status();
            assert!(
                created.is_ok_and(|s| s.success()),
                "cannot create {}: {help}",
                venv.display()
            );
        }
        let installed = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(packages)
            .status();
        assert!(
            installed.is_ok_and(|s| s.success()) && imports(&python),
            "cannot install {packages:?} into {}: {help}",
            venv.display()
        );
    }
    python
}

/// A figure in kB from /proc/PID/status (`field` as `"VmRSS"`, `"VmHWM"`); panics when the
/// process or the field is missing, so a memory bound can never pass on a zero.
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Resident memory of a process in kB.
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS")
}
