//! A real `redis-server` for tests: its own process on a free port, in its own temporary
//! directory, killed on drop; and a tiny blocking RESP2 client to drive and inspect it.
//!
//! There is no skip: without `redis-server` the tests fail and say how to install it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::free_port;

/// What the Redis tests need installed.
const NOT_FOUND: &str = "redis-server not found: install it (apt-get install redis-server)";

/// How long a starting (or AOF-loading) server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A reply, as RESP2 sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<Value>),
}

impl Value {
    /// The text of a simple or bulk string (lossy), the number of an integer; panics otherwise.
    pub fn text(&self) -> String {
        match self {
            Value::Simple(s) => s.clone(),
            Value::Bulk(b) => String::from_utf8_lossy(b).into_owned(),
            Value::Int(n) => n.to_string(),
            other => panic!("not a string reply: {other:?}"),
        }
    }

    pub fn int(&self) -> i64 {
        match self {
            Value::Int(n) => *n,
            Value::Bulk(_) | Value::Simple(_) => self.text().parse().expect("a number"),
            other => panic!("not an integer reply: {other:?}"),
        }
    }

    pub fn array(&self) -> &[Value] {
        match self {
            Value::Array(items) => items,
            other => panic!("not an array reply: {other:?}"),
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Value::Error(_))
    }
}

/// A blocking RESP2 connection.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> std::io::Result<Client> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one command and reads its reply.
    pub fn cmd(&mut self, args: &[&str]) -> std::io::Result<Value> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            out.extend_from_slice(arg.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out)?;
        self.read_value()
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line
            .strip_suffix("\r\n")
            .ok_or_else(|| std::io::Error::other(format!("bad RESP line {line:?}")))?;
        Ok(line.to_string())
    }

    fn read_value(&mut self) -> std::io::Result<Value> {
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(1);
        let number = || -> std::io::Result<i64> {
            rest.parse()
                .map_err(|_| std::io::Error::other(format!("bad RESP number {line:?}")))
        };
        Ok(match kind {
            "+" => Value::Simple(rest.to_string()),
            "-" => Value::Error(rest.to_string()),
            ":" => Value::Int(number()?),
            "$" => match number()? {
                -1 => Value::Nil,
                n => {
                    let mut data = vec![0u8; n as usize + 2];
                    self.reader.read_exact(&mut data)?;
                    data.truncate(n as usize);
                    Value::Bulk(data)
                }
            },
            "*" => match number()? {
                -1 => Value::Nil,
                n => {
                    let mut items = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        items.push(self.read_value()?);
                    }
                    Value::Array(items)
                }
            },
            _ => return Err(std::io::Error::other(format!("bad RESP reply {line:?}"))),
        })
    }
}

/// A `redis-server` process of our own, killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// Working directory: the AOF (when persistent) and `redis.log` live here.
    pub dir: tempfile::TempDir,
    pub persistent: bool,
}

impl RedisServer {
    /// Without persistence (`--save ''`, no AOF): a restart starts empty.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// With `--appendonly yes --appendfsync always`: a restart (even after SIGKILL) keeps
    /// every write Redis acknowledged.
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            persistent,
        };
        server.spawn();
        server
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        // The port may be briefly unavailable right after a kill (or taken by some socket in
        // between): try again for a while before giving up.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.spawn_once();
            self.child = Some(child);
            match self.wait_ready(deadline) {
                Ok(()) => return,
                Err(why) => {
                    let _ = self.kill_child();
                    assert!(
                        Instant::now() < deadline,
                        "redis-server on port {} did not start: {why}\n{}",
                        self.port,
                        self.log_tail()
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn spawn_once(&self) -> Child {
        let log = self.dir.path().join("redis.log");
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--dir", self.dir.path().to_str().expect("utf-8 path")])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(["--logfile", log.to_str().expect("utf-8 path")]);
        if self.persistent {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NOT_FOUND}"),
            Err(e) => panic!("starting redis-server: {e}"),
        }
    }

    /// Until PING answers PONG (not LOADING), or the process exits, or the deadline.
    fn wait_ready(&mut self, deadline: Instant) -> Result<(), String> {
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("spawned")
                .try_wait()
                .expect("try_wait")
            {
                return Err(format!("exited with {status}"));
            }
            if let Ok(mut client) = Client::connect(self.port) {
                if let Ok(Value::Simple(pong)) = client.cmd(&["PING"]) {
                    if pong == "PONG" {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("PING never answered".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_child(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }

    /// SIGKILL: no shutdown, no final save (what an AOF with `appendfsync always` must survive).
    pub fn kill(&mut self) {
        assert!(self.kill_child().is_some(), "redis-server was not running");
    }

    /// SIGTERM, and waits until it has exited.
    pub fn stop(&mut self) {
        let child = self.child.as_mut().expect("redis-server running");
        // SAFETY: kill(2) on a pid we spawned and have not reaped yet; no memory involved.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.kill_child();
    }

    /// Starts it again on the same port and in the same directory (killing it first if it is
    /// still running); returns once it answers PING.
    pub fn restart(&mut self) {
        let _ = self.kill_child();
        self.spawn();
    }

    /// A new connection to it.
    pub fn client(&self) -> Client {
        Client::connect(self.port).expect("connect to redis-server")
    }

    /// Runs one command on a fresh connection; panics on an I/O failure (an error reply is a
    /// `Value::Error`).
    pub fn cmd(&self, args: &[&str]) -> Value {
        self.client()
            .cmd(args)
            .unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// Every key matching `pattern` (SCAN, so a big keyspace does not block the server).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut client = self.client();
        let mut cursor = "0".to_string();
        let mut keys = Vec::new();
        loop {
            let reply = client
                .cmd(&["SCAN", &cursor, "MATCH", pattern, "COUNT", "1000"])
                .expect("SCAN");
            let parts = reply.array();
            cursor = parts[0].text();
            keys.extend(parts[1].array().iter().map(Value::text));
            if cursor == "0" {
                keys.sort();
                keys.dedup();
                return keys;
            }
        }
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.kill_child();
    }
}

/// A TCP proxy in front of a Redis that can make pub/sub connections go silent: still open,
/// still accepting what the client sends, but delivering nothing back (a link that stopped
/// delivering while publishes succeed, centrifugo#1189). Connections that sent a SUBSCRIBE
/// are pub/sub connections; only those open at the moment of `silence_pubsub` are silenced, so
/// a reconnect gets a working link.
pub struct SilencingProxy {
    pub port: u16,
    links: Arc<Mutex<Vec<ProxyLink>>>,
}

struct ProxyLink {
    pubsub: Arc<AtomicBool>,
    silenced: Arc<AtomicBool>,
}

impl SilencingProxy {
    pub fn start(redis_port: u16) -> SilencingProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let links: Arc<Mutex<Vec<ProxyLink>>> = Arc::default();
        let accepted = Arc::clone(&links);
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", redis_port)) else {
                    continue;
                };
                let link = ProxyLink {
                    pubsub: Arc::default(),
                    silenced: Arc::default(),
                };
                let (pubsub, silenced) = (Arc::clone(&link.pubsub), Arc::clone(&link.silenced));
                accepted.lock().unwrap().push(link);
                let (client_in, upstream_out) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || pump(client_in, upstream_out, Some(&pubsub), None));
                std::thread::spawn(move || pump(upstream, client, None, Some(&silenced)));
            }
        });
        SilencingProxy { port, links }
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Silences every pub/sub connection open now; returns how many.
    pub fn silence_pubsub(&self) -> usize {
        let links = self.links.lock().unwrap();
        let mut silenced = 0;
        for link in links.iter().filter(|l| l.pubsub.load(Ordering::SeqCst)) {
            link.silenced.store(true, Ordering::SeqCst);
            silenced += 1;
        }
        silenced
    }
}

/// Copies `from` to `to` until either ends. Marks `pubsub` when a SUBSCRIBE passes; drops the
/// bytes instead of forwarding them once `silenced` is set.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    pubsub: Option<&AtomicBool>,
    silenced: Option<&AtomicBool>,
) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(pubsub) = pubsub {
            let text = String::from_utf8_lossy(&buf[..n]).to_ascii_uppercase();
            if text.contains("SUBSCRIBE") {
                pubsub.store(true, Ordering::SeqCst);
            }
        }
        if silenced.is_some_and(|s| s.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}
