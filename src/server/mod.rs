//! The stock service: the [`Service`] that serves PROTOCOL.md over WebSocket and HTTP on one
//! port, on top of the store, the subscription index, the fan-out and the log.
//!
//! The service does not know which engine holds the stock ([`crate::engine`]):
//! - A write goes to the engine; its ack and its broadcasts wait in the outbox until the
//!   engine reports its outcome (durable in the log, or applied in Redis).
//! - Reads (get, subscribe snapshots, conflated sends, HTTP GET) see only what the engine says
//!   is decided ([`Engine::visible`]).
//! - Replies to a connection that has something waiting in the outbox queue behind it, so each
//!   connection sees its replies in the order it asked.
//! - Changes made elsewhere (another process on a shared engine) join the same fan-out; a
//!   per-SKU record of the newest version sent keeps every subscriber's view moving forward.

pub mod auth;
pub mod browser;
mod commit;
mod durable;
mod http_api;
pub mod metrics;
mod snapshot;
pub mod start;
pub mod workers;
mod ws_api;

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::info;
use serde_json::Value;

use crate::api::messages::MessageLimits;
use crate::app::{Service, WsMessage};
use crate::broadcast::{Fanout, SentVersions, Subscriptions};
use crate::engine::{Engine, Progress};
use crate::http::{Request, Response};
use crate::net::{ConnId, Ctx, Frame, Pressure};
use crate::stock::{SkuId, Stock};
use auth::{Access, Role};
use commit::{Body, Outgoing};
use metrics::Metrics;

/// Outbox entries (writes in flight and the replies queued behind them) past which every
/// connection that adds a write is held (not read) until the outbox drains to half of it. The
/// log's pending batch holds only writes of the outbox, so this bounds it too. A burst may pass
/// it by what the connections had already read (one read each), never more.
pub const WRITES_IN_FLIGHT_TOTAL_MAX: usize = 65_536;

/// Default of `--max-skus`.
pub const SKUS_MAX_DEFAULT: usize = 1_000_000;
/// Default of `--max-writes-in-flight`: enough to keep a group commit full for a pipelining
/// client, small enough that a stalled log holds little per connection.
pub const WRITES_IN_FLIGHT_PER_CONN_MAX_DEFAULT: u32 = 256;

/// Service settings beyond the loop's limits.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    pub access: Access,
    pub message_limits: MessageLimits,
    /// SKUs one connection may subscribe to by name (`*` counts as one).
    pub subscriptions_per_conn_max: usize,
    /// Idempotency keys remembered; past it keyed writes are refused (`unavailable`).
    pub idempotency_keys_max: usize,
    pub idempotency_ttl_secs: u64,
    /// Distinct SKUs (known, i.e. written at least once); a write that would create one past
    /// it is refused with `too_large`, writes to existing SKUs go on. With the Redis engine it
    /// is checked against this process's replica: writes in flight and other processes may
    /// overshoot it by the writes they have in flight at once.
    pub skus_max: usize,
    /// Writes (messages or requests) one connection may have waiting for the engine; at the
    /// limit the connection is not read until its replies drain (backpressure, see
    /// `WRITES_IN_FLIGHT_TOTAL_MAX` for the sum).
    pub writes_in_flight_per_conn_max: u32,
    /// Write messages per second per connection (0 = unlimited); past it: `rate_limited` /
    /// 429. A batch is one write: it is one atomic change and one log record, whatever its size
    /// (batch size has its own limit, `MessageLimits::batch_ops_max`).
    pub writes_per_conn_per_sec: u32,
    /// Writes per second per token, summed over all its connections and requests (0 =
    /// unlimited); past it: `rate_limited` / 429.
    pub writes_per_token_per_sec: u32,
    /// Browser origins allowed to open a WebSocket (empty = any).
    pub allowed_origins: Vec<String>,
    /// Role shown in /healthz ("embedded", later "redis").
    pub role_name: String,
    /// Re-read on SIGHUP; its tokens join `fixed_tokens`.
    pub tokens_file: Option<std::path::PathBuf>,
    pub fixed_tokens: Vec<auth::Token>,
    /// Holds in total, lines per hold, longest TTL (PROTOCOL.md "Holds").
    pub hold_limits: crate::stock::HoldLimits,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            access: Access {
                tokens: Vec::new(),
                public_read: true,
            },
            message_limits: MessageLimits::default(),
            subscriptions_per_conn_max: 10_000,
            idempotency_keys_max: 1_000_000,
            idempotency_ttl_secs: crate::stock::idempotency::IDEMPOTENCY_TTL_SECS,
            skus_max: SKUS_MAX_DEFAULT,
            writes_in_flight_per_conn_max: WRITES_IN_FLIGHT_PER_CONN_MAX_DEFAULT,
            writes_per_conn_per_sec: 0,
            writes_per_token_per_sec: 0,
            allowed_origins: Vec::new(),
            role_name: "embedded".into(),
            tokens_file: None,
            fixed_tokens: Vec::new(),
            hold_limits: crate::stock::HoldLimits::default(),
        }
    }
}

/// Per-connection state of the service (HTTP and WebSocket alike), one per connection slot
/// whether the connection is idle or busy. What only some connections need at some moments
/// lives beside it, keyed by connection: the token name of a WebSocket that presented one
/// (`StockService::session_tokens`) and snapshots being sent (`StockService::snapshots`).
#[derive(Default)]
struct Session {
    generation: u32,
    /// Entries of the outbox addressed to this connection: while non-zero its replies queue.
    outbox_pending: u32,
    /// Write rate window: writes in it and its start (loop ms).
    window_writes: u32,
    role: Option<Role>,
    websocket: bool,
    /// Not read while its writes in flight are at their bound (listed in `held`).
    reads_held: bool,
    window_start_ms: u64,
}

/// Bytes of a session: three words (the three counters and the role and two flags in the first
/// two, the window start). 80 while the token name (24) and the snapshot queue (32,
/// and a ~350-byte buffer it kept after its first snapshot) lived here.
const SESSION_BYTES_MAX: usize = 24;
const _: () = assert!(std::mem::size_of::<Session>() <= SESSION_BYTES_MAX);

pub struct StockService {
    config: ServiceConfig,
    engine: Box<dyn Engine>,
    subs: Subscriptions,
    fanout: Fanout,
    outbox: VecDeque<Outgoing>,
    /// Scratch for [`Engine::poll`], kept for its capacity.
    progress: Vec<Progress>,
    /// SKUs of refused writes, forgotten (if unused) after the release that refused them.
    to_forget: Vec<SkuId>,
    /// Newest version of each SKU broadcast so far.
    sent_versions: SentVersions,
    /// `*`-only updates of the current release, sent as one frame run per subscriber.
    wildcard_batch: commit::WildcardBatch,
    sessions: Vec<Session>,
    /// Name of the token each WebSocket that presented one was opened with (for the per-token
    /// rate limit and for closing it when a reload revokes the token). Entries go when the
    /// WebSocket closes.
    session_tokens: HashMap<ConnId, Rc<str>, foldhash::fast::RandomState>,
    /// Snapshot replies being sent in chunks to a connection, the first one in progress (see
    /// `snapshot`). Only connections with one under way have an entry; it goes with the last
    /// chunk or the connection.
    snapshots: HashMap<ConnId, snapshot::Snapshots, foldhash::fast::RandomState>,
    released: Vec<SkuId>,
    /// Connections not read because of writes in flight, released as the outbox drains.
    /// INVARIANT: holds each connection whose session has `reads_held`, once.
    held: Vec<ConnId>,
    /// Per-token write rate windows.
    token_rates: auth::TokenRates,
    pub metrics: Metrics,
    started_ms: u64,
    /// Hold id -> the WebSocket that created it, to push `hold_expired` to. Entries go when
    /// the hold is committed, released or expires, so there are at most as many as live
    /// holds (bounded by `hold_limits.holds_max`); a stale holder (closed connection) is
    /// recognised by its generation.
    hold_owners: HashMap<Box<str>, ConnId>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl StockService {
    pub fn new(config: ServiceConfig, engine: Box<dyn Engine>) -> Self {
        StockService {
            config,
            engine,
            subs: Subscriptions::new(),
            fanout: Fanout::new(),
            outbox: VecDeque::new(),
            progress: Vec::new(),
            to_forget: Vec::new(),
            sent_versions: SentVersions::default(),
            wildcard_batch: commit::WildcardBatch::default(),
            sessions: Vec::new(),
            session_tokens: HashMap::default(),
            snapshots: HashMap::default(),
            released: Vec::new(),
            held: Vec::new(),
            token_rates: auth::TokenRates::default(),
            metrics: Metrics::default(),
            started_ms: 0,
            hold_owners: HashMap::new(),
        }
    }

    pub fn engine(&self) -> &dyn Engine {
        self.engine.as_ref()
    }

    /// Replaces the access rules (SIGHUP reload of the tokens file).
    pub fn set_access(&mut self, access: Access) {
        self.config.access = access;
    }

    fn session(&mut self, id: ConnId) -> &mut Session {
        let index = id.index as usize;
        if self.sessions.len() <= index {
            self.sessions.resize_with(index + 1, Session::default);
        }
        let session = &mut self.sessions[index];
        if session.generation != id.generation {
            *session = Session {
                generation: id.generation,
                ..Session::default()
            };
        }
        session
    }

    fn session_ref(&self, id: ConnId) -> Option<&Session> {
        self.sessions
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
    }

    fn role(&self, id: ConnId) -> Option<Role> {
        self.session_ref(id).and_then(|s| s.role)
    }

    /// The decided state of a SKU: what every reader sees.
    fn visible(&self, sku: SkuId) -> Stock {
        self.engine.visible(sku)
    }

    fn visible_by_name(&self, name: &str) -> Stock {
        self.engine
            .skus()
            .lookup(name)
            .map_or(Stock::default(), |sku| self.visible(sku))
    }

    /// Sends a reply now, or behind this connection's waiting outbox entries (or behind
    /// everything in flight, when `wait_for_inflight`).
    fn reply(
        &mut self,
        cx: &mut Ctx<'_>,
        id: ConnId,
        frame: Frame,
        close_after: bool,
        wait_for_inflight: bool,
    ) {
        let waiting = self.session_ref(id).is_some_and(|s| s.outbox_pending > 0);
        if waiting || (wait_for_inflight && !self.outbox.is_empty()) {
            self.session(id).outbox_pending += 1;
            self.outbox.push_back(Outgoing::Reply {
                seq: self.engine.last_ticket(),
                to: id,
                body: Body::Frame(frame),
                close_after,
            });
            return;
        }
        cx.send(id, frame);
        if close_after {
            cx.close(id);
        }
    }

    /// Replies with the visible state of `skus` (or of every known SKU), built now or, if this
    /// connection has replies waiting, when its turn comes.
    fn reply_states(
        &mut self,
        cx: &mut Ctx<'_>,
        id: ConnId,
        kind: &'static str,
        request_id: Option<Value>,
        names: Vec<String>,
        all_known: bool,
    ) {
        if self.session_ref(id).is_some_and(|s| s.outbox_pending > 0) {
            self.session(id).outbox_pending += 1;
            let body = Body::States {
                kind,
                id: request_id,
                names,
                all_known,
            };
            self.outbox.push_back(Outgoing::Reply {
                seq: self.engine.last_ticket(),
                to: id,
                body,
                close_after: false,
            });
            return;
        }
        let snapshot = snapshot::Snapshot::new(kind, request_id, names, all_known);
        self.start_snapshot(cx, id, snapshot);
    }

    /// Drops SKUs that nobody references and that were never written (reads and subscriptions
    /// of arbitrary names must not grow memory forever).
    fn forget_unused(&mut self, skus: impl IntoIterator<Item = SkuId>) {
        // A batch may name one SKU several times: forgetting it twice would touch a dead slot
        // (the store asserts on that), so each SKU is considered once.
        let mut skus: Vec<SkuId> = skus.into_iter().collect();
        skus.sort_unstable();
        skus.dedup();
        for sku in skus {
            if self.engine.skus().get(sku).version == 0 && !self.subs_reference(sku) {
                self.engine.forget(sku);
                self.sent_versions.forget(sku);
            }
        }
    }

    fn subs_reference(&self, sku: SkuId) -> bool {
        self.subs.is_held(sku)
    }

    fn uptime_secs(&self, cx: &Ctx<'_>) -> u64 {
        (cx.now_ms() - self.started_ms) / 1000
    }
}

impl Service for StockService {
    fn wants_websocket(&self, req: &Request) -> bool {
        req.path == "/ws" || (req.path == "/" && req.is_upgrade())
    }

    fn on_request(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) -> Option<Response> {
        self.handle_http(cx, id, req)
    }

    fn on_upgrade(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) -> Result<(), Response> {
        self.upgrade(cx, id, req)
    }

    fn on_ws_open(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) {
        self.ws_open(cx, id, req);
    }

    fn on_ws_message(&mut self, cx: &mut Ctx<'_>, id: ConnId, message: WsMessage<'_>) {
        self.metrics.ws_messages_in_total += 1;
        match message {
            WsMessage::Text(text) => self.ws_text(cx, id, text),
            WsMessage::Binary(_) => {
                let error = crate::api::ApiError::bad_request("messages must be JSON text frames");
                self.reply(cx, id, crate::api::reply::error(None, &error), false, false);
            }
        }
    }

    fn on_ws_close(&mut self, _cx: &mut Ctx<'_>, id: ConnId) {
        // The maps first: nothing below can then leave their entries behind.
        self.snapshots.remove(&id);
        self.session_tokens.remove(&id);
        let mut released = std::mem::take(&mut self.released);
        self.subs.remove_conn(id, &mut released);
        self.fanout.remove_conn(id);
        self.forget_unused(released.drain(..));
        self.released = released;
    }

    fn on_buffer_full(&mut self, cx: &mut Ctx<'_>, id: ConnId, pressure: Pressure) {
        match pressure {
            Pressure::High => self.metrics.slow_consumer_full_total += 1,
            Pressure::Hard => {
                self.metrics.slow_consumer_closed_total += 1;
                self.limit_hit(cx, id, metrics::LimitHit::SendQueueHard);
            }
        }
    }

    fn on_limit(&mut self, cx: &mut Ctx<'_>, id: ConnId, limit: crate::app::Limit) {
        self.limit_hit(cx, id, limit.into());
    }

    fn on_buffer_drain(&mut self, cx: &mut Ctx<'_>, id: ConnId) {
        // Conflated updates first (they stop as soon as the connection is full again), then
        // the next snapshot chunk, which is a reply and always goes.
        if self.fanout.has_pending(id) {
            let engine = self.engine.as_ref();
            self.fanout.drain(cx, &self.subs, id, |sku| {
                crate::api::reply::stock_update(engine.skus().name(sku), engine.visible(sku))
            });
        }
        if self.snapshot_pending(id) {
            self.send_next_chunk(cx, id);
        }
    }

    fn on_wake(&mut self, cx: &mut Ctx<'_>) {
        self.settle(cx);
    }

    fn before_sleep(&mut self, cx: &mut Ctx<'_>) {
        if self.started_ms == 0 {
            self.started_ms = cx.now_ms();
        }
        self.engine.before_sleep(cx);
        self.settle(cx);
        self.engine.after_settle(cx);
    }

    fn on_outbound(
        &mut self,
        cx: &mut Ctx<'_>,
        id: crate::net::OutboundId,
        readable: bool,
        writable: bool,
    ) {
        self.engine.on_outbound(cx, id, readable, writable);
        self.settle(cx);
    }

    fn can_exit(&self) -> bool {
        !self.engine.in_flight() && self.outbox.is_empty()
    }

    fn on_reload(&mut self, cx: &mut Ctx<'_>) {
        let Some(path) = self.config.tokens_file.clone() else {
            return;
        };
        let loaded = start::load_tokens(None, Some(&path)).and_then(|file_tokens| {
            let count = file_tokens.len();
            let mut tokens = self.config.fixed_tokens.clone();
            tokens.extend(file_tokens);
            auth::check_distinct_secrets(&tokens).map(|()| (tokens, count))
        });
        match loaded {
            Ok((tokens, count)) => {
                let before = std::mem::replace(&mut self.config.access.tokens, tokens);
                info!("tokens reloaded: {count} from {}", path.display());
                self.revoke_sessions(cx, &before);
            }
            Err(e) => log::error!("tokens not reloaded, keeping the old ones: {e}"),
        }
    }

    fn poll_timeout_ms(&self) -> Option<u64> {
        self.engine.poll_timeout_ms()
    }
}

/// Echoed request id, borrowed for reply builders.
fn id_ref(id: &Option<Value>) -> Option<&Value> {
    id.as_ref()
}

/// Announces the bound address on stdout (the real port when started with `:0`), for
/// operators' scripts and the test harness.
pub(crate) fn log_started(addr: std::net::SocketAddr) {
    use std::io::Write;
    info!("stocksync listening on {addr}");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "stocksync: listening on {addr}");
    let _ = out.flush();
}
