//! The engine seam: where the stock service commits writes and reads state, whichever store
//! holds the inventory.
//!
//! - [`embedded`]: the in-memory store with its write-ahead log on local disk (one process,
//!   one inventory).
//! - [`redis`]: a real Redis decides every write with a Lua script and feeds every process's
//!   replica through pub/sub (many processes, one inventory).
//!
//! Contract between the service and an engine:
//! - [`Engine::submit`] starts a write. It is answered at once ([`Submitted::Now`]: a duplicate,
//!   a refusal) or later ([`Submitted::Pending`] with a ticket). Tickets grow by one per
//!   pending write.
//! - [`Engine::poll`] reports progress in the order things happened: every ticket up to N has
//!   its outcome ([`Progress::Through`]), all of them do ([`Progress::All`], after a failure),
//!   or a change made elsewhere must be broadcast ([`Progress::Remote`]). The service then
//!   takes each outcome with [`Engine::take_outcome`], in ticket order.
//! - Reads ([`Engine::visible`]) show only what is decided: never a change that may still be
//!   refused, never older than an ack already sent.
//! - SKU names are interned by the engine's [`Store`] ([`Engine::skus`]): the service, the
//!   subscription index and the engine share one [`SkuId`] per name.

pub mod embedded;
pub mod redis;

use crate::api::{ApiError, WriteRequest};
use crate::net::{Ctx, OutboundId};
use crate::stock::{OpError, SkuId, Stock, Store};
use crate::wal::LogStats;

/// How a write ended.
#[derive(Debug)]
pub enum Outcome {
    /// Applied (or applied before, for a `duplicate` with the same idempotency key):
    /// `results` holds each op's SKU state after the write, in op order; `changed` each SKU
    /// the write changed, once, with its new state (empty for a duplicate).
    Applied {
        results: Vec<(SkuId, Stock)>,
        changed: Vec<(SkuId, Stock)>,
        duplicate: bool,
        /// The hold after an `extend` (its reply shows it, as `get` would).
        view: Option<HoldView>,
    },
    /// Refused; nothing changed. `release` lists SKUs the write interned, which the service
    /// may forget if nobody else holds them.
    Refused {
        error: ApiError,
        release: Vec<SkuId>,
    },
}

impl Outcome {
    pub fn refused(error: ApiError) -> Outcome {
        Outcome::Refused {
            error,
            release: Vec::new(),
        }
    }
}

/// What [`Engine::submit`] did with a write.
#[derive(Debug)]
pub enum Submitted {
    /// Decided without waiting (its answer still goes out behind writes in flight).
    Now(Outcome),
    /// In flight; its outcome is reported by [`Engine::poll`].
    Pending(u64),
}

/// Progress reported by [`Engine::poll`], in the order it happened.
#[derive(Debug)]
pub enum Progress {
    /// Every write up to this ticket has its outcome.
    Through(u64),
    /// Every write submitted so far has its outcome (the rest were failed together); ticket
    /// numbers may be reused after this.
    All,
    /// Changes made elsewhere (another process), newest state of each SKU, to broadcast.
    Remote(Vec<(SkuId, Stock)>),
    /// A hold expired (PROTOCOL.md "Holds"): its units went back to stock as one change, now
    /// decided. `changed` is each SKU's new state, to broadcast; `lag_ms` how long after the
    /// deadline the change was decided.
    HoldExpired {
        hold: String,
        changed: Vec<(SkuId, Stock)>,
        lag_ms: u64,
    },
}

/// A live hold as `get` shows it (PROTOCOL.md "Holds").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldView {
    pub hold: String,
    pub expires_in_ms: u64,
    pub lines: Vec<(SkuId, u64)>,
}

impl HoldView {
    /// `hold` as `get` shows it from `holds` (each engine keeps its own table), or why not.
    pub fn of(holds: &crate::stock::Holds, hold: &str, now_ms: u64) -> Result<HoldView, ApiError> {
        let (lines, deadline_ms) = holds
            .check_live(hold, now_ms)
            .map_err(|e| ApiError::from_hold(&e, hold))?;
        Ok(HoldView {
            hold: hold.to_string(),
            expires_in_ms: deadline_ms.saturating_sub(now_ms),
            lines: lines.to_vec(),
        })
    }
}

/// Hold figures for `/metrics`, kept by the engine that decides holds.
#[derive(Clone, Copy, Debug, Default)]
pub struct HoldStats {
    pub live: usize,
    pub expired_markers: usize,
    /// Holds created.
    pub taken_total: u64,
}

/// Milliseconds since the Unix epoch: hold deadlines are wall-clock times, so they keep
/// their meaning across a restart.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Figures for `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct EngineStatus {
    /// Why writes are refused right now, if they are.
    pub refusing: Option<String>,
    pub idempotency_keys: usize,
    pub holds: HoldStats,
}

/// The refusal of an engine that does not decide holds.
pub fn holds_unsupported(kind: &str, hold: &str) -> ApiError {
    ApiError::new(
        crate::api::ErrorCode::Unavailable,
        format!("hold `{hold}`: holds are not available with the {kind} engine yet"),
    )
}

pub trait Engine {
    /// `"embedded"` or `"redis"` (shown in `/healthz`).
    fn kind(&self) -> &'static str;
    /// SKU names and ids; its states may run ahead of [`Engine::visible`].
    fn skus(&self) -> &Store;
    /// The id of `name`, interning it (for reads and subscriptions).
    fn intern(&mut self, name: &str) -> Result<SkuId, OpError>;
    /// Frees `sku` if it was never written; the caller holds no other reference to it.
    fn forget(&mut self, sku: SkuId);
    /// The state every reader may see.
    fn visible(&self, sku: SkuId) -> Stock;
    /// Starts a write (see the module contract).
    fn submit(&mut self, cx: &mut Ctx<'_>, req: &WriteRequest, now_secs: u64) -> Submitted;
    /// Collects progress into `out` (see the module contract).
    fn poll(&mut self, cx: &mut Ctx<'_>, out: &mut Vec<Progress>);
    /// The outcome of a ticket reported done; `None` if it was already taken.
    fn take_outcome(&mut self, ticket: u64) -> Option<Outcome>;
    /// A live hold as `get` shows it, or why not (`unknown_hold`, `hold_expired`). Shows the
    /// hold as decided so far, like an ack would.
    fn hold_view(&self, hold: &str, _now_ms: u64) -> Result<HoldView, ApiError> {
        Err(holds_unsupported(self.kind(), hold))
    }
    /// The ticket of the newest pending write (replies queued now wait for it).
    fn last_ticket(&self) -> u64;
    /// Whether writes are in flight (the loop may not exit while they are).
    fn in_flight(&self) -> bool;
    fn status(&self) -> EngineStatus;
    /// The write-ahead log's figures (zeros where there is none).
    fn log_stats(&self) -> LogStats {
        LogStats::default()
    }
    /// Engine-specific lines appended to `/metrics` (Prometheus text).
    fn render_metrics(&self, _out: &mut String) {}
    /// Engine-specific fields of `/healthz`.
    fn health(&self, _out: &mut serde_json::Map<String, serde_json::Value>) {}
    /// Runs before the loop sleeps: hand batches to the disk or the network.
    fn before_sleep(&mut self, _cx: &mut Ctx<'_>) {}
    /// Runs before the loop sleeps, after the service released what `poll` reported.
    fn after_settle(&mut self, _cx: &mut Ctx<'_>) {}
    /// Readiness of an outbound connection this engine opened.
    fn on_outbound(
        &mut self,
        _cx: &mut Ctx<'_>,
        _id: OutboundId,
        _readable: bool,
        _writable: bool,
    ) {
    }
    /// The longest the loop may sleep for this engine's own timers.
    fn poll_timeout_ms(&self) -> Option<u64> {
        None
    }
    /// Gives the engine the loop's waker, for helper threads.
    fn set_waker(&mut self, _waker: std::sync::Arc<mio::Waker>) {}
}
