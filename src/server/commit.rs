//! The write path and the outbox: apply, log, and release acks and broadcasts only once the
//! log says the change is durable (or undo it and refuse it if the log failed).

use std::time::Instant;

use serde_json::Value;

use super::{now_secs, StockService};
use crate::api::messages::WriteRequest;
use crate::api::{reply, ApiError, ErrorCode};
use crate::net::{ConnId, Ctx, Frame};
use crate::stock::{Lookup, SkuId, Stock};
use crate::wal::{KeyRecord, Record, SnapshotPart};

/// Known SKUs added to a snapshot per loop iteration (see `maybe_snapshot`).
pub const SNAPSHOT_CHUNK_SKUS: usize = 65_536;

/// Bytes of `*`-only updates gathered into one frame run before it is sent (see
/// `flush_wildcard_batch`); a loop turn with more sends several runs.
pub const WILDCARD_BATCH_BYTES_MAX: usize = 64 * 1024;

/// Updates gathered during one release for the `*` subscribers.
#[derive(Default)]
pub struct WildcardBatch {
    bytes: Vec<u8>,
    skus: Vec<SkuId>,
}

/// How the writer wants its answer.
#[derive(Clone, Debug)]
pub enum ReplyTo {
    WebSocket { id: Option<Value> },
    Http(super::http_api::HttpReply),
}

/// Something waiting for the log.
pub enum Outgoing {
    /// An accepted change: its ack and its broadcasts go out when `seq` is durable.
    Change(Box<PendingChange>),
    /// A reply queued behind earlier entries for the same connection.
    Reply {
        seq: u64,
        to: ConnId,
        body: Body,
        close_after: bool,
    },
}

/// A queued reply's content. Replies that report state are built when released, so they never
/// show a version older than a broadcast the connection received before them.
pub enum Body {
    Frame(Frame),
    States {
        kind: &'static str,
        id: Option<Value>,
        names: Vec<String>,
        all_known: bool,
    },
    /// Built from the service's state when released (an HTTP read pipelined behind a write).
    Build(Box<dyn FnOnce(&StockService) -> Frame>),
}

pub struct PendingChange {
    seq: u64,
    writer: ConnId,
    reply_to: ReplyTo,
    ack: Frame,
    /// State of each changed SKU before the change (for undo), then after it (for the
    /// broadcast and the overlay).
    before: Vec<(SkuId, Stock)>,
    changed: Vec<(SkuId, Stock)>,
    key: Option<String>,
    received: Instant,
}

impl Outgoing {
    fn seq(&self) -> u64 {
        match self {
            Outgoing::Change(change) => change.seq,
            Outgoing::Reply { seq, .. } => *seq,
        }
    }
}

impl StockService {
    /// Builds the error reply for a writer.
    fn error_frame(reply_to: &ReplyTo, error: &ApiError) -> (Frame, bool) {
        match reply_to {
            ReplyTo::WebSocket { id } => (reply::error(id.as_ref(), error), false),
            ReplyTo::Http(http) => {
                let response = http.finish(crate::http::Response::json(
                    error.code.http_status(),
                    reply::http_error_body(error),
                ));
                (Frame::from(response.to_bytes()), !http.keep_alive)
            }
        }
    }

    fn success_frame(
        &self,
        reply_to: &ReplyTo,
        batch: bool,
        states: &[(&str, Stock)],
        duplicate: bool,
    ) -> (Frame, bool) {
        match reply_to {
            ReplyTo::WebSocket { id } => (reply::ack(id.as_ref(), batch, states, duplicate), false),
            ReplyTo::Http(http) => {
                let response = http.finish(crate::http::Response::json(
                    200,
                    reply::http_stock_body(states, batch, duplicate),
                ));
                (Frame::from(response.to_bytes()), !http.keep_alive)
            }
        }
    }

    pub(super) fn refuse(
        &mut self,
        cx: &mut Ctx<'_>,
        conn: ConnId,
        reply_to: &ReplyTo,
        error: &ApiError,
    ) {
        self.metrics.count_error(error.code);
        let (frame, close_after) = Self::error_frame(reply_to, error);
        // A refusal may reflect state still in flight: it waits like an ack would.
        self.reply(cx, conn, frame, close_after, true);
    }

    /// Applies a write (single op or batch) for `conn`; the answer goes out when durable.
    pub(super) fn write(
        &mut self,
        cx: &mut Ctx<'_>,
        conn: ConnId,
        req: WriteRequest,
        reply_to: ReplyTo,
    ) {
        let now = now_secs();
        let fingerprint = req.fingerprint();
        if let Some(key) = &req.idempotency_key {
            match self.keys.lookup(key, fingerprint, now) {
                Lookup::Hit(result) => {
                    let states: Vec<(&str, Stock)> = result
                        .iter()
                        .map(|&(sku, stock)| (self.store.name(sku), stock))
                        .collect();
                    let (frame, close_after) =
                        self.success_frame(&reply_to, req.batch, &states, true);
                    self.metrics.duplicates_total += 1;
                    // The original may still be in flight: the repeat is answered after it.
                    self.reply(cx, conn, frame, close_after, true);
                    return;
                }
                Lookup::Mismatch => {
                    let error = ApiError::bad_request(
                        "idempotency key already used for a different request",
                    );
                    self.refuse(cx, conn, &reply_to, &error);
                    return;
                }
                Lookup::Miss => {}
            }
            if let Err(full) = self.keys.check_room(key, now) {
                self.refuse(
                    cx,
                    conn,
                    &reply_to,
                    &ApiError::new(ErrorCode::Unavailable, full.to_string()),
                );
                return;
            }
        }
        if let Some(reason) = self.log.refusing() {
            let error = ApiError::new(
                ErrorCode::Unavailable,
                format!("writes are unavailable: {reason}"),
            );
            self.refuse(cx, conn, &reply_to, &error);
            return;
        }
        let mut ops = Vec::with_capacity(req.ops.len());
        for (index, spec) in req.ops.iter().enumerate() {
            match self.store.intern(&spec.sku) {
                Ok(sku) => ops.push(spec.bind(sku)),
                Err(e) => {
                    let error = ApiError::from_op(&e, &spec.sku).at(req.batch.then_some(index));
                    self.forget_unused(ops.iter().map(|op| op.sku));
                    self.refuse(cx, conn, &reply_to, &error);
                    return;
                }
            }
        }
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
                let mut error = ApiError::from_op(&batch_error.error, &sku_name);
                error.index = req.batch.then_some(batch_error.index);
                self.metrics.count_op_result(&ops, Some(error.code));
                self.forget_unused(ops.iter().map(|op| op.sku));
                self.refuse(cx, conn, &reply_to, &error);
                return;
            }
        };
        let result: Vec<(SkuId, Stock)> = ops
            .iter()
            .zip(&applied.results)
            .map(|(op, &s)| (op.sku, s))
            .collect();
        let key_record = req.idempotency_key.as_ref().map(|key| KeyRecord {
            key: key.clone(),
            fingerprint: fingerprint.0,
            result: result
                .iter()
                .map(|&(sku, s)| (self.store.name(sku).to_string(), s))
                .collect(),
            created_secs: now,
        });
        if let Some(key) = &req.idempotency_key {
            // check_room passed above and nothing ran in between.
            let _ = self.keys.insert(key, fingerprint, result.clone(), now);
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
                let error = ApiError::new(
                    ErrorCode::Unavailable,
                    format!("writes are unavailable: {}", unavailable.0),
                );
                self.forget_unused(ops.iter().map(|op| op.sku));
                self.refuse(cx, conn, &reply_to, &error);
                return;
            }
        };
        self.last_seq = seq;
        self.metrics.count_op_result(&ops, None);
        let states: Vec<(&str, Stock)> = result
            .iter()
            .map(|&(sku, s)| (self.store.name(sku), s))
            .collect();
        let (ack, _) = self.success_frame(&reply_to, req.batch, &states, false);
        for &(sku, durable) in &before {
            self.overlay.entry(sku).or_insert((durable, seq)).1 = seq;
        }
        self.session(conn).outbox_pending += 1;
        self.outbox
            .push_back(Outgoing::Change(Box::new(PendingChange {
                seq,
                writer: conn,
                reply_to,
                ack,
                before,
                changed: applied.changed,
                key: req.idempotency_key,
                received: Instant::now(),
            })));
    }

    /// Releases what the log made durable; undoes and refuses what it failed.
    pub(super) fn settle(&mut self, cx: &mut Ctx<'_>) {
        let completion = self.log.poll();
        while let Some(front) = self.outbox.front() {
            if front.seq() > completion.durable_through {
                break;
            }
            let entry = self.outbox.pop_front().expect("front exists");
            self.release(cx, entry);
        }
        self.flush_wildcard_batch(cx);
        if let Some(failed_from) = completion.failed_from {
            self.roll_back(cx, failed_from);
            self.flush_wildcard_batch(cx);
        }
    }

    /// Sends the updates gathered for `*` subscribers as one frame run.
    fn flush_wildcard_batch(&mut self, cx: &mut Ctx<'_>) {
        if self.wildcard_batch.skus.is_empty() {
            return;
        }
        let frame = Frame::from(self.wildcard_batch.bytes.as_slice());
        self.fanout
            .deliver_to_wildcard(cx, &self.subs, &self.wildcard_batch.skus, &frame);
        self.wildcard_batch.bytes.clear();
        self.wildcard_batch.skus.clear();
    }

    fn done_with(&mut self, conn: ConnId) {
        if let Some(session) = self.sessions.get_mut(conn.index as usize) {
            if session.generation == conn.generation {
                session.outbox_pending = session.outbox_pending.saturating_sub(1);
            }
        }
    }

    fn release(&mut self, cx: &mut Ctx<'_>, entry: Outgoing) {
        match entry {
            Outgoing::Reply {
                to,
                body,
                close_after,
                ..
            } => {
                self.done_with(to);
                // Updates gathered so far go first: a reply reporting state must not overtake
                // an older broadcast to the same connection.
                self.flush_wildcard_batch(cx);
                let frame = match body {
                    Body::Frame(frame) => frame,
                    Body::States {
                        kind,
                        id,
                        names,
                        all_known,
                    } => self.states_frame(kind, id.as_ref(), &names, all_known),
                    Body::Build(build) => build(self),
                };
                cx.send(to, frame);
                if close_after {
                    cx.close(to);
                }
            }
            Outgoing::Change(change) => {
                let change = *change;
                self.done_with(change.writer);
                self.metrics.ack_latency.observe(change.received.elapsed());
                // The writer hears first (PROTOCOL.md), then every subscriber. A writer that
                // also hears `*` gets the gathered older updates before this newer ack.
                if self.subs.has_wildcard(change.writer) {
                    self.flush_wildcard_batch(cx);
                }
                cx.send(change.writer, change.ack);
                if matches!(&change.reply_to, ReplyTo::Http(http) if !http.keep_alive) {
                    cx.close(change.writer);
                }
                for &(sku, after) in &change.changed {
                    if let Some(entry) = self.overlay.get_mut(&sku) {
                        if entry.1 == change.seq {
                            self.overlay.remove(&sku);
                        } else {
                            entry.0 = after;
                        }
                    }
                    let frame = reply::stock_update(self.store.name(sku), after);
                    let (named, all) = self.subs.subscribers(sku);
                    if named.is_empty() {
                        // Only `*` hears this SKU: gather it with this turn's other such
                        // updates into one frame run per subscriber.
                        if !all.is_empty() {
                            self.wildcard_batch.bytes.extend_from_slice(&frame);
                            self.wildcard_batch.skus.push(sku);
                            if self.wildcard_batch.bytes.len() >= WILDCARD_BATCH_BYTES_MAX {
                                self.flush_wildcard_batch(cx);
                            }
                        }
                    } else {
                        // Keeps every connection's view in order: gathered updates first.
                        self.flush_wildcard_batch(cx);
                        self.fanout.deliver(cx, &self.subs, sku, &frame);
                    }
                }
                self.metrics.changes_total += 1;
            }
        }
    }

    /// The log failed every record from `failed_from` on: undo them newest first and refuse
    /// them. Replies queued behind them still go out, in order.
    fn roll_back(&mut self, cx: &mut Ctx<'_>, failed_from: u64) {
        let entries: Vec<Outgoing> = self.outbox.drain(..).collect();
        let mut changes: Vec<&PendingChange> = Vec::new();
        for entry in &entries {
            if let Outgoing::Change(change) = entry {
                if change.seq >= failed_from {
                    changes.push(change);
                }
            }
        }
        for change in changes.iter().rev() {
            self.store.undo(&change.before);
            if let Some(key) = &change.key {
                self.keys.remove(key);
            }
        }
        self.overlay.clear();
        // The log reuses the failed sequence numbers: later replies must not wait for ones
        // that will now name other records.
        self.last_seq = self.last_seq.min(failed_from.saturating_sub(1));
        let count = changes.len();
        // SKUs the failed changes interned; forgotten once at the end (two changes may name
        // the same SKU, and forgetting a slot twice would touch a dead one).
        let mut touched: Vec<SkuId> = Vec::new();
        for entry in entries {
            match entry {
                Outgoing::Change(change) if change.seq >= failed_from => {
                    self.done_with(change.writer);
                    let error = ApiError::new(
                        ErrorCode::Unavailable,
                        "the change could not be made durable (log write failed); nothing was applied",
                    );
                    self.metrics.count_error(ErrorCode::Unavailable);
                    let (frame, close_after) = Self::error_frame(&change.reply_to, &error);
                    cx.send(change.writer, frame);
                    if close_after {
                        cx.close(change.writer);
                    }
                    touched.extend(change.before.iter().map(|&(sku, _)| sku));
                }
                other => self.release(cx, other),
            }
        }
        self.forget_unused(touched);
        self.metrics.rolled_back_total += count as u64;
    }

    /// A reply carrying the visible state of `skus` (or of every known SKU).
    pub(super) fn states_frame(
        &self,
        kind: &str,
        id: Option<&Value>,
        names: &[String],
        all_known: bool,
    ) -> Frame {
        if all_known {
            let states = self
                .store
                .known()
                .map(|(sku, _)| (self.store.name(sku), self.visible(sku)))
                .filter(|(_, stock)| stock.version > 0);
            reply::with_states(kind, id, states)
        } else {
            reply::with_states(
                kind,
                id,
                names
                    .iter()
                    .map(|name| (name.as_str(), self.visible_by_name(name))),
            )
        }
    }

    /// Adds the next part of the snapshot the log has open, if any: the durable state of up
    /// to [`SNAPSHOT_CHUNK_SKUS`] known SKUs per loop iteration, so 1M SKUs pause the loop
    /// for a few milliseconds at a time instead of once for the whole store (the log keeps
    /// the idempotency keys itself). Why a snapshot spread over iterations is still exact
    /// after replay: see `crate::wal::snapshot`.
    pub(super) fn maybe_snapshot(&mut self) {
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
}
