//! Start-up: lock the data dir, load the newest snapshot, replay the log after it, open the
//! log for writing.
//!
//! - A torn tail of the last segment (a crash mid-write) is cut off with a warning.
//! - Anything else wrong (a bad record followed by valid ones, a bad snapshot, missing
//!   records, a sequence that jumps) refuses to start with the file and byte offset: running
//!   on would silently drop acknowledged changes.
//! - Idempotency keys come back from the snapshot and the records; keys past their TTL are
//!   dropped. Versions go on from the recovered states.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::warn;

use super::lock::{DirLock, LockError};
use super::reader::{self, ScanEnd};
use super::record::{decode_record, encoded_key, put_key, record_key};
use super::snapshot::KeyShadow;
use super::writer::{open_segment, parse_segment_name, segment_file_name, DiskLog, OpenSegments};
use super::{snapshot, HoldRecord, KeyRecord, LogOptions, LoggedHold, WalError};
use crate::stock::holds::{hold_id_is_valid, HoldState, Holds};
use crate::stock::idempotency::key_is_valid;
use crate::stock::{Fingerprint, IdempotencyCache, Stock, Store};

/// What recovery found, for the start-up log line and for benchmarks.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub snapshot: Option<PathBuf>,
    pub snapshot_states: u64,
    pub snapshot_keys: u64,
    pub segments: usize,
    pub log_bytes: u64,
    pub records_replayed: u64,
    pub records_skipped: u64,
    /// (file, offset, bytes cut) of a torn tail.
    pub torn_tail: Option<(PathBuf, u64, u64)>,
    pub keys_dropped: u64,
    pub next_seq: u64,
    pub elapsed: Duration,
}

/// Recovered state and the open log.
pub struct Recovered {
    pub store: Store,
    pub keys: IdempotencyCache,
    /// Holds as logged: some may be past their deadline (the engine expires them at start).
    pub holds: Holds,
    pub log: DiskLog,
    pub report: RecoveryReport,
}

/// Opens `dir` (creating it if needed): see the module docs.
pub fn open(
    dir: &Path,
    options: LogOptions,
    keys: IdempotencyCache,
    now_secs: u64,
) -> Result<Recovered, WalError> {
    open_with_holds(dir, options, keys, Holds::default(), now_secs)
}

/// [`open`], restoring holds into `holds` (empty, with the configured limits).
pub fn open_with_holds(
    dir: &Path,
    options: LogOptions,
    keys: IdempotencyCache,
    holds: Holds,
    now_secs: u64,
) -> Result<Recovered, WalError> {
    let started = Instant::now();
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| WalError::io(dir, e))?;
        if options.sync {
            // The new directory's own entry must survive a power loss too.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                super::sync_dir(parent).map_err(|e| WalError::io(parent, e))?;
            }
        }
    }
    let lock = DirLock::acquire(dir).map_err(|e| match e {
        LockError::Held { holder } => WalError::Locked {
            dir: dir.to_path_buf(),
            holder,
        },
        LockError::Io(error) => WalError::io(&dir.join(super::lock::LOCK_FILE), error),
    })?;
    let (store, keys, holds, shadow, segments, mut report) =
        load(dir, options, keys, holds, now_secs)?;
    let log = DiskLog::start(segments, options, shadow, lock).map_err(|e| WalError::io(dir, e))?;
    report.elapsed = started.elapsed();
    Ok(Recovered {
        store,
        keys,
        holds,
        log,
        report,
    })
}

/// Restores state into a store and key cache as records and snapshots hand it over.
struct Restorer {
    store: Store,
    keys: IdempotencyCache,
    holds: Holds,
    now_secs: u64,
    keys_dropped: u64,
}

impl Restorer {
    fn state(&mut self, name: &str, stock: Stock) -> Result<(), String> {
        if !stock.is_valid() || !stock.is_known() {
            return Err(format!("SKU {name} has an impossible state {stock:?}"));
        }
        self.store
            .restore(name, stock)
            .map(|_| ())
            .map_err(|_| format!("invalid SKU name {name:?}"))
    }

    /// Sets a hold to its logged state. Its SKUs must be known by now (the record or snapshot
    /// that holds them carries their states first).
    fn hold(&mut self, hold: HoldRecord) -> Result<(), String> {
        if !hold_id_is_valid(&hold.hold) {
            return Err(format!("invalid hold id {:?}", hold.hold));
        }
        let state = match hold.state {
            LoggedHold::Gone => HoldState::Gone,
            LoggedHold::Expired { at_ms } => HoldState::Expired { at_ms },
            LoggedHold::Live { deadline_ms, lines } => {
                let mut bound = Vec::with_capacity(lines.len());
                for (name, units) in lines {
                    let sku = self.store.lookup(&name).filter(|_| units > 0);
                    let sku = sku.ok_or_else(|| {
                        format!("hold {} holds {units} of unknown SKU {name:?}", hold.hold)
                    })?;
                    bound.push((sku, units));
                }
                HoldState::Live {
                    lines: bound,
                    deadline_ms,
                }
            }
        };
        self.holds.set(&hold.hold, state);
        Ok(())
    }

    fn key(&mut self, key: KeyRecord) -> Result<(), String> {
        if !key_is_valid(&key.key) {
            return Err(format!("invalid idempotency key {:?}", key.key));
        }
        if key.created_secs.saturating_add(self.keys.ttl_secs()) < self.now_secs {
            // Expired before we got here: nobody may rely on it any more.
            self.keys_dropped += 1;
            return Ok(());
        }
        let mut result = Vec::with_capacity(key.result.len());
        for (name, stock) in &key.result {
            let sku = self
                .store
                .intern(name)
                .map_err(|_| format!("invalid SKU name {name:?} in key {}", key.key))?;
            result.push((sku, *stock));
        }
        let inserted = self.keys.insert(
            &key.key,
            Fingerprint(key.fingerprint),
            result,
            key.created_secs,
        );
        if inserted.is_err() {
            // Only if keys_max was lowered since these keys were written.
            self.keys_dropped += 1;
        }
        Ok(())
    }
}

type Loaded = (
    Store,
    IdempotencyCache,
    Holds,
    KeyShadow,
    OpenSegments,
    RecoveryReport,
);

fn load(
    dir: &Path,
    options: LogOptions,
    keys: IdempotencyCache,
    holds: Holds,
    now_secs: u64,
) -> Result<Loaded, WalError> {
    let mut snapshots = Vec::new();
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| WalError::io(dir, e))? {
        let entry = entry.map_err(|e| WalError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(from) = snapshot::parse_file_name(name) {
            snapshots.push(from);
        } else if let Some(start) = parse_segment_name(name) {
            segments.push(start);
        } else if name.ends_with(".snap.tmp") {
            // A snapshot that never finished; the log still holds everything it had.
            let _ = fs::remove_file(entry.path());
        }
    }
    snapshots.sort_unstable();
    segments.sort_unstable();
    let mut report = RecoveryReport::default();
    let mut restorer = Restorer {
        store: Store::new(),
        keys,
        holds,
        now_secs,
        keys_dropped: 0,
    };
    // The snapshot thread's copy of the live keys (see `snapshot::KeyShadow`).
    let mut shadow = KeyShadow::new(restorer.keys.ttl_secs());
    let live = |created_secs: u64, ttl_secs: u64| created_secs.saturating_add(ttl_secs) >= now_secs;
    let mut replay_from = 1;
    if let Some(&newest) = snapshots.last() {
        let path = dir.join(snapshot::file_name(newest));
        let bytes = fs::read(&path).map_err(|e| WalError::io(&path, e))?;
        // Room for the snapshot's SKUs up front, so the name index never rehashes while loading.
        restorer
            .store
            .reserve(snapshot::states_total(&bytes).unwrap_or(0));
        let mut failure: Option<String> = None;
        let mut states = 0u64;
        let mut keys = Vec::new();
        let mut holds = Vec::new();
        let read = snapshot::read_with_holds(
            &bytes,
            |name, stock| {
                states += 1;
                if failure.is_none() {
                    failure = restorer.state(&name, stock).err();
                }
            },
            |key| keys.push(key),
            |hold| holds.push(hold),
        );
        let from = read.map_err(|error| WalError::CorruptSnapshot {
            path: path.clone(),
            error,
        })?;
        report.snapshot_keys = keys.len() as u64;
        for hold in holds {
            if failure.is_none() {
                failure = restorer.hold(hold).err();
            }
        }
        let mut encoded = Vec::new();
        for key in keys {
            if live(key.created_secs, restorer.keys.ttl_secs()) {
                encoded.clear();
                put_key(&mut encoded, &key);
                if let Ok(key) = encoded_key(&encoded) {
                    shadow.insert(key);
                }
            }
            if failure.is_none() {
                failure = restorer.key(key).err();
            }
        }
        if let Some(reason) = failure {
            return Err(WalError::CorruptRecord {
                path,
                offset: 0,
                reason,
            });
        }
        replay_from = from;
        report.snapshot = Some(path);
        report.snapshot_states = states;
    }
    // Replay: every record from `replay_from` on, gapless and in order.
    let mut next_seq = replay_from;
    let mut current_end = 0u64;
    for (index, &start) in segments.iter().enumerate() {
        let path = dir.join(segment_file_name(start));
        let bytes = fs::read(&path).map_err(|e| WalError::io(&path, e))?;
        report.log_bytes += bytes.len() as u64;
        let last_segment = index + 1 == segments.len();
        let mut expected_in_segment = start;
        let scanned = reader::scan(&bytes, start.saturating_sub(1), |offset, body| {
            let corrupt = |reason: String| WalError::CorruptRecord {
                path: path.clone(),
                offset,
                reason,
            };
            let seq = super::record::record_seq(body).unwrap_or(0);
            if seq != expected_in_segment {
                return Err(corrupt(format!(
                    "record has sequence number {seq}, expected {expected_in_segment}"
                )));
            }
            expected_in_segment += 1;
            if seq < replay_from {
                report.records_skipped += 1;
                return Ok(seq);
            }
            if seq > next_seq {
                return Err(WalError::MissingRecords {
                    path: path.clone(),
                    from: next_seq,
                    to: seq - 1,
                });
            }
            if seq < next_seq {
                return Err(corrupt(format!("sequence number {seq} repeats")));
            }
            let (_, record) = decode_record(body).map_err(|e| corrupt(e.to_string()))?;
            if let Ok(Some(key)) = record_key(body) {
                if live(key.created_secs, restorer.keys.ttl_secs()) {
                    shadow.insert(key);
                }
            }
            for (name, stock) in &record.states {
                restorer.state(name, *stock).map_err(corrupt)?;
            }
            if let Some(key) = record.key {
                restorer.key(key).map_err(corrupt)?;
            }
            for hold in record.holds {
                restorer.hold(hold).map_err(corrupt)?;
            }
            report.records_replayed += 1;
            next_seq = seq + 1;
            Ok(seq)
        });
        let end = match scanned {
            Ok(ScanEnd::Clean) => bytes.len() as u64,
            Ok(ScanEnd::TornTail { offset, anomaly }) if last_segment => {
                let cut = bytes.len() as u64 - offset;
                warn!(
                    "log {}: torn tail at byte offset {offset} ({anomaly}); cutting {cut} \
                     bytes (a write interrupted by a crash, never acknowledged)",
                    path.display()
                );
                truncate(&path, offset, options.sync)?;
                report.torn_tail = Some((path.clone(), offset, cut));
                report.log_bytes -= cut;
                offset
            }
            Ok(ScanEnd::TornTail { offset, anomaly }) => {
                return Err(WalError::CorruptRecord {
                    path,
                    offset,
                    reason: format!("{anomaly}, and later log segments exist"),
                });
            }
            Err(Ok(error)) => return Err(error),
            Err(Err(corrupt)) => {
                return Err(WalError::CorruptRecord {
                    path,
                    offset: corrupt.offset,
                    reason: format!(
                        "{}, followed by a valid record at byte offset {}",
                        corrupt.anomaly, corrupt.valid_at
                    ),
                });
            }
        };
        if last_segment {
            current_end = end;
            // Where this segment's records end: its next append must be `next_seq`.
            if expected_in_segment != next_seq {
                current_end = u64::MAX;
            }
        }
    }
    restorer.keys.expire(now_secs);
    restorer.holds.prune_markers(now_secs.saturating_mul(1000));
    if let Err(reason) = restorer.holds.check(&restorer.store) {
        return Err(WalError::CorruptRecord {
            path: dir.to_path_buf(),
            offset: 0,
            reason: format!("holds and stock disagree after replay: {reason}"),
        });
    }
    report.keys_dropped = restorer.keys_dropped;
    report.segments = segments.len();
    report.next_seq = next_seq;
    // Go on in the last segment if the next record follows its last one; otherwise (no
    // segment yet, or the snapshot is ahead of the log) start a segment at `next_seq`.
    let current_start = match segments.last() {
        Some(&start) if current_end != u64::MAX => start,
        Some(&start) if start >= next_seq => {
            return Err(WalError::MissingRecords {
                path: dir.join(segment_file_name(start)),
                from: next_seq,
                to: start - 1,
            });
        }
        _ => {
            segments.push(next_seq);
            next_seq
        }
    };
    let (current, current_len) =
        open_segment(dir, current_start, options.sync).map_err(|e| WalError::io(dir, e))?;
    let open = OpenSegments {
        dir: dir.to_path_buf(),
        segments,
        current,
        current_len,
        next_seq,
        log_bytes: report.log_bytes,
    };
    Ok((
        restorer.store,
        restorer.keys,
        restorer.holds,
        shadow,
        open,
        report,
    ))
}

fn truncate(path: &Path, offset: u64, sync: bool) -> Result<(), WalError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| WalError::io(path, e))?;
    file.set_len(offset).map_err(|e| WalError::io(path, e))?;
    if sync {
        file.sync_all().map_err(|e| WalError::io(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{Log, Record, SnapshotPart};

    fn options(snapshot_log_bytes: u64) -> LogOptions {
        LogOptions {
            sync: true,
            snapshot_log_bytes,
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn cache() -> IdempotencyCache {
        IdempotencyCache::new(100, 86_400)
    }

    fn stock(version: u64) -> Stock {
        Stock {
            on_hand: version * 10,
            reserved: version,
            version,
        }
    }

    fn record(sku: &str, version: u64, key: Option<&str>) -> Record {
        let states = vec![(sku.to_string(), stock(version))];
        Record {
            holds: Vec::new(),
            key: key.map(|key| KeyRecord {
                key: key.to_string(),
                fingerprint: version,
                result: states.clone(),
                created_secs: now(),
            }),
            states,
        }
    }

    /// Submits and polls, as the event loop does every iteration (there is no loop here to
    /// wake), until `seq` is durable.
    fn wait_durable(log: &mut DiskLog, seq: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            log.submit();
            if log.poll().durable_through >= seq {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "record {seq} never became durable"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn records_survive_a_reopen_and_sequence_numbers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), options(u64::MAX), cache(), now())
            .unwrap()
            .log;
        for version in 1..=5 {
            let seq = log
                .append(record("a", version, Some(&format!("k{version}"))))
                .unwrap();
            assert_eq!(seq, version);
            if version % 2 == 0 {
                log.submit();
            }
        }
        log.submit();
        wait_durable(&mut log, 5);
        drop(log);
        let recovered = open(dir.path(), options(u64::MAX), cache(), now()).unwrap();
        let sku = recovered.store.lookup("a").unwrap();
        assert_eq!(recovered.store.get(sku), stock(5));
        assert_eq!(recovered.keys.len(), 5);
        assert_eq!(recovered.report.records_replayed, 5);
        let mut log = recovered.log;
        assert_eq!(log.append(record("a", 6, None)).unwrap(), 6);
    }

    #[test]
    fn expired_keys_are_dropped_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), options(u64::MAX), cache(), now())
            .unwrap()
            .log;
        log.append(record("a", 1, Some("old"))).unwrap();
        log.submit();
        wait_durable(&mut log, 1);
        drop(log);
        let recovered = open(dir.path(), options(u64::MAX), cache(), now() + 86_401).unwrap();
        assert_eq!(recovered.keys.len(), 0);
        assert_eq!(recovered.report.keys_dropped, 1);
    }

    #[test]
    fn a_snapshot_drops_the_log_it_covers_and_replays_to_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), options(1), cache(), now()).unwrap().log;
        for version in 1..=3 {
            log.append(record("a", version, Some(&format!("k{version}"))))
                .unwrap();
        }
        log.submit();
        wait_durable(&mut log, 3);
        // The log passed its threshold: the next submit (nothing pending) opens a snapshot
        // from record 4, and it is collectable at once since 1..=3 are durable.
        log.submit();
        log.poll();
        let cursor = log.snapshot_request().expect("a snapshot is open");
        assert_eq!(cursor.next_slot, 0);
        // Records appended while it is collected land after its starting point.
        log.append(record("b", 1, None)).unwrap();
        log.submit();
        let mut part = SnapshotPart::new();
        part.state("a", stock(3));
        part.next_slot = Some(1);
        log.snapshot_part(part);
        // The last part; the keys of records 1..=3 come from the log itself.
        log.snapshot_part(SnapshotPart::new());
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.stats().snapshots_total == 0 {
            log.poll();
            assert!(Instant::now() < deadline, "snapshot never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
        wait_durable(&mut log, 4);
        drop(log);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.contains(&snapshot::file_name(4)), "{names:?}");
        assert!(names.contains(&segment_file_name(4)), "{names:?}");
        assert!(
            !names.contains(&segment_file_name(1)),
            "covered segment kept: {names:?}"
        );
        let recovered = open(dir.path(), options(u64::MAX), cache(), now()).unwrap();
        let get = |name| recovered.store.get(recovered.store.lookup(name).unwrap());
        assert_eq!((get("a"), get("b")), (stock(3), stock(1)));
        assert_eq!(recovered.keys.len(), 3);
        assert_eq!(recovered.report.records_replayed, 1);
    }

    #[test]
    fn a_log_that_starts_after_the_snapshot_point_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        crate::wal::record::encode_record(&mut bytes, 5, &record("a", 1, None)).unwrap();
        fs::write(dir.path().join(segment_file_name(5)), bytes).unwrap();
        match open(dir.path(), options(u64::MAX), cache(), now()) {
            Err(WalError::MissingRecords { from: 1, to: 4, .. }) => {}
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("opened a log with records 1..=4 missing"),
        }
    }
}
