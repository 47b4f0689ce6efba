//! Write-ahead log benchmarks.
//!
//! `cargo bench --bench wal` (criterion):
//! - `record_encode`: one record, single op with an idempotency key, and a batch of 10.
//! - `group_commit`: append N records, submit, wait until durable, through the real
//!   `DiskLog` and its thread, with fdatasync and without: the cost of one batch and how it
//!   is shared by the records in it.
//! - `snapshot_collect`: what collecting a snapshot costs the event loop with 1M SKUs: one
//!   chunk (what one loop iteration pays), the whole store in one go, the old way (a
//!   `Vec<(String, Stock)>` of the whole store), and walking 1M idempotency keys.
//!
//! `STOCKSYNC_WAL_SERVER_BENCH=1 cargo bench --bench wal` instead runs whole-server figures
//! against the real binary on loopback: acknowledged ops/s and ack latency with `--fsync
//! always` and `never`, single ops and batches of 10; recovery time for 1M SKUs (from the
//! log, and from a snapshot) and for a 1 GiB log. Results go to stdout as markdown rows.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use stocksync::stock::{Fingerprint, IdempotencyCache, Stock, Store};
use stocksync::wal::record::{encode_record, put_key_parts};
use stocksync::wal::{recovery, KeyRecord, Log, LogOptions, Record, SnapshotPart};

const CHUNK_SKUS: usize = 65_536;

fn stock(v: u64) -> Stock {
    Stock {
        on_hand: 1000 + v,
        reserved: v % 7,
        version: v + 1,
    }
}

fn single_record(i: u64) -> Record {
    let states = vec![(format!("sku-{}", i % 10_000), stock(i))];
    Record {
        holds: Vec::new(),
        key: Some(KeyRecord {
            key: format!("order-{i}-line-1"),
            fingerprint: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            result: states.clone(),
            created_secs: 1_760_000_000,
        }),
        states,
    }
}

fn batch_record(i: u64) -> Record {
    Record {
        holds: Vec::new(),
        states: (0..10)
            .map(|j| (format!("sku-{}", (i * 10 + j) % 10_000), stock(i + j)))
            .collect(),
        key: None,
    }
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("record_encode");
    let mut out = Vec::with_capacity(4096);
    for (name, record) in [
        ("single_keyed", single_record(7)),
        ("batch_10", batch_record(7)),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                black_box(encode_record(&mut out, 42, black_box(&record)))
            })
        });
    }
    group.finish();
}

fn bench_group_commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("group_commit");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(3));
    for sync in [true, false] {
        for records in [1u64, 10, 100] {
            let dir = tempfile::tempdir().unwrap();
            let options = LogOptions {
                sync,
                snapshot_log_bytes: u64::MAX,
            };
            let keys = IdempotencyCache::new(1000, 86_400);
            let mut log = recovery::open(dir.path(), options, keys, 0).unwrap().log;
            let batch: Vec<Record> = (0..records).map(single_record).collect();
            group.throughput(Throughput::Elements(records));
            let name = if sync { "fdatasync" } else { "no_sync" };
            group.bench_function(BenchmarkId::new(name, records), |b| {
                b.iter(|| {
                    let mut last = 0;
                    for record in &batch {
                        last = log.append(record.clone()).unwrap();
                    }
                    log.submit();
                    // No loop here to wake: poll until the log thread reports.
                    while log.poll().durable_through < last {
                        std::thread::yield_now();
                    }
                })
            });
        }
    }
    group.finish();
}

fn million_skus() -> Store {
    let mut store = Store::new();
    for i in 0..1_000_000u64 {
        store.restore(&format!("sku-{i:07}"), stock(i)).unwrap();
    }
    store
}

fn bench_snapshot_collect(c: &mut Criterion) {
    let store = million_skus();
    let mut group = c.benchmark_group("snapshot_collect_1M_skus");
    group.sample_size(10);
    group.bench_function("one_chunk_65536", |b| {
        b.iter(|| {
            // A chunk from the middle, as `maybe_snapshot` takes it (skip to the cursor).
            let mut part = SnapshotPart::new();
            for (sku, s) in store.known().skip_while(|(sku, _)| sku.0 < 500_000) {
                if part.states() as usize >= CHUNK_SKUS {
                    break;
                }
                part.state(store.name(sku), s);
            }
            black_box(part.into_frames())
        })
    });
    group.bench_function("whole_store_encoded", |b| {
        b.iter(|| {
            let mut part = SnapshotPart::new();
            for (sku, s) in store.known() {
                part.state(store.name(sku), s);
            }
            black_box(part.into_frames())
        })
    });
    let mut keys = IdempotencyCache::new(1_000_000, 86_400);
    for i in 0..1_000_000u64 {
        let sku = store.lookup(&format!("sku-{i:07}")).unwrap();
        let key = format!("order-{i:010}-line-1");
        let result = vec![(sku, store.get(sku))];
        keys.insert(&key, Fingerprint(i), result, 1_760_000_000)
            .unwrap();
    }
    group.bench_function("keys_1M_from_the_cache", |b| {
        b.iter(|| {
            // What a loop-side key walk would cost (why the log keeps its own copy instead).
            let mut out = Vec::new();
            for (key, fingerprint, result, created_secs) in keys.iter() {
                let result = result.iter().map(|&(sku, s)| (store.name(sku), s));
                put_key_parts(&mut out, key, fingerprint.0, created_secs, result);
            }
            black_box(out)
        })
    });
    group.bench_function("whole_store_as_vec_of_strings", |b| {
        b.iter(|| {
            let states: Vec<(String, Stock)> = store
                .known()
                .map(|(sku, s)| (store.name(sku).to_string(), s))
                .collect();
            black_box(states)
        })
    });
    group.finish();
}

// ---------------------------------------------------------------------------------------
// Whole-server figures.

const TOKEN: &str = "wal-bench-token";

struct Proc {
    child: Child,
    addr: SocketAddr,
    /// stderr lines, read by a thread.
    lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the server; returns it and how long until it accepted a connection.
fn start(dir: &Path, extra: &[&str], rust_log: &str) -> (Proc, Duration) {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", &addr.to_string(), "--write-token", TOKEN])
        .args(["--data-dir", dir.to_str().unwrap()])
        .args(extra)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        assert!(child.try_wait().unwrap().is_none(), "server exited");
        std::thread::sleep(Duration::from_millis(2));
    }
    (Proc { child, addr, lines }, started.elapsed())
}

fn stop(mut proc: Proc) {
    // SAFETY: kill(2) on a child we spawned; no memory is involved.
    unsafe {
        libc::kill(proc.child.id() as i32, libc::SIGTERM);
    }
    let _ = proc.child.wait();
}

type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

fn writer(addr: SocketAddr) -> Ws {
    let (ws, _) = tungstenite::connect(format!("ws://{addr}/ws?token={TOKEN}")).unwrap();
    ws
}

fn read_text(ws: &mut Ws) -> String {
    loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(text) => return text.to_string(),
            _ => continue,
        }
    }
}

/// One connection pipelining `in_flight` writes for `duration` after `warmup`; returns the
/// number of acks and their latencies (µs), both counted after the warm-up only.
fn drive(
    addr: SocketAddr,
    conn: usize,
    ops_per_message: usize,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
) -> (u64, Vec<u32>) {
    let mut ws = writer(addr);
    let message = |n: usize| {
        let op = |k: usize| {
            let sku = (conn * 1000 + (n * ops_per_message + k) % 1000) as u64;
            format!(r#"{{"id":"b-{sku}","action":"increase","change":1}}"#)
        };
        if ops_per_message == 1 {
            format!(r#"{{"type":"stock_update","stock":{}}}"#, op(0))
        } else {
            let ops: Vec<String> = (0..ops_per_message).map(op).collect();
            format!(r#"{{"type":"stock_batch","ops":[{}]}}"#, ops.join(","))
        }
    };
    let start = Instant::now();
    let (measure_from, end) = (start + warmup, start + warmup + duration);
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut latencies = Vec::new();
    let mut acks = 0u64;
    let mut n = 0;
    loop {
        let now = Instant::now();
        while now < end && sent.len() < in_flight {
            ws.send(tungstenite::Message::text(message(n))).unwrap();
            sent.push_back(Instant::now());
            n += 1;
        }
        let Some(at) = sent.pop_front() else { break };
        let reply = read_text(&mut ws);
        assert!(reply.contains(r#""type":"ack""#), "{reply}");
        if at >= measure_from {
            acks += 1;
            latencies.push(at.elapsed().as_micros() as u32);
        }
    }
    (acks, latencies)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

fn throughput_figures() {
    const CONNS: usize = 8;
    const IN_FLIGHT: usize = 16;
    let warmup = Duration::from_secs(1);
    let duration = Duration::from_secs(5);
    println!(
        "| fsync | message | ops/s acked | messages/s | p50 ack ms | p99 ack ms | p99.9 ack ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for fsync in ["always", "never"] {
        for ops_per_message in [1usize, 10] {
            let dir = tempfile::tempdir().unwrap();
            let (server, _) = start(dir.path(), &["--fsync", fsync], "warn");
            let addr = server.addr;
            let drivers: Vec<_> = (0..CONNS)
                .map(|conn| {
                    std::thread::spawn(move || {
                        drive(addr, conn, ops_per_message, IN_FLIGHT, warmup, duration)
                    })
                })
                .collect();
            let mut acks = 0;
            let mut latencies = Vec::new();
            for driver in drivers {
                let (a, l) = driver.join().unwrap();
                acks += a;
                latencies.extend(l);
            }
            latencies.sort_unstable();
            let messages_per_sec = acks as f64 / duration.as_secs_f64();
            println!(
                "| {fsync} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                if ops_per_message == 1 {
                    "single op"
                } else {
                    "batch of 10"
                },
                messages_per_sec * ops_per_message as f64,
                messages_per_sec,
                percentile(&latencies, 0.5),
                percentile(&latencies, 0.99),
                percentile(&latencies, 0.999),
            );
            stop(server);
        }
    }
}

/// Waits for a stderr line containing `needle`; returns it.
fn wait_line(proc: &Proc, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match proc.lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(_) => continue,
            Err(_) => panic!("no line with {needle:?}"),
        }
    }
}

fn recovery_figures() {
    const SKUS: usize = 1_000_000;
    const PER_BATCH: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    // Load 1M SKUs: 10,000 batches of 100 sets, pipelined.
    let (server, _) = start(dir.path(), &["--fsync", "never"], "warn");
    let mut ws = writer(server.addr);
    let mut outstanding = 0;
    for b in 0..SKUS / PER_BATCH {
        let ops: Vec<String> = (0..PER_BATCH)
            .map(|k| {
                let sku = b * PER_BATCH + k;
                format!(
                    r#"{{"id":"sku-{sku:07}","action":"set","quantity":{}}}"#,
                    sku % 500
                )
            })
            .collect();
        let text = format!(r#"{{"type":"stock_batch","ops":[{}]}}"#, ops.join(","));
        ws.send(tungstenite::Message::text(text)).unwrap();
        outstanding += 1;
        if outstanding == 64 {
            read_text(&mut ws);
            outstanding -= 1;
        }
    }
    for _ in 0..outstanding {
        read_text(&mut ws);
    }
    drop(ws);
    stop(server);
    let log_bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();

    println!("| recovery | data | to listening | recovery log line |");
    println!("|---|---|---|---|");
    let (server, took) = start(dir.path(), &[], "info");
    let line = wait_line(&server, "recovered", Duration::from_secs(1));
    println!(
        "| 1M SKUs from the log only | 10,000 records, {:.1} MiB | {} ms | {} |",
        log_bytes as f64 / 1048576.0,
        took.as_millis(),
        line.split("] ").nth(1).unwrap_or(&line)
    );
    stop(server);

    // A snapshot of 1M SKUs: a threshold below the log size takes one at once. The debug
    // lines give the loop pause per chunk.
    let (server, _) = start(
        dir.path(),
        &["--snapshot-log-bytes", "1000"],
        "info,stocksync::server::commit=debug",
    );
    let mut pauses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let written = loop {
        let line = server.lines.recv_timeout(Duration::from_secs(120)).unwrap();
        if let Some(us) = line
            .split("collected in ")
            .nth(1)
            .and_then(|rest| rest.trim_end_matches(" us").parse::<u64>().ok())
        {
            pauses.push(us);
        }
        if line.contains(".snap written") {
            break line;
        }
        assert!(Instant::now() < deadline, "no snapshot");
    };
    println!(
        "| (snapshot of 1M SKUs taken) | {} parts; loop pause per part: max {:.1} ms, total {:.1} ms | | {} |",
        pauses.len(),
        *pauses.iter().max().unwrap_or(&0) as f64 / 1000.0,
        pauses.iter().sum::<u64>() as f64 / 1000.0,
        written.split("] ").nth(1).unwrap_or(&written)
    );
    stop(server);
    let (server, took) = start(dir.path(), &[], "info");
    let line = wait_line(&server, "recovered", Duration::from_secs(1));
    println!(
        "| 1M SKUs from a snapshot | snapshot + empty log | {} ms | {} |",
        took.as_millis(),
        line.split("] ").nth(1).unwrap_or(&line)
    );
    stop(server);

    // A 1 GiB log, written directly with the log's own encoder: records of 10 states each
    // over 1M SKUs (what batches of 10 leave behind), no snapshot.
    let big = tempfile::tempdir().unwrap();
    let path = big
        .path()
        .join(stocksync::wal::writer::segment_file_name(1));
    let mut bytes = Vec::with_capacity(1 << 30);
    let mut seq = 1u64;
    while bytes.len() < 1 << 30 {
        let states = (0..10u64)
            .map(|j| {
                let sku = (seq * 10 + j) % SKUS as u64;
                (format!("sku-{sku:07}"), stock(seq))
            })
            .collect();
        encode_record(&mut bytes, seq, &Record::new(states, None)).unwrap();
        seq += 1;
    }
    std::fs::write(&path, &bytes).unwrap();
    drop(bytes);
    let (server, took) = start(big.path(), &[], "info");
    let line = wait_line(&server, "recovered", Duration::from_secs(1));
    println!(
        "| 1 GiB log, no snapshot | {} records of 10 states | {} ms | {} |",
        seq - 1,
        took.as_millis(),
        line.split("] ").nth(1).unwrap_or(&line)
    );
    stop(server);
}

fn main() {
    if std::env::var_os("STOCKSYNC_WAL_SERVER_BENCH").is_some() {
        throughput_figures();
        recovery_figures();
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_encode(&mut criterion);
    bench_group_commit(&mut criterion);
    bench_snapshot_collect(&mut criterion);
    criterion.final_summary();
}
