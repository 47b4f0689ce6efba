//! The Redis engine: one inventory shared by every stocksync process on one Redis.
//!
//! - Writes are decided in Redis, one Lua script per write ([`scripts::WRITE`]), sent with
//!   EVALSHA on a pipelined command link inside the loop; replies come back in order.
//! - Each process keeps a replica ([`Store`]) fed by a pub/sub change feed, and serves every
//!   read from it. Changes carry the global sequence: the replica applies them in sequence
//!   order, from the feed or from our own replies, whichever comes first. A write's ack is
//!   released only once its change is in the replica, so its writer never reads older.
//! - Never silently stale: a gap in the feed's sequence, a reply ahead of the feed for longer
//!   than [`GAP_WAIT_MS`], a probe of the sequence ahead of the replica for two probes, a feed
//!   that does not answer its ping, or any reconnect starts a catch-up
//!   ([`scripts::CHANGES_SINCE`]): every SKU changed since the replica's sequence is read and
//!   pushed to its subscribers in sequence order.
//! - Redis away: writes are refused with `unavailable` at once while no link is up, and a
//!   write whose reply does not come within [`WRITE_TIMEOUT_MS`] fails the link (its outcome
//!   is unknown: `unavailable`, and its idempotency key makes a retry safe). Reads go on from
//!   the replica. Links come back with exponential backoff and full jitter.
//! - An epoch key, made once per inventory, shows when Redis lost its data: the process then
//!   refuses writes and says so in `/healthz`, `/metrics` and the log.
//! - Holds (PROTOCOL.md "Holds") are decided in Redis too ([`scripts::WRITE`],
//!   [`scripts::HOLD`]). Every process mirrors them ([`Holds`], for `get` and its timers) from
//!   its replies, the feed's hold tokens, and Redis at start and after each catch-up. When a
//!   deadline passes, the process runs [`scripts::EXPIRE_HOLD`]; whichever process runs it
//!   first releases the hold, and every process reports that one change from the feed as
//!   [`Progress::HoldExpired`]. Design: docs/SCALING.md "Holds across processes".

mod holds_mirror;
pub mod link;
mod link_lifecycle;
pub mod loader;
mod replies;
mod requests;
pub mod resp;
pub mod scripts;
mod sequence;
pub mod url;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{error, warn};

use super::{wall_ms, Engine, EngineStatus, HoldStats, HoldView, Outcome, Progress, Submitted};
use crate::api::messages::HoldAction;
use crate::api::{ApiError, ErrorCode, WriteRequest};
use crate::net::{Ctx, OutboundId};
use crate::server::metrics::{single, Histogram};
use crate::stock::holds::{HoldLimits, HoldState, Holds, EXPIRED_MARKER_MS, TTL_MS_MAX};
use crate::stock::{HoldError, Op, OpError, SkuId, Stock, Store};
use link::Link;
use resp::Value;
use scripts::{HoldEvent, HoldRefusal, Keys};
use url::RedisUrl;

/// A write whose reply has not come after this long fails its link (PROTOCOL.md: writes are
/// answered within 1 s while Redis is unreachable).
pub const WRITE_TIMEOUT_MS: u64 = 800;
/// How long a change may wait for the feed to deliver the changes before it (a reply ahead of
/// the feed) before the process catches up by reading Redis.
pub const GAP_WAIT_MS: u64 = 300;
/// How often the current sequence is read to compare with the replica (a silent feed is
/// noticed after two probes ahead: about a second).
pub const PROBE_INTERVAL_MS: u64 = 500;
/// How often the feed link is pinged; no answer within the same time drops it.
pub const FEED_PING_INTERVAL_MS: u64 = 1_000;
/// Reconnect backoff: full jitter between 0 and min(max, base * 2^attempt).
pub const RECONNECT_BASE_MS: u64 = 100;
pub const RECONNECT_MAX_MS: u64 = 2_000;
/// SKUs read per catch-up round trip (a chunk is at most ~64 bytes a SKU).
pub const CATCH_UP_CHUNK_SKUS: usize = 20_000;
/// Changes held while waiting for the one before them; past it the buffer is dropped and the
/// process catches up instead.
pub const REORDER_CHANGES_MAX: usize = 100_000;
/// Writes in flight on the command link at most; past it new writes are refused
/// (`unavailable`) until replies come back.
pub const WRITES_IN_FLIGHT_MAX: usize = 100_000;

/// Hold expiries sent to Redis and not yet answered, at most (the rest wait their turn: one
/// second with 10,000 deadlines is still a few round trips of pipelined scripts).
pub const EXPIRIES_IN_FLIGHT_MAX: usize = 1_024;
/// How long before a hold is tried again after Redis said its deadline had not passed yet
/// (clocks of the process and of Redis differ a little) or the link broke.
pub const EXPIRY_RETRY_MS: u64 = 100;
/// Holds read per round trip when the hold mirror is loaded or reloaded (HSCAN COUNT).
pub const HOLDS_CHUNK: usize = 10_000;
/// Stale timer entries (left by extends and ended holds) tolerated beyond the live holds
/// before the timer heap is rebuilt from the mirror: the heap stays O(live holds).
const TIMER_SLACK_ENTRIES: usize = 1_024;

const _: () = assert!(WRITE_TIMEOUT_MS < 1_000);
const _: () = assert!(2 * PROBE_INTERVAL_MS + GAP_WAIT_MS < 2_000);

/// Settings of the Redis engine.
#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub url: RedisUrl,
    pub prefix: String,
    pub idempotency_ttl_secs: u64,
    pub hold_limits: HoldLimits,
    /// `--max-skus`, enforced by the write script across every process (0 = none).
    pub skus_max: usize,
}

/// One chunk of a catch-up reply ([`scripts::CHANGES_SINCE`]).
pub struct CatchUpChunk {
    pub seq: u64,
    pub epoch: String,
    pub through: String,
    pub more: bool,
    pub states: String,
}

impl CatchUpChunk {
    pub fn parse(reply: &Value) -> Result<CatchUpChunk, String> {
        let bad = || format!("unexpected catch-up reply from Redis: {reply:?}");
        let Value::Array(items) = reply else {
            return Err(match reply {
                Value::Error(e) => format!("Redis refused the catch-up script: {e}"),
                _ => bad(),
            });
        };
        if items.len() != 5 {
            return Err(bad());
        }
        let text = |v: &Value| v.as_str().map(str::to_string).ok_or_else(bad);
        Ok(CatchUpChunk {
            seq: items[0]
                .as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(bad)?,
            epoch: text(&items[1])?,
            through: match &items[2] {
                Value::Int(n) => n.to_string(),
                other => text(other)?,
            },
            more: items[3].as_int().ok_or_else(bad)? == 1,
            states: text(&items[4])?,
        })
    }
}

/// What a reply on the command link answers, in the order the commands were sent.
enum Expect {
    /// AUTH, SELECT, SCRIPT LOAD: an error ends the link.
    Setup(&'static str),
    /// The epoch, read after every (re)connect.
    Epoch,
    Write(Box<SentWrite>),
    CatchUp,
    Probe,
    /// An EXPIRE_HOLD of this hold.
    Expire(Box<str>),
    /// A chunk of the hold mirror's reload.
    Holds,
}

/// Which script a write runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Script {
    Write,
    Hold,
}

struct SentWrite {
    ticket: u64,
    ops: Vec<Op>,
    batch: bool,
    sent: Instant,
    sent_ms: u64,
    /// The EVAL arguments after the script, to send again after NOSCRIPT.
    args: Vec<String>,
    script: Script,
    /// The hold each op names (a hold command: its hold, at index 0), to name it in errors.
    holds: Vec<Option<String>>,
    /// An extend: its reply shows the hold.
    view_of: Option<String>,
}

/// Our own write that made a buffered change: resolved once the change is applied.
struct Answer {
    ticket: u64,
    results: String,
    view_of: Option<String>,
}

/// A change waiting in sequence order.
#[derive(Default)]
struct Buffered {
    changes: Vec<(String, Stock)>,
    holds: Vec<HoldEvent>,
    /// Made by this process and seen on the feed before its reply: it waits for the reply, so
    /// its writer hears the ack before anyone hears the change.
    awaits_reply: bool,
    /// Our own write that made it, resolved once applied.
    write: Option<Answer>,
    since_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkState {
    /// No link; the next attempt at `retry_at_ms`.
    Down { retry_at_ms: u64 },
    /// Connected (or connecting), commands pipelined.
    Up,
}

pub struct RedisEngine {
    config: RedisConfig,
    addr: SocketAddr,
    keys: Keys,
    write_sha: String,
    catch_up_sha: String,
    replica: Store,
    /// Names this process in the changes it writes (random per start).
    origin: String,
    /// Every change up to this global sequence is in the replica.
    applied_seq: u64,
    epoch: String,
    cmd: Option<Link>,
    cmd_state: LinkState,
    expects: VecDeque<Expect>,
    writes_in_flight: usize,
    feed: Option<Link>,
    feed_state: LinkState,
    feed_subscribed: bool,
    /// Sequence of the last feed message, while the feed is known to be gap-free.
    feed_seq: Option<u64>,
    feed_ping_sent_ms: Option<u64>,
    feed_ping_due_ms: u64,
    reconnect_attempts: u32,
    /// Changes ahead of `applied_seq`, by sequence.
    reorder: BTreeMap<u64, Buffered>,
    catch_up_needed: bool,
    catch_up_in_flight: bool,
    probe_in_flight: bool,
    probe_due_ms: u64,
    /// The sequence the last probe saw in Redis, if the replica was behind it.
    probe_target: Option<u64>,
    last_ticket: u64,
    done_through: u64,
    outcomes: BTreeMap<u64, Outcome>,
    events: Vec<Progress>,
    remote: Vec<(SkuId, Stock)>,
    now_ms: u64,
    data_lost: Option<String>,
    last_error: Option<String>,
    stats: RedisStats,
    scratch: Vec<Value>,
    hold_sha: String,
    expire_sha: String,
    holds_sha: String,
    /// Every live hold and the expired markers this process saw, mirrored from Redis (for
    /// `get` and for the expiry timers; Redis decides everything).
    holds: Holds,
    /// Deadlines to wake at (wall ms), earliest first; an entry whose hold is gone or was
    /// extended is skipped when it comes up.
    timers: BinaryHeap<Reverse<(u64, Box<str>)>>,
    /// Holds whose EXPIRE_HOLD is in flight.
    expiring: HashSet<Box<str>>,
    holds_taken_total: u64,
    /// The hold mirror's reload after a catch-up: the HSCAN cursor of the next chunk.
    reload_cursor: Option<String>,
    /// While a reload runs (and until the replica passes `reload_through`): the sequence at
    /// which each hold was last set, by the reload or by a change, so an older change applied
    /// after a newer chunk does not undo it.
    reload_guard: HashMap<Box<str>, u64>,
    reload_through: u64,
    /// A catch-up finished while a reload's chunk was in flight: the reload starts over once
    /// it comes back (never two scans at once).
    reload_again: bool,
}

#[derive(Default)]
struct RedisStats {
    reconnects_total: u64,
    resyncs_total: u64,
    feed_gaps_total: u64,
    data_loss_total: u64,
    round_trip: Histogram,
    feed_lag: Histogram,
}

impl RedisEngine {
    /// Loads the replica (blocking, before the port opens) and prepares the links. If Redis
    /// is unreachable now, the process still starts, refusing writes and serving nothing
    /// until the first link loads everything.
    pub fn start(config: RedisConfig) -> Result<RedisEngine, String> {
        let addr = config.url.resolve()?;
        let keys = Keys::new(&config.prefix);
        let (replica, applied_seq, epoch, catch_up_needed, loaded_holds, markers) =
            match loader::load(addr, &config.url, &keys, CATCH_UP_CHUNK_SKUS) {
                Ok(loaded) => (
                    loaded.replica,
                    loaded.applied_seq,
                    loaded.epoch,
                    false,
                    loaded.holds,
                    loaded.markers,
                ),
                Err(e) if e.starts_with(loader::CONNECT_FAILED) => {
                    warn!("starting without the inventory ({e}); it loads once Redis answers");
                    (Store::new(), 0, String::new(), true, Vec::new(), Vec::new())
                }
                Err(e) => return Err(e),
            };
        let origin = crate::cli::random_token()
            .map_err(|e| format!("cannot make a process id for Redis: {e}"))?;
        let holds = Holds::new(config.hold_limits);
        let mut engine = RedisEngine {
            origin,
            config,
            addr,
            keys,
            write_sha: scripts::sha1_hex(scripts::WRITE),
            catch_up_sha: scripts::sha1_hex(scripts::CHANGES_SINCE),
            replica,
            applied_seq,
            epoch,
            cmd: None,
            cmd_state: LinkState::Down { retry_at_ms: 0 },
            expects: VecDeque::new(),
            writes_in_flight: 0,
            feed: None,
            feed_state: LinkState::Down { retry_at_ms: 0 },
            feed_subscribed: false,
            feed_seq: None,
            feed_ping_sent_ms: None,
            feed_ping_due_ms: 0,
            reconnect_attempts: 0,
            reorder: BTreeMap::new(),
            catch_up_needed,
            catch_up_in_flight: false,
            probe_in_flight: false,
            probe_due_ms: 0,
            probe_target: None,
            last_ticket: 0,
            done_through: 0,
            outcomes: BTreeMap::new(),
            events: Vec::new(),
            remote: Vec::new(),
            now_ms: 0,
            data_lost: None,
            last_error: None,
            stats: RedisStats::default(),
            scratch: Vec::new(),
            hold_sha: scripts::sha1_hex(scripts::HOLD),
            expire_sha: scripts::sha1_hex(scripts::EXPIRE_HOLD),
            holds_sha: scripts::sha1_hex(scripts::HOLDS),
            holds,
            timers: BinaryHeap::new(),
            expiring: HashSet::new(),
            holds_taken_total: 0,
            reload_cursor: None,
            reload_guard: HashMap::new(),
            reload_through: 0,
            reload_again: false,
        };
        for (hold, deadline_ms, lines) in loaded_holds {
            engine.set_hold(&hold, Some((deadline_ms, &lines)));
        }
        let now = wall_ms();
        for (hold, at_ms) in markers {
            if at_ms.saturating_add(EXPIRED_MARKER_MS) > now {
                engine.holds.set(&hold, HoldState::Expired { at_ms });
            }
        }
        Ok(engine)
    }

    fn unavailable(&self) -> ApiError {
        let reason = self
            .refusing()
            .unwrap_or_else(|| "Redis is unreachable".into());
        ApiError::new(
            ErrorCode::Unavailable,
            format!("writes are unavailable: {reason}"),
        )
    }

    fn refusing(&self) -> Option<String> {
        if let Some(lost) = &self.data_lost {
            return Some(lost.clone());
        }
        if self.cmd_state != LinkState::Up {
            return Some(format!(
                "Redis at {} is unreachable{}",
                self.config.url,
                self.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})"))
            ));
        }
        if self.epoch.is_empty() {
            return Some("the inventory is still loading from Redis".into());
        }
        None
    }
}

/// One chunk of a scan of holds or expired markers ([`scripts::HOLDS`]).
pub struct HoldsChunk<T> {
    pub seq: u64,
    pub cursor: String,
    pub entries: Vec<(String, T)>,
}

impl<T> HoldsChunk<T> {
    /// `value` reads each entry's value (a packed hold, an expiry time).
    pub fn parse(reply: &Value, value: impl Fn(&str) -> Option<T>) -> Result<Self, String> {
        let bad = || format!("unexpected holds reply from Redis: {reply:?}");
        let Value::Array(items) = reply else {
            return Err(bad());
        };
        let [seq, cursor, Value::Array(pairs)] = items.as_slice() else {
            return Err(bad());
        };
        let mut entries = Vec::with_capacity(pairs.len() / 2);
        for pair in pairs.chunks(2) {
            let [id, packed] = pair else {
                return Err(bad());
            };
            let (Some(id), Some(packed)) = (id.as_str(), packed.as_str()) else {
                return Err(bad());
            };
            let parsed = value(packed)
                .ok_or_else(|| format!("malformed hold `{id}` in Redis: {packed:?}"))?;
            entries.push((id.to_string(), parsed));
        }
        Ok(HoldsChunk {
            seq: seq
                .as_int()
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(bad)?,
            cursor: cursor.as_str().ok_or_else(bad)?.to_string(),
            entries,
        })
    }
}

fn owned(states: Vec<(&str, Stock)>) -> Vec<(String, Stock)> {
    states
        .into_iter()
        .map(|(name, stock)| (name.to_string(), stock))
        .collect()
}

/// A number in `0..=cap` from the OS's random source (good enough for spreading retries).
fn jitter(cap: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(cap);
    hasher.finish() % (cap + 1)
}

impl Engine for RedisEngine {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn skus(&self) -> &Store {
        &self.replica
    }

    fn intern(&mut self, name: &str) -> Result<SkuId, OpError> {
        self.replica.intern(name)
    }

    fn forget(&mut self, sku: SkuId) {
        // A hold learned before its SKU's state (a reload ahead of the replica) names a SKU
        // still at version 0: the mirror keeps its id, so it stays.
        if self.replica.get(sku).version == 0 && self.holds.held(sku) == 0 {
            self.replica.forget(sku);
        }
    }

    fn visible(&self, sku: SkuId) -> Stock {
        self.replica.get(sku)
    }

    fn submit(&mut self, cx: &mut Ctx<'_>, req: &WriteRequest, _now_secs: u64) -> Submitted {
        self.ensure_links(cx);
        if self.refusing().is_some() {
            return Submitted::Now(Outcome::refused(self.unavailable()));
        }
        // Both queues toward Redis are bounded: what waits for a reply, and what is not even
        // written to the socket yet (Redis not reading).
        let unsent = self.cmd.as_ref().map_or(0, Link::output_len);
        if self.writes_in_flight >= WRITES_IN_FLIGHT_MAX || unsent > link::OUTPUT_BYTES_MAX {
            let error = ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "writes are unavailable: {} writes ({unsent} bytes unsent) already wait for \
                     Redis",
                    self.writes_in_flight
                ),
            );
            return Submitted::Now(Outcome::refused(error));
        }
        let mut ops = Vec::with_capacity(req.ops.len());
        for (index, spec) in req.ops.iter().enumerate() {
            match self.replica.intern(&spec.sku) {
                Ok(sku) => ops.push(spec.bind(sku)),
                Err(e) => {
                    let error = ApiError::from_op(&e, &spec.sku).at(req.batch.then_some(index));
                    let release = ops.iter().map(|op: &Op| op.sku).collect();
                    return Submitted::Now(Outcome::Refused { error, release });
                }
            }
        }
        let (args, script, holds, view_of) = match &req.hold {
            Some(command) => {
                let args = self.hold_args(req, &command.hold, command.action);
                let view_of = matches!(command.action, HoldAction::Extend { .. })
                    .then(|| command.hold.clone());
                (
                    args,
                    Script::Hold,
                    vec![Some(command.hold.clone())],
                    view_of,
                )
            }
            None => {
                let args = self.write_args(req, req.fingerprint().0, self.last_ticket + 1);
                let holds = req.ops.iter().map(|op| op.hold.clone()).collect();
                (args, Script::Write, holds, None)
            }
        };
        self.last_ticket += 1;
        let ticket = self.last_ticket;
        let write = SentWrite {
            ticket,
            ops,
            batch: req.batch,
            sent: Instant::now(),
            sent_ms: cx.now_ms(),
            args,
            script,
            holds,
            view_of,
        };
        self.send_write(cx, write, false);
        Submitted::Pending(ticket)
    }

    fn poll(&mut self, _cx: &mut Ctx<'_>, out: &mut Vec<Progress>) {
        self.flush_remote();
        out.append(&mut self.events);
    }

    fn take_outcome(&mut self, ticket: u64) -> Option<Outcome> {
        self.outcomes.remove(&ticket)
    }

    fn hold_view(&self, hold: &str, now_ms: u64) -> Result<HoldView, ApiError> {
        self.view(hold, now_ms)
    }

    fn last_ticket(&self) -> u64 {
        self.last_ticket
    }

    fn in_flight(&self) -> bool {
        self.writes_in_flight > 0
    }

    fn status(&self) -> EngineStatus {
        EngineStatus {
            refusing: self.refusing(),
            // Kept in Redis, with their TTL; not counted here.
            idempotency_keys: 0,
            // As this process's mirror knows them; `taken_total` counts holds its own
            // writes created.
            holds: HoldStats {
                live: self.holds.live_len(),
                expired_markers: self.holds.markers_len(),
                taken_total: self.holds_taken_total,
            },
        }
    }

    fn health(&self, out: &mut serde_json::Map<String, serde_json::Value>) {
        out.insert(
            "redis".into(),
            serde_json::json!({
                "url": self.config.url.to_string(),
                "prefix": self.config.prefix,
                "connected": self.cmd_state == LinkState::Up && self.feed_subscribed,
                "change_seq": self.applied_seq,
                "data_lost": self.data_lost.is_some(),
                "last_error": self.last_error,
            }),
        );
    }

    fn render_metrics(&self, out: &mut String) {
        let s = &self.stats;
        single(
            out,
            "stocksync_redis_connected",
            "gauge",
            "1 while both links to Redis (commands and change feed) are up.",
            u8::from(self.cmd_state == LinkState::Up && self.feed_subscribed),
        );
        single(
            out,
            "stocksync_redis_reconnects_total",
            "counter",
            "Links to Redis lost (each is reopened with backoff).",
            s.reconnects_total,
        );
        single(
            out,
            "stocksync_redis_resyncs_total",
            "counter",
            "Catch-ups: every SKU changed since the replica's sequence read again from Redis.",
            s.resyncs_total,
        );
        single(
            out,
            "stocksync_redis_feed_gaps_total",
            "counter",
            "Holes seen in the change feed's sequence (lost pub/sub messages).",
            s.feed_gaps_total,
        );
        single(
            out,
            "stocksync_redis_data_loss_total",
            "counter",
            "Times Redis was seen to have lost the inventory (its epoch changed).",
            s.data_loss_total,
        );
        single(
            out,
            "stocksync_redis_change_seq",
            "gauge",
            "Global change sequence the replica has applied.",
            self.applied_seq,
        );
        single(
            out,
            "stocksync_redis_changes_buffered",
            "gauge",
            "Changes waiting for an earlier one (feed lag in changes).",
            self.reorder.len(),
        );
        s.round_trip.render(
            out,
            "stocksync_redis_roundtrip_seconds",
            "From sending a write script to Redis to its reply.",
        );
        s.feed_lag.render(
            out,
            "stocksync_redis_feed_lag_seconds",
            "How long changes waited for the feed to bring the changes before them.",
        );
    }

    fn before_sleep(&mut self, cx: &mut Ctx<'_>) {
        self.ensure_links(cx);
        self.tick(cx);
        self.flush_links(cx);
    }

    fn on_outbound(&mut self, cx: &mut Ctx<'_>, id: OutboundId, _readable: bool, writable: bool) {
        self.now_ms = cx.now_ms();
        let mut replies = std::mem::take(&mut self.scratch);
        if self.cmd.as_ref().is_some_and(|l| l.id() == id) {
            let result = self
                .cmd
                .as_mut()
                .map(|link| link.on_ready(cx, writable, &mut replies));
            for value in replies.drain(..) {
                self.on_cmd_reply(cx, value);
            }
            if let Some(Err(e)) = result {
                self.cmd_down(cx, e.to_string());
            }
        } else if self.feed.as_ref().is_some_and(|l| l.id() == id) {
            let result = self
                .feed
                .as_mut()
                .map(|link| link.on_ready(cx, writable, &mut replies));
            for value in replies.drain(..) {
                self.on_feed_message(cx, value);
            }
            if let Some(Err(e)) = result {
                self.feed_down(cx, e.to_string());
            }
        }
        self.scratch = replies;
        self.maybe_catch_up();
        self.flush_links(cx);
    }

    fn poll_timeout_ms(&self) -> Option<u64> {
        let mut next = self.probe_due_ms.min(self.feed_ping_due_ms);
        for state in [self.cmd_state, self.feed_state] {
            if let LinkState::Down { retry_at_ms } = state {
                next = next.min(retry_at_ms);
            }
        }
        if let Some((_, first)) = self.reorder.first_key_value() {
            next = next.min(first.since_ms + GAP_WAIT_MS);
        }
        if let Some(Expect::Write(w)) = self.expects.iter().find(|e| matches!(e, Expect::Write(_)))
        {
            next = next.min(w.sent_ms + WRITE_TIMEOUT_MS);
        }
        let mut wait_ms = next.saturating_sub(self.now_ms).max(1);
        // Hold deadlines are wall-clock times (the loop's clock may be another).
        if let Some(Reverse((at, _))) = self.timers.peek() {
            if self.expiring.len() < EXPIRIES_IN_FLIGHT_MAX && self.refusing().is_none() {
                wait_ms = wait_ms.min(at.saturating_sub(wall_ms()).max(1));
            }
        }
        Some(wait_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_chunks_parse_and_refuse_garbage() {
        let text = |t: &str| Value::Bulk(t.as_bytes().to_vec());
        let reply = Value::Array(vec![
            Value::Int(42),
            text("17"),
            Value::Array(vec![
                text("h1"),
                text("1700 a 2 b 1"),
                text("h2"),
                text("9 c 3"),
            ]),
        ]);
        let chunk = HoldsChunk::parse(&reply, scripts::parse_packed_hold).unwrap();
        assert_eq!((chunk.seq, chunk.cursor.as_str()), (42, "17"));
        assert_eq!(chunk.entries.len(), 2);
        assert_eq!(chunk.entries[1], ("h2".into(), (9, vec![("c".into(), 3)])));
        let odd = Value::Array(vec![
            Value::Int(1),
            text("0"),
            Value::Array(vec![text("h1")]),
        ]);
        assert!(HoldsChunk::parse(&odd, scripts::parse_packed_hold).is_err());
        let bad = Value::Array(vec![
            Value::Int(1),
            text("0"),
            Value::Array(vec![text("h1"), text("x a 1")]),
        ]);
        assert!(HoldsChunk::parse(&bad, scripts::parse_packed_hold).is_err());
        assert_eq!(
            HoldRefusal::parse("ttl_range", "5"),
            Some(HoldRefusal::TtlRange(5))
        );
        assert_eq!(HoldRefusal::parse("nope", ""), None);
    }
}
