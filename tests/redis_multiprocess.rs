//! Several processes on ONE port (SO_REUSEPORT) with one Redis serve one inventory
//! (PROTOCOL.md "Several processes, one inventory"): subscribers land on every process (which
//! one is read from the kernel, /proc, as tests/reuseport.rs does), a reserve storm spread over
//! all of them never oversells, and every subscriber sees every version of its SKUs in order.
//! Then `--workers N`: the binary supervises its own worker processes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::watch::{alive, children_of, ws_server_pid, Watcher};
use common::*;
use serde_json::{json, Value};

const PROCESSES: usize = 3;
/// Subscribers wanted on each process.
const SUBSCRIBERS_PER_PROCESS: usize = 3;
/// Connections tried before giving up on the kernel spreading them (a fair hash misses one of 3
/// processes in 200 tries with probability 3 * (2/3)^200).
const CONNECT_TRIES_MAX: usize = 200;

const HOT: &str = "storm-a";
const HOT_UNITS: u64 = 300;
const WARM: &str = "storm-b";
const WARM_UNITS: u64 = 100;
const WRITERS: usize = 40;
/// Per writer: three of every four reserves go to HOT, one to WARM: 600 on HOT, 200 on WARM.
const RESERVES_PER_WRITER: usize = 20;

/// Slack for a change to reach every process on a loaded 2-core machine.
const FEED: Duration = Duration::from_secs(10);

fn ws_at(port: u16, path: &str) -> Ws {
    let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}{path}")).expect("connect");
    set_timeout(&ws, Duration::from_secs(10));
    ws
}

/// A connection to the shared port and the pid of the process that accepted it.
fn connect_somewhere(port: u16, path: &str, pids: &[u32]) -> (Ws, u32) {
    let ws = ws_at(port, path);
    // The handshake completed, so the server end has been accepted; allow a moment anyway.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = ws_server_pid(&ws, port, pids) {
            return (ws, pid);
        }
        assert!(
            Instant::now() < deadline,
            "no process among {pids:?} holds the connection"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn get_at(port: u16, sku: &str) -> Value {
    let reply = request(&mut ws_at(port, "/ws"), json!({"type":"get","skus":[sku]}));
    reply["stock"][0].clone()
}

#[test]
fn three_processes_on_one_port_never_oversell_and_every_subscriber_sees_every_version() {
    let redis = RedisServer::start();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let servers: Vec<Server> = (0..PROCESSES)
        .map(|_| Server::start_redis_on(&listen, &redis.url(), &[]))
        .collect();
    let pids: Vec<u32> = servers.iter().map(Server::pid).collect();
    println!("processes on port {port}: {pids:?}");

    // Subscribers until every process has its share, each labelled with where it landed.
    let mut watchers = Vec::new();
    let mut per_process: BTreeMap<u32, usize> = pids.iter().map(|p| (*p, 0)).collect();
    for _ in 0..CONNECT_TRIES_MAX {
        if per_process.values().all(|n| *n >= SUBSCRIBERS_PER_PROCESS) {
            break;
        }
        let (ws, pid) = connect_somewhere(port, "/ws", &pids);
        let count = per_process.get_mut(&pid).unwrap();
        if *count < SUBSCRIBERS_PER_PROCESS {
            *count += 1;
            let label = format!("subscriber {} on pid {pid}", watchers.len());
            println!("{label}");
            watchers.push(Watcher::subscribe(label, ws, &[HOT, WARM]));
        }
    }
    assert!(
        per_process.values().all(|n| *n >= SUBSCRIBERS_PER_PROCESS),
        "the kernel did not spread subscribers over every process: {per_process:?}"
    );

    let (mut setter, setter_pid) = connect_somewhere(port, &format!("/ws?token={TOKEN}"), &pids);
    for (sku, units) in [(HOT, HOT_UNITS), (WARM, WARM_UNITS)] {
        let ack = request(
            &mut setter,
            json!({"type":"stock_update","stock":stock_op(sku, "set", units)}),
        );
        assert_eq!(ack["stock"]["version"], 1, "{ack}");
    }
    println!("stock set through pid {setter_pid}");

    // The storm: writers connected first (spread by the kernel too), then all at once, each
    // pipelining its reserves.
    let start = Arc::new(Barrier::new(WRITERS));
    let mut writers_per_process: BTreeMap<u32, usize> = BTreeMap::new();
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (mut ws, pid) = connect_somewhere(port, &format!("/ws?token={TOKEN}"), &pids);
            *writers_per_process.entry(pid).or_default() += 1;
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                for i in 0..RESERVES_PER_WRITER {
                    let sku = if i % 4 == 3 { WARM } else { HOT };
                    send(
                        &mut ws,
                        json!({"type":"stock_update","id":format!("{w}-{i}"),
                               "stock":stock_op(sku, "reserve", 1)}),
                    );
                }
                (0..RESERVES_PER_WRITER)
                    .map(|i| {
                        let reply = recv(&mut ws);
                        assert_eq!(reply["id"], format!("{w}-{i}"), "replies in order");
                        reply
                    })
                    .collect::<Vec<Value>>()
            })
        })
        .collect();
    println!("writers per process: {writers_per_process:?}");
    assert_eq!(
        writers_per_process.len(),
        PROCESSES,
        "the storm must reach every process: {writers_per_process:?}"
    );
    let replies: Vec<Value> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("writer thread"))
        .collect();

    let mut acked: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut refused = 0;
    for reply in &replies {
        match reply["type"].as_str() {
            Some("ack") => {
                let stock = &reply["stock"];
                let version = stock["version"].as_u64().unwrap();
                // The nth reserve applied leaves reserved = n at version n + 1.
                assert_eq!(stock["reserved"].as_u64(), Some(version - 1), "{reply}");
                let sku = stock["id"].as_str().unwrap().to_string();
                assert!(
                    acked.entry(sku).or_default().insert(version),
                    "version acked twice: {reply}"
                );
            }
            Some("error") => {
                assert_eq!(reply["code"], "insufficient_stock", "{reply}");
                refused += 1;
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    let hot: Vec<u64> = acked[HOT].iter().copied().collect();
    let warm: Vec<u64> = acked[WARM].iter().copied().collect();
    assert_eq!(
        hot,
        (2..=HOT_UNITS + 1).collect::<Vec<_>>(),
        "exactly {HOT_UNITS} acks on {HOT}"
    );
    assert_eq!(
        warm,
        (2..=WARM_UNITS + 1).collect::<Vec<_>>(),
        "exactly {WARM_UNITS} acks on {WARM}"
    );
    assert_eq!(
        refused,
        WRITERS * RESERVES_PER_WRITER - (HOT_UNITS + WARM_UNITS) as usize
    );

    // Every process reads the final state.
    for server in &servers {
        let deadline = Instant::now() + FEED;
        loop {
            let mut reader = server.ws("/ws");
            let reply = request(&mut reader, json!({"type":"get","skus":[HOT, WARM]}));
            let versions = (
                reply["stock"][0]["version"].as_u64(),
                reply["stock"][1]["version"].as_u64(),
            );
            if versions == (Some(HOT_UNITS + 1), Some(WARM_UNITS + 1)) {
                assert_eq!(reply["stock"][0]["quantity"], 0, "{reply}");
                assert_eq!(reply["stock"][0]["reserved"], HOT_UNITS, "{reply}");
                assert_eq!(reply["stock"][1]["reserved"], WARM_UNITS, "{reply}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "pid {} still reads {reply}",
                server.pid()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Every subscriber, on every process, saw every version in order, none missing.
    for watcher in &watchers {
        assert!(
            watcher.wait_version(HOT, HOT_UNITS + 1, FEED)
                && watcher.wait_version(WARM, WARM_UNITS + 1, FEED),
            "{} stopped at {HOT} v{}, {WARM} v{}",
            watcher.label,
            watcher.version(HOT),
            watcher.version(WARM)
        );
    }
    for watcher in watchers {
        let label = watcher.label.clone();
        let seen = watcher.finish();
        seen.check_states();
        assert!(seen.closed.is_none(), "{label}: {:?}", seen.closed);
        assert!(seen.other.is_empty(), "{label}: {:?}", seen.other);
        assert_eq!(
            seen.versions(HOT),
            (1..=HOT_UNITS + 1).collect::<Vec<_>>(),
            "{label}: every version of {HOT}, once, in order"
        );
        assert_eq!(
            seen.versions(WARM),
            (1..=WARM_UNITS + 1).collect::<Vec<_>>(),
            "{label}: every version of {WARM}, once, in order"
        );
    }
    assert_eq!(get_at(port, HOT)["version"], HOT_UNITS + 1);
}

// ---- --workers N ------------------------------------------------------------------------------

/// A `stocksync --workers N` supervisor; on drop, it and every worker it has are killed.
struct Supervisor {
    child: Child,
    port: u16,
    /// One message per `stocksync: listening on` line any of its processes printed.
    listening: Receiver<String>,
}

impl Supervisor {
    fn start(workers: &str, redis_url: &str) -> Supervisor {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_stocksync"));
        command
            .args(["--workers", workers])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", redis_url, "--data-dir", "none"])
            .args(["--write-token", TOKEN])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if std::env::var("STOCKSYNC_TEST_LOG").is_ok() {
            command.stderr(Stdio::inherit());
        }
        let mut child = command.spawn().expect("start stocksync --workers");
        let stdout = child.stdout.take().unwrap();
        let (tx, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(addr) = line.strip_prefix("stocksync: listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        Supervisor {
            child,
            port,
            listening,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn workers(&self) -> Vec<u32> {
        children_of(self.pid())
    }

    /// Waits for `n` more `listening on` lines.
    fn wait_listening_lines(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            let addr = self.listening.recv_timeout(left).unwrap_or_else(|_| {
                panic!("only {i} of {n} `stocksync: listening on` lines within {timeout:?}")
            });
            assert_eq!(addr, format!("127.0.0.1:{}", self.port));
        }
    }

    /// `/healthz` on a new connection: (status, pid, engine).
    fn healthz(&self) -> Option<(u16, u64, String)> {
        let url = format!("http://127.0.0.1:{}/healthz", self.port);
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(5))
            .build();
        let response = match agent.get(&url).set("Connection", "close").call() {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(_) => return None,
        };
        let status = response.status();
        let body: Value = response.into_json().ok()?;
        Some((
            status,
            body["pid"].as_u64()?,
            body["engine"].as_str()?.to_string(),
        ))
    }

    /// Distinct pids answering `/healthz` on new connections, until `want` of them answered
    /// (or the timeout).
    fn answering_pids(&self, want: &BTreeSet<u32>, timeout: Duration) -> BTreeSet<u32> {
        let deadline = Instant::now() + timeout;
        let mut seen = BTreeSet::new();
        while !want.is_subset(&seen) && Instant::now() < deadline {
            if let Some((status, pid, engine)) = self.healthz() {
                assert_eq!((status, engine.as_str()), (200, "redis"), "pid {pid}");
                seen.insert(pid as u32);
            } else {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        seen
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped; no memory involved.
        unsafe {
            libc::kill(self.pid() as i32, signal);
        }
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "supervisor still running {timeout:?} after the signal; workers {:?}",
                self.workers()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for worker in self.workers() {
            kill(worker, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a pid of a process this test started (directly or via the supervisor).
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// Waits until `f` holds; false on timeout.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_serve_one_port_a_dead_worker_is_replaced_and_sigterm_stops_them_all() {
    let redis = RedisServer::start();
    let mut supervisor = Supervisor::start("3", &redis.url());
    supervisor.wait_listening_lines(3, Duration::from_secs(30));
    assert!(
        eventually(Duration::from_secs(10), || supervisor.workers().len() == 3),
        "workers: {:?}",
        supervisor.workers()
    );
    let workers: BTreeSet<u32> = supervisor.workers().into_iter().collect();
    assert!(!workers.contains(&supervisor.pid()));
    let answering = supervisor.answering_pids(&workers, Duration::from_secs(20));
    assert_eq!(
        answering, workers,
        "every worker serves, and only workers answer"
    );
    println!("supervisor {}, workers {workers:?}", supervisor.pid());

    // They share one inventory: a write through one connection is read through all of them.
    let (mut writer, _) = tungstenite::connect(format!(
        "ws://127.0.0.1:{}/ws?token={TOKEN}",
        supervisor.port
    ))
    .unwrap();
    let ack = request(
        &mut writer,
        json!({"type":"stock_update","stock":stock_op("w-1","set",9)}),
    );
    assert_eq!(ack["stock"]["version"], 1, "{ack}");
    let pids: Vec<u32> = workers.iter().copied().collect();
    let mut read_on: BTreeSet<u32> = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while read_on.len() < pids.len() {
        assert!(Instant::now() < deadline, "read only on {read_on:?}");
        let (mut reader, pid) = connect_somewhere(supervisor.port, "/ws", &pids);
        let state = &request(&mut reader, json!({"type":"get","skus":["w-1"]}))["stock"][0];
        if state["version"] == 1 {
            assert_eq!(state["quantity"], 9, "{state}");
            read_on.insert(pid);
        }
    }

    // A worker that dies is replaced, and the new one serves.
    let victim = *workers.iter().next().unwrap();
    kill(victim, libc::SIGKILL);
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || !alive(victim)),
        "killed worker {victim} still there"
    );
    assert!(
        eventually(Duration::from_secs(15), || {
            let now = supervisor.workers();
            now.len() == 3 && !now.contains(&victim)
        }),
        "no replacement for {victim}: workers now {:?}",
        supervisor.workers()
    );
    supervisor.wait_listening_lines(1, Duration::from_secs(15));
    let replaced: BTreeSet<u32> = supervisor.workers().into_iter().collect();
    let fresh: BTreeSet<u32> = replaced.difference(&workers).copied().collect();
    assert_eq!(fresh.len(), 1, "before {workers:?}, after {replaced:?}");
    let answering = supervisor.answering_pids(&fresh, Duration::from_secs(20));
    assert!(
        fresh.is_subset(&answering),
        "the replacement {fresh:?} never answered (saw {answering:?})"
    );
    println!(
        "worker {victim} replaced by {fresh:?}, serving {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        answering.is_subset(&replaced),
        "{answering:?} vs {replaced:?}"
    );

    // SIGTERM: every worker stops, then the supervisor exits 0.
    supervisor.signal(libc::SIGTERM);
    let status = supervisor.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "supervisor exit status {status}");
    let left: Vec<u32> = replaced.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "workers still running after the supervisor exited: {left:?}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", supervisor.port)).is_err(),
        "something still listens on the port"
    );
}

#[test]
fn workers_auto_starts_one_per_core_and_sigint_stops_them() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let redis = RedisServer::start();
    let mut supervisor = Supervisor::start("auto", &redis.url());
    supervisor.wait_listening_lines(cores, Duration::from_secs(30));
    assert!(
        eventually(Duration::from_secs(10), || supervisor.workers().len()
            == cores),
        "{cores} cores, workers {:?}",
        supervisor.workers()
    );
    let workers: BTreeSet<u32> = supervisor.workers().into_iter().collect();
    assert_eq!(
        supervisor.answering_pids(&workers, Duration::from_secs(20)),
        workers
    );
    supervisor.signal(libc::SIGINT);
    let status = supervisor.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "supervisor exit status {status}");
    assert!(workers.iter().all(|p| !alive(*p)), "{workers:?}");
}
