//! Recovery from the data dir, against the real binary: torn tails are cut to a clean prefix,
//! a corrupt record in the middle refuses to start (naming the file and offset), a snapshot
//! plus the log after it gives back the state before the crash, and two processes cannot
//! share a data dir.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SKUS: usize = 12;

fn sku(i: usize) -> String {
    format!("r-{}", i % SKUS)
}

/// The only log segment in `dir`.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    found.sort();
    found
}

/// Where each record of a segment starts, read from the frame headers (u32 LE length, u32
/// CRC, body), plus the file's length.
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        starts.push(at);
        at += 8 + len;
    }
    assert_eq!(at, bytes.len(), "the segment is whole frames");
    starts
}

/// Writes `n` sets, one record each, and returns the ack state of each write, in order.
fn write_sets(server: &Server, n: usize) -> Vec<Value> {
    let mut writer = server.writer();
    (0..n)
        .map(|i| {
            let ack = request(
                &mut writer,
                json!({"type":"stock_update","id":i,"idempotency_key":format!("set-{i}"),
                       "stock":{"id":sku(i),"action":"set","quantity":100 + i}}),
            );
            assert_eq!(ack["type"], "ack", "{ack}");
            ack["stock"].clone()
        })
        .collect()
}

/// Every SKU's state as the server reports it, by name.
fn read_all(server: &Server) -> BTreeMap<String, Value> {
    read_states(server, &(0..SKUS).map(sku).collect::<Vec<_>>())
}

/// What the server must show after the first `k` writes, given their acks.
fn expected_after(acks: &[Value], k: usize) -> BTreeMap<String, Value> {
    let mut state: BTreeMap<String, Value> = (0..SKUS)
        .map(|i| {
            let name = sku(i);
            let never = json!({"id":name,"quantity":0,"on_hand":0,"reserved":0,"version":0});
            (name, never)
        })
        .collect();
    for ack in &acks[..k] {
        state.insert(ack["id"].as_str().unwrap().to_string(), ack.clone());
    }
    state
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "LOCK" {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A fresh copy of `base` and the path of its log segment.
fn copy_of(base: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(base, dir.path());
    let segment = segments(dir.path()).pop().unwrap();
    (dir, segment)
}

/// Writes `bytes` with the bits of `mask` flipped at `at` to `segment`; returns what it wrote.
fn write_flipped(segment: &Path, bytes: &[u8], at: usize, mask: u8) -> Vec<u8> {
    let mut changed = bytes.to_vec();
    changed[at] ^= mask;
    std::fs::write(segment, &changed).unwrap();
    changed
}

/// Runs the binary on `dir` expecting it to refuse to start; returns its stderr.
fn refused_start(dir: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stocksync"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--write-token", TOKEN, "--data-dir", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success(), "the server exited 0");
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            return stderr;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started on a data dir it should refuse");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One data dir with `n` acknowledged sets; the server is killed (SIGKILL) at the end.
fn base_dir(n: usize) -> (tempfile::TempDir, Vec<Value>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on_dir(dir.path(), &[]);
    let acks = write_sets(&server, n);
    drop(server);
    let segment = segments(dir.path()).pop().unwrap();
    let bytes = std::fs::read(segment).unwrap();
    (dir, acks, bytes)
}

#[test]
fn a_log_cut_at_random_offsets_recovers_the_whole_records_before_the_cut() {
    let (base, acks, bytes) = base_dir(30);
    let starts = record_starts(&bytes);
    assert_eq!(starts.len(), acks.len(), "one record per write");
    let mut rng = Rng(0x5eed_0001);
    let mut cuts = vec![0, bytes.len(), bytes.len() - 1, starts[29] + 3];
    cuts.extend((0..6).map(|_| rng.index(bytes.len())));
    for cut in cuts {
        let (dir, segment) = copy_of(base.path());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&segment)
            .unwrap();
        file.set_len(cut as u64).unwrap();
        let whole = starts
            .iter()
            .zip(starts.iter().skip(1).chain(std::iter::once(&bytes.len())))
            .filter(|&(_, &end)| end <= cut)
            .count();
        let server = Server::start_on_dir(dir.path(), &[]);
        assert_eq!(
            read_all(&server),
            expected_after(&acks, whole),
            "cut at {cut}"
        );
        // The torn tail is gone from the file: what is left is exactly the whole records.
        let kept = std::fs::read(&segment).unwrap();
        let expected_len = if whole == acks.len() {
            bytes.len()
        } else {
            starts[whole]
        };
        assert_eq!(kept.len(), expected_len, "cut at {cut}");
        // And writing goes on from there, versions continuing.
        let mut writer = server.writer();
        let ack = request(
            &mut writer,
            json!({"type":"stock_update","stock":{"id":sku(0),"action":"increase","change":1}}),
        );
        let before = expected_after(&acks, whole)[&sku(0)]["version"]
            .as_u64()
            .unwrap();
        assert_eq!(ack["stock"]["version"], before + 1, "cut at {cut}");
    }
}

#[test]
fn a_flipped_byte_in_the_middle_refuses_to_start_and_names_file_and_offset() {
    let (base, _acks, bytes) = base_dir(20);
    let starts = record_starts(&bytes);
    let mut rng = Rng(0x5eed_0002);
    for _ in 0..5 {
        // Any byte of any record but the last.
        let at = rng.index(starts[19]);
        let record_start = *starts.iter().rfind(|&&s| s <= at).unwrap();
        let (dir, segment) = copy_of(base.path());
        let changed = write_flipped(&segment, &bytes, at, 0x20);
        let stderr = refused_start(dir.path());
        let name = segment.file_name().unwrap().to_str().unwrap();
        assert!(stderr.contains(name), "flip at {at}: {stderr}");
        assert!(
            stderr.contains(&format!("byte offset {record_start}:")),
            "flip at {at} (record at {record_start}): {stderr}"
        );
        // Nothing was cut: the operator decides.
        assert_eq!(std::fs::read(&segment).unwrap(), changed);
    }
}

#[test]
fn a_flipped_byte_in_the_last_record_is_a_torn_tail() {
    let (base, acks, bytes) = base_dir(10);
    let starts = record_starts(&bytes);
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..3 {
        let at = starts[9] + rng.index(bytes.len() - starts[9]);
        let (dir, segment) = copy_of(base.path());
        write_flipped(&segment, &bytes, at, 0x01);
        let server = Server::start_on_dir(dir.path(), &[]);
        assert_eq!(read_all(&server), expected_after(&acks, 9), "flip at {at}");
    }
}

#[test]
fn a_snapshot_and_the_log_after_it_replay_to_the_state_before_the_crash() {
    let dir = tempfile::tempdir().unwrap();
    // A tiny snapshot threshold: several snapshots happen while we write.
    let server = Server::start_on_dir(dir.path(), &["--snapshot-log-bytes", "2048"]);
    let mut writer = server.writer();
    let mut keyed = Vec::new();
    for i in 0..300usize {
        let key = format!("snap-{i}");
        let message = if i % 3 == 0 {
            json!({"type":"stock_batch","idempotency_key":key,"ops":[
                {"id":sku(i),"action":"increase","change":2},
                {"id":sku(i + 5),"action":"increase","change":1}]})
        } else {
            json!({"type":"stock_update","idempotency_key":key,
                   "stock":{"id":sku(i),"action":"increase","change":1 + i % 4}})
        };
        let ack = request(&mut writer, message.clone());
        assert_eq!(ack["type"], "ack", "{ack}");
        keyed.push((message, ack));
    }
    // Snapshots ran and dropped the log they cover.
    let deadline = Instant::now() + Duration::from_secs(10);
    let snapshot = loop {
        let snapshots: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "snap"))
            .collect();
        if !snapshots.is_empty() && segments(dir.path()).len() <= 2 {
            break snapshots;
        }
        assert!(Instant::now() < deadline, "no snapshot taken");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(snapshot.len(), 1, "older snapshots are removed");
    let before = read_all(&server);
    drop(writer);
    server.signal(libc::SIGKILL);
    drop(server);
    let server = Server::start_on_dir(dir.path(), &["--snapshot-log-bytes", "2048"]);
    assert_eq!(read_all(&server), before);
    // Keys came back too, from the snapshot (early ones) and from the log (late ones).
    let mut writer = server.writer();
    for index in [0, 1, 150, 299] {
        let (message, ack) = &keyed[index];
        let again = request(&mut writer, message.clone());
        assert_eq!(again["duplicate"], true, "key {index}: {again}");
        assert_eq!(again["stock"], ack["stock"], "key {index}");
    }
    assert_eq!(read_all(&server), before, "duplicates changed nothing");
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on_dir(dir.path(), &[]);
    let stderr = refused_start(dir.path());
    assert!(
        stderr.contains("in use by another stocksync process"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&server.child.id().to_string()),
        "names the holder: {stderr}"
    );
    // The first one is unharmed.
    write_sets(&server, 1);
}
