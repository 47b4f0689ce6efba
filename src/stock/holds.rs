//! Holds: reservations that expire (PROTOCOL.md "Holds: reservations that expire").
//!
//! A hold is a named set of reserved units, one line per SKU, with a deadline. This module
//! keeps the table of holds, the units each SKU has held, the deadlines, and the markers of
//! holds that expired in the last hour. Like the rest of `stock` it does no I/O and reads no
//! clock: every call takes `now_ms` (milliseconds since the Unix epoch, so deadlines survive
//! a restart), which is how tests drive time.
//!
//! Contract for callers:
//! - Units held are part of `reserved` (the store keeps `reserved`, this table keeps how much
//!   of it is held); [`Store::apply_held`] refuses an anonymous `release` / `commit` that
//!   would take held units.
//! - Every change returns [`HoldChange`]s (each hold's state before and after). The caller logs
//!   the `after` states next to the SKU states; if the log fails it calls [`Holds::undo`] (and
//!   [`Store::undo`]) to put everything back. Replay after a restart calls [`Holds::set`] with
//!   each logged state, in log order.
//! - Expiry is driven by the caller's timer: [`Holds::next_deadline_ms`] says when to wake,
//!   [`Holds::due`] names a hold whose deadline has passed, [`Holds::settle`] with
//!   [`Settle::Expire`] releases it as one change. The deadlines sit in a min-heap keyed by
//!   deadline, so finding the next one is O(1) and expiring one is O(log n): no scan of all
//!   holds, whatever their number.
//! - A hold whose deadline has passed is expired for every purpose, even before the timer has
//!   run its expiry: commit, release, extend and adding to it get [`HoldError::Expired`], so a
//!   commit racing with expiry gets one clear answer. The caller runs due expiries before it
//!   decides a hold write, so the expiry is logged first.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;

use super::ops::{Action, BatchError, Op};
use super::store::{Applied, SkuId, Store};

/// Longest hold id, in bytes (PROTOCOL.md: 1 to 128 bytes of `[A-Za-z0-9._:/-]`).
pub const HOLD_ID_BYTES_MAX: usize = 128;
/// Shortest `ttl_ms` a client may ask for (PROTOCOL.md).
pub const TTL_MS_MIN: u64 = 100;
/// Longest `ttl_ms` the contract allows: one day. `--hold-ttl-max-ms` may lower it.
pub const TTL_MS_MAX: u64 = 86_400_000;
/// How long an expired hold is remembered as expired (PROTOCOL.md: at least one hour), so a
/// late commit gets `hold_expired` rather than `unknown_hold`.
pub const EXPIRED_MARKER_MS: u64 = 3_600_000;
/// Stale heap entries (left by extends and by holds that ended) tolerated beyond the live
/// holds before the heap is rebuilt from the live holds: the heap stays O(live holds).
const HEAP_SLACK_ENTRIES: usize = 1024;

const _: () = assert!(TTL_MS_MIN <= TTL_MS_MAX);
const _: () = assert!(HOLD_ID_BYTES_MAX <= crate::wal::record::NAME_BYTES_MAX);

/// Whether `id` is a valid hold id: 1 to [`HOLD_ID_BYTES_MAX`] bytes of `[A-Za-z0-9._:/-]`.
pub fn hold_id_is_valid(id: &str) -> bool {
    (1..=HOLD_ID_BYTES_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'))
}

/// Limits on holds (config `--holds-max`, `--hold-lines-max`, `--hold-ttl-max-ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldLimits {
    /// Live holds in total; a write creating one more is refused ([`HoldError::HoldsFull`]).
    /// Also bounds the expired markers kept (the oldest goes first past it).
    pub holds_max: usize,
    /// Distinct SKUs in one hold ([`HoldError::TooManyLines`] past it).
    pub lines_max: usize,
    /// Longest `ttl_ms` accepted (at most [`TTL_MS_MAX`]).
    pub ttl_ms_max: u64,
}

impl Default for HoldLimits {
    fn default() -> Self {
        HoldLimits {
            holds_max: 1_000_000,
            lines_max: 100,
            ttl_ms_max: TTL_MS_MAX,
        }
    }
}

/// One line of a hold: a SKU and the units held of it.
pub type Line = (SkuId, u64);

/// A hold a write names, while the write is checked: its new lines and the last
/// `ttl_ms` given.
struct Named<'a> {
    hold: &'a str,
    lines: Vec<Line>,
    ttl_ms: Option<u64>,
}

/// The state of one hold id, as logged and as put back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldState {
    /// Holding `units` of each SKU until `deadline_ms`. Lines are in first-taken order, one per
    /// SKU, units > 0.
    Live {
        /// (SKU, units held), one per SKU.
        lines: Vec<(SkuId, u64)>,
        /// Wall-clock ms at which it expires.
        deadline_ms: u64,
    },
    /// Expired at `at_ms`; remembered until `at_ms + EXPIRED_MARKER_MS`.
    Expired {
        /// Wall-clock ms of the expiry.
        at_ms: u64,
    },
    /// Never existed, committed, released, or expired long ago: the id is free.
    Gone,
}

/// Why a hold request was refused. Nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldError {
    /// No such hold (never existed, committed, released, or expired over an hour ago).
    Unknown,
    /// The hold expired (its deadline passed), within the last hour.
    Expired,
    /// The op would create the hold but carries no `ttl_ms`.
    TtlRequired,
    /// `ttl_ms` outside `TTL_MS_MIN..=ttl_ms_max`.
    TtlOutOfRange {
        /// As sent.
        ttl_ms: u64,
        /// The configured longest.
        max: u64,
    },
    /// Creating the hold would pass `holds_max` live holds.
    HoldsFull {
        /// `holds_max`.
        max: usize,
    },
    /// The hold would hold more than `lines_max` SKUs.
    TooManyLines {
        /// `lines_max`.
        max: usize,
    },
}

impl fmt::Display for HoldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HoldError::Unknown => write!(f, "no such hold (never taken, or already gone)"),
            HoldError::Expired => write!(f, "the hold expired; its units went back to stock"),
            HoldError::TtlRequired => write!(f, "`ttl_ms` is required to create a hold"),
            HoldError::TtlOutOfRange { ttl_ms, max } => {
                write!(f, "`ttl_ms` must be in {TTL_MS_MIN}..={max}, got {ttl_ms}")
            }
            HoldError::HoldsFull { max } => write!(f, "at most {max} live holds"),
            HoldError::TooManyLines { max } => write!(f, "a hold holds at most {max} SKUs"),
        }
    }
}

/// A refused write that names holds: a stock rule (at its op index), or a hold rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldWriteError {
    /// A stock rule refused the op at its index.
    Rule(BatchError),
    /// A hold rule refused the op at `index`.
    Hold {
        /// The op naming the hold.
        index: usize,
        /// Why.
        error: HoldError,
    },
}

/// One hold's state before and after a change (for the log, and for undo).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldChange {
    /// The hold id.
    pub hold: Box<str>,
    /// Its state before the change.
    pub before: HoldState,
    /// Its state after the change.
    pub after: HoldState,
}

/// What a `reserve` op of a write takes: its hold, and the `ttl_ms` it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Take<'a> {
    /// The hold id.
    pub hold: &'a str,
    /// `ttl_ms` of the op, if any.
    pub ttl_ms: Option<u64>,
}

/// How a hold ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// Its units become a sale (`commit`).
    Commit,
    /// Its units go back to available (`release`).
    Release,
    /// Its deadline passed: released, and remembered as expired for an hour.
    Expire,
}

/// A live hold in its slot. A free slot has an empty name (a hold id is never empty).
#[derive(Debug, Default)]
struct Slot {
    name: Box<str>,
    lines: Vec<(SkuId, u64)>,
    deadline_ms: u64,
    /// Bumped on every change of the slot, so heap entries of an earlier deadline (or of an
    /// earlier hold in the slot) are recognised as stale.
    generation: u32,
}

/// Every hold. See the module docs for the contract.
#[derive(Debug, Default)]
pub struct Holds {
    slots: Vec<Slot>,
    /// Hold id -> slot of every live hold.
    ids: HashMap<Box<str>, u32>,
    free: Vec<u32>,
    /// Min-heap of (deadline_ms, slot, generation). INVARIANT: every live hold has an entry
    /// with its current deadline and generation; other entries are stale and skipped.
    deadlines: BinaryHeap<Reverse<(u64, u32, u32)>>,
    /// Units held per SKU, only for SKUs with some. INVARIANT: equals the sum of the lines of
    /// live holds, and never passes the SKU's `reserved`.
    held: HashMap<SkuId, u64>,
    /// Hold id -> when it expired, for [`EXPIRED_MARKER_MS`].
    expired: HashMap<Box<str>, u64>,
    /// Markers in the order they were made, so pruning looks only at the oldest.
    expired_order: VecDeque<(u64, Box<str>)>,
    limits: HoldLimits,
}

impl Holds {
    /// An empty table with `limits`.
    pub fn new(limits: HoldLimits) -> Holds {
        Holds {
            limits,
            ..Holds::default()
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> HoldLimits {
        self.limits
    }

    /// Units of `sku` held by live holds.
    pub fn held(&self, sku: SkuId) -> u64 {
        self.held.get(&sku).copied().unwrap_or(0)
    }

    /// Live holds.
    pub fn live_len(&self) -> usize {
        self.ids.len()
    }

    /// Expired markers kept.
    pub fn markers_len(&self) -> usize {
        self.expired.len()
    }

    /// The state of `hold` as stored (a live hold past its deadline is still `Live` until its
    /// expiry runs; see [`Holds::check_live`]).
    pub fn state(&self, hold: &str, now_ms: u64) -> HoldState {
        if let Some(&slot) = self.ids.get(hold) {
            let slot = &self.slots[slot as usize];
            return HoldState::Live {
                lines: slot.lines.clone(),
                deadline_ms: slot.deadline_ms,
            };
        }
        match self.expired.get(hold) {
            Some(&at_ms) if marker_alive(at_ms, now_ms) => HoldState::Expired { at_ms },
            _ => HoldState::Gone,
        }
    }

    /// A live hold's lines and deadline, or why it cannot be acted on at `now_ms`.
    pub fn check_live(&self, hold: &str, now_ms: u64) -> Result<(&[Line], u64), HoldError> {
        if let Some(&slot) = self.ids.get(hold) {
            let slot = &self.slots[slot as usize];
            if slot.deadline_ms <= now_ms {
                return Err(HoldError::Expired);
            }
            return Ok((&slot.lines, slot.deadline_ms));
        }
        match self.expired.get(hold) {
            Some(&at_ms) if marker_alive(at_ms, now_ms) => Err(HoldError::Expired),
            _ => Err(HoldError::Unknown),
        }
    }

    /// Every live hold: (id, lines, deadline_ms). For snapshots.
    pub fn live(&self) -> impl Iterator<Item = (&str, &[(SkuId, u64)], u64)> + '_ {
        self.ids.iter().map(|(name, &slot)| {
            let slot = &self.slots[slot as usize];
            (&**name, slot.lines.as_slice(), slot.deadline_ms)
        })
    }

    /// Every expired marker: (id, at_ms). For snapshots.
    pub fn markers(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.expired.iter().map(|(name, &at)| (&**name, at))
    }

    /// Sets `hold` to `state` as is, keeping held units and deadlines in step: used by replay,
    /// by undo, and by every change here.
    pub fn set(&mut self, hold: &str, state: HoldState) {
        if let Some(slot) = self.ids.remove(hold) {
            let lines = std::mem::take(&mut self.slots[slot as usize].lines);
            for (sku, units) in lines {
                let held = self.held.get_mut(&sku).expect("a live line is counted");
                *held -= units;
                if *held == 0 {
                    self.held.remove(&sku);
                }
            }
            let slot_entry = &mut self.slots[slot as usize];
            slot_entry.name = Box::default();
            slot_entry.generation = slot_entry.generation.wrapping_add(1);
            self.free.push(slot);
        }
        self.expired.remove(hold);
        match state {
            HoldState::Gone => {}
            HoldState::Expired { at_ms } => {
                self.expired.insert(hold.into(), at_ms);
                self.expired_order.push_back((at_ms, hold.into()));
                // Bounded like the holds: past it the oldest marker goes early (a late commit
                // of that hold then gets `unknown_hold`, which changes nothing either).
                while self.expired.len() > self.limits.holds_max.max(1) {
                    self.drop_oldest_marker();
                }
            }
            HoldState::Live { lines, deadline_ms } => {
                for &(sku, units) in &lines {
                    assert!(units > 0, "a hold line holds at least one unit");
                    *self.held.entry(sku).or_insert(0) += units;
                }
                let slot = match self.free.pop() {
                    Some(slot) => slot,
                    None => {
                        self.slots.push(Slot::default());
                        u32::try_from(self.slots.len() - 1).expect("holds fit u32 slots")
                    }
                };
                let entry = &mut self.slots[slot as usize];
                entry.name = hold.into();
                entry.lines = lines;
                entry.deadline_ms = deadline_ms;
                entry.generation = entry.generation.wrapping_add(1);
                let generation = entry.generation;
                self.ids.insert(hold.into(), slot);
                self.deadlines
                    .push(Reverse((deadline_ms, slot, generation)));
                if self.deadlines.len() > 2 * self.ids.len() + HEAP_SLACK_ENTRIES {
                    self.rebuild_heap();
                }
            }
        }
    }

    /// Puts back the states before `changes` (newest first), after a failed log write.
    pub fn undo(&mut self, changes: &[HoldChange]) {
        for change in changes.iter().rev() {
            self.set(&change.hold, change.before.clone());
        }
    }

    /// The earliest deadline of a live hold, for the caller's timer.
    pub fn next_deadline_ms(&mut self) -> Option<u64> {
        self.drop_stale_tops();
        self.deadlines
            .peek()
            .map(|Reverse((deadline, _, _))| *deadline)
    }

    /// The earliest deadline in the heap without dropping stale entries (a stale one is never
    /// later than the live deadline it stood for, so it only makes the caller wake early).
    pub fn peek_deadline_ms(&self) -> Option<u64> {
        self.deadlines
            .peek()
            .map(|Reverse((deadline, _, _))| *deadline)
    }

    /// A live hold whose deadline is at or before `now_ms`, earliest first. It stays live
    /// until the caller settles it (so a caller that cannot log the expiry now retries later).
    pub fn due(&mut self, now_ms: u64) -> Option<&str> {
        self.drop_stale_tops();
        let &Reverse((deadline, slot, _)) = self.deadlines.peek()?;
        (deadline <= now_ms).then(|| &*self.slots[slot as usize].name)
    }

    /// Forgets expired markers older than [`EXPIRED_MARKER_MS`] (cheap: looks at the oldest).
    pub fn prune_markers(&mut self, now_ms: u64) {
        while let Some(&(at_ms, _)) = self.expired_order.front() {
            if marker_alive(at_ms, now_ms) {
                break;
            }
            self.drop_oldest_marker();
        }
    }

    /// Takes units into holds: `ops` is a write whose op `i` reserves into the hold
    /// `takes[i]` (its op has [`Op::held`]) or is anonymous (`None`). All or nothing, like
    /// [`Store::apply`]; each hold named gets its new lines, and the last `ttl_ms` given for a
    /// hold sets its deadline to `now_ms + ttl_ms`.
    pub fn write(
        &mut self,
        store: &mut Store,
        ops: &[Op],
        takes: &[Option<Take<'_>>],
        now_ms: u64,
    ) -> Result<(Applied, Vec<HoldChange>), HoldWriteError> {
        assert_eq!(ops.len(), takes.len(), "one take per op");
        // Each hold named, in first-named order.
        let mut named: Vec<Named<'_>> = Vec::new();
        let mut creating = 0usize;
        for (index, (op, take)) in ops.iter().zip(takes).enumerate() {
            let Some(take) = take else { continue };
            assert!(
                op.held && op.action == Action::Reserve,
                "only a held reserve takes into a hold"
            );
            let hold_error = |error| HoldWriteError::Hold { index, error };
            if let Some(ttl_ms) = take.ttl_ms {
                self.check_ttl(ttl_ms).map_err(hold_error)?;
            }
            let position = match named.iter().position(|n| n.hold == take.hold) {
                Some(position) => position,
                None => {
                    let lines = match self.check_live(take.hold, now_ms) {
                        Ok((lines, _)) => lines.to_vec(),
                        Err(HoldError::Unknown) => {
                            if take.ttl_ms.is_none() {
                                return Err(hold_error(HoldError::TtlRequired));
                            }
                            creating += 1;
                            if self.live_len() + creating > self.limits.holds_max {
                                let max = self.limits.holds_max;
                                return Err(hold_error(HoldError::HoldsFull { max }));
                            }
                            Vec::new()
                        }
                        Err(error) => return Err(hold_error(error)),
                    };
                    named.push(Named {
                        hold: take.hold,
                        lines,
                        ttl_ms: None,
                    });
                    named.len() - 1
                }
            };
            let entry = &mut named[position];
            match entry.lines.iter_mut().find(|(sku, _)| *sku == op.sku) {
                Some(line) => line.1 += op.amount,
                None => entry.lines.push((op.sku, op.amount)),
            }
            if entry.lines.len() > self.limits.lines_max {
                let max = self.limits.lines_max;
                return Err(hold_error(HoldError::TooManyLines { max }));
            }
            if take.ttl_ms.is_some() {
                entry.ttl_ms = take.ttl_ms;
            }
        }
        let held = |sku| self.held(sku);
        let applied = store.apply_held(ops, &held).map_err(HoldWriteError::Rule)?;
        let mut changes = Vec::with_capacity(named.len());
        for Named {
            hold,
            lines,
            ttl_ms,
        } in named
        {
            let before = self.state(hold, now_ms);
            let deadline_ms = match (ttl_ms, &before) {
                (Some(ttl_ms), _) => now_ms.saturating_add(ttl_ms),
                (None, HoldState::Live { deadline_ms, .. }) => *deadline_ms,
                (None, _) => unreachable!("a hold without ttl_ms was live"),
            };
            let after = HoldState::Live { lines, deadline_ms };
            self.set(hold, after.clone());
            changes.push(HoldChange {
                hold: hold.into(),
                before,
                after,
            });
        }
        Ok((applied, changes))
    }

    /// Ends a hold: commits, releases or expires every unit of it, all its SKUs atomically
    /// (one version per SKU). Commit and release need a live hold before its deadline;
    /// expire needs one at or past it.
    pub fn settle(
        &mut self,
        store: &mut Store,
        hold: &str,
        how: Settle,
        now_ms: u64,
    ) -> Result<(Applied, HoldChange), HoldError> {
        let Some(&slot) = self.ids.get(hold) else {
            return Err(self
                .check_live(hold, now_ms)
                .err()
                .unwrap_or(HoldError::Unknown));
        };
        let deadline_ms = self.slots[slot as usize].deadline_ms;
        let due = deadline_ms <= now_ms;
        match how {
            Settle::Commit | Settle::Release if due => return Err(HoldError::Expired),
            Settle::Expire if !due => return Err(HoldError::Unknown),
            _ => {}
        }
        let action = if how == Settle::Commit {
            Action::Commit
        } else {
            Action::Release
        };
        let ops: Vec<Op> = self.slots[slot as usize]
            .lines
            .iter()
            .map(|&(sku, units)| Op::held(sku, action, units))
            .collect();
        let held = |sku| self.held(sku);
        // Cannot fail: the held units are part of reserved (the invariant), and a held
        // release / commit takes exactly those.
        let applied = store
            .apply_held(&ops, &held)
            .expect("a hold's own units can always be released or committed");
        let before = self.state(hold, now_ms);
        let after = match how {
            Settle::Expire => HoldState::Expired { at_ms: now_ms },
            Settle::Commit | Settle::Release => HoldState::Gone,
        };
        self.set(hold, after.clone());
        let change = HoldChange {
            hold: hold.into(),
            before,
            after,
        };
        Ok((applied, change))
    }

    /// Moves a live hold's deadline to `now_ms + ttl_ms`. Changes no stock.
    pub fn extend(
        &mut self,
        hold: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Result<HoldChange, HoldError> {
        self.check_ttl(ttl_ms)?;
        let (lines, _) = self.check_live(hold, now_ms)?;
        let lines = lines.to_vec();
        let before = self.state(hold, now_ms);
        let after = HoldState::Live {
            lines,
            deadline_ms: now_ms.saturating_add(ttl_ms),
        };
        self.set(hold, after.clone());
        Ok(HoldChange {
            hold: hold.into(),
            before,
            after,
        })
    }

    fn check_ttl(&self, ttl_ms: u64) -> Result<(), HoldError> {
        let max = self.limits.ttl_ms_max.min(TTL_MS_MAX);
        if (TTL_MS_MIN..=max).contains(&ttl_ms) {
            Ok(())
        } else {
            Err(HoldError::TtlOutOfRange { ttl_ms, max })
        }
    }

    fn drop_stale_tops(&mut self) {
        while let Some(&Reverse((_, slot, generation))) = self.deadlines.peek() {
            let entry = &self.slots[slot as usize];
            if !entry.name.is_empty() && entry.generation == generation {
                return;
            }
            self.deadlines.pop();
        }
    }

    fn rebuild_heap(&mut self) {
        let entries: Vec<Reverse<(u64, u32, u32)>> = self
            .ids
            .values()
            .map(|&slot| {
                let entry = &self.slots[slot as usize];
                Reverse((entry.deadline_ms, slot, entry.generation))
            })
            .collect();
        self.deadlines = BinaryHeap::from(entries);
    }

    fn drop_oldest_marker(&mut self) {
        if let Some((at_ms, name)) = self.expired_order.pop_front() {
            // The id may have been marked again since (an undo and a new expiry): only the
            // marker this entry made goes.
            if self.expired.get(&name) == Some(&at_ms) {
                self.expired.remove(&name);
            }
        }
    }

    /// Whether no SKU holds more than it has reserved (after recovery: a log that says
    /// otherwise was written by a bug, and running on would let a release underflow).
    pub fn check(&self, store: &Store) -> Result<(), String> {
        for (&sku, &held) in &self.held {
            let reserved = store.get(sku).reserved;
            if held > reserved {
                let name = store.name(sku);
                return Err(format!(
                    "{name} holds {held} units but has {reserved} reserved"
                ));
            }
        }
        Ok(())
    }

    /// Checks the invariants against `store` (tests).
    pub fn assert_consistent(&self, store: &Store) {
        let mut sums: HashMap<SkuId, u64> = HashMap::new();
        for (_, lines, _) in self.live() {
            for &(sku, units) in lines {
                *sums.entry(sku).or_insert(0) += units;
            }
        }
        assert_eq!(
            sums, self.held,
            "held units out of step with the holds' lines"
        );
        for (&sku, &held) in &self.held {
            assert!(
                held <= store.get(sku).reserved,
                "{sku:?} holds more than reserved"
            );
        }
    }
}

fn marker_alive(at_ms: u64, now_ms: u64) -> bool {
    at_ms.saturating_add(EXPIRED_MARKER_MS) > now_ms
}

impl From<BatchError> for HoldWriteError {
    fn from(error: BatchError) -> Self {
        HoldWriteError::Rule(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stock::{OpError, Stock};

    const T0: u64 = 1_700_000_000_000;

    fn stock(on_hand: u64, reserved: u64, version: u64) -> Stock {
        Stock {
            on_hand,
            reserved,
            version,
        }
    }

    /// A store with `a` = 10 on hand and `b` = 5 on hand, no holds.
    fn setup() -> (Store, Holds, SkuId, SkuId) {
        let mut store = Store::new();
        let a = store.restore("a", stock(10, 0, 1)).unwrap();
        let b = store.restore("b", stock(5, 0, 1)).unwrap();
        (store, Holds::new(HoldLimits::default()), a, b)
    }

    fn take<'a>(hold: &'a str, ttl_ms: Option<u64>) -> Option<Take<'a>> {
        Some(Take { hold, ttl_ms })
    }

    #[test]
    fn take_add_commit_one_version_per_sku() {
        let (mut store, mut holds, a, b) = setup();
        let ops = [
            Op::held(a, Action::Reserve, 3),
            Op::held(b, Action::Reserve, 2),
        ];
        let (applied, changes) = holds
            .write(&mut store, &ops, &[take("h", Some(1000)); 2], T0)
            .unwrap();
        assert_eq!(
            applied.changed,
            vec![(a, stock(10, 3, 2)), (b, stock(5, 2, 2))]
        );
        assert_eq!(changes[0].before, HoldState::Gone);
        assert_eq!((holds.held(a), holds.held(b)), (3, 2));
        // Adding without ttl keeps the deadline.
        let ops = [Op::held(a, Action::Reserve, 1)];
        holds
            .write(&mut store, &ops, &[take("h", None)], T0 + 10)
            .unwrap();
        let (lines, deadline) = holds.check_live("h", T0 + 10).unwrap();
        assert_eq!(
            (lines.to_vec(), deadline),
            (vec![(a, 4), (b, 2)], T0 + 1000)
        );
        let (applied, change) = holds
            .settle(&mut store, "h", Settle::Commit, T0 + 20)
            .unwrap();
        assert_eq!(
            applied.changed,
            vec![(a, stock(6, 0, 4)), (b, stock(3, 0, 3))]
        );
        assert_eq!(change.after, HoldState::Gone);
        assert_eq!(holds.check_live("h", T0 + 20), Err(HoldError::Unknown));
        assert_eq!((holds.held(a), holds.live_len()), (0, 0));
        holds.assert_consistent(&store);
    }

    #[test]
    fn anonymous_release_and_commit_cannot_take_held_units() {
        let (mut store, mut holds, a, _) = setup();
        let ops = [Op::held(a, Action::Reserve, 4)];
        holds
            .write(&mut store, &ops, &[take("h", Some(500))], T0)
            .unwrap();
        store.apply(&[Op::new(a, Action::Reserve, 2)]).unwrap();
        let held = |sku| holds.held(sku);
        for action in [Action::Release, Action::Commit] {
            let error = store
                .apply_held(&[Op::new(a, action, 3)], &held)
                .unwrap_err();
            assert_eq!(
                error.error,
                OpError::InsufficientReserved {
                    reserved: 2,
                    requested: 3
                }
            );
        }
        store
            .apply_held(&[Op::new(a, Action::Release, 2)], &held)
            .unwrap();
        // Decrease and set still see every reserved unit, held or not.
        assert!(store
            .apply_held(&[Op::new(a, Action::Set, 3)], &held)
            .is_err());
        holds.assert_consistent(&store);
    }

    #[test]
    fn expiry_is_driven_by_the_clock_and_wins_over_a_late_commit() {
        let (mut store, mut holds, a, b) = setup();
        let ops = [Op::held(a, Action::Reserve, 3)];
        holds
            .write(&mut store, &ops, &[take("early", Some(100))], T0)
            .unwrap();
        let ops = [Op::held(b, Action::Reserve, 1)];
        holds
            .write(&mut store, &ops, &[take("late", Some(5000))], T0)
            .unwrap();
        assert_eq!(holds.next_deadline_ms(), Some(T0 + 100));
        assert_eq!(holds.due(T0 + 99), None);
        // Past the deadline the hold is expired for every purpose before the timer runs.
        assert_eq!(
            holds
                .settle(&mut store, "early", Settle::Commit, T0 + 100)
                .unwrap_err(),
            HoldError::Expired
        );
        assert_eq!(holds.due(T0 + 100), Some("early"));
        let (applied, change) = holds
            .settle(&mut store, "early", Settle::Expire, T0 + 100)
            .unwrap();
        assert_eq!(applied.changed, vec![(a, stock(10, 0, 3))]);
        assert_eq!(change.after, HoldState::Expired { at_ms: T0 + 100 });
        assert_eq!(holds.due(T0 + 100), None);
        assert_eq!(holds.next_deadline_ms(), Some(T0 + 5000));
        // Expired for an hour: commit, release, extend and adding to it say so.
        let later = T0 + 100 + EXPIRED_MARKER_MS - 1;
        assert_eq!(holds.check_live("early", later), Err(HoldError::Expired));
        assert_eq!(holds.extend("early", 1000, later), Err(HoldError::Expired));
        let ops = [Op::held(a, Action::Reserve, 1)];
        let error = holds.write(&mut store, &ops, &[take("early", Some(100))], later);
        assert_eq!(
            error.unwrap_err(),
            HoldWriteError::Hold {
                index: 0,
                error: HoldError::Expired
            }
        );
        holds.prune_markers(T0 + 100 + EXPIRED_MARKER_MS);
        assert_eq!(holds.markers_len(), 0);
        assert_eq!(
            holds.check_live("early", T0 + 100 + EXPIRED_MARKER_MS),
            Err(HoldError::Unknown)
        );
        holds.assert_consistent(&store);
    }

    #[test]
    fn extend_moves_the_deadline_and_leaves_a_stale_heap_entry_behind() {
        let (mut store, mut holds, a, _) = setup();
        let ops = [Op::held(a, Action::Reserve, 1)];
        holds
            .write(&mut store, &ops, &[take("h", Some(100))], T0)
            .unwrap();
        holds.extend("h", 10_000, T0 + 50).unwrap();
        assert_eq!(holds.due(T0 + 200), None, "the old deadline is stale");
        assert_eq!(holds.next_deadline_ms(), Some(T0 + 10_050));
        assert_eq!(
            holds.extend("h", 99, T0),
            Err(HoldError::TtlOutOfRange {
                ttl_ms: 99,
                max: TTL_MS_MAX
            })
        );
    }

    #[test]
    fn refusals_change_nothing() {
        let (mut store, mut holds, a, b) = setup();
        let limits = HoldLimits {
            holds_max: 1,
            lines_max: 1,
            ttl_ms_max: 1000,
        };
        holds = Holds { limits, ..holds };
        let before: Vec<_> = store.known().collect();
        let cases: Vec<(Vec<Op>, Vec<Option<Take>>, HoldWriteError)> = vec![
            (
                vec![Op::held(a, Action::Reserve, 1)],
                vec![take("h", None)],
                HoldWriteError::Hold {
                    index: 0,
                    error: HoldError::TtlRequired,
                },
            ),
            (
                vec![Op::held(a, Action::Reserve, 1)],
                vec![take("h", Some(1001))],
                HoldWriteError::Hold {
                    index: 0,
                    error: HoldError::TtlOutOfRange {
                        ttl_ms: 1001,
                        max: 1000,
                    },
                },
            ),
            (
                vec![
                    Op::held(a, Action::Reserve, 1),
                    Op::held(b, Action::Reserve, 1),
                ],
                vec![take("h", Some(500)); 2],
                HoldWriteError::Hold {
                    index: 1,
                    error: HoldError::TooManyLines { max: 1 },
                },
            ),
            (
                vec![
                    Op::held(a, Action::Reserve, 1),
                    Op::held(b, Action::Reserve, 1),
                ],
                vec![take("h", Some(500)), take("g", Some(500))],
                HoldWriteError::Hold {
                    index: 1,
                    error: HoldError::HoldsFull { max: 1 },
                },
            ),
            (
                vec![
                    Op::held(a, Action::Reserve, 1),
                    Op::new(b, Action::Decrease, 9),
                ],
                vec![take("h", Some(500)), None],
                HoldWriteError::Rule(BatchError {
                    index: 1,
                    error: OpError::InsufficientStock {
                        available: 5,
                        requested: 9,
                    },
                }),
            ),
        ];
        for (ops, takes, error) in cases {
            assert_eq!(
                holds.write(&mut store, &ops, &takes, T0).unwrap_err(),
                error
            );
            assert_eq!(store.known().collect::<Vec<_>>(), before);
            assert_eq!(holds.live_len(), 0);
        }
        assert_eq!(
            holds
                .settle(&mut store, "h", Settle::Release, T0)
                .unwrap_err(),
            HoldError::Unknown
        );
    }

    #[test]
    fn undo_puts_every_hold_back() {
        let (mut store, mut holds, a, b) = setup();
        let ops = [Op::held(a, Action::Reserve, 2)];
        holds
            .write(&mut store, &ops, &[take("h", Some(100))], T0)
            .unwrap();
        let before_store = vec![(a, store.get(a)), (b, store.get(b))];
        let (_, change) = holds
            .settle(&mut store, "h", Settle::Expire, T0 + 100)
            .unwrap();
        let ops = [Op::held(b, Action::Reserve, 1)];
        let (_, more) = holds
            .write(&mut store, &ops, &[take("g", Some(100))], T0 + 100)
            .unwrap();
        store.undo(&before_store);
        let mut changes = vec![change];
        changes.extend(more);
        holds.undo(&changes);
        assert_eq!(
            holds.check_live("h", T0 + 50).map(|(l, d)| (l.to_vec(), d)),
            Ok((vec![(a, 2)], T0 + 100))
        );
        assert_eq!(holds.check_live("g", T0 + 50), Err(HoldError::Unknown));
        assert_eq!(holds.markers_len(), 0);
        assert_eq!(
            holds.due(T0 + 100),
            Some("h"),
            "the undone hold is armed again"
        );
        holds.assert_consistent(&store);
    }

    #[test]
    fn the_heap_stays_bounded_under_many_extends() {
        let (mut store, mut holds, a, _) = setup();
        let ops = [Op::held(a, Action::Reserve, 1)];
        holds
            .write(&mut store, &ops, &[take("h", Some(100))], T0)
            .unwrap();
        for i in 0..10_000 {
            holds.extend("h", 1000, T0 + i).unwrap();
        }
        assert!(holds.deadlines.len() <= 2 + HEAP_SLACK_ENTRIES + 1);
        assert_eq!(holds.next_deadline_ms(), Some(T0 + 9_999 + 1000));
    }

    #[test]
    fn hold_ids() {
        for good in ["h", "cart:42/line-1.x_y", &"x".repeat(128)] {
            assert!(hold_id_is_valid(good), "{good}");
        }
        for bad in ["", "a b", "é", &"x".repeat(129), "a*"] {
            assert!(!hold_id_is_valid(bad), "{bad}");
        }
    }

    /// One step of the model-based property test.
    #[derive(Clone, Debug)]
    enum Step {
        Take {
            hold: u8,
            sku: u8,
            units: u64,
            ttl_ms: Option<u64>,
        },
        Anonymous {
            sku: u8,
            action: Action,
            units: u64,
        },
        End {
            hold: u8,
            how: Settle,
        },
        Extend {
            hold: u8,
            ttl_ms: u64,
        },
        Advance {
            ms: u64,
        },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let action = prop_oneof![
            Just(Action::Reserve),
            Just(Action::Release),
            Just(Action::Commit),
            Just(Action::Decrease),
        ];
        let how = prop_oneof![Just(Settle::Commit), Just(Settle::Release)];
        prop_oneof![
            (0..4u8, 0..3u8, 1..6u64, proptest::option::of(100..800u64)).prop_map(
                |(hold, sku, units, ttl_ms)| Step::Take {
                    hold,
                    sku,
                    units,
                    ttl_ms
                }
            ),
            (0..3u8, action, 1..6u64).prop_map(|(sku, action, units)| Step::Anonymous {
                sku,
                action,
                units
            }),
            (0..4u8, how).prop_map(|(hold, how)| Step::End { hold, how }),
            (0..4u8, 100..800u64).prop_map(|(hold, ttl_ms)| Step::Extend { hold, ttl_ms }),
            (0..700u64).prop_map(|ms| Step::Advance { ms }),
        ]
    }

    /// Expires every hold due at `now`, as the engine's timer does.
    fn run_expiry(store: &mut Store, holds: &mut Holds, now: u64) {
        while let Some(hold) = holds.due(now).map(Box::<str>::from) {
            holds.settle(store, &hold, Settle::Expire, now).unwrap();
        }
    }

    proptest::proptest! {
        /// Units of holds never leak and are never released twice: after every step, each
        /// SKU's reserved units are its anonymous reservations plus its held units, held units
        /// are exactly the lines of live holds, on_hand drops only by what was committed, and
        /// a refused step changes nothing. In the end every hold expires and gives back
        /// exactly its units.
        #[test]
        fn holds_never_leak_nor_double_release(
            steps in proptest::collection::vec(step(), 1..80)
        ) {
            let mut store = Store::new();
            let skus: Vec<SkuId> = (0..3)
                .map(|i| store.restore(&format!("s{i}"), stock(20, 0, 1)).unwrap())
                .collect();
            let mut holds = Holds::new(HoldLimits { holds_max: 3, lines_max: 2, ttl_ms_max: 800 });
            let mut anonymous = [0u64; 3];
            let mut sold = [0u64; 3];
            let mut now = T0;
            for step in steps {
                let before: Vec<_> = store.known().collect();
                let live_before = holds.live_len();
                let name = |hold: u8| format!("h{hold}");
                let refused = match step {
                    Step::Take { hold, sku, units, ttl_ms } => {
                        let ops = [Op::held(skus[sku as usize], Action::Reserve, units)];
                        let hold = name(hold);
                        let takes = [Some(Take { hold: &hold, ttl_ms })];
                        holds.write(&mut store, &ops, &takes, now).is_err()
                    }
                    Step::Anonymous { sku, action, units } => {
                        let op = Op::new(skus[sku as usize], action, units);
                        let held = |sku| holds.held(sku);
                        let ok = store.apply_held(&[op], &held).is_ok();
                        let i = sku as usize;
                        match (ok, action) {
                            (true, Action::Reserve) => anonymous[i] += units,
                            (true, Action::Release) => anonymous[i] -= units,
                            (true, Action::Commit) => {
                                anonymous[i] -= units;
                                sold[i] += units;
                            }
                            (true, _) => sold[i] += units,
                            (false, _) => {}
                        }
                        !ok
                    }
                    Step::End { hold, how } => {
                        match holds.settle(&mut store, &name(hold), how, now) {
                            Ok((applied, change)) => {
                                let HoldState::Live { lines, .. } = change.before else {
                                    panic!("ended a hold that was not live");
                                };
                                proptest::prop_assert_eq!(applied.changed.len(), lines.len());
                                if how == Settle::Commit {
                                    for (sku, units) in lines {
                                        sold[sku.0 as usize] += units;
                                    }
                                }
                                // Never twice: the same hold is gone now.
                                let again = holds.settle(&mut store, &name(hold), how, now);
                                proptest::prop_assert!(again.is_err());
                                false
                            }
                            Err(_) => true,
                        }
                    }
                    Step::Extend { hold, ttl_ms } => holds.extend(&name(hold), ttl_ms, now).is_err(),
                    Step::Advance { ms } => {
                        now += ms;
                        run_expiry(&mut store, &mut holds, now);
                        false
                    }
                };
                if refused {
                    proptest::prop_assert_eq!(store.known().collect::<Vec<_>>(), before);
                    proptest::prop_assert_eq!(holds.live_len(), live_before);
                }
                holds.assert_consistent(&store);
                for (i, &sku) in skus.iter().enumerate() {
                    let s = store.get(sku);
                    proptest::prop_assert_eq!(s.reserved, anonymous[i] + holds.held(sku));
                    proptest::prop_assert_eq!(s.on_hand, 20 - sold[i]);
                }
            }
            now += TTL_MS_MAX;
            run_expiry(&mut store, &mut holds, now);
            proptest::prop_assert_eq!(holds.live_len(), 0);
            for (i, &sku) in skus.iter().enumerate() {
                proptest::prop_assert_eq!(store.get(sku).reserved, anonymous[i]);
                proptest::prop_assert_eq!(holds.held(sku), 0);
            }
        }
    }
}
