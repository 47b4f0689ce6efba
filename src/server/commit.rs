//! The write path and the outbox: hand writes to the engine, and release acks and broadcasts
//! in order once the engine reports their outcome (durable in the log, or applied in Redis).

use std::time::Instant;

use serde_json::Value;

use super::metrics::OpCounts;
use super::{now_secs, StockService};
use crate::api::messages::{HoldAction, WriteRequest};
use crate::api::{reply, ApiError, ErrorCode};
use crate::engine::{HoldView, Outcome, Progress, Submitted};
use crate::net::{ConnId, Ctx, Frame};
use crate::stock::{SkuId, Stock};

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

/// Something waiting for the engine.
pub enum Outgoing {
    /// A write in flight: its answer and its broadcasts go out when its ticket is done.
    Write(Box<PendingWrite>),
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

pub struct PendingWrite {
    ticket: u64,
    writer: ConnId,
    reply_to: ReplyTo,
    batch: bool,
    actions: OpCounts,
    received: Instant,
    holds: HoldsOf,
}

/// What a write does to holds, for its reply and for the service's record of who holds what.
#[derive(Clone, Debug, Default)]
pub struct HoldsOf {
    /// A `hold` message: the hold and its action (the reply is shaped after it).
    command: Option<(String, HoldAction)>,
    /// Holds its `reserve` ops take into (distinct): the writer becomes the holder of those it
    /// creates, to hear `hold_expired`.
    takes: Vec<String>,
}

impl HoldsOf {
    fn of(req: &WriteRequest) -> HoldsOf {
        let mut takes: Vec<String> = Vec::new();
        for op in &req.ops {
            if let Some(hold) = &op.hold {
                if !takes.contains(hold) {
                    takes.push(hold.clone());
                }
            }
        }
        HoldsOf {
            command: req.hold.as_ref().map(|c| (c.hold.clone(), c.action)),
            takes,
        }
    }
}

impl Outgoing {
    fn seq(&self) -> u64 {
        match self {
            Outgoing::Write(write) => write.ticket,
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

    /// Records what an applied write did to holds: the holder of each hold it created, the
    /// end of each hold it committed or released.
    fn note_holds(&mut self, holds: &HoldsOf, writer: ConnId) {
        match &holds.command {
            Some((hold, HoldAction::Commit)) => {
                self.metrics.holds_committed_total += 1;
                self.hold_owners.remove(hold.as_str());
            }
            Some((hold, HoldAction::Release)) => {
                self.metrics.holds_released_total += 1;
                self.hold_owners.remove(hold.as_str());
            }
            Some((_, HoldAction::Extend { .. })) | None => {}
        }
        // Only a WebSocket can be pushed to; the first writer of a hold is its holder.
        if !holds.takes.is_empty() && self.session_ref(writer).is_some_and(|s| s.websocket) {
            for hold in &holds.takes {
                self.hold_owners
                    .entry(hold.as_str().into())
                    .or_insert(writer);
            }
        }
    }

    fn hold_ack_frame(
        reply_to: &ReplyTo,
        hold: &str,
        states: &[(&str, Stock)],
        duplicate: bool,
    ) -> (Frame, bool) {
        match reply_to {
            ReplyTo::WebSocket { id } => (
                reply::hold_states("ack", id.as_ref(), hold, states, duplicate),
                false,
            ),
            ReplyTo::Http(http) => {
                Self::http_ok(http, reply::http_hold_states_body(hold, states, duplicate))
            }
        }
    }

    pub(super) fn hold_view_frame(
        &self,
        reply_to: &ReplyTo,
        view: &HoldView,
        duplicate: bool,
    ) -> (Frame, bool) {
        let skus = self.engine.skus();
        let lines = view
            .lines
            .iter()
            .map(|&(sku, units)| (skus.name(sku), units));
        match reply_to {
            ReplyTo::WebSocket { id } => (
                reply::hold(
                    id.as_ref(),
                    &view.hold,
                    view.expires_in_ms,
                    lines,
                    duplicate,
                ),
                false,
            ),
            ReplyTo::Http(http) => Self::http_ok(
                http,
                reply::http_hold_body(&view.hold, view.expires_in_ms, lines, duplicate),
            ),
        }
    }

    fn http_ok(http: &super::http_api::HttpReply, body: Vec<u8>) -> (Frame, bool) {
        let response = http.finish(crate::http::Response::json(200, body));
        (Frame::from(response.to_bytes()), !http.keep_alive)
    }

    /// A hold expired: its change goes to subscribers like any other, and its holder, if its
    /// connection is still open, hears `hold_expired` (PROTOCOL.md "Holds").
    fn hold_expired(
        &mut self,
        cx: &mut Ctx<'_>,
        hold: String,
        changed: Vec<(SkuId, Stock)>,
        lag_ms: u64,
    ) {
        self.metrics.holds_expired_total += 1;
        self.metrics
            .hold_expiry_lag
            .observe(std::time::Duration::from_millis(lag_ms));
        self.metrics.changes_total += 1;
        let owner = self.hold_owners.remove(hold.as_str());
        if let Some(owner) = owner.filter(|&owner| cx.is_open(owner)) {
            let skus = self.engine.skus();
            let states: Vec<(&str, Stock)> = changed
                .iter()
                .map(|&(sku, s)| (skus.name(sku), s))
                .collect();
            let frame = reply::hold_states("hold_expired", None, &hold, &states, false);
            // The holder hears of its hold first, like a writer hears its ack first.
            if self.subs.has_wildcard(owner) {
                self.flush_wildcard_batch(cx);
            }
            self.reply(cx, owner, frame, false, false);
        }
        for (sku, after) in changed {
            self.broadcast(cx, sku, after);
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

    /// Hands a write (single op or batch) to the engine for `conn`; the answer goes out when
    /// the engine has decided it.
    pub(super) fn write(
        &mut self,
        cx: &mut Ctx<'_>,
        conn: ConnId,
        req: WriteRequest,
        reply_to: ReplyTo,
    ) {
        if let Err(error) = self.check_skus_max(&req) {
            self.limit_hit(cx, conn, super::metrics::LimitHit::Skus);
            self.refuse(cx, conn, &reply_to, &error);
            return;
        }
        let actions = OpCounts::of(req.ops.iter().map(|op| op.action));
        let holds = HoldsOf::of(&req);
        match self.engine.submit(cx, &req, now_secs()) {
            Submitted::Now(outcome) => {
                // Decided at once, but the state it reports may reflect writes in flight:
                // the answer waits like an ack would.
                let (frame, close_after) =
                    self.outcome_frame(&reply_to, req.batch, &actions, &holds, conn, outcome, None);
                self.reply(cx, conn, frame, close_after, true);
                let release = std::mem::take(&mut self.to_forget);
                self.forget_unused(release);
            }
            Submitted::Pending(ticket) => {
                self.session(conn).outbox_pending += 1;
                self.hold_if_too_many(cx, conn);
                self.outbox
                    .push_back(Outgoing::Write(Box::new(PendingWrite {
                        ticket,
                        writer: conn,
                        reply_to,
                        batch: req.batch,
                        actions,
                        received: Instant::now(),
                        holds,
                    })));
                self.metrics.outbox_entries_peak =
                    self.metrics.outbox_entries_peak.max(self.outbox.len());
            }
        }
    }

    /// Bounds writes in flight (PROTOCOL.md "Limits"): a connection with as many as it may
    /// have, or any writer while the whole outbox is full, is not read further until replies
    /// drain. Nothing is refused: the client just waits, as with TCP flow control.
    fn hold_if_too_many(&mut self, cx: &mut Ctx<'_>, conn: ConnId) {
        let per_conn_max = self.config.writes_in_flight_per_conn_max;
        let total_full = self.outbox.len() >= super::WRITES_IN_FLIGHT_TOTAL_MAX;
        let session = self.session(conn);
        if session.reads_held || (session.outbox_pending < per_conn_max && !total_full) {
            return;
        }
        session.reads_held = true;
        self.held.push(conn);
        cx.hold_reads(conn, true);
        self.limit_hit(cx, conn, super::metrics::LimitHit::WritesInFlight);
    }

    /// Reads again the held connections whose replies drained to half their bound (and the
    /// outbox to half its), so a held client resumes with room to pipeline.
    fn release_held(&mut self, cx: &mut Ctx<'_>) {
        if self.held.is_empty() || self.outbox.len() > super::WRITES_IN_FLIGHT_TOTAL_MAX / 2 {
            return;
        }
        let resume_at = self.config.writes_in_flight_per_conn_max / 2;
        let mut held = std::mem::take(&mut self.held);
        held.retain(|&conn| {
            let Some(session) = self.sessions.get_mut(conn.index as usize) else {
                return false;
            };
            if session.generation != conn.generation {
                return false; // closed; its slot is someone else's now
            }
            if session.outbox_pending > resume_at {
                return true;
            }
            session.reads_held = false;
            cx.hold_reads(conn, false);
            false
        });
        self.held = held;
    }

    /// `--max-skus`: refuses a write that would create SKUs past the limit. Counted against
    /// the engine's store, which for the embedded engine already holds the writes in flight
    /// (it runs ahead of what is visible), and for Redis is this process's replica, which may
    /// lag: the Redis write script checks again, exactly (`scripts::WRITE`).
    fn check_skus_max(&self, req: &WriteRequest) -> Result<(), ApiError> {
        let skus = self.engine.skus();
        let mut new: Vec<&str> = req
            .ops
            .iter()
            .map(|op| op.sku.as_str())
            .filter(|name| {
                !skus
                    .lookup(name)
                    .is_some_and(|sku| skus.get(sku).version > 0)
            })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        new.sort_unstable();
        new.dedup();
        let max = self.config.skus_max;
        if skus.known_len().saturating_add(new.len()) > max {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("the inventory holds its maximum of {max} SKUs; this write would add more"),
            ));
        }
        Ok(())
    }

    /// The answer to a decided write, with its metrics counted; the changes it made are left
    /// in `changed` for the caller to broadcast.
    #[allow(clippy::too_many_arguments)]
    fn outcome_frame(
        &mut self,
        reply_to: &ReplyTo,
        batch: bool,
        actions: &OpCounts,
        holds: &HoldsOf,
        writer: ConnId,
        outcome: Outcome,
        changed_out: Option<&mut Vec<(SkuId, Stock)>>,
    ) -> (Frame, bool) {
        match outcome {
            Outcome::Applied {
                results,
                changed,
                duplicate,
                view,
            } => {
                if duplicate {
                    self.metrics.duplicates_total += 1;
                } else {
                    self.metrics.count_op_result(actions, None);
                    self.note_holds(holds, writer);
                }
                if let Some(out) = changed_out {
                    *out = changed;
                }
                let skus = self.engine.skus();
                let states: Vec<(&str, Stock)> = results
                    .iter()
                    .map(|&(sku, s)| (skus.name(sku), s))
                    .collect();
                match &holds.command {
                    None => Self::success_frame(reply_to, batch, &states, duplicate),
                    Some((hold, HoldAction::Extend { .. })) => match view {
                        Some(view) => self.hold_view_frame(reply_to, &view, duplicate),
                        // A repeated extend of a hold that has ended since.
                        None => {
                            let error =
                                ApiError::from_hold(&crate::stock::HoldError::Unknown, hold);
                            Self::error_frame(reply_to, &error)
                        }
                    },
                    Some((hold, _)) => Self::hold_ack_frame(reply_to, hold, &states, duplicate),
                }
            }
            Outcome::Refused { error, release } => {
                if error.code.is_stock_rule() {
                    self.metrics.count_op_result(actions, Some(error.code));
                }
                self.metrics.count_error(error.code);
                // Forgotten once the whole release is done: two refused writes may have
                // interned the same SKU, and forgetting a slot twice would touch a dead one.
                self.to_forget.extend(release);
                Self::error_frame(reply_to, &error)
            }
        }
    }

    /// Releases what the engine decided, in the order it reports.
    pub(super) fn settle(&mut self, cx: &mut Ctx<'_>) {
        let mut progress = std::mem::take(&mut self.progress);
        self.engine.poll(cx, &mut progress);
        for step in progress.drain(..) {
            match step {
                Progress::Through(ticket) => self.release_through(cx, Some(ticket)),
                Progress::All => self.release_through(cx, None),
                Progress::Remote(changes) => {
                    for (sku, after) in changes {
                        self.broadcast(cx, sku, after);
                    }
                }
                Progress::HoldExpired {
                    hold,
                    changed,
                    lag_ms,
                } => self.hold_expired(cx, hold, changed, lag_ms),
            }
        }
        self.progress = progress;
        self.flush_wildcard_batch(cx);
        self.release_held(cx);
        let release = std::mem::take(&mut self.to_forget);
        self.forget_unused(release);
    }

    /// Releases outbox entries up to `ticket` (all of them for `None`), in order.
    fn release_through(&mut self, cx: &mut Ctx<'_>, ticket: Option<u64>) {
        while let Some(front) = self.outbox.front() {
            if ticket.is_some_and(|t| front.seq() > t) {
                break;
            }
            let entry = self.outbox.pop_front().expect("front exists");
            self.release(cx, entry);
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
                    } => {
                        let snapshot = super::snapshot::Snapshot::new(kind, id, names, all_known);
                        self.start_snapshot(cx, to, snapshot);
                        return;
                    }
                    Body::Build(build) => build(self),
                };
                cx.send(to, frame);
                if close_after {
                    cx.close(to);
                }
            }
            Outgoing::Write(write) => {
                let write = *write;
                self.done_with(write.writer);
                let outcome = self.engine.take_outcome(write.ticket).unwrap_or_else(|| {
                    // Every ticket reported done has an outcome; answering beats hanging.
                    log::error!("no outcome for write ticket {}", write.ticket);
                    Outcome::refused(ApiError::new(
                        ErrorCode::Internal,
                        "the write's outcome was lost",
                    ))
                });
                let applied = matches!(outcome, Outcome::Applied { .. });
                if applied {
                    self.metrics.ack_latency.observe(write.received.elapsed());
                }
                let mut changed = Vec::new();
                let (frame, close_after) = self.outcome_frame(
                    &write.reply_to,
                    write.batch,
                    &write.actions,
                    &write.holds,
                    write.writer,
                    outcome,
                    Some(&mut changed),
                );
                // The writer hears first (PROTOCOL.md), then every subscriber. A writer that
                // also hears `*` gets the gathered older updates before this newer ack.
                if self.subs.has_wildcard(write.writer) {
                    self.flush_wildcard_batch(cx);
                }
                cx.send(write.writer, frame);
                if close_after {
                    cx.close(write.writer);
                }
                if !changed.is_empty() {
                    for (sku, after) in changed {
                        self.broadcast(cx, sku, after);
                    }
                    self.metrics.changes_total += 1;
                }
            }
        }
    }

    /// Sends a SKU's new state to its subscribers, unless they were already sent this version
    /// or a newer one (a change may reach us twice: from our own write and from the change
    /// feed of a shared engine).
    pub(super) fn broadcast(&mut self, cx: &mut Ctx<'_>, sku: SkuId, after: Stock) {
        if !self.sent_versions.advance(sku, after.version) {
            return;
        }
        let frame = reply::stock_update(self.engine.skus().name(sku), after);
        let (named, all) = self.subs.subscribers(sku);
        if named.is_empty() {
            // Only `*` hears this SKU: gather it with this turn's other such updates into
            // one frame run per subscriber.
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
}
