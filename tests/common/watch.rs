//! Helpers for tests with several processes: subscribers that record every update on a thread
//! of their own, requests with a deadline, and which process holds a connection (read from the
//! kernel: /proc/PID/fd and /proc/net/tcp, as tests/reuseport.rs does).

use std::collections::{BTreeMap, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

use super::{send, set_timeout, Ws};

/// How often a watcher thread wakes to check whether it should stop.
const WATCH_TICK: Duration = Duration::from_millis(50);

/// The next text message as JSON, or `None` when nothing came within `timeout`. Panics if the
/// connection ends.
pub fn recv_within(ws: &mut Ws, timeout: Duration) -> Option<Value> {
    set_timeout(ws, timeout);
    let deadline = Instant::now() + timeout;
    let result = loop {
        match ws.read() {
            Ok(Message::Text(text)) => break Some(serde_json::from_str(&text).expect("json")),
            Ok(Message::Ping(_)) | Ok(Message::Pong(_)) => {}
            Ok(other) => panic!("unexpected message {other:?}"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    break None;
                }
            }
            Err(e) => panic!("connection failed: {e}"),
        }
    };
    set_timeout(ws, Duration::from_secs(10));
    result
}

/// Sends `value` and waits at most `timeout` for the reply; returns it with the time it took.
pub fn request_within(ws: &mut Ws, value: Value, timeout: Duration) -> (Option<Value>, Duration) {
    let sent = Instant::now();
    send(ws, value);
    let reply = recv_within(ws, timeout);
    (reply, sent.elapsed())
}

/// Everything one subscriber received.
#[derive(Default)]
pub struct Seen {
    /// States from the `subscribed` reply, by SKU.
    pub snapshot: BTreeMap<String, Value>,
    /// Every `stock_update` state, in arrival order.
    pub updates: Vec<Value>,
    /// Anything else that arrived (a subscriber should get nothing else).
    pub other: Vec<Value>,
    /// How the connection ended, if it did.
    pub closed: Option<String>,
}

impl Seen {
    /// Versions of `sku` in arrival order (updates only).
    pub fn versions(&self, sku: &str) -> Vec<u64> {
        self.updates
            .iter()
            .filter(|s| s["id"] == sku)
            .map(|s| s["version"].as_u64().expect("version"))
            .collect()
    }

    /// The newest state of `sku` this subscriber knows (snapshot or update).
    pub fn last(&self, sku: &str) -> Option<&Value> {
        self.updates
            .iter()
            .rev()
            .find(|s| s["id"] == sku)
            .or_else(|| self.snapshot.get(sku))
    }

    /// Every (sku, earlier version, later version) where a version went back, snapshot
    /// included. Equal versions (a redelivery after a catch-up) are allowed by the contract.
    pub fn regressions(&self) -> Vec<(String, u64, u64)> {
        let mut newest: BTreeMap<String, u64> = self
            .snapshot
            .iter()
            .map(|(sku, s)| (sku.clone(), s["version"].as_u64().unwrap()))
            .collect();
        let mut bad = Vec::new();
        for state in &self.updates {
            let sku = state["id"].as_str().unwrap().to_string();
            let version = state["version"].as_u64().unwrap();
            let before = newest.entry(sku.clone()).or_insert(0);
            if version < *before {
                bad.push((sku, *before, version));
            } else {
                *before = version;
            }
        }
        bad
    }

    /// Every state received must be well formed (PROTOCOL.md "Stock model").
    pub fn check_states(&self) {
        for state in self.snapshot.values().chain(&self.updates) {
            let on_hand = state["on_hand"].as_u64().expect("on_hand");
            let reserved = state["reserved"].as_u64().expect("reserved");
            assert!(reserved <= on_hand, "{state}");
            assert_eq!(
                state["quantity"].as_u64(),
                Some(on_hand - reserved),
                "{state}"
            );
        }
    }
}

/// A subscriber whose connection is read by a thread of its own, recording everything.
pub struct Watcher {
    pub label: String,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Subscribes `ws` to `skus`, checks the reply, and starts recording.
    pub fn subscribe(label: impl Into<String>, mut ws: Ws, skus: &[&str]) -> Watcher {
        let reply = super::request(&mut ws, json!({"type":"subscribe","skus":skus}));
        assert_eq!(reply["type"], "subscribed", "{reply}");
        let mut seen = Seen::default();
        for state in reply["stock"].as_array().expect("stock") {
            seen.snapshot
                .insert(state["id"].as_str().unwrap().to_string(), state.clone());
        }
        let seen = Arc::new(Mutex::new(seen));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            std::thread::spawn(move || watch(ws, &seen, &stop))
        };
        Watcher {
            label: label.into(),
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Runs `f` on what was received so far.
    pub fn with<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&self.seen.lock().unwrap())
    }

    /// The newest version of `sku` received so far (0 if none).
    pub fn version(&self, sku: &str) -> u64 {
        self.with(|s| s.last(sku).map_or(0, |v| v["version"].as_u64().unwrap()))
    }

    /// Waits until `sku` reached `version` (or more); false on timeout.
    pub fn wait_version(&self, sku: &str, version: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.version(sku) >= version {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the thread (the connection is closed) and returns everything received.
    pub fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("watcher thread");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch(mut ws: Ws, seen: &Mutex<Seen>, stop: &AtomicBool) {
    set_timeout(&ws, WATCH_TICK);
    while !stop.load(Ordering::Relaxed) {
        match ws.read() {
            Ok(Message::Text(text)) => {
                let value: Value = serde_json::from_str(&text).expect("json");
                let mut seen = seen.lock().unwrap();
                if value["type"] == "stock_update" {
                    seen.updates.push(value["stock"].clone());
                } else {
                    seen.other.push(value);
                }
            }
            Ok(Message::Close(frame)) => {
                seen.lock().unwrap().closed = Some(format!("close frame {frame:?}"));
                return;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => {
                seen.lock().unwrap().closed = Some(e.to_string());
                return;
            }
        }
    }
    let _ = ws.close(None);
}

// ---- which process holds a connection ---------------------------------------------------------

/// TCP states in /proc/net/tcp.
pub const ESTABLISHED: &str = "01";
pub const LISTEN: &str = "0A";

/// Socket inodes of process `pid`.
pub fn socket_inodes(pid: u32) -> HashSet<u64> {
    let mut inodes = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return inodes;
    };
    for entry in dir.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path()) {
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
            {
                inodes.insert(inode.parse().unwrap());
            }
        }
    }
    inodes
}

/// (state, local port, remote port, inode) of every IPv4 TCP socket.
fn tcp_sockets() -> Vec<(String, u16, u16, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next()?, 16).ok();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some((
                fields[3].to_string(),
                port(fields[1])?,
                port(fields[2])?,
                fields[9].parse().ok()?,
            ))
        })
        .collect()
}

/// How many sockets in `state` with local port `port` process `pid` holds.
pub fn held(pid: u32, port: u16, state: &str) -> usize {
    let mine = socket_inodes(pid);
    tcp_sockets()
        .iter()
        .filter(|(s, local, _, inode)| s == state && *local == port && mine.contains(inode))
        .count()
}

/// Which of `pids` holds the server end of the client connection `stream` (to `server_port`).
pub fn server_pid_of(stream: &TcpStream, server_port: u16, pids: &[u32]) -> Option<u32> {
    let client_port = stream.local_addr().ok()?.port();
    let inode = tcp_sockets()
        .into_iter()
        .find(|(s, local, remote, _)| {
            s == ESTABLISHED && *local == server_port && *remote == client_port
        })?
        .3;
    pids.iter()
        .copied()
        .find(|pid| socket_inodes(*pid).contains(&inode))
}

/// `server_pid_of` for a WebSocket client.
pub fn ws_server_pid(ws: &Ws, server_port: u16, pids: &[u32]) -> Option<u32> {
    match ws.get_ref() {
        MaybeTlsStream::Plain(stream) => server_pid_of(stream, server_port, pids),
        _ => None,
    }
}

/// Live (not zombie) children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[0] != "Z" && fields[1] == parent.to_string() {
            children.push(pid);
        }
    }
    children.sort();
    children
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
