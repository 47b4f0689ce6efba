//! Snapshots: the full state and the live idempotency keys, so the log before them can go.
//!
//! File `snapshot-<replay_from>.snap` is a run of frames (the log's frame format,
//! [`super::record`]); each body starts with a kind byte:
//!
//! ```text
//! HEADER  u64 LE replay_from, u64 LE created_secs
//! STATES  state...            (until the body ends)
//! KEYS    key...              (until the body ends)
//! HOLDS   hold...             (until the body ends; live holds and expired markers)
//! END     varint states_total, varint keys_total
//! ```
//!
//! HOLDS frames came with holds (PROTOCOL.md "Holds"); a snapshot
//! without them is one of the first format and has no holds. Holds are added by the service
//! in the last part, from their durable state, and the same fuzzy-snapshot argument as for
//! the states holds: every record carries the full state after the change of each hold it
//! touches.
//!
//! It is written to `<name>.tmp`, fsynced, renamed into place and the directory fsynced, so a
//! file with the final name is complete; a crash leaves at most a `.tmp` that start-up deletes.
//! Recovery loads the snapshot, then replays every log record with `seq >= replay_from`.
//!
//! The states are collected by the service in chunks over several loop iterations (a fuzzy
//! snapshot), see [`super::Log::snapshot_request`]. Each SKU's state is its *durable* state
//! at some moment after every record below `replay_from` was durable. Replaying the records
//! from `replay_from` on, each carrying full resulting states, then ends every SKU at the state
//! of its last record, or at the snapshot's state if no record from `replay_from` on touched
//! it, which is then exactly its state before `replay_from`. So the mix of moments is harmless.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{SystemTime, UNIX_EPOCH};

use super::record::{begin_frame, end_frame, frame_crc, put_state, put_varint};
use super::record::{record_key, Cursor, DecodeError, EncodedKey};
use super::record::{FRAME_BODY_BYTES_MAX, FRAME_HEADER_BYTES};
use super::KeyRecord;
use crate::stock::Stock;

const KIND_HEADER: u8 = 1;
const KIND_STATES: u8 = 2;
const KIND_KEYS: u8 = 3;
const KIND_END: u8 = 4;
const KIND_HOLDS: u8 = 5;

/// A snapshot frame is closed once its body passes this, so frames stay small to check and
/// a chunk of any size splits by itself.
const FRAME_TARGET_BYTES: usize = 1024 * 1024;
const _: () = assert!(FRAME_TARGET_BYTES * 2 < FRAME_BODY_BYTES_MAX);

/// The file name of the snapshot that replays from `replay_from`.
pub fn file_name(replay_from: u64) -> String {
    format!("snapshot-{replay_from:020}.snap")
}

/// Parses a snapshot file name back into its `replay_from`.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("snapshot-")?.strip_suffix(".snap")?;
    (digits.len() == 20).then_some(())?;
    digits.parse().ok()
}

/// SKU states encoded on the loop thread, ready for the snapshot writer.
#[derive(Debug, Default)]
pub struct SnapshotPart {
    bytes: Vec<u8>,
    open: Option<(usize, u8)>,
    states: u64,
    holds: u64,
    /// `Some(slot)`: more states follow, from this store slot on. `None`: this is the last
    /// part (the snapshot thread adds the keys, see [`KeyShadow`]).
    pub next_slot: Option<u32>,
}

impl SnapshotPart {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&mut self, name: &str, stock: Stock) {
        self.enter(KIND_STATES);
        put_state(&mut self.bytes, name, stock);
        self.states += 1;
    }

    pub fn states(&self) -> u64 {
        self.states
    }

    /// Adds a live hold or an expired marker (in the last part).
    pub fn hold(&mut self, hold: &super::HoldRecord) {
        self.enter(KIND_HOLDS);
        super::record::put_hold(&mut self.bytes, hold);
        self.holds += 1;
    }

    pub fn holds(&self) -> u64 {
        self.holds
    }

    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Opens a frame of `kind` unless one is open with room left.
    fn enter(&mut self, kind: u8) {
        if let Some((start, open_kind)) = self.open {
            if open_kind == kind && self.bytes.len() - start < FRAME_TARGET_BYTES {
                return;
            }
            self.close();
        }
        let start = begin_frame(&mut self.bytes);
        self.bytes.push(kind);
        self.open = Some((start, kind));
    }

    fn close(&mut self) {
        if let Some((start, _)) = self.open.take() {
            end_frame(&mut self.bytes, start).expect("frames close near FRAME_TARGET_BYTES");
        }
    }

    /// The finished frames, with the number of states they hold.
    pub fn into_frames(mut self) -> (Vec<u8>, u64) {
        self.close();
        (self.bytes, self.states)
    }
}

/// What the snapshot writer thread is told, in order.
pub enum SnapshotCommand {
    Begin {
        replay_from: u64,
        created_secs: u64,
    },
    /// State frames from the service.
    Frames(Vec<u8>),
    /// The service is done: add the keys, close, sync and rename.
    Finish {
        states: u64,
    },
    /// A batch of records the log thread just made durable: its keys join [`KeyShadow`].
    Durable(Vec<u8>),
}

/// (insertion order, created_secs, the key as encoded in its record)
type ShadowKey = (u64, u64, Box<[u8]>);

/// The live idempotency keys as the durable log holds them, kept by the snapshot thread.
///
/// Why not take them from the service's cache like the states: walking 1M keys there paused
/// the loop for about 300 ms (a hash lookup per key), and the walk cannot be split across
/// iterations (the cache's order shifts as keys expire). Here the log thread hands over each
/// batch after writing it, and the keys' bytes are copied out as encoded, no decoding.
///
/// Which keys a snapshot gets: the log thread sends a batch here before it reports it
/// durable, and the loop finishes a snapshot only after every record before `replay_from` was
/// reported durable, so every key of a record before `replay_from` is here by `Finish` (some
/// later ones too, which is harmless: their records are durable and replayed anyway). Keys of
/// failed batches never arrive: only written batches are sent.
#[derive(Debug, Default)]
pub struct KeyShadow {
    entries: HashMap<Box<str>, ShadowKey>,
    order_next: u64,
    ttl_secs: u64,
}

impl KeyShadow {
    pub fn new(ttl_secs: u64) -> Self {
        KeyShadow {
            ttl_secs,
            ..KeyShadow::default()
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds (or replaces: a key reused after it expired) one encoded key.
    pub fn insert(&mut self, key: EncodedKey<'_>) {
        let order = self.order_next;
        self.order_next += 1;
        self.entries
            .insert(key.key.into(), (order, key.created_secs, key.bytes.into()));
    }

    /// Adds the keys of a batch of record frames (as written to the log).
    pub fn add_batch(&mut self, frames: &[u8]) {
        let mut at = 0;
        while at + FRAME_HEADER_BYTES <= frames.len() {
            let len_bytes: [u8; 4] = frames[at..at + 4].try_into().expect("4 bytes");
            let body_start = at + FRAME_HEADER_BYTES;
            let body_end = body_start + u32::from_le_bytes(len_bytes) as usize;
            let Some(body) = frames.get(body_start..body_end) else {
                break;
            };
            match record_key(body) {
                Ok(Some(key)) => self.insert(key),
                Ok(None) => {}
                // We encoded these bytes ourselves a moment ago.
                Err(e) => unreachable!("a record we wrote does not decode: {e}"),
            }
            at = body_end;
        }
    }

    /// Drops keys past their TTL at `now_secs`, then encodes the rest as KEYS frames, oldest
    /// first (re-inserting in this order rebuilds the cache as it was). Returns the frames and
    /// how many keys they hold.
    fn frames(&mut self, now_secs: u64) -> (Vec<u8>, u64) {
        let ttl_secs = self.ttl_secs;
        self.entries
            .retain(|_, (_, created, _)| created.saturating_add(ttl_secs) >= now_secs);
        let mut live: Vec<&ShadowKey> = self.entries.values().collect();
        live.sort_unstable_by_key(|(order, _, _)| *order);
        let mut out = Vec::new();
        let mut open: Option<usize> = None;
        for (_, _, bytes) in &live {
            if let Some(start) = open {
                if out.len() - start >= FRAME_TARGET_BYTES {
                    end_frame(&mut out, start).expect("frames close near FRAME_TARGET_BYTES");
                    open = None;
                }
            }
            if open.is_none() {
                open = Some(begin_frame(&mut out));
                out.push(KIND_KEYS);
            }
            out.extend_from_slice(bytes);
        }
        if let Some(start) = open {
            end_frame(&mut out, start).expect("frames close near FRAME_TARGET_BYTES");
        }
        (out, live.len() as u64)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What it reports back.
#[derive(Debug)]
pub enum SnapshotOutcome {
    Done { replay_from: u64, bytes: u64 },
    Failed { replay_from: u64, error: String },
}

/// Writes one snapshot at a time from `commands`; reports through `report` (which also wakes
/// the loop). Runs until the sender is dropped.
pub fn run_writer(
    dir: PathBuf,
    sync: bool,
    mut keys: KeyShadow,
    commands: Receiver<SnapshotCommand>,
    mut report: impl FnMut(SnapshotOutcome),
) {
    // The snapshot being written: its replay_from, tmp path, and file with bytes written
    // (or the error that stopped it, reported at Finish).
    type Current = (u64, PathBuf, io::Result<(File, u64)>);
    let mut current: Option<Current> = None;
    while let Ok(command) = commands.recv() {
        match command {
            SnapshotCommand::Begin {
                replay_from,
                created_secs,
            } => {
                if let Some((_, abandoned, _)) = current.take() {
                    // Abandoned (its log rotation failed); a new one starts over.
                    let _ = fs::remove_file(abandoned);
                }
                let tmp = dir.join(format!("{}.tmp", file_name(replay_from)));
                let file = File::create(&tmp).and_then(|mut file| {
                    let mut header = Vec::new();
                    let start = begin_frame(&mut header);
                    header.push(KIND_HEADER);
                    header.extend_from_slice(&replay_from.to_le_bytes());
                    header.extend_from_slice(&created_secs.to_le_bytes());
                    end_frame(&mut header, start).expect("a header is small");
                    file.write_all(&header)?;
                    Ok((file, header.len() as u64))
                });
                current = Some((replay_from, tmp, file));
            }
            SnapshotCommand::Frames(frames) => {
                if let Some((_, _, Ok((file, written)))) = &mut current {
                    let result = file.write_all(&frames);
                    *written += frames.len() as u64;
                    if let Err(e) = result {
                        current.as_mut().expect("matched Some").2 = Err(e);
                    }
                }
            }
            SnapshotCommand::Durable(frames) => keys.add_batch(&frames),
            SnapshotCommand::Finish { states } => {
                let Some((replay_from, tmp, file)) = current.take() else {
                    continue;
                };
                let (key_frames, key_count) = keys.frames(now_secs());
                let outcome = match file.and_then(|(mut file, written)| {
                    file.write_all(&key_frames)?;
                    let written = written + key_frames.len() as u64;
                    finish(
                        &dir,
                        &tmp,
                        replay_from,
                        file,
                        written,
                        states,
                        key_count,
                        sync,
                    )
                }) {
                    Ok(bytes) => SnapshotOutcome::Done { replay_from, bytes },
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        SnapshotOutcome::Failed {
                            replay_from,
                            error: e.to_string(),
                        }
                    }
                };
                report(outcome);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    dir: &Path,
    tmp: &Path,
    replay_from: u64,
    mut file: File,
    written: u64,
    states: u64,
    keys: u64,
    sync: bool,
) -> io::Result<u64> {
    let mut end = Vec::new();
    let start = begin_frame(&mut end);
    end.push(KIND_END);
    put_varint(&mut end, states);
    put_varint(&mut end, keys);
    end_frame(&mut end, start).expect("an end frame is small");
    file.write_all(&end)?;
    if sync {
        file.sync_all()?;
    }
    drop(file);
    let path = dir.join(file_name(replay_from));
    fs::rename(tmp, &path)?;
    if sync {
        super::sync_dir(dir)?;
    }
    // Older snapshots are covered by this one.
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let older = name
            .to_str()
            .and_then(parse_file_name)
            .is_some_and(|from| from < replay_from);
        if older {
            let _ = fs::remove_file(entry.path());
        }
    }
    Ok(written + end.len() as u64)
}

/// Why a snapshot file cannot be loaded.
#[derive(Debug, PartialEq, Eq)]
pub enum SnapshotError {
    BadFrame { offset: u64, reason: String },
    BadBody { offset: u64, error: DecodeError },
    Incomplete,
    CountMismatch { states: u64, keys: u64 },
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::BadFrame { offset, reason } => {
                write!(f, "bad frame at byte offset {offset}: {reason}")
            }
            SnapshotError::BadBody { offset, error } => {
                write!(
                    f,
                    "bad content in the frame at byte offset {offset}: {error}"
                )
            }
            SnapshotError::Incomplete => write!(f, "the file ends before its end frame"),
            SnapshotError::CountMismatch { states, keys } => write!(
                f,
                "the end frame counts differ from the content ({states} states, {keys} keys read)"
            ),
        }
    }
}

/// Reads a whole snapshot, handing each state and key to the callbacks; returns its
/// `replay_from`. Everything is checked: frame CRCs, content, and the end frame's counts.
pub fn read(
    bytes: &[u8],
    on_state: impl FnMut(String, Stock),
    on_key: impl FnMut(KeyRecord),
) -> Result<u64, SnapshotError> {
    read_with_holds(bytes, on_state, on_key, |_| {})
}

/// Fewest bytes one state takes in a STATES frame: a one-byte name with its length byte and
/// three one-byte varints.
const STATE_BYTES_MIN: usize = 5;

/// How many states the snapshot in `bytes` holds, as its END frame says, for sizing the store
/// before reading it: `None` if there is no END frame to be found. Frames are hopped over by
/// their headers only (no checksums: [`read_with_holds`] checks everything), and the count is
/// capped by what the file could hold, so a damaged count cannot make the caller reserve more
/// than the file's size allows.
pub fn states_total(bytes: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    loop {
        let header = bytes.get(at..at.checked_add(FRAME_HEADER_BYTES)?)?;
        let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
        let body_start = at + FRAME_HEADER_BYTES;
        let body = bytes.get(body_start..body_start.checked_add(len)?)?;
        if body.first() == Some(&KIND_END) {
            let total = Cursor::new(&body[1..]).varint().ok()?;
            let cap = bytes.len() / STATE_BYTES_MIN;
            return Some(usize::try_from(total).map_or(cap, |total| total.min(cap)));
        }
        at = body_start + len;
    }
}

/// [`read`], also handing over each live hold and expired marker. HOLDS frames are checked
/// by their CRC; the END frame keeps the first format's two counts, so it does not count them.
pub fn read_with_holds(
    bytes: &[u8],
    mut on_state: impl FnMut(String, Stock),
    mut on_key: impl FnMut(KeyRecord),
    mut on_hold: impl FnMut(super::HoldRecord),
) -> Result<u64, SnapshotError> {
    let mut at = 0usize;
    let mut replay_from = None;
    let (mut states, mut keys) = (0u64, 0u64);
    while at < bytes.len() {
        let offset = at as u64;
        let bad = |reason: &str| SnapshotError::BadFrame {
            offset,
            reason: reason.to_string(),
        };
        let header = bytes
            .get(at..at + FRAME_HEADER_BYTES)
            .ok_or_else(|| bad("partial header"))?;
        let len_bytes: [u8; 4] = header[0..4].try_into().expect("4 bytes");
        let len = u32::from_le_bytes(len_bytes) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let body_start = at + FRAME_HEADER_BYTES;
        let body = bytes
            .get(body_start..body_start.saturating_add(len))
            .filter(|_| (1..=FRAME_BODY_BYTES_MAX).contains(&len))
            .ok_or_else(|| bad("bad or partial length"))?;
        if frame_crc(len_bytes, body) != crc {
            return Err(bad("checksum mismatch"));
        }
        let body_error = |error| SnapshotError::BadBody { offset, error };
        let mut cursor = Cursor::new(&body[1..]);
        match (body[0], replay_from) {
            (KIND_HEADER, None) => {
                replay_from = Some(cursor.u64_le().map_err(body_error)?);
                cursor.u64_le().map_err(body_error)?;
                cursor.finish().map_err(body_error)?;
            }
            (KIND_STATES, Some(_)) => {
                while !cursor.is_done() {
                    let (name, stock) = cursor.state().map_err(body_error)?;
                    on_state(name, stock);
                    states += 1;
                }
            }
            (KIND_KEYS, Some(_)) => {
                while !cursor.is_done() {
                    on_key(cursor.key().map_err(body_error)?);
                    keys += 1;
                }
            }
            (KIND_HOLDS, Some(_)) => {
                while !cursor.is_done() {
                    on_hold(cursor.hold().map_err(body_error)?);
                }
            }
            (KIND_END, Some(from)) => {
                let states_total = cursor.varint().map_err(body_error)?;
                let keys_total = cursor.varint().map_err(body_error)?;
                cursor.finish().map_err(body_error)?;
                if states_total != states || keys_total != keys {
                    return Err(SnapshotError::CountMismatch { states, keys });
                }
                if body_start + len != bytes.len() {
                    return Err(bad("bytes after the end frame"));
                }
                return Ok(from);
            }
            (kind, _) => return Err(bad(&format!("unexpected frame kind {kind}"))),
        }
        at = body_start + len;
    }
    Err(SnapshotError::Incomplete)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn stock(v: u64) -> Stock {
        Stock {
            on_hand: v * 2,
            reserved: v,
            version: v,
        }
    }

    fn write_snapshot(dir: &Path, replay_from: u64, n: u64) -> Vec<u8> {
        let (tx, rx) = mpsc::channel();
        tx.send(SnapshotCommand::Begin {
            replay_from,
            created_secs: 5,
        })
        .unwrap();
        let mut part = SnapshotPart::new();
        for i in 1..=n {
            part.state(&format!("sku-{i}"), stock(i));
        }
        let (frames, states) = part.into_frames();
        tx.send(SnapshotCommand::Frames(frames)).unwrap();
        // A durable batch with a keyed record (its key goes in) and a keyless one.
        let mut batch = Vec::new();
        let record = |key: Option<KeyRecord>| super::super::Record {
            holds: Vec::new(),
            states: vec![("sku-1".to_string(), stock(1))],
            key,
        };
        let key = KeyRecord {
            key: "k".into(),
            fingerprint: 9,
            result: vec![("sku-1".to_string(), stock(1))],
            created_secs: now_secs(),
        };
        super::super::record::encode_record(&mut batch, 1, &record(Some(key))).unwrap();
        super::super::record::encode_record(&mut batch, 2, &record(None)).unwrap();
        tx.send(SnapshotCommand::Durable(batch)).unwrap();
        tx.send(SnapshotCommand::Finish { states }).unwrap();
        drop(tx);
        let mut outcomes = Vec::new();
        let shadow = KeyShadow::new(86_400);
        run_writer(dir.to_path_buf(), true, shadow, rx, |o| outcomes.push(o));
        assert!(matches!(outcomes[..], [SnapshotOutcome::Done { .. }]));
        fs::read(dir.join(file_name(replay_from))).unwrap()
    }

    #[test]
    fn a_snapshot_round_trips_and_replaces_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        write_snapshot(dir.path(), 3, 10);
        let bytes = write_snapshot(dir.path(), 7, 100_000);
        assert!(!dir.path().join(file_name(3)).exists());
        let mut states = Vec::new();
        let mut keys = Vec::new();
        let from = read(&bytes, |n, s| states.push((n, s)), |k| keys.push(k)).unwrap();
        assert_eq!(from, 7);
        assert_eq!(states.len(), 100_000);
        assert_eq!(states[99_999], ("sku-100000".to_string(), stock(100_000)));
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].result, vec![("sku-1".to_string(), stock(1))]);
    }

    #[test]
    fn states_total_is_read_from_the_end_frame_and_capped_by_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = write_snapshot(dir.path(), 7, 1_000);
        assert_eq!(states_total(&bytes), Some(1_000));
        // No END frame (cut short): no count.
        assert_eq!(states_total(&bytes[..bytes.len() - 1]), None);
        assert_eq!(states_total(&[]), None);
        // A count past what the file could hold is capped by its size.
        let mut end = Vec::new();
        let start = begin_frame(&mut end);
        end.push(KIND_END);
        put_varint(&mut end, u64::MAX);
        put_varint(&mut end, 0);
        end_frame(&mut end, start).unwrap();
        assert_eq!(states_total(&end), Some(end.len() / STATE_BYTES_MIN));
    }

    #[test]
    fn any_cut_or_flip_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = write_snapshot(dir.path(), 1, 20);
        for cut in 0..bytes.len() {
            assert!(read(&bytes[..cut], |_, _| {}, |_| {}).is_err(), "cut {cut}");
        }
        for at in 0..bytes.len() {
            let mut changed = bytes.clone();
            changed[at] ^= 0x10;
            assert!(read(&changed, |_, _| {}, |_| {}).is_err(), "flip {at}");
        }
    }

    #[test]
    fn the_key_shadow_keeps_live_keys_in_insertion_order_and_drops_expired_ones() {
        let mut shadow = KeyShadow::new(100);
        let mut batch = Vec::new();
        for (seq, (key, created_secs)) in [("a", 1_000), ("b", 950), ("c", 1_050), ("a", 1_060)]
            .into_iter()
            .enumerate()
        {
            let record = super::super::Record {
                holds: Vec::new(),
                states: vec![("s".to_string(), stock(1))],
                key: Some(KeyRecord {
                    key: key.into(),
                    fingerprint: seq as u64,
                    result: vec![],
                    created_secs,
                }),
            };
            super::super::record::encode_record(&mut batch, seq as u64 + 1, &record).unwrap();
        }
        shadow.add_batch(&batch);
        assert_eq!(shadow.len(), 3, "a reused key replaces the old one");
        let (frames, count) = shadow.frames(1_055);
        // b (950) expired; c then a (re-inserted last) remain, oldest insertion first.
        assert_eq!(count, 2);
        assert_eq!(shadow.len(), 2);
        let mut keys = Vec::new();
        let mut at = 0;
        while at < frames.len() {
            let len = u32::from_le_bytes(frames[at..at + 4].try_into().unwrap()) as usize;
            let body = &frames[at + 8..at + 8 + len];
            assert_eq!(body[0], KIND_KEYS);
            let mut cursor = Cursor::new(&body[1..]);
            while !cursor.is_done() {
                keys.push(cursor.key().unwrap());
            }
            at += 8 + len;
        }
        let names: Vec<(&str, u64)> = keys
            .iter()
            .map(|k| (k.key.as_str(), k.fingerprint))
            .collect();
        assert_eq!(names, [("c", 2), ("a", 3)]);
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(parse_file_name(&file_name(42)), Some(42));
        assert_eq!(parse_file_name("snapshot-42.snap"), None);
        assert_eq!(parse_file_name(&format!("{}.tmp", file_name(1))), None);
    }
}
