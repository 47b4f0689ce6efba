//! Durability: the interface the stock service commits through, and its implementations.
//!
//! The contract (PROTOCOL.md: nothing acknowledged is ever lost):
//! - The service applies a change in memory, then [`Log::append`]s a record of its result and
//!   holds the ack and the broadcast until [`Log::poll`] reports the record durable.
//! - All records appended in one loop iteration form one batch, handed to the disk by
//!   [`Log::submit`] in `before_sleep` (group commit: one write and one fsync per batch).
//!   While a batch is being written, the next iterations' records wait and go out together
//!   as soon as it is done, so `submit` must be called every iteration.
//! - Completions are reported in sequence order. A failed batch fails every later record too
//!   (they were computed on top of it); the service rolls all of them back and refuses them
//!   with `unavailable`, and the log discards them rather than writing them later.
//!
//! [`writer::DiskLog`] is the real log (files in `--data-dir`, recovered by
//! [`recovery::open`]); [`memory::MemoryLog`] keeps nothing. Files in a data dir:
//! `LOCK` (flock, one process), `log-<first seq>.wal` segments of checksummed records
//! ([`record`]), and `snapshot-<replay_from>.snap` ([`snapshot`]).

pub mod lock;
pub mod memory;
pub mod reader;
pub mod record;
pub mod recovery;
pub mod snapshot;
pub mod writer;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::stock::Stock;
pub use snapshot::SnapshotPart;

/// One accepted change: the resulting state of every SKU it changed, and the idempotency key
/// it recorded, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub states: Vec<(String, Stock)>,
    pub key: Option<KeyRecord>,
    /// The state after the change of every hold it changed (PROTOCOL.md "Holds").
    pub holds: Vec<HoldRecord>,
}

impl Record {
    /// A record without holds.
    pub fn new(states: Vec<(String, Stock)>, key: Option<KeyRecord>) -> Record {
        Record {
            states,
            key,
            holds: Vec::new(),
        }
    }
}

/// A hold's state after a change, as logged: SKUs by name, like the states.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldRecord {
    pub hold: String,
    pub state: LoggedHold,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoggedHold {
    Live {
        deadline_ms: u64,
        lines: Vec<(String, u64)>,
    },
    Expired {
        at_ms: u64,
    },
    /// Committed or released: the id is free.
    Gone,
}

/// An idempotency key with the request's fingerprint and the result it answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key: String,
    pub fingerprint: u64,
    pub result: Vec<(String, Stock)>,
    pub created_secs: u64,
}

/// What finished since the last poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// Every record with a sequence number up to this one is durable.
    pub durable_through: u64,
    /// Records from this sequence number on failed and were discarded.
    pub failed_from: Option<u64>,
}

/// The log refuses writes (its disk failed recently); retry later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable(pub String);

/// Figures for /healthz and /metrics.
#[derive(Clone, Debug, Default)]
pub struct LogStats {
    pub records_total: u64,
    pub batches_total: u64,
    pub bytes_total: u64,
    pub fsyncs_total: u64,
    pub failures_total: u64,
    pub snapshots_total: u64,
    pub log_bytes: u64,
}

pub trait Log {
    /// Adds a record to this iteration's batch; returns its sequence number (strictly
    /// increasing). Nothing is appended on error.
    fn append(&mut self, record: Record) -> Result<u64, Unavailable>;
    /// Hands this iteration's batch to the disk.
    fn submit(&mut self);
    /// Reports what finished. Cheap; called on every wake-up and before sleeping.
    fn poll(&mut self) -> Completion;
    /// A batch is being written.
    fn in_flight(&self) -> bool;
    /// `None` when writes are accepted, else why not.
    fn refusing(&self) -> Option<String>;
    fn stats(&self) -> LogStats;
    /// Gives the log the loop's waker, for its threads to report completions. Called once,
    /// before the first `submit`.
    fn set_waker(&mut self, _waker: Arc<mio::Waker>) {}
    /// `Some` while the log has a snapshot open and wants the service's states: the service
    /// adds a [`SnapshotPart`] with the *durable* state (what readers see) of known SKUs from
    /// `next_slot` on, a bounded number per loop iteration. The log keeps the idempotency keys
    /// itself ([`snapshot::KeyShadow`]). Why a snapshot collected over several iterations is
    /// still correct: see [`snapshot`].
    fn snapshot_request(&self) -> Option<SnapshotCursor> {
        None
    }
    /// One part of the open snapshot (`part.next_slot == None` for the last, with the keys).
    fn snapshot_part(&mut self, _part: SnapshotPart) {}
}

/// Where the service continues collecting an open snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotCursor {
    pub next_slot: u32,
}

/// How the disk log is run (from `cli::Settings`).
#[derive(Clone, Copy, Debug)]
pub struct LogOptions {
    /// fdatasync every batch (`--fsync always`); false only for benchmarks and throwaway data.
    pub sync: bool,
    /// Log bytes past which a snapshot is taken.
    pub snapshot_log_bytes: u64,
}

/// Why a data dir cannot be opened. Each names the file and, for bad content, the offset.
#[derive(Debug)]
pub enum WalError {
    Io {
        path: PathBuf,
        error: io::Error,
    },
    Locked {
        dir: PathBuf,
        holder: String,
    },
    CorruptRecord {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    CorruptSnapshot {
        path: PathBuf,
        error: snapshot::SnapshotError,
    },
    MissingRecords {
        path: PathBuf,
        from: u64,
        to: u64,
    },
}

impl WalError {
    pub fn io(path: &Path, error: io::Error) -> WalError {
        WalError::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

impl fmt::Display for WalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalError::Io { path, error } => write!(f, "{}: {error}", path.display()),
            WalError::Locked { dir, holder } => write!(
                f,
                "data dir {} is in use by another stocksync process (pid {}); \
                 two processes must never share one data dir",
                dir.display(),
                if holder.is_empty() { "unknown" } else { holder }
            ),
            WalError::CorruptRecord {
                path,
                offset,
                reason,
            } => write!(
                f,
                "corrupt log record in {} at byte offset {offset}: {reason}; refusing to start \
                 rather than drop the records after it (restore the file from a backup, or \
                 truncate it at that offset to accept losing them)",
                path.display()
            ),
            WalError::CorruptSnapshot { path, error } => write!(
                f,
                "corrupt snapshot {}: {error}; refusing to start (restore it from a backup)",
                path.display()
            ),
            WalError::MissingRecords { path, from, to } => write!(
                f,
                "log records {from}..={to} are missing before {}; refusing to start",
                path.display()
            ),
        }
    }
}

impl std::error::Error for WalError {}

/// fsyncs a directory, so the files created, renamed or removed in it survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
