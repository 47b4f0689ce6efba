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

pub mod link;
pub mod loader;
pub mod resp;
pub mod scripts;
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

    fn backoff_ms(&mut self) -> u64 {
        let cap = RECONNECT_MAX_MS.min(RECONNECT_BASE_MS << self.reconnect_attempts.min(10));
        self.reconnect_attempts = self.reconnect_attempts.saturating_add(1);
        // Full jitter (AWS architecture blog): processes that lost Redis together do not
        // come back together.
        jitter(cap)
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

    // ---- links -------------------------------------------------------------------------

    /// Opens the links that are down and due.
    fn ensure_links(&mut self, cx: &mut Ctx<'_>) {
        self.now_ms = cx.now_ms();
        if let LinkState::Down { retry_at_ms } = self.cmd_state {
            if self.now_ms >= retry_at_ms {
                self.open_cmd(cx);
            }
        }
        if let LinkState::Down { retry_at_ms } = self.feed_state {
            if self.now_ms >= retry_at_ms {
                self.open_feed(cx);
            }
        }
    }

    fn open_cmd(&mut self, cx: &mut Ctx<'_>) {
        let mut link = match Link::connect(cx, self.addr) {
            Ok(link) => link,
            Err(e) => {
                self.cmd_down(cx, format!("connect: {e}"));
                return;
            }
        };
        for command in self.config.url.session_commands() {
            link.command(&command);
            self.expects.push_back(Expect::Setup("AUTH/SELECT"));
        }
        for script in scripts::ALL {
            link.command(&["SCRIPT", "LOAD", script]);
            self.expects.push_back(Expect::Setup("SCRIPT LOAD"));
        }
        // SET NX first: a fresh Redis gets its epoch here; a Redis that lost its data gets a
        // new one, which the GET then shows to differ from ours.
        match crate::cli::random_token() {
            Ok(fresh) => {
                link.command(&["SET", self.keys.epoch.as_str(), fresh.as_str(), "NX"]);
                self.expects.push_back(Expect::Setup("SET epoch"));
            }
            Err(e) => warn!("cannot make an epoch: {e}"),
        }
        link.command(&["GET", self.keys.epoch.as_str()]);
        self.expects.push_back(Expect::Epoch);
        self.cmd = Some(link);
        self.cmd_state = LinkState::Up;
        // Whatever changed while we were away is read again once the feed is back too.
        self.catch_up_needed = true;
    }

    fn open_feed(&mut self, cx: &mut Ctx<'_>) {
        let mut link = match Link::connect(cx, self.addr) {
            Ok(link) => link,
            Err(e) => {
                self.feed_down(cx, format!("connect: {e}"));
                return;
            }
        };
        for command in self.config.url.session_commands() {
            if command[0] == "AUTH" {
                link.command(&command);
            }
        }
        link.command(&["SUBSCRIBE", self.keys.channel.as_str()]);
        self.feed = Some(link);
        self.feed_state = LinkState::Up;
        self.feed_subscribed = false;
        self.feed_seq = None;
        self.feed_ping_sent_ms = None;
        self.feed_ping_due_ms = self.now_ms + FEED_PING_INTERVAL_MS;
    }

    /// The command link failed: every write in flight has an unknown outcome.
    fn cmd_down(&mut self, cx: &mut Ctx<'_>, why: String) {
        let link = self.cmd.take();
        self.drop_link(cx, link, "command link", why);
        let retry_at_ms = self.now_ms + self.backoff_ms();
        self.cmd_state = LinkState::Down { retry_at_ms };
        self.catch_up_in_flight = false;
        self.probe_in_flight = false;
        self.reload_cursor = None;
        self.reload_again = false;
        for expect in std::mem::take(&mut self.expects) {
            if let Expect::Expire(hold) = &expect {
                // Tried again once a link is back (the script is idempotent).
                self.expiring.remove(hold);
                let at = wall_ms() + EXPIRY_RETRY_MS;
                self.timers.push(Reverse((at, hold.clone())));
            }
            if let Expect::Write(write) = expect {
                let error = ApiError::new(
                    ErrorCode::Unavailable,
                    "the link to Redis broke before the write's reply: its outcome is unknown; \
                     retry it with the same idempotency key",
                );
                self.resolve(write.ticket, Outcome::refused(error));
            }
        }
        self.writes_in_flight = 0;
        // Changes Redis applied whose place in the sequence the feed has not confirmed yet:
        // their writers are answered now (the outcome is known), the replica takes them per
        // SKU (newer versions only), and the catch-up after reconnecting fills any gap.
        self.force_buffered();
    }

    fn feed_down(&mut self, cx: &mut Ctx<'_>, why: String) {
        let link = self.feed.take();
        self.drop_link(cx, link, "change feed", why);
        let retry_at_ms = self.now_ms + self.backoff_ms();
        self.feed_state = LinkState::Down { retry_at_ms };
        self.feed_subscribed = false;
        self.feed_seq = None;
        self.catch_up_needed = true;
    }

    /// Closes a lost link and records why. Only a link that was up is news: failed attempts
    /// while Redis stays away are not (the reason is in /healthz), so the log is not flooded
    /// at every backoff step.
    fn drop_link(&mut self, cx: &mut Ctx<'_>, link: Option<Link>, what: &str, why: String) {
        if let Some(link) = link {
            if link.is_connected() {
                warn!("Redis {what} lost: {why}");
                self.stats.reconnects_total += 1;
            } else {
                log::debug!("Redis {what} attempt failed: {why}");
            }
            link.close(cx);
        }
        self.last_error = Some(why);
    }

    fn flush_links(&mut self, cx: &mut Ctx<'_>) {
        if let Some(link) = self.cmd.as_mut() {
            if let Err(e) = link.flush(cx) {
                self.cmd_down(cx, e.to_string());
            }
        }
        if let Some(link) = self.feed.as_mut() {
            if let Err(e) = link.flush(cx) {
                self.feed_down(cx, e.to_string());
            }
        }
    }

    // ---- the sequence ------------------------------------------------------------------

    /// Records the outcome of `ticket` and reports every ticket done in order.
    fn resolve(&mut self, ticket: u64, outcome: Outcome) {
        self.outcomes.insert(ticket, outcome);
        let before = self.done_through;
        while self
            .outcomes
            .range(self.done_through + 1..)
            .next()
            .is_some_and(|(&t, _)| t == self.done_through + 1)
        {
            self.done_through += 1;
        }
        if self.done_through != before {
            self.flush_remote();
            self.events.push(Progress::Through(self.done_through));
        }
    }

    fn flush_remote(&mut self) {
        if !self.remote.is_empty() {
            self.events
                .push(Progress::Remote(std::mem::take(&mut self.remote)));
        }
    }

    /// Puts states into the replica (newer versions only) and returns what changed.
    fn apply_states(&mut self, states: &[(String, Stock)]) -> Vec<(SkuId, Stock)> {
        let mut changed = Vec::with_capacity(states.len());
        for (name, stock) in states {
            match self.replica.intern(name) {
                Ok(sku) => {
                    if stock.version > self.replica.get(sku).version {
                        let _ = self.replica.restore(name, *stock);
                        changed.push((sku, *stock));
                    }
                }
                Err(e) => warn!("ignoring SKU `{name}` from Redis: {e}"),
            }
        }
        changed
    }

    /// Applies a buffered change that is next in sequence (or forced): to the replica and
    /// the hold mirror, then to its writer or to the subscribers (an expiry as
    /// [`Progress::HoldExpired`], which every process reports: the one whose connection took
    /// the hold pushes `hold_expired`, all broadcast the units freed).
    fn apply_buffered(&mut self, seq: u64, buffered: Buffered) {
        let changed = self.apply_states(&buffered.changes);
        let mut expired = None;
        for event in &buffered.holds {
            if buffered.write.is_some()
                && matches!(event, HoldEvent::Live { .. })
                && !matches!(self.holds.state(event.hold(), 0), HoldState::Live { .. })
            {
                self.holds_taken_total += 1;
            }
            let applied = self.apply_hold_event(seq, event);
            if let HoldEvent::Expired {
                hold,
                at_ms,
                deadline_ms,
            } = event
            {
                // Not if a reload already reported it (see `ghost_expired`).
                if applied {
                    expired = Some((hold.clone(), at_ms.saturating_sub(*deadline_ms)));
                }
            }
        }
        match (buffered.write, expired) {
            (Some(answer), _) => {
                let outcome = self.applied_outcome(&answer, changed);
                self.resolve(answer.ticket, outcome);
            }
            (None, Some((hold, lag_ms))) => {
                self.flush_remote();
                self.events.push(Progress::HoldExpired {
                    hold,
                    changed,
                    lag_ms,
                });
            }
            (None, None) => self.remote.extend(changed),
        }
    }

    fn applied_outcome(&mut self, answer: &Answer, changed: Vec<(SkuId, Stock)>) -> Outcome {
        let mut states = Vec::new();
        for (name, stock) in scripts::parse_states(&answer.results).unwrap_or_default() {
            if let Ok(sku) = self.replica.intern(name) {
                states.push((sku, stock));
            }
        }
        let view = answer
            .view_of
            .as_deref()
            .and_then(|hold| self.view(hold, wall_ms()).ok());
        Outcome::Applied {
            results: states,
            changed,
            duplicate: false,
            view,
        }
    }

    // ---- the hold mirror ---------------------------------------------------------------

    /// A hold event of the change at `seq`, unless a newer reload chunk already set the hold
    /// (then it returns false).
    fn apply_hold_event(&mut self, seq: u64, event: &HoldEvent) -> bool {
        let hold = event.hold();
        if self.reload_guard.get(hold).is_some_and(|&at| at >= seq) {
            return false;
        }
        if self.reload_cursor.is_some() {
            self.reload_guard.insert(hold.into(), seq);
        }
        match event {
            HoldEvent::Live {
                deadline_ms, lines, ..
            } => self.set_hold(hold, Some((*deadline_ms, lines))),
            HoldEvent::Gone { .. } => self.set_hold(hold, None),
            HoldEvent::Expired { at_ms, .. } => {
                self.holds.set(hold, HoldState::Expired { at_ms: *at_ms });
            }
        }
        true
    }

    /// A hold live in the mirror but gone from Redis, its deadline passed: the change that
    /// ended it reached this process only as states (a catch-up after the feed lost it), so
    /// it most likely expired. It is remembered as expired (`get` answers `hold_expired`; a
    /// commit is decided by Redis anyway) and reported, so its holder hears `hold_expired`
    /// (the states are the replica's; the service never broadcasts a version twice).
    fn ghost_expired(&mut self, hold: &str, deadline_ms: u64, through_seq: u64) {
        let lines: Vec<SkuId> = match self.holds.state(hold, 0) {
            HoldState::Live { lines, .. } => lines.iter().map(|&(sku, _)| sku).collect(),
            _ => return,
        };
        let now = wall_ms();
        self.holds.set(hold, HoldState::Expired { at_ms: now });
        // A change about it still on its way (older than what Redis showed) is skipped.
        self.reload_guard.insert(hold.into(), through_seq);
        self.reload_through = self.reload_through.max(through_seq);
        let changed = lines
            .into_iter()
            .map(|sku| (sku, self.replica.get(sku)))
            .collect();
        self.flush_remote();
        self.events.push(Progress::HoldExpired {
            hold: hold.to_string(),
            changed,
            lag_ms: now.saturating_sub(deadline_ms),
        });
    }

    /// Sets a hold live with its lines and deadline (arming its timer), or gone.
    fn set_hold(&mut self, hold: &str, live: Option<(u64, &[(String, u64)])>) {
        let Some((deadline_ms, lines)) = live else {
            self.holds.set(hold, HoldState::Gone);
            return;
        };
        let mut interned = Vec::with_capacity(lines.len());
        for (name, units) in lines {
            match self.replica.intern(name) {
                Ok(sku) => interned.push((sku, *units)),
                Err(e) => warn!("ignoring hold `{hold}` line `{name}` from Redis: {e}"),
            }
        }
        if interned.is_empty() {
            self.holds.set(hold, HoldState::Gone);
            return;
        }
        self.holds.set(
            hold,
            HoldState::Live {
                lines: interned,
                deadline_ms,
            },
        );
        self.timers.push(Reverse((deadline_ms, hold.into())));
        if self.timers.len() > 2 * self.holds.live_len() + TIMER_SLACK_ENTRIES {
            self.timers = self
                .holds
                .live()
                .map(|(name, _, deadline_ms)| Reverse((deadline_ms, name.into())))
                .collect();
        }
    }

    fn view(&self, hold: &str, now_ms: u64) -> Result<HoldView, ApiError> {
        let (lines, deadline_ms) = self
            .holds
            .check_live(hold, now_ms)
            .map_err(|e| ApiError::from_hold(&e, hold))?;
        Ok(HoldView {
            hold: hold.to_string(),
            expires_in_ms: deadline_ms.saturating_sub(now_ms),
            lines: lines.to_vec(),
        })
    }

    /// Sends EXPIRE_HOLD for every mirrored hold whose deadline passed (whichever process
    /// runs it first releases the hold; for the others it is a no-op).
    fn fire_expiries(&mut self) {
        if self.cmd_state != LinkState::Up || self.refusing().is_some() {
            return;
        }
        let now = wall_ms();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now || self.expiring.len() >= EXPIRIES_IN_FLIGHT_MAX {
                break;
            }
            let Some(Reverse((_, hold))) = self.timers.pop() else {
                break;
            };
            let due = matches!(
                self.holds.state(&hold, now),
                HoldState::Live { deadline_ms, .. } if deadline_ms <= now
            );
            if !due || self.expiring.contains(&hold) {
                continue;
            }
            let Some(link) = self.cmd.as_mut() else {
                break;
            };
            let marker = format!("{}{hold}", self.keys.expired_prefix);
            let marker_ms = EXPIRED_MARKER_MS.to_string();
            // Another origin than our writes': nobody waits for this reply, so the change is
            // applied from whichever of the feed and the reply comes first.
            let origin = format!("{}-expiry", self.origin);
            link.command(&[
                "EVALSHA",
                self.expire_sha.as_str(),
                "9",
                self.keys.stock.as_str(),
                self.keys.changed.as_str(),
                self.keys.seq.as_str(),
                self.keys.epoch.as_str(),
                self.keys.holds.as_str(),
                self.keys.held.as_str(),
                self.keys.deadlines.as_str(),
                marker.as_str(),
                self.keys.expired_index.as_str(),
                self.keys.channel.as_str(),
                origin.as_str(),
                &hold,
                marker_ms.as_str(),
            ]);
            self.expiring.insert(hold.clone());
            self.expects.push_back(Expect::Expire(hold));
        }
    }

    fn on_expire_reply(&mut self, cx: &mut Ctx<'_>, hold: Box<str>, value: Value) {
        self.expiring.remove(&hold);
        let retry = |engine: &mut Self, after_ms: u64| {
            let at = wall_ms() + after_ms.max(EXPIRY_RETRY_MS);
            engine.timers.push(Reverse((at, hold.clone())));
        };
        let items = match value {
            Value::Array(items) => items,
            Value::Error(e) if e.starts_with("NOSCRIPT") => {
                // The script cache was flushed: load the scripts again on this link (the
                // replies are only checked for errors), then try again.
                if let Some(link) = self.cmd.as_mut() {
                    for script in scripts::ALL {
                        link.command(&["SCRIPT", "LOAD", script]);
                        self.expects.push_back(Expect::Setup("SCRIPT LOAD"));
                    }
                }
                retry(self, 0);
                return;
            }
            Value::Error(e) => {
                error!("Redis refused to expire hold `{hold}`: {e}");
                retry(self, 1_000);
                return;
            }
            other => {
                self.cmd_down(cx, format!("unexpected expiry reply {other:?}"));
                return;
            }
        };
        let int = |i: usize| {
            items
                .get(i)
                .and_then(Value::as_int)
                .and_then(|n| u64::try_from(n).ok())
        };
        match items.first().and_then(Value::as_str) {
            Some("ok") => {
                let change = items
                    .get(2)
                    .and_then(Value::as_str)
                    .and_then(scripts::parse_change);
                let (Some(seq), Some(change)) = (int(1), change) else {
                    self.cmd_down(cx, "malformed expiry reply".into());
                    return;
                };
                let epoch = change.epoch.to_string();
                self.check_epoch(&epoch);
                let states = owned(change.states);
                self.offer(seq, states, change.holds, None, false);
            }
            Some("gone") => {
                // Still live here although every change up to `seq` is applied: a hold the
                // mirror kept by mistake (a reload raced with its end). Its deadline passed,
                // so it most likely expired. (Usually the other process's expiry is already
                // applied here, and the hold is marked expired: left as is.)
                if let (Some(seq), HoldState::Live { deadline_ms, .. }) =
                    (int(1), self.holds.state(&hold, 0))
                {
                    if seq <= self.applied_seq {
                        self.ghost_expired(&hold, deadline_ms, seq);
                    }
                }
            }
            Some("later") => {
                let (deadline, now) = (int(1).unwrap_or(0), int(2).unwrap_or(0));
                retry(self, deadline.saturating_sub(now));
            }
            _ => self.cmd_down(cx, "unexpected expiry reply".into()),
        }
    }

    /// Starts reloading the hold mirror (after a catch-up: changes the feed lost may have
    /// taken, ended or extended holds).
    fn start_holds_reload(&mut self) {
        if self.reload_cursor.is_some() {
            self.reload_again = true;
            return;
        }
        self.reload_guard.clear();
        self.reload_cursor = Some("0".into());
        self.send_holds_chunk();
    }

    fn send_holds_chunk(&mut self) {
        let (Some(link), Some(cursor)) = (self.cmd.as_mut(), self.reload_cursor.as_ref()) else {
            return;
        };
        let count = HOLDS_CHUNK.to_string();
        link.command(&[
            "EVALSHA",
            self.holds_sha.as_str(),
            "2",
            self.keys.holds.as_str(),
            self.keys.seq.as_str(),
            cursor.as_str(),
            count.as_str(),
            "hash",
        ]);
        self.expects.push_back(Expect::Holds);
    }

    fn on_holds_chunk(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let chunk = match HoldsChunk::parse(&value, scripts::parse_packed_hold) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.cmd_down(cx, e);
                return;
            }
        };
        if self.reload_cursor.is_none() {
            return;
        }
        for (hold, (deadline_ms, lines)) in chunk.entries {
            if self
                .reload_guard
                .get(hold.as_str())
                .is_some_and(|&at| at > chunk.seq)
            {
                continue;
            }
            self.reload_guard.insert(hold.as_str().into(), chunk.seq);
            self.set_hold(&hold, Some((deadline_ms, &lines)));
        }
        self.reload_through = self.reload_through.max(chunk.seq);
        if std::mem::take(&mut self.reload_again) {
            self.reload_cursor = Some("0".into());
            self.send_holds_chunk();
            return;
        }
        if chunk.cursor != "0" {
            self.reload_cursor = Some(chunk.cursor);
            self.send_holds_chunk();
            return;
        }
        self.reload_cursor = None;
        // Live here but neither in Redis nor set by a change since the reload began: ended
        // while the feed was away (see `ghost_expired`).
        let now = wall_ms();
        let ghosts: Vec<(Box<str>, u64)> = self
            .holds
            .live()
            .filter(|(name, _, _)| !self.reload_guard.contains_key(*name))
            .map(|(name, _, deadline_ms)| (name.into(), deadline_ms))
            .collect();
        let through = self.reload_through;
        for (hold, deadline_ms) in ghosts {
            if deadline_ms <= now {
                self.ghost_expired(&hold, deadline_ms, through);
            } else {
                self.holds.set(&hold, HoldState::Gone);
            }
        }
        self.maybe_drop_reload_guard();
    }

    /// The guard is needed only until the replica has passed every reload chunk's sequence.
    fn maybe_drop_reload_guard(&mut self) {
        if self.reload_cursor.is_none() && self.applied_seq >= self.reload_through {
            self.reload_guard = HashMap::new();
        }
    }

    /// A change with its global sequence, from the feed or from our own reply.
    fn offer(
        &mut self,
        seq: u64,
        changes: Vec<(String, Stock)>,
        holds: Vec<HoldEvent>,
        write: Option<Answer>,
        from_feed_ours: bool,
    ) {
        if seq <= self.applied_seq {
            // Already in the replica (the other path brought it first, with its hold events).
            if let Some(answer) = write {
                let changed = self.apply_states(&changes);
                let outcome = self.applied_outcome(&answer, changed);
                self.resolve(answer.ticket, outcome);
            }
            return;
        }
        let now = self.now_ms;
        let entry = self.reorder.entry(seq).or_insert_with(|| Buffered {
            since_ms: now,
            ..Buffered::default()
        });
        if entry.changes.is_empty() && entry.holds.is_empty() {
            entry.changes = changes;
            entry.holds = holds;
        }
        if write.is_some() {
            entry.write = write;
            entry.awaits_reply = false;
        } else if from_feed_ours && entry.write.is_none() {
            entry.awaits_reply = true;
        }
        if self.reorder.len() > REORDER_CHANGES_MAX {
            warn!("more than {REORDER_CHANGES_MAX} changes out of order; catching up");
            self.force_buffered();
            self.catch_up_needed = true;
            return;
        }
        self.drain_in_order();
    }

    /// Applies buffered changes while the next one in sequence is there.
    fn drain_in_order(&mut self) {
        if self.catch_up_in_flight {
            return;
        }
        while let Some(entry) = self.reorder.first_entry() {
            if *entry.key() != self.applied_seq + 1 || entry.get().awaits_reply {
                break;
            }
            let (seq, buffered) = entry.remove_entry();
            self.applied_seq = seq;
            let waited_ms = self.now_ms.saturating_sub(buffered.since_ms);
            self.stats
                .feed_lag
                .observe(Duration::from_millis(waited_ms));
            self.apply_buffered(seq, buffered);
        }
        self.maybe_drop_reload_guard();
    }

    /// Applies every buffered change now, whatever the gaps (per SKU, newer versions only).
    fn force_buffered(&mut self) {
        for (seq, buffered) in std::mem::take(&mut self.reorder) {
            self.apply_buffered(seq, buffered);
        }
    }

    fn check_epoch(&mut self, epoch: &str) {
        if epoch.is_empty() || epoch == self.epoch {
            return;
        }
        // Nothing was ever seen: a new epoch loses nothing (a fresh Redis behind a fresh
        // inventory), so it is adopted quietly.
        if self.epoch.is_empty() || (self.applied_seq == 0 && self.replica.known_len() == 0) {
            self.epoch = epoch.to_string();
            return;
        }
        if self.data_lost.is_none() {
            let message = format!(
                "Redis lost its data (inventory epoch {} became {epoch}): writes are refused; \
                 restore Redis from its backup or append-only file, then restart stocksync",
                self.epoch
            );
            error!("{message}");
            self.stats.data_loss_total += 1;
            self.data_lost = Some(message);
        }
    }

    // ---- replies -----------------------------------------------------------------------

    fn on_cmd_reply(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let Some(expect) = self.expects.pop_front() else {
            self.cmd_down(cx, "a reply nobody asked for".into());
            return;
        };
        match expect {
            Expect::Setup(what) => {
                if let Value::Error(e) = value {
                    error!("Redis refused {what}: {e}");
                    self.cmd_down(cx, format!("{what}: {e}"));
                } else {
                    self.reconnect_attempts = 0;
                }
            }
            Expect::Epoch => {
                if let Some(epoch) = value.as_str() {
                    let epoch = epoch.to_string();
                    self.check_epoch(&epoch);
                }
            }
            Expect::Write(write) => {
                self.writes_in_flight = self.writes_in_flight.saturating_sub(1);
                self.stats.round_trip.observe(write.sent.elapsed());
                self.on_write_reply(cx, *write, value);
            }
            Expect::CatchUp => self.on_catch_up_reply(cx, value),
            Expect::Expire(hold) => self.on_expire_reply(cx, hold, value),
            Expect::Holds => self.on_holds_chunk(cx, value),
            Expect::Probe => {
                self.probe_in_flight = false;
                let seq = value
                    .as_int()
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0);
                // A live feed brings, within a probe interval, every change the previous probe
                // saw in Redis; one that did not is silent.
                if self
                    .probe_target
                    .is_some_and(|target| self.applied_seq < target)
                {
                    warn!(
                        "Redis was at change {} a probe ago but the feed brought only {}: \
                         rebuilding the feed",
                        self.probe_target.unwrap_or(0),
                        self.applied_seq
                    );
                    self.probe_target = None;
                    self.feed_down(cx, "silent while changes go on".into());
                    self.feed_state = LinkState::Down { retry_at_ms: 0 };
                } else {
                    self.probe_target = (seq > self.applied_seq).then_some(seq);
                }
            }
        }
    }

    fn on_write_reply(&mut self, cx: &mut Ctx<'_>, write: SentWrite, value: Value) {
        let items = match value {
            Value::Array(items) => items,
            Value::Error(e) if e.starts_with("NOSCRIPT") => {
                // The script cache was flushed: send the script itself, in the same place in
                // the pipeline order as far as this link goes.
                self.send_write(cx, write, true);
                return;
            }
            Value::Error(e) => {
                let error = ApiError::new(
                    ErrorCode::Unavailable,
                    format!("writes are unavailable: Redis refused the write: {e}"),
                );
                self.resolve(write.ticket, Outcome::refused(error));
                return;
            }
            other => {
                self.cmd_down(cx, format!("unexpected write reply {other:?}"));
                return;
            }
        };
        let tag = items.first().and_then(Value::as_str).unwrap_or("");
        match tag {
            "ok" if items.len() == 4 => {
                let seq = items[1].as_int().and_then(|n| u64::try_from(n).ok());
                let payload = items[2].as_str().and_then(scripts::parse_change);
                let results = items[3].as_str();
                let (Some(seq), Some(change), Some(results)) = (seq, payload, results) else {
                    self.cmd_down(cx, "malformed write reply".into());
                    return;
                };
                let epoch = change.epoch.to_string();
                self.check_epoch(&epoch);
                let changes = owned(change.states);
                let answer = Answer {
                    ticket: write.ticket,
                    results: results.to_string(),
                    view_of: write.view_of.clone(),
                };
                self.offer(seq, changes, change.holds, Some(answer), false);
            }
            "dup" if items.len() == 2 => {
                let answer = Answer {
                    ticket: write.ticket,
                    results: items[1].as_str().unwrap_or("").to_string(),
                    view_of: write.view_of.clone(),
                };
                let mut outcome = self.applied_outcome(&answer, Vec::new());
                if let Outcome::Applied { duplicate, .. } = &mut outcome {
                    *duplicate = true;
                }
                self.resolve(write.ticket, outcome);
            }
            "full" => {
                let error = ApiError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the inventory holds its maximum of {} SKUs; this write would add more",
                        self.config.skus_max
                    ),
                );
                let release = write.ops.iter().map(|op| op.sku).collect();
                self.resolve(write.ticket, Outcome::Refused { error, release });
            }
            "mismatch" => {
                let error =
                    ApiError::bad_request("idempotency key already used for a different request");
                self.resolve(write.ticket, Outcome::refused(error));
            }
            "err" if items.len() == 8 => {
                let outcome = self.rule_error(&write, &items);
                self.resolve(write.ticket, outcome);
            }
            "herr" if items.len() == 4 => {
                let outcome = self.hold_error(&write, &items);
                self.resolve(write.ticket, outcome);
            }
            _ => self.cmd_down(cx, format!("unexpected write reply {items:?}")),
        }
    }

    /// Rebuilds the refusal from the state the failing op saw, with the store's own rules, so
    /// both engines give the same error for the same request.
    fn rule_error(&mut self, write: &SentWrite, items: &[Value]) -> Outcome {
        let n = |i: usize| {
            items[i]
                .as_int()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0)
        };
        let index = n(1) as usize;
        let Some(op) = write.ops.get(index) else {
            return Outcome::refused(ApiError::new(ErrorCode::Internal, "bad script reply"));
        };
        let committed = Stock {
            on_hand: n(2),
            reserved: n(3),
            version: n(4),
        };
        let working = Stock {
            on_hand: n(5),
            reserved: n(6),
            version: committed.version,
        };
        let mut held = n(7);
        // stage_op asserts held <= reserved: a Redis that says otherwise gets the generic
        // refusal below instead of a panic.
        let error = if committed.is_valid() && working.is_valid() && held <= working.reserved {
            crate::stock::store::stage_op(op, committed, working, &mut held).err()
        } else {
            None
        }
        .unwrap_or(OpError::InvalidChange {
            action: op.action,
            amount: Some(i128::from(op.amount)),
        });
        let name = self.replica.name(op.sku).to_string();
        Outcome::Refused {
            error: ApiError::from_op(&error, &name).at(write.batch.then_some(index)),
            release: write.ops.iter().map(|op| op.sku).collect(),
        }
    }

    /// Rebuilds a hold rule's refusal (`{"herr", index, why, detail}`) as the embedded
    /// engine words it.
    fn hold_error(&mut self, write: &SentWrite, items: &[Value]) -> Outcome {
        let index = items[1]
            .as_int()
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(0);
        let why = items[2].as_str().unwrap_or("");
        let detail = items[3].as_str().unwrap_or("");
        let hold = write
            .holds
            .get(index)
            .and_then(|h| h.as_deref())
            .unwrap_or_default();
        let limits = self.config.hold_limits;
        let error = match HoldRefusal::parse(why, detail) {
            Some(HoldRefusal::Unknown) => HoldError::Unknown,
            Some(HoldRefusal::Expired) => HoldError::Expired,
            Some(HoldRefusal::TtlRequired) => HoldError::TtlRequired,
            Some(HoldRefusal::TtlRange(ttl_ms)) => HoldError::TtlOutOfRange {
                ttl_ms,
                max: limits.ttl_ms_max.min(TTL_MS_MAX),
            },
            Some(HoldRefusal::Full) => HoldError::HoldsFull {
                max: limits.holds_max,
            },
            Some(HoldRefusal::Lines) => HoldError::TooManyLines {
                max: limits.lines_max,
            },
            None => {
                return Outcome::refused(ApiError::new(ErrorCode::Internal, "bad script reply"))
            }
        };
        Outcome::Refused {
            error: ApiError::from_hold(&error, hold).at(write.batch.then_some(index)),
            release: write.ops.iter().map(|op| op.sku).collect(),
        }
    }

    fn on_catch_up_reply(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let chunk = match CatchUpChunk::parse(&value) {
            Ok(chunk) => chunk,
            Err(e) => {
                self.catch_up_in_flight = false;
                self.cmd_down(cx, e);
                return;
            }
        };
        self.check_epoch(&chunk.epoch);
        let states: Vec<(String, Stock)> = scripts::parse_states(&chunk.states)
            .unwrap_or_default()
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        let changed = self.apply_states(&states);
        self.remote.extend(changed);
        if chunk.more {
            self.send_catch_up(&chunk.through);
            return;
        }
        self.catch_up_in_flight = false;
        self.applied_seq = self.applied_seq.max(chunk.seq);
        // Buffered changes the catch-up covered: their writers are answered now.
        while let Some(entry) = self.reorder.first_entry() {
            if *entry.key() > self.applied_seq {
                break;
            }
            let (seq, buffered) = entry.remove_entry();
            self.apply_buffered(seq, buffered);
        }
        self.drain_in_order();
        self.flush_remote();
        self.start_holds_reload();
    }

    fn on_feed_message(&mut self, cx: &mut Ctx<'_>, value: Value) {
        let Value::Array(items) = value else {
            self.feed_down(cx, format!("unexpected feed reply {value:?}"));
            return;
        };
        match items.first().and_then(Value::as_str) {
            Some("subscribe") => {
                if self.last_error.is_some() {
                    log::info!("Redis change feed subscribed again; catching up");
                }
                self.feed_subscribed = true;
                self.reconnect_attempts = 0;
                // Anything published before the subscription took effect is read back.
                self.catch_up_needed = true;
            }
            Some("pong") => self.feed_ping_sent_ms = None,
            Some("message") if items.len() == 3 => {
                let Some(change) = items[2].as_str().and_then(scripts::parse_change) else {
                    warn!("malformed change on the feed; catching up");
                    self.catch_up_needed = true;
                    return;
                };
                let epoch = change.epoch.to_string();
                self.check_epoch(&epoch);
                let seq = change.seq;
                let ours = change.origin == self.origin;
                if let Some(last) = self.feed_seq {
                    if seq > last + 1 && seq > self.applied_seq + 1 {
                        // Pub/sub is at-most-once: a hole means lost messages.
                        self.stats.feed_gaps_total += 1;
                        self.catch_up_needed = true;
                    }
                }
                self.feed_seq = Some(seq);
                let states = owned(change.states);
                self.offer(seq, states, change.holds, None, ours);
            }
            _ => {}
        }
    }

    // ---- requests ----------------------------------------------------------------------

    fn send_write(&mut self, cx: &mut Ctx<'_>, write: SentWrite, full_script: bool) {
        let Some(link) = self.cmd.as_mut() else {
            let error = self.unavailable();
            self.resolve(write.ticket, Outcome::refused(error));
            return;
        };
        let (script, sha) = match write.script {
            Script::Write => (scripts::WRITE, self.write_sha.as_str()),
            Script::Hold => (scripts::HOLD, self.hold_sha.as_str()),
        };
        let head: [&str; 2] = if full_script {
            ["EVAL", script]
        } else {
            ["EVALSHA", sha]
        };
        let mut args: Vec<&str> = Vec::with_capacity(head.len() + write.args.len());
        args.extend(head);
        args.extend(write.args.iter().map(String::as_str));
        link.command(&args);
        self.writes_in_flight += 1;
        self.expects.push_back(Expect::Write(Box::new(write)));
        let _ = cx;
    }

    fn send_catch_up(&mut self, from: &str) {
        let Some(link) = self.cmd.as_mut() else {
            return;
        };
        let limit = CATCH_UP_CHUNK_SKUS.to_string();
        link.command(&[
            "EVALSHA",
            self.catch_up_sha.as_str(),
            "4",
            self.keys.stock.as_str(),
            self.keys.changed.as_str(),
            self.keys.seq.as_str(),
            self.keys.epoch.as_str(),
            from,
            limit.as_str(),
        ]);
        self.expects.push_back(Expect::CatchUp);
        self.catch_up_in_flight = true;
    }

    /// Starts a catch-up once both links are up (the feed first: changes after the catch-up's
    /// read then arrive through it).
    fn maybe_catch_up(&mut self) {
        if !self.catch_up_needed
            || self.catch_up_in_flight
            || !self.feed_subscribed
            || self.cmd_state != LinkState::Up
        {
            return;
        }
        self.catch_up_needed = false;
        self.stats.resyncs_total += 1;
        let from = self.applied_seq.to_string();
        self.send_catch_up(&from);
    }

    /// Timers: write timeouts, the gap wait, probes, feed pings.
    fn tick(&mut self, cx: &mut Ctx<'_>) {
        let now = self.now_ms;
        let oldest_write = self.expects.iter().find_map(|e| match e {
            Expect::Write(w) => Some(w.sent_ms),
            _ => None,
        });
        if oldest_write.is_some_and(|sent| now >= sent + WRITE_TIMEOUT_MS) {
            self.cmd_down(cx, format!("no reply within {WRITE_TIMEOUT_MS} ms"));
        }
        if let Some((_, first)) = self.reorder.first_key_value() {
            let waiting = self.catch_up_in_flight || self.catch_up_needed;
            if !waiting && now >= first.since_ms + GAP_WAIT_MS {
                self.stats.feed_gaps_total += 1;
                self.catch_up_needed = true;
            }
        }
        if self.cmd_state == LinkState::Up && !self.probe_in_flight && now >= self.probe_due_ms {
            if let Some(link) = self.cmd.as_mut() {
                link.command(&["GET", self.keys.seq.as_str()]);
                self.expects.push_back(Expect::Probe);
                self.probe_in_flight = true;
                self.probe_due_ms = now + PROBE_INTERVAL_MS;
            }
        }
        if self.feed_state == LinkState::Up {
            if let Some(sent) = self.feed_ping_sent_ms {
                if now >= sent + FEED_PING_INTERVAL_MS {
                    self.feed_down(cx, "no answer to ping".into());
                }
            } else if now >= self.feed_ping_due_ms {
                if let Some(link) = self.feed.as_mut() {
                    link.command(&["PING"]);
                    self.feed_ping_sent_ms = Some(now);
                    self.feed_ping_due_ms = now + FEED_PING_INTERVAL_MS;
                }
            }
        }
        self.maybe_catch_up();
        self.fire_expiries();
    }

    /// The idempotency key of `req` (the epoch key again when it has none: the scripts
    /// then ignore it) and its flag.
    fn idem_args(&self, req: &WriteRequest) -> (String, &'static str) {
        match &req.idempotency_key {
            Some(key) => (format!("{}{key}", self.keys.idem_prefix), "1"),
            None => (self.keys.epoch.clone(), "0"),
        }
    }

    fn write_args(&self, req: &WriteRequest, fingerprint: u64) -> Result<Vec<String>, String> {
        let mut args = Vec::with_capacity(20 + 6 * req.ops.len());
        let (idem, keyed) = self.idem_args(req);
        let fresh_epoch =
            crate::cli::random_token().map_err(|e| format!("cannot make an epoch: {e}"))?;
        let limits = self.config.hold_limits;
        args.extend([
            "8".to_string(),
            self.keys.stock.clone(),
            self.keys.changed.clone(),
            self.keys.seq.clone(),
            self.keys.epoch.clone(),
            idem,
            self.keys.holds.clone(),
            self.keys.held.clone(),
            self.keys.deadlines.clone(),
            self.keys.channel.clone(),
            fingerprint.to_string(),
            self.config.idempotency_ttl_secs.to_string(),
            fresh_epoch,
            keyed.to_string(),
            self.origin.clone(),
            self.keys.expired_prefix.clone(),
            limits.holds_max.to_string(),
            limits.lines_max.to_string(),
            limits.ttl_ms_max.min(TTL_MS_MAX).to_string(),
            req.ops.len().to_string(),
        ]);
        for op in &req.ops {
            args.push(op.sku.clone());
            args.push(scripts::action_name(op.action).to_string());
            args.push(op.amount.to_string());
            args.push(op.if_version.map_or("-1".to_string(), |v| v.to_string()));
            args.push(op.hold.clone().unwrap_or_default());
            args.push(op.ttl_ms.map_or("-1".to_string(), |t| t.to_string()));
        }
        args.push(self.config.skus_max.to_string());
        Ok(args)
    }

    fn hold_args(&self, req: &WriteRequest, hold: &str, action: HoldAction) -> Vec<String> {
        let (idem, keyed) = self.idem_args(req);
        let ttl_ms = match action {
            HoldAction::Extend { ttl_ms } => ttl_ms,
            HoldAction::Commit | HoldAction::Release => 0,
        };
        vec![
            "9".to_string(),
            self.keys.stock.clone(),
            self.keys.changed.clone(),
            self.keys.seq.clone(),
            self.keys.epoch.clone(),
            idem,
            self.keys.holds.clone(),
            self.keys.held.clone(),
            self.keys.deadlines.clone(),
            format!("{}{hold}", self.keys.expired_prefix),
            self.keys.channel.clone(),
            req.fingerprint().0.to_string(),
            self.config.idempotency_ttl_secs.to_string(),
            keyed.to_string(),
            self.origin.clone(),
            hold.to_string(),
            action.as_str().to_string(),
            ttl_ms.to_string(),
            self.config
                .hold_limits
                .ttl_ms_max
                .min(TTL_MS_MAX)
                .to_string(),
        ]
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
        if self.refusing().is_some() || self.writes_in_flight >= WRITES_IN_FLIGHT_MAX {
            let mut error = self.unavailable();
            if self.refusing().is_none() {
                error.message = format!(
                    "writes are unavailable: {WRITES_IN_FLIGHT_MAX} writes already wait for Redis"
                );
            }
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
            None => match self.write_args(req, req.fingerprint().0) {
                Ok(args) => {
                    let holds = req.ops.iter().map(|op| op.hold.clone()).collect();
                    (args, Script::Write, holds, None)
                }
                Err(e) => {
                    return Submitted::Now(Outcome::refused(ApiError::new(ErrorCode::Internal, e)))
                }
            },
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
