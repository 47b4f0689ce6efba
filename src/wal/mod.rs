//! Durability: the interface the stock service commits through, and its implementations.
//!
//! The contract (PROTOCOL.md: nothing acknowledged is ever lost):
//! - The service applies a change in memory, then [`Log::append`]s a record of its result and
//!   holds the ack and the broadcast until [`Log::poll`] reports the record durable.
//! - All records appended in one loop iteration form one batch, handed to the disk by
//!   [`Log::submit`] in `before_sleep` (group commit: one write and one fsync per batch).
//! - Completions are reported in sequence order. A failed batch fails every later record too
//!   (they were computed on top of it); the service rolls all of them back and refuses them
//!   with `unavailable`, and the log discards them rather than writing them later.

pub mod memory;

use crate::stock::Stock;

/// One accepted change: the resulting state of every SKU it changed, and the idempotency key
/// it recorded, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub states: Vec<(String, Stock)>,
    pub key: Option<KeyRecord>,
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
    /// Whether this log wants a snapshot of the full state now (its files grew).
    fn wants_snapshot(&self) -> bool {
        false
    }
    /// Takes a snapshot of durable state: `states` and live idempotency keys, as of
    /// `through_seq` (every record up to it is included).
    fn snapshot(
        &mut self,
        _through_seq: u64,
        _states: Vec<(String, Stock)>,
        _keys: Vec<KeyRecord>,
    ) {
    }
}
