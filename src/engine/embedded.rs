//! The embedded engine: the in-memory [`Store`] plus the write-ahead log on local disk.
//!
//! Visibility rule ("nothing acknowledged is ever lost", and nobody sees what might be):
//! - A write is applied to the store at once, so later writes are checked against it, and its
//!   record is appended to the log. Its outcome is reported only once the log says the record
//!   is durable.
//! - Reads see only durable state: for a SKU with a change in flight, `overlay` holds its last
//!   durable state.
//! - If the log fails, every change in flight is undone in reverse order and refused with
//!   `unavailable`; nothing of it was ever visible.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::{Engine, EngineStatus, Outcome, Progress, Submitted};
use crate::api::{ApiError, ErrorCode, WriteRequest};
use crate::net::Ctx;
use crate::stock::{IdempotencyCache, Lookup, OpError, SkuId, Stock, Store};
use crate::wal::{KeyRecord, Log, LogStats, Record, SnapshotPart};

/// Known SKUs added to a snapshot per loop iteration (see `maybe_snapshot`).
pub const SNAPSHOT_CHUNK_SKUS: usize = 65_536;

/// A change appended to the log and not yet durable.
struct InFlight {
    seq: u64,
    /// State of each changed SKU before the change (for undo).
    before: Vec<(SkuId, Stock)>,
    results: Vec<(SkuId, Stock)>,
    changed: Vec<(SkuId, Stock)>,
    key: Option<String>,
}

pub struct EmbeddedEngine {
    store: Store,
    keys: IdempotencyCache,
    log: Box<dyn Log>,
    /// Last durable state and latest in-flight sequence of every SKU with a change in flight.
    overlay: HashMap<SkuId, (Stock, u64)>,
    /// Changes waiting for the log, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Outcomes reported done and not yet taken, oldest first.
    done: VecDeque<(u64, Outcome)>,
    /// Highest sequence number appended to the log.
    last_seq: u64,
}

impl EmbeddedEngine {
    pub fn new(store: Store, keys: IdempotencyCache, log: Box<dyn Log>) -> Self {
        EmbeddedEngine {
            store,
            keys,
            log,
            overlay: HashMap::new(),
            in_flight: VecDeque::new(),
            done: VecDeque::new(),
            last_seq: 0,
        }
    }

    pub fn log(&self) -> &dyn Log {
        self.log.as_ref()
    }

    fn unavailable(message: String) -> ApiError {
        ApiError::new(ErrorCode::Unavailable, message)
    }

    /// The log failed every record from `failed_from` on: undo them newest first.
    fn roll_back(&mut self, failed_from: u64) {
        let failed: Vec<InFlight> = self.in_flight.drain(..).collect();
        for change in failed.iter().rev() {
            self.store.undo(&change.before);
            if let Some(key) = &change.key {
                self.keys.remove(key);
            }
        }
        self.overlay.clear();
        // The log reuses the failed sequence numbers: later replies must not wait for ones
        // that will now name other records.
        self.last_seq = self.last_seq.min(failed_from.saturating_sub(1));
        for change in failed {
            let error = Self::unavailable(
                "the change could not be made durable (log write failed); nothing was applied"
                    .into(),
            );
            let release = change.before.iter().map(|&(sku, _)| sku).collect();
            self.done
                .push_back((change.seq, Outcome::Refused { error, release }));
        }
    }

    /// Adds the next part of the snapshot the log has open, if any: the durable state of up
    /// to [`SNAPSHOT_CHUNK_SKUS`] known SKUs per loop iteration, so 1M SKUs pause the loop
    /// for a few milliseconds at a time instead of once for the whole store (the log keeps
    /// the idempotency keys itself). Why a snapshot spread over iterations is still exact
    /// after replay: see `crate::wal::snapshot`.
    fn maybe_snapshot(&mut self) {
        let Some(cursor) = self.log.snapshot_request() else {
            return;
        };
        let started = Instant::now();
        let mut part = SnapshotPart::new();
        let mut next_slot = None;
        let from = self
            .store
            .known()
            .skip_while(|(sku, _)| sku.0 < cursor.next_slot);
        for (sku, _) in from {
            if part.states() as usize >= SNAPSHOT_CHUNK_SKUS {
                next_slot = Some(sku.0);
                break;
            }
            // Durable state only: a change still in flight may yet fail and be undone.
            part.state(self.store.name(sku), self.visible(sku));
        }
        part.next_slot = next_slot;
        log::debug!(
            "snapshot part of {} states ({} bytes) collected in {} us",
            part.states(),
            part.byte_len(),
            started.elapsed().as_micros()
        );
        self.log.snapshot_part(part);
    }

    /// Interns every op's SKU; on an invalid name, the error (at its index in a batch).
    fn bind(&mut self, req: &WriteRequest) -> Result<Vec<crate::stock::Op>, Outcome> {
        let mut ops = Vec::with_capacity(req.ops.len());
        for (index, spec) in req.ops.iter().enumerate() {
            match self.store.intern(&spec.sku) {
                Ok(sku) => ops.push(spec.bind(sku)),
                Err(e) => {
                    let error = ApiError::from_op(&e, &spec.sku).at(req.batch.then_some(index));
                    let release = ops.iter().map(|op: &crate::stock::Op| op.sku).collect();
                    return Err(Outcome::Refused { error, release });
                }
            }
        }
        Ok(ops)
    }
}

impl Engine for EmbeddedEngine {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn skus(&self) -> &Store {
        &self.store
    }

    fn intern(&mut self, name: &str) -> Result<SkuId, OpError> {
        self.store.intern(name)
    }

    fn forget(&mut self, sku: SkuId) {
        if self.store.get(sku).version == 0 {
            self.store.forget(sku);
        }
    }

    fn visible(&self, sku: SkuId) -> Stock {
        match self.overlay.get(&sku) {
            Some(&(durable, _)) => durable,
            None => self.store.get(sku),
        }
    }

    fn submit(&mut self, _cx: &mut Ctx<'_>, req: &WriteRequest, now: u64) -> Submitted {
        let fingerprint = req.fingerprint();
        if let Some(key) = &req.idempotency_key {
            match self.keys.lookup(key, fingerprint, now) {
                Lookup::Hit(result) => {
                    return Submitted::Now(Outcome::Applied {
                        results: result.to_vec(),
                        changed: Vec::new(),
                        duplicate: true,
                    });
                }
                Lookup::Mismatch => {
                    return Submitted::Now(Outcome::refused(ApiError::bad_request(
                        "idempotency key already used for a different request",
                    )));
                }
                Lookup::Miss => {}
            }
            if let Err(full) = self.keys.check_room(key, now) {
                return Submitted::Now(Outcome::refused(Self::unavailable(full.to_string())));
            }
        }
        if let Some(reason) = self.log.refusing() {
            return Submitted::Now(Outcome::refused(Self::unavailable(format!(
                "writes are unavailable: {reason}"
            ))));
        }
        let ops = match self.bind(req) {
            Ok(ops) => ops,
            Err(outcome) => return Submitted::Now(outcome),
        };
        let mut before: Vec<(SkuId, Stock)> = Vec::with_capacity(ops.len());
        for op in &ops {
            if !before.iter().any(|&(sku, _)| sku == op.sku) {
                before.push((op.sku, self.store.get(op.sku)));
            }
        }
        let applied = match self.store.apply(&ops) {
            Ok(applied) => applied,
            Err(batch_error) => {
                let sku_name = self.store.name(ops[batch_error.index].sku).to_string();
                let error = ApiError::from_op(&batch_error.error, &sku_name)
                    .at(req.batch.then_some(batch_error.index));
                let release = ops.iter().map(|op| op.sku).collect();
                return Submitted::Now(Outcome::Refused { error, release });
            }
        };
        let results: Vec<(SkuId, Stock)> = ops
            .iter()
            .zip(&applied.results)
            .map(|(op, &s)| (op.sku, s))
            .collect();
        let key_record = req.idempotency_key.as_ref().map(|key| KeyRecord {
            key: key.clone(),
            fingerprint: fingerprint.0,
            result: results
                .iter()
                .map(|&(sku, s)| (self.store.name(sku).to_string(), s))
                .collect(),
            created_secs: now,
        });
        if let Some(key) = &req.idempotency_key {
            // check_room passed above and nothing ran in between.
            let _ = self.keys.insert(key, fingerprint, results.clone(), now);
        }
        let record = Record {
            states: applied
                .changed
                .iter()
                .map(|&(sku, s)| (self.store.name(sku).to_string(), s))
                .collect(),
            key: key_record,
        };
        let seq = match self.log.append(record) {
            Ok(seq) => seq,
            Err(unavailable) => {
                self.store.undo(&before);
                if let Some(key) = &req.idempotency_key {
                    self.keys.remove(key);
                }
                let error = Self::unavailable(format!("writes are unavailable: {}", unavailable.0));
                let release = ops.iter().map(|op| op.sku).collect();
                return Submitted::Now(Outcome::Refused { error, release });
            }
        };
        self.last_seq = seq;
        for &(sku, durable) in &before {
            self.overlay.entry(sku).or_insert((durable, seq)).1 = seq;
        }
        self.in_flight.push_back(InFlight {
            seq,
            before,
            results,
            changed: applied.changed,
            key: req.idempotency_key.clone(),
        });
        Submitted::Pending(seq)
    }

    fn poll(&mut self, _cx: &mut Ctx<'_>, out: &mut Vec<Progress>) {
        let completion = self.log.poll();
        while let Some(front) = self.in_flight.front() {
            if front.seq > completion.durable_through {
                break;
            }
            let change = self.in_flight.pop_front().expect("front exists");
            for &(sku, after) in &change.changed {
                if let Some(entry) = self.overlay.get_mut(&sku) {
                    if entry.1 == change.seq {
                        self.overlay.remove(&sku);
                    } else {
                        entry.0 = after;
                    }
                }
            }
            self.done.push_back((
                change.seq,
                Outcome::Applied {
                    results: change.results,
                    changed: change.changed,
                    duplicate: false,
                },
            ));
        }
        out.push(Progress::Through(completion.durable_through));
        if let Some(failed_from) = completion.failed_from {
            self.roll_back(failed_from);
            out.push(Progress::All);
        }
    }

    fn take_outcome(&mut self, ticket: u64) -> Option<Outcome> {
        while let Some((front, _)) = self.done.front() {
            if *front > ticket {
                return None;
            }
            let (seq, outcome) = self.done.pop_front().expect("front exists");
            if seq == ticket {
                return Some(outcome);
            }
        }
        None
    }

    fn last_ticket(&self) -> u64 {
        self.last_seq
    }

    fn in_flight(&self) -> bool {
        self.log.in_flight()
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            refusing: self.log.refusing(),
            idempotency_keys: self.keys.len(),
        }
    }

    fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    fn before_sleep(&mut self, _cx: &mut Ctx<'_>) {
        self.log.submit();
    }

    fn after_settle(&mut self, _cx: &mut Ctx<'_>) {
        self.maybe_snapshot();
    }

    fn poll_timeout_ms(&self) -> Option<u64> {
        // A snapshot being collected goes on next iteration even if nothing else happens.
        self.log.snapshot_request().map(|_| 0)
    }

    fn set_waker(&mut self, waker: std::sync::Arc<mio::Waker>) {
        self.log.set_waker(waker);
    }
}
