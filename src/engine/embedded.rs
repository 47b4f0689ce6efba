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
//!
//! Holds (PROTOCOL.md "Holds"): the hold table ([`Holds`]) changes with the store, in the same
//! record and the same undo. Expiry runs from the loop: [`Engine::poll_timeout_ms`] wakes it at
//! the earliest deadline, and every hold due is expired in `before_sleep` (and before any write
//! is decided, so a commit racing with expiry finds it expired) as a change of its own. Its
//! outcome is reported as [`Progress::HoldExpired`] once durable, in log order.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use super::{wall_ms, Engine, EngineStatus, HoldStats, HoldView, Outcome, Progress, Submitted};
use crate::api::messages::HoldAction;
use crate::api::{ApiError, ErrorCode, WriteRequest};
use crate::net::Ctx;
use crate::stock::holds::{HoldChange, HoldState, HoldWriteError, Holds, Settle, Take};
use crate::stock::{Fingerprint, IdempotencyCache, Lookup, OpError, SkuId, Stock, Store};
use crate::wal::{HoldRecord, KeyRecord, Log, LogStats, LoggedHold, Record, SnapshotPart};

/// Known SKUs added to a snapshot per loop iteration (see `maybe_snapshot`).
pub const SNAPSHOT_CHUNK_SKUS: usize = 65_536;

/// How long to wait before trying again to expire holds when the log refuses writes (the
/// deadline stays armed; without a pause the loop would spin on it).
pub const EXPIRY_RETRY_MS: u64 = 100;

/// How long start-up waits for the expiries of holds that passed their deadline while the
/// server was down to become durable, before giving up with an error.
pub const STARTUP_EXPIRY_WAIT_MS: u64 = 30_000;

/// A change appended to the log and not yet durable.
struct InFlight {
    seq: u64,
    /// State of each changed SKU before the change (for undo).
    before: Vec<(SkuId, Stock)>,
    results: Vec<(SkuId, Stock)>,
    changed: Vec<(SkuId, Stock)>,
    key: Option<String>,
    /// Holds the change touched, before and after (for undo and for snapshots).
    holds: Vec<HoldChange>,
    /// For an expiry: the hold and its deadline.
    expired: Option<(Box<str>, u64)>,
    /// For an extend: the hold as its reply shows it.
    view: Option<HoldView>,
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
    holds: Holds,
    holds_taken_total: u64,
    /// No expiry is tried before this (wall ms) after the log refused one.
    expiry_retry_at_ms: u64,
}

impl EmbeddedEngine {
    pub fn new(store: Store, keys: IdempotencyCache, log: Box<dyn Log>, holds: Holds) -> Self {
        EmbeddedEngine {
            store,
            keys,
            log,
            overlay: HashMap::new(),
            in_flight: VecDeque::new(),
            done: VecDeque::new(),
            last_seq: 0,
            holds,
            holds_taken_total: 0,
            expiry_retry_at_ms: 0,
        }
    }

    /// Expires every hold whose deadline passed while the server was down, and waits until
    /// those changes are durable (PROTOCOL.md "Holds": released at start, before the port
    /// opens). Returns how many were expired.
    pub fn expire_overdue_at_start(&mut self) -> Result<usize, String> {
        let now_ms = wall_ms();
        let before = self.in_flight.len();
        self.expire_due(now_ms);
        let expired = self.in_flight.len() - before;
        if expired == 0 {
            return Ok(0);
        }
        let started = Instant::now();
        let mut progress = Vec::new();
        loop {
            self.log.submit();
            progress.clear();
            self.collect(&mut progress);
            if progress.iter().any(|p| matches!(p, Progress::All)) {
                return Err("the log failed while expiring overdue holds".into());
            }
            if self.in_flight.is_empty() {
                return Ok(expired);
            }
            if started.elapsed().as_millis() > u128::from(STARTUP_EXPIRY_WAIT_MS) {
                return Err("expiring overdue holds did not become durable in time".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Expires every hold due at `now_ms`, each as one change of its own.
    fn expire_due(&mut self, now_ms: u64) {
        self.holds.prune_markers(now_ms);
        if now_ms < self.expiry_retry_at_ms {
            return;
        }
        while let Some(hold) = self.holds.due(now_ms).map(Box::<str>::from) {
            if self.log.refusing().is_some() {
                self.expiry_retry_at_ms = now_ms + EXPIRY_RETRY_MS;
                return;
            }
            let (deadline_ms, before) = match self.holds.state(&hold, now_ms) {
                HoldState::Live { deadline_ms, lines } => {
                    let before: Vec<(SkuId, Stock)> = lines
                        .iter()
                        .map(|&(sku, _)| (sku, self.store.get(sku)))
                        .collect();
                    (deadline_ms, before)
                }
                _ => unreachable!("a due hold is live"),
            };
            let (applied, change) = self
                .holds
                .settle(&mut self.store, &hold, Settle::Expire, now_ms)
                .expect("a due hold can be expired");
            let changed = applied.changed;
            let results = changed.clone();
            let outcome = self.log_change(before, changed, results, None, None, vec![change]);
            match outcome {
                Ok(seq) => {
                    if let Some(change) = self.in_flight.back_mut().filter(|c| c.seq == seq) {
                        change.expired = Some((hold, deadline_ms));
                    }
                }
                Err(_) => {
                    // Undone by log_change; the hold stays live and due: try again later.
                    self.expiry_retry_at_ms = now_ms + EXPIRY_RETRY_MS;
                    return;
                }
            }
        }
    }

    /// Appends the record of an applied change and tracks it until durable. On a log error
    /// the change is undone (store, holds and key) and the error returned.
    fn log_change(
        &mut self,
        before: Vec<(SkuId, Stock)>,
        changed: Vec<(SkuId, Stock)>,
        results: Vec<(SkuId, Stock)>,
        key_record: Option<KeyRecord>,
        key: Option<&str>,
        holds: Vec<HoldChange>,
    ) -> Result<u64, String> {
        let record = Record {
            states: changed
                .iter()
                .map(|&(sku, s)| (self.store.name(sku).to_string(), s))
                .collect(),
            key: key_record,
            holds: holds.iter().map(|c| self.hold_record(c)).collect(),
        };
        let seq = match self.log.append(record) {
            Ok(seq) => seq,
            Err(unavailable) => {
                self.store.undo(&before);
                self.holds.undo(&holds);
                if let Some(key) = key {
                    self.keys.remove(key);
                }
                return Err(unavailable.0);
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
            changed,
            key: key.map(str::to_string),
            holds,
            expired: None,
            view: None,
        });
        Ok(seq)
    }

    fn hold_record(&self, change: &HoldChange) -> HoldRecord {
        let state = match &change.after {
            HoldState::Live { lines, deadline_ms } => LoggedHold::Live {
                deadline_ms: *deadline_ms,
                lines: lines
                    .iter()
                    .map(|&(sku, units)| (self.store.name(sku).to_string(), units))
                    .collect(),
            },
            HoldState::Expired { at_ms } => LoggedHold::Expired { at_ms: *at_ms },
            HoldState::Gone => LoggedHold::Gone,
        };
        HoldRecord {
            hold: change.hold.to_string(),
            state,
        }
    }

    /// Moves changes the log made durable to their outcomes, in log order; an expiry is
    /// reported in its place among the writes (so its broadcast keeps version order).
    fn collect(&mut self, out: &mut Vec<Progress>) {
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
            if let Some((hold, deadline_ms)) = change.expired {
                out.push(Progress::Through(change.seq - 1));
                out.push(Progress::HoldExpired {
                    hold: hold.into(),
                    changed: change.changed,
                    lag_ms: wall_ms().saturating_sub(deadline_ms),
                });
                continue;
            }
            self.done.push_back((
                change.seq,
                Outcome::Applied {
                    results: change.results,
                    changed: change.changed,
                    duplicate: false,
                    view: change.view,
                },
            ));
        }
        out.push(Progress::Through(completion.durable_through));
        if let Some(failed_from) = completion.failed_from {
            self.roll_back(failed_from);
            out.push(Progress::All);
        }
    }

    /// Every hold as durable: the table, with each hold a change in flight touched put back
    /// to its state before the oldest such change (for snapshots, which hold durable state).
    fn durable_holds(&self) -> Vec<HoldRecord> {
        let mut patched: HashMap<&str, &HoldState> = HashMap::new();
        for change in &self.in_flight {
            for hold in &change.holds {
                patched.entry(&hold.hold).or_insert(&hold.before);
            }
        }
        let record = |hold: &str, state: &HoldState| {
            self.hold_record(&HoldChange {
                hold: hold.into(),
                before: HoldState::Gone,
                after: state.clone(),
            })
        };
        let mut out = Vec::with_capacity(self.holds.live_len() + self.holds.markers_len());
        for (hold, lines, deadline_ms) in self.holds.live() {
            if !patched.contains_key(hold) {
                let state = HoldState::Live {
                    lines: lines.to_vec(),
                    deadline_ms,
                };
                out.push(record(hold, &state));
            }
        }
        for (hold, at_ms) in self.holds.markers() {
            if !patched.contains_key(hold) {
                out.push(record(hold, &HoldState::Expired { at_ms }));
            }
        }
        for (hold, state) in patched {
            if !matches!(state, HoldState::Gone) {
                out.push(record(hold, state));
            }
        }
        out
    }

    fn view(&self, hold: &str, now_ms: u64) -> Result<HoldView, ApiError> {
        HoldView::of(&self.holds, hold, now_ms)
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
            self.holds.undo(&change.holds);
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
        if next_slot.is_none() {
            // The last part carries the holds: all of them at once (they are far fewer than
            // SKUs in practice; see docs/BENCHMARKS.md for the pause with 1M holds).
            for hold in self.durable_holds() {
                part.hold(&hold);
            }
        }
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

/// A write applied in memory, not yet logged.
struct Decided {
    /// State before the write of every SKU it touched (for undo).
    before: Vec<(SkuId, Stock)>,
    changed: Vec<(SkuId, Stock)>,
    results: Vec<(SkuId, Stock)>,
    holds: Vec<HoldChange>,
    view: Option<HoldView>,
}

impl EmbeddedEngine {
    /// Applies a write of ops (some may take into holds) to the store and the hold table.
    fn decide_ops(&mut self, req: &WriteRequest, now_ms: u64) -> Result<Decided, Outcome> {
        let ops = self.bind(req)?;
        let mut before: Vec<(SkuId, Stock)> = Vec::with_capacity(ops.len());
        for op in &ops {
            if !before.iter().any(|&(sku, _)| sku == op.sku) {
                before.push((op.sku, self.store.get(op.sku)));
            }
        }
        let takes: Vec<Option<Take<'_>>> = req
            .ops
            .iter()
            .map(|spec| {
                spec.hold.as_deref().map(|hold| Take {
                    hold,
                    ttl_ms: spec.ttl_ms,
                })
            })
            .collect();
        let refused = |error: ApiError| Outcome::Refused {
            error,
            release: ops.iter().map(|op| op.sku).collect(),
        };
        let (applied, holds) = if takes.iter().any(Option::is_some) {
            match self.holds.write(&mut self.store, &ops, &takes, now_ms) {
                Ok(done) => done,
                Err(HoldWriteError::Rule(batch_error)) => {
                    let name = self.store.name(ops[batch_error.index].sku).to_string();
                    let error = ApiError::from_op(&batch_error.error, &name)
                        .at(req.batch.then_some(batch_error.index));
                    return Err(refused(error));
                }
                Err(HoldWriteError::Hold { index, error }) => {
                    let hold = req.ops[index].hold.as_deref().unwrap_or_default();
                    let error = ApiError::from_hold(&error, hold).at(req.batch.then_some(index));
                    return Err(refused(error));
                }
            }
        } else {
            let held = |sku| self.holds.held(sku);
            match self.store.apply_held(&ops, &held) {
                Ok(applied) => (applied, Vec::new()),
                Err(batch_error) => {
                    let name = self.store.name(ops[batch_error.index].sku).to_string();
                    let error = ApiError::from_op(&batch_error.error, &name)
                        .at(req.batch.then_some(batch_error.index));
                    return Err(refused(error));
                }
            }
        };
        let results = ops
            .iter()
            .zip(&applied.results)
            .map(|(op, &s)| (op.sku, s))
            .collect();
        Ok(Decided {
            before,
            changed: applied.changed,
            results,
            holds,
            view: None,
        })
    }

    /// Applies a hold's commit, release or extend.
    fn decide_hold_command(
        &mut self,
        hold: &str,
        action: HoldAction,
        now_ms: u64,
    ) -> Result<Decided, Outcome> {
        let refused = |error| Outcome::refused(ApiError::from_hold(&error, hold));
        let how = match action {
            HoldAction::Commit => Settle::Commit,
            HoldAction::Release => Settle::Release,
            HoldAction::Extend { ttl_ms } => {
                let change = self.holds.extend(hold, ttl_ms, now_ms).map_err(refused)?;
                let view = self.view(hold, now_ms).ok();
                return Ok(Decided {
                    before: Vec::new(),
                    changed: Vec::new(),
                    results: Vec::new(),
                    holds: vec![change],
                    view,
                });
            }
        };
        let (lines, _) = self.holds.check_live(hold, now_ms).map_err(refused)?;
        let before: Vec<(SkuId, Stock)> = lines
            .iter()
            .map(|&(sku, _)| (sku, self.store.get(sku)))
            .collect();
        let (applied, change) = self
            .holds
            .settle(&mut self.store, hold, how, now_ms)
            .map_err(refused)?;
        Ok(Decided {
            before,
            results: applied.changed.clone(),
            changed: applied.changed,
            holds: vec![change],
            view: None,
        })
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
        // Only a keyed write is ever compared by fingerprint (about 2% of an unkeyed write's
        // instructions went to hashing it for nothing).
        let fingerprint = match req.idempotency_key {
            Some(_) => req.fingerprint(),
            None => Fingerprint(0),
        };
        if let Some(key) = &req.idempotency_key {
            match self.keys.lookup(key, fingerprint, now) {
                Lookup::Hit(result) => {
                    let results = result.to_vec();
                    // An extend records no states: its repeat shows the hold as it is now.
                    let view = match &req.hold {
                        Some(command) if matches!(command.action, HoldAction::Extend { .. }) => {
                            self.view(&command.hold, wall_ms()).ok()
                        }
                        _ => None,
                    };
                    return Submitted::Now(Outcome::Applied {
                        results,
                        changed: Vec::new(),
                        duplicate: true,
                        view,
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
        let now_ms = wall_ms();
        // Holds past their deadline are expired (and logged) first: a commit that lost the
        // race with expiry finds the hold expired and changes nothing.
        self.expire_due(now_ms);
        let decided = match &req.hold {
            Some(command) => self.decide_hold_command(&command.hold, command.action, now_ms),
            None => self.decide_ops(req, now_ms),
        };
        let Decided {
            before,
            changed,
            results,
            holds,
            view,
        } = match decided {
            Ok(decided) => decided,
            Err(outcome) => return Submitted::Now(outcome),
        };
        let release: Vec<SkuId> = before.iter().map(|&(sku, _)| sku).collect();
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
        let created = holds
            .iter()
            .filter(|c| !matches!(c.before, HoldState::Live { .. }))
            .filter(|c| matches!(c.after, HoldState::Live { .. }))
            .count() as u64;
        let key = req.idempotency_key.as_deref();
        match self.log_change(before, changed, results, key_record, key, holds) {
            Ok(seq) => {
                self.holds_taken_total += created;
                if let Some(change) = self.in_flight.back_mut() {
                    change.view = view;
                }
                Submitted::Pending(seq)
            }
            Err(reason) => {
                let error = Self::unavailable(format!("writes are unavailable: {reason}"));
                Submitted::Now(Outcome::Refused { error, release })
            }
        }
    }

    fn poll(&mut self, _cx: &mut Ctx<'_>, out: &mut Vec<Progress>) {
        self.collect(out);
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
            holds: HoldStats {
                live: self.holds.live_len(),
                expired_markers: self.holds.markers_len(),
                taken_total: self.holds_taken_total,
            },
        }
    }

    fn log_stats(&self) -> LogStats {
        self.log.stats()
    }

    fn before_sleep(&mut self, _cx: &mut Ctx<'_>) {
        // Expiries join this iteration's batch: one fsync for every hold due now.
        self.expire_due(wall_ms());
        self.log.submit();
    }

    fn hold_view(&self, hold: &str, now_ms: u64) -> Result<HoldView, ApiError> {
        self.view(hold, now_ms)
    }

    fn after_settle(&mut self, _cx: &mut Ctx<'_>) {
        self.maybe_snapshot();
    }

    fn poll_timeout_ms(&self) -> Option<u64> {
        // A snapshot being collected goes on next iteration even if nothing else happens.
        if self.log.snapshot_request().is_some() {
            return Some(0);
        }
        // Wake for the earliest hold deadline (a stale heap top only wakes us early).
        let deadline_ms = self.holds.peek_deadline_ms()?;
        let now_ms = wall_ms();
        let wait_ms = deadline_ms.saturating_sub(now_ms);
        Some(if now_ms < self.expiry_retry_at_ms {
            wait_ms.max(self.expiry_retry_at_ms - now_ms)
        } else {
            wait_ms
        })
    }

    fn set_waker(&mut self, waker: std::sync::Arc<mio::Waker>) {
        self.log.set_waker(waker);
    }
}
