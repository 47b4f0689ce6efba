//! The authoritative stock of every SKU, and atomic batches of ops on it
//! (PROTOCOL.md "Stock model", "Operations").
//!
//! Contract for callers:
//! - Names are interned: [`Store::intern`] validates a name once and hands out a [`SkuId`], a
//!   slot index, so the hot path indexes a `Vec` instead of hashing a string.
//! - A SKU is *known* once written (version > 0). Reading must not make it known, and must not
//!   grow memory either: a caller that interned a name only to read or subscribe to it calls
//!   [`Store::forget`] when it no longer holds the id. `forget` frees the slot for reuse, so the
//!   caller must be the last holder of that id (refcount subscriptions): a stale `SkuId` would
//!   later name a different SKU. Known SKUs are never forgotten, so their ids are stable for the
//!   life of the store (which is why the idempotency cache may keep them).
//! - [`Store::apply`] is all or nothing. Either every op is accepted and each SKU it touches gets
//!   exactly one new version, or the store is left exactly as it was and the first failing op is
//!   reported by index.
//! - Durability is the caller's: capture `get()` of the touched SKUs before `apply`, write the
//!   log, and on failure [`Store::undo`] to those states before anything is acknowledged or
//!   broadcast.
//! - A `SkuId` that is not live in this store is a programmer error and panics.

use super::ops::{Action, BatchError, Op, OpError, ON_HAND_MAX};
use std::collections::HashMap;

use super::name_index::NameIndex;
use super::sku;

/// Most SKU slots one store can hold: a [`SkuId`] is a `u32`. Memory runs out long before this
/// (each slot holds a name of up to 128 bytes); callers cap SKUs through config, using
/// [`Store::interned_len`].
pub const SKUS_MAX: usize = u32::MAX as usize;

/// Batches touching at most this many distinct SKUs find them in the scratch list by linear
/// scan; past it the batch builds a `HashMap` index. A scan of 16 `u32`s beats hashing, and keeps
/// single ops (by far the common case) free of any map.
pub const BATCH_LINEAR_SCAN_SKUS_MAX: usize = 16;

/// The state of one SKU (PROTOCOL.md "Stock model").
///
/// INVARIANT: `reserved <= on_hand <= ON_HAND_MAX`, and a SKU with version 0 (never written)
/// is all zeros.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stock {
    /// Physical units held.
    pub on_hand: u64,
    /// Units held by open reservations.
    pub reserved: u64,
    /// +1 on every change of this SKU; 0 means never written.
    pub version: u64,
}

impl Stock {
    /// Units available to sell: `on_hand - reserved` (the number a storefront shows).
    pub fn quantity(&self) -> u64 {
        // Saturating so that a broken value cannot show a huge wrapped number; `is_valid`
        // is asserted wherever a Stock enters the store.
        self.on_hand.saturating_sub(self.reserved)
    }

    /// Whether the SKU has been written (PROTOCOL.md: a SKU is known once version > 0).
    pub fn is_known(&self) -> bool {
        self.version > 0
    }

    /// The unit invariant: `reserved <= on_hand <= ON_HAND_MAX`.
    pub fn is_valid(&self) -> bool {
        self.reserved <= self.on_hand && self.on_hand <= ON_HAND_MAX
    }

    fn is_valid_stored(&self) -> bool {
        self.is_valid() && (self.is_known() || *self == Stock::default())
    }
}

/// An interned SKU name: an index into the store's slots (a slab key, not a map key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SkuId(pub u32);

impl SkuId {
    pub(super) fn slot(self) -> usize {
        self.0 as usize
    }
}

/// What an accepted batch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The state after the batch of each SKU it changed: one entry per distinct SKU, in the
    /// order the batch first touched them. Each carries its new version.
    pub changed: Vec<(SkuId, Stock)>,
    /// For each op, in order, the state of its SKU after the whole batch (PROTOCOL.md: the ack
    /// holds these).
    pub results: Vec<Stock>,
}

/// Every SKU's stock, with interned names. See the module docs for the contract.
#[derive(Debug, Default)]
pub struct Store {
    /// Slot -> name. An empty name marks a free slot: a valid name is never empty.
    names: Vec<Box<str>>,
    /// Slot -> state, kept apart from names so scans of `known()` stay dense.
    /// INVARIANT: every entry `is_valid_stored()`; a free slot holds `Stock::default()`.
    stocks: Vec<Stock>,
    /// Name -> slot for every live slot, by the names in `names`.
    ids: NameIndex,
    /// Free slots, reused last-freed first.
    free: Vec<SkuId>,
    /// Slots with version > 0, so `known_len()` is O(1).
    known_len: usize,
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store::default()
    }

    /// The id of `name`, interning it if new. A new name gets a free slot (or a new one) with
    /// a never-written state. Refuses names that break the SKU rules.
    pub fn intern(&mut self, name: &str) -> Result<SkuId, OpError> {
        let hash = self.ids.hash(name);
        if let Some(id) = self.ids.find(&self.names, hash, name) {
            return Ok(id);
        }
        sku::validate(name)?;
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id.slot()] = name.into();
                id
            }
            None => {
                assert!(self.names.len() < SKUS_MAX, "SKU slots exhausted");
                let slot = u32::try_from(self.names.len()).expect("slots < SKUS_MAX fit u32");
                self.names.push(name.into());
                self.stocks.push(Stock::default());
                SkuId(slot)
            }
        };
        self.ids.insert(&self.names, hash, id);
        Ok(id)
    }

    /// Room for `additional` more SKUs without growing (recovery knows roughly how many are
    /// coming; growing the name index rehashes every name).
    pub fn reserve(&mut self, additional: usize) {
        let additional = additional.min(SKUS_MAX - self.names.len());
        self.names.reserve(additional);
        self.stocks.reserve(additional);
        self.ids.reserve(&self.names, additional);
    }

    /// The id of `name` if it is interned. Never allocates.
    pub fn lookup(&self, name: &str) -> Option<SkuId> {
        self.ids.find(&self.names, self.ids.hash(name), name)
    }

    /// The name `id` was interned with.
    pub fn name(&self, id: SkuId) -> &str {
        &self.names[self.live_slot(id)]
    }

    /// The current state of `id` (all zeros if never written).
    pub fn get(&self, id: SkuId) -> Stock {
        self.stocks[self.live_slot(id)]
    }

    /// Every known SKU (version > 0) in slot order, not sorted by name. Slots never move, so
    /// known SKUs keep their relative order across calls; a newly written SKU may appear
    /// anywhere, since it may have reused a freed slot.
    pub fn known(&self) -> impl Iterator<Item = (SkuId, Stock)> + '_ {
        let ids = (0..).map(SkuId);
        ids.zip(self.stocks.iter().copied())
            .filter(|(_, stock)| stock.is_known())
    }

    /// Known SKUs from slot `first` on, in slot order: a scan resumed where an earlier one
    /// stopped (chunked snapshots). A SKU first written behind the cursor is not seen.
    pub fn known_from(&self, first: u32) -> impl Iterator<Item = (SkuId, Stock)> + '_ {
        let skip = (first as usize).min(self.stocks.len());
        (first..)
            .map(SkuId)
            .zip(self.stocks[skip..].iter().copied())
            .filter(|(_, stock)| stock.is_known())
    }

    /// How many SKUs are known (version > 0).
    pub fn known_len(&self) -> usize {
        self.known_len
    }

    /// How many names are interned (known or not): the store's memory in slots.
    pub fn interned_len(&self) -> usize {
        self.ids.len()
    }

    /// Drops an interned name that was never written, freeing its slot for a later `intern`.
    /// Returns false, and keeps it, if the SKU is known. The caller must hold the last copy of
    /// `id`: after this the id is dead, and its slot may soon name another SKU.
    pub fn forget(&mut self, id: SkuId) -> bool {
        let slot = self.live_slot(id);
        if self.stocks[slot].is_known() {
            return false;
        }
        let hash = self.ids.hash(&self.names[slot]);
        let removed = self.ids.remove(hash, id);
        assert!(removed, "name index out of step with slot {slot}");
        self.names[slot] = Box::default();
        self.free.push(id);
        true
    }

    /// Sets `name`'s state as is, for recovery from a snapshot or log. Refuses invalid names;
    /// panics if `stock` breaks the [`Stock`] invariant, since a checksummed record holding one
    /// means the writer had a bug, and running on would spread it.
    pub fn restore(&mut self, name: &str, stock: Stock) -> Result<SkuId, OpError> {
        assert!(
            stock.is_valid_stored(),
            "restored stock breaks the invariant: {stock:?}"
        );
        let id = self.intern(name)?;
        self.write(id.slot(), stock);
        Ok(id)
    }

    /// Validates `ops` as [`Store::apply`] would, without changing anything.
    pub fn check(&self, ops: &[Op]) -> Result<(), BatchError> {
        let mut touched = Vec::new();
        self.stage(ops, &no_held, &mut touched)
    }

    /// Applies `ops` atomically, as one change (PROTOCOL.md "Operations", batch), with no
    /// units held by holds (see [`Store::apply_held`]).
    ///
    /// Ops apply in order, each seeing the effect of those before it; `if_version` compares with
    /// the version before the batch. If any op fails, nothing changes and the error names the
    /// first failing op. Otherwise each distinct SKU touched gets exactly one new version, even
    /// if its values did not change (a `set` to the current value is still a change). An empty
    /// batch changes nothing and succeeds; the API refuses it before it gets here.
    ///
    /// Allocates the two result `Vec`s and nothing else unless the batch touches more than
    /// [`BATCH_LINEAR_SCAN_SKUS_MAX`] distinct SKUs.
    pub fn apply(&mut self, ops: &[Op]) -> Result<Applied, BatchError> {
        self.apply_held(ops, &no_held)
    }

    /// [`Store::apply`] where `held(sku)` units of each SKU's `reserved` belong to holds
    /// (PROTOCOL.md "Holds"): an anonymous `release` / `commit` sees only `reserved - held`,
    /// an op with [`Op::held`] moves units into (`reserve`) or out of (`release`, `commit`) the
    /// held part. The store does not keep held units itself: the hold table
    /// (`super::holds`) owns them and updates them after an accepted apply.
    pub fn apply_held(
        &mut self,
        ops: &[Op],
        held: &dyn Fn(SkuId) -> u64,
    ) -> Result<Applied, BatchError> {
        // The scratch copies of the touched SKUs become `changed` once the batch passes.
        let mut changed = Vec::with_capacity(ops.len());
        self.stage(ops, held, &mut changed)?;
        for (id, stock) in changed.iter_mut() {
            let before = self.stocks[id.slot()];
            stock.version = before
                .version
                .checked_add(1)
                .expect("2^64 writes never happen");
            self.write(id.slot(), *stock);
        }
        let results = ops.iter().map(|op| self.stocks[op.sku.slot()]).collect();
        Ok(Applied { changed, results })
    }

    /// Puts back states captured with [`Store::get`] before an `apply` whose log write failed.
    /// Entries apply in order; the same SKU may appear more than once. Versions only go back.
    pub fn undo(&mut self, before: &[(SkuId, Stock)]) {
        for &(id, stock) in before {
            assert!(stock.is_valid_stored(), "undo to a broken state: {stock:?}");
            let slot = self.live_slot(id);
            let current = self.stocks[slot];
            assert!(
                current.version >= stock.version,
                "undo would move {id:?} forward"
            );
            self.write(slot, stock);
        }
    }

    /// Runs `ops` on scratch copies of the SKUs they touch, leaving those copies (with their
    /// pre-batch versions) in `touched`, in first-touch order. Held units are tracked beside
    /// the copies, since a batch may take a hold and then try an anonymous release.
    fn stage(
        &self,
        ops: &[Op],
        held: &dyn Fn(SkuId) -> u64,
        touched: &mut Vec<(SkuId, Stock)>,
    ) -> Result<(), BatchError> {
        let mut positions = Positions::default();
        let mut held_working: Vec<u64> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let committed = self.get(op.sku);
            let position = positions.find_or_push(touched, op.sku, committed);
            if position == held_working.len() {
                held_working.push(held(op.sku));
            }
            let working = touched[position].1;
            let held_units = &mut held_working[position];
            let after = stage_op(op, committed, working, held_units)
                .map_err(|error| BatchError { index, error })?;
            touched[position].1 = after;
        }
        Ok(())
    }

    fn write(&mut self, slot: usize, stock: Stock) {
        let before = self.stocks[slot];
        // Add before subtracting: known_len may be 0 when a known SKU is undone to version 0.
        self.known_len += usize::from(stock.is_known());
        self.known_len -= usize::from(before.is_known());
        self.stocks[slot] = stock;
    }

    fn live_slot(&self, id: SkuId) -> usize {
        let slot = id.slot();
        let live = self.names.get(slot).is_some_and(|name| !name.is_empty());
        assert!(live, "{id:?} is not a live SKU of this store");
        slot
    }
}

/// No SKU has held units (stores used without holds, and `check`).
fn no_held(_: SkuId) -> u64 {
    0
}

/// One op against the working copy of its SKU. `committed` is the SKU's state before the batch;
/// `held` the working count of its units held by holds, updated when the op is accepted.
///
/// A malformed amount is reported before a version conflict: it is a client bug whatever the
/// state, and the API may already have refused it while parsing, so checking it first gives the
/// same error whichever layer catches it.
pub(crate) fn stage_op(
    op: &Op,
    committed: Stock,
    working: Stock,
    held: &mut u64,
) -> Result<Stock, OpError> {
    if !op.action.amount_range().contains(&op.amount) {
        let amount = Some(i128::from(op.amount));
        return Err(OpError::InvalidChange {
            action: op.action,
            amount,
        });
    }
    if let Some(expected) = op.if_version {
        if expected != committed.version {
            return Err(OpError::VersionConflict {
                expected,
                current: committed,
            });
        }
    }
    assert!(
        *held <= working.reserved,
        "held units {held} pass reserved in {working:?}"
    );
    let takes_reserved = matches!(op.action, Action::Release | Action::Commit);
    // PROTOCOL.md "Holds": an anonymous release / commit may not take held units, and a hold
    // acts on exactly its own units.
    let free = if op.held {
        *held
    } else {
        working.reserved - *held
    };
    if takes_reserved && op.amount > free {
        return Err(OpError::InsufficientReserved {
            reserved: free,
            requested: op.amount,
        });
    }
    let after = op.action.apply(working, op.amount)?;
    match (op.held, op.action) {
        (true, Action::Reserve) => *held += op.amount,
        (true, Action::Release | Action::Commit) => *held -= op.amount,
        _ => {}
    }
    Ok(after)
}

/// Where each touched SKU sits in a batch's scratch list.
#[derive(Default)]
struct Positions {
    /// Built only once the batch passes `BATCH_LINEAR_SCAN_SKUS_MAX` distinct SKUs.
    index: Option<HashMap<SkuId, usize>>,
}

impl Positions {
    fn find_or_push(
        &mut self,
        touched: &mut Vec<(SkuId, Stock)>,
        id: SkuId,
        committed: Stock,
    ) -> usize {
        let found = match &self.index {
            Some(index) => index.get(&id).copied(),
            None => touched.iter().position(|&(touched_id, _)| touched_id == id),
        };
        if let Some(position) = found {
            return position;
        }
        touched.push((id, committed));
        let position = touched.len() - 1;
        match &mut self.index {
            Some(index) => {
                index.insert(id, position);
            }
            None if touched.len() > BATCH_LINEAR_SCAN_SKUS_MAX => {
                let entries = touched.iter().enumerate();
                self.index = Some(entries.map(|(position, &(id, _))| (id, position)).collect());
            }
            None => {}
        }
        position
    }
}

#[cfg(test)]
mod tests {
    use super::super::ops::CHANGE_MAX;
    use super::*;

    fn stock(on_hand: u64, reserved: u64, version: u64) -> Stock {
        Stock {
            on_hand,
            reserved,
            version,
        }
    }

    fn op(sku: SkuId, action: Action, amount: u64) -> Op {
        Op::new(sku, action, amount)
    }

    fn snapshot(store: &Store) -> Vec<(SkuId, Stock)> {
        store.known().collect()
    }

    /// A store with `a` = (10 on hand, 4 reserved, v3) and `b` = (2, 0, v1).
    fn two_skus() -> (Store, SkuId, SkuId) {
        let mut store = Store::new();
        let a = store.restore("a", stock(10, 4, 3)).unwrap();
        let b = store.restore("b", stock(2, 0, 1)).unwrap();
        (store, a, b)
    }

    #[test]
    fn intern_lookup_name() {
        let mut store = Store::new();
        let a = store.intern("a").unwrap();
        let b = store.intern("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(store.intern("a"), Ok(a));
        assert_eq!(store.lookup("a"), Some(a));
        assert_eq!(store.lookup("c"), None);
        assert_eq!(store.name(b), "b");
        assert_eq!(store.get(a), Stock::default());
        assert_eq!((store.interned_len(), store.known_len()), (2, 0));
        assert_eq!(
            store.known().count(),
            0,
            "interning does not make a SKU known"
        );
        for bad in ["", "batch", "*", "a b"] {
            assert_eq!(store.intern(bad), Err(OpError::InvalidSku), "{bad:?}");
        }
        assert_eq!(store.interned_len(), 2);
    }

    #[test]
    fn single_op_success_bumps_version() {
        let (mut store, a, _) = two_skus();
        let applied = store.apply(&[op(a, Action::Reserve, 6)]).unwrap();
        let after = stock(10, 10, 4);
        assert_eq!(
            applied,
            Applied {
                changed: vec![(a, after)],
                results: vec![after]
            }
        );
        assert_eq!(store.get(a), after);
        assert_eq!(store.get(a).quantity(), 0);
    }

    #[test]
    fn single_op_rejections_change_nothing() {
        let (mut store, a, _) = two_skus();
        let before = snapshot(&store);
        let current = stock(10, 4, 3);
        let short_stock = OpError::InsufficientStock {
            available: 6,
            requested: 7,
        };
        let short_reserved = OpError::InsufficientReserved {
            reserved: 4,
            requested: 5,
        };
        #[rustfmt::skip]
        let cases: &[(Op, OpError)] = &[
            (op(a, Action::Decrease, 7), short_stock),
            (op(a, Action::Reserve, 7), short_stock),
            (op(a, Action::Release, 5), short_reserved),
            (op(a, Action::Commit, 5), short_reserved),
            (op(a, Action::Set, 3), OpError::BelowReserved { reserved: 4, quantity: 3 }),
            (op(a, Action::Increase, 0),
             OpError::InvalidChange { action: Action::Increase, amount: Some(0) }),
            (op(a, Action::Set, ON_HAND_MAX + 1),
             OpError::InvalidChange { action: Action::Set, amount: Some(1_000_000_000_001) }),
            (Op { if_version: Some(2), ..op(a, Action::Increase, 1) },
             OpError::VersionConflict { expected: 2, current }),
            (Op { if_version: Some(4), ..op(a, Action::Increase, 1) },
             OpError::VersionConflict { expected: 4, current }),
            // A bad amount wins over a version conflict (see `stage_op`).
            (Op { if_version: Some(9), ..op(a, Action::Decrease, CHANGE_MAX + 1) },
             OpError::InvalidChange { action: Action::Decrease, amount: Some(1_000_000_001) }),
        ];
        for &(op, error) in cases {
            assert_eq!(
                store.check(&[op]),
                Err(BatchError { index: 0, error }),
                "{op:?}"
            );
            assert_eq!(
                store.apply(&[op]),
                Err(BatchError { index: 0, error }),
                "{op:?}"
            );
            assert_eq!(snapshot(&store), before, "{op:?}");
        }
    }

    #[test]
    fn if_version_match_applies() {
        let (mut store, a, b) = two_skus();
        let ops = [Op {
            if_version: Some(3),
            ..op(a, Action::Set, 4)
        }];
        assert_eq!(store.apply(&ops).unwrap().results, vec![stock(4, 4, 4)]);
        // if_version 0 means "only if never written".
        let c = store.intern("c").unwrap();
        let ops = [Op {
            if_version: Some(0),
            ..op(c, Action::Set, 1)
        }];
        assert_eq!(store.apply(&ops).unwrap().results, vec![stock(1, 0, 1)]);
        let conflict = OpError::VersionConflict {
            expected: 0,
            current: stock(2, 0, 1),
        };
        let ops = [Op {
            if_version: Some(0),
            ..op(b, Action::Set, 1)
        }];
        assert_eq!(
            store.apply(&ops),
            Err(BatchError {
                index: 0,
                error: conflict
            })
        );
    }

    #[test]
    fn set_to_the_current_value_is_a_change() {
        let (mut store, _, b) = two_skus();
        let applied = store.apply(&[op(b, Action::Set, 2)]).unwrap();
        assert_eq!(applied.changed, vec![(b, stock(2, 0, 2))]);
    }

    #[test]
    fn batch_failing_at_each_index_changes_nothing() {
        let (mut store, a, b) = two_skus();
        let c = store.intern("c").unwrap();
        let good = [
            op(a, Action::Commit, 4),
            op(c, Action::Set, 5),
            op(b, Action::Increase, 1),
            op(a, Action::Decrease, 6),
            op(c, Action::Reserve, 5),
        ];
        let before: Vec<_> = [a, b, c].iter().map(|&id| store.get(id)).collect();
        for k in 0..good.len() {
            let mut ops = good;
            // Decreasing by CHANGE_MAX always fails: no SKU here has that much.
            ops[k] = op(ops[k].sku, Action::Decrease, CHANGE_MAX);
            let result = store.apply(&ops);
            assert_eq!(result.map_err(|error| error.index), Err(k));
            let after: Vec<_> = [a, b, c].iter().map(|&id| store.get(id)).collect();
            assert_eq!(after, before, "failing at {k} changed state");
            assert_eq!(store.known_len(), 2);
        }
        let applied = store.apply(&good).unwrap();
        assert_eq!(
            applied
                .changed
                .iter()
                .map(|&(id, _)| id)
                .collect::<Vec<_>>(),
            [a, c, b]
        );
        assert_eq!(store.known_len(), 3);
    }

    #[test]
    fn one_version_per_sku_per_batch_and_results_after_batch() {
        let (mut store, a, b) = two_skus();
        let ops = [
            op(a, Action::Increase, 5), // 15, 4
            op(b, Action::Reserve, 2),  // 2, 2
            op(a, Action::Reserve, 11), // 15, 15: sees the increase before it
            op(a, Action::Commit, 15),  // 0, 0
            op(b, Action::Release, 1),  // 2, 1
            op(a, Action::Set, 7),      // 7, 0
        ];
        let applied = store.apply(&ops).unwrap();
        let (a_after, b_after) = (stock(7, 0, 4), stock(2, 1, 2));
        assert_eq!(applied.changed, vec![(a, a_after), (b, b_after)]);
        let results = vec![a_after, b_after, a_after, a_after, b_after, a_after];
        assert_eq!(applied.results, results);
        assert_eq!((store.get(a), store.get(b)), (a_after, b_after));
    }

    #[test]
    fn if_version_compares_with_the_version_before_the_batch() {
        let (mut store, a, _) = two_skus();
        let guarded = |version| Op {
            if_version: Some(version),
            ..op(a, Action::Increase, 1)
        };
        // The first op would make a's version 4 if applied alone; the second still sees 3.
        let applied = store.apply(&[guarded(3), guarded(3)]).unwrap();
        assert_eq!(applied.results, vec![stock(12, 4, 4); 2]);
        let conflict = OpError::VersionConflict {
            expected: 5,
            current: stock(12, 4, 4),
        };
        let result = store.apply(&[guarded(4), guarded(5)]);
        assert_eq!(
            result,
            Err(BatchError {
                index: 1,
                error: conflict
            })
        );
    }

    #[test]
    fn empty_batch_is_a_no_op() {
        let (mut store, _, _) = two_skus();
        let before = snapshot(&store);
        assert_eq!(
            store.apply(&[]),
            Ok(Applied {
                changed: vec![],
                results: vec![]
            })
        );
        assert_eq!(snapshot(&store), before);
    }

    #[test]
    fn batch_over_many_skus_uses_the_index_path() {
        let mut store = Store::new();
        let count = BATCH_LINEAR_SCAN_SKUS_MAX * 3;
        let ids: Vec<SkuId> = (0..count)
            .map(|i| store.intern(&format!("s{i}")).unwrap())
            .collect();
        let mut ops: Vec<Op> = ids.iter().map(|&id| op(id, Action::Set, 10)).collect();
        ops.extend(ids.iter().rev().map(|&id| op(id, Action::Reserve, 3)));
        let applied = store.apply(&ops).unwrap();
        assert_eq!(applied.changed.len(), count);
        assert!(applied
            .changed
            .iter()
            .zip(&ids)
            .all(|(&(id, s), &want)| { id == want && s == stock(10, 3, 1) }));
        assert!(applied.results.iter().all(|&s| s == stock(10, 3, 1)));
        // Fail in the second half, on a SKU found through the index.
        ops.push(op(ids[BATCH_LINEAR_SCAN_SKUS_MAX + 1], Action::Reserve, 8));
        let error = OpError::InsufficientStock {
            available: 4,
            requested: 8,
        };
        let before = snapshot(&store);
        assert_eq!(
            store.apply(&ops),
            Err(BatchError {
                index: 2 * count,
                error
            })
        );
        assert_eq!(snapshot(&store), before);
    }

    #[test]
    fn check_does_not_apply() {
        let (mut store, a, b) = two_skus();
        let before = snapshot(&store);
        assert_eq!(
            store
                .check(&[op(a, Action::Increase, 1), op(b, Action::Commit, 1)])
                .map_err(|e| e.index),
            Err(1)
        );
        assert_eq!(
            store.check(&[op(a, Action::Increase, 1), op(b, Action::Decrease, 1)]),
            Ok(())
        );
        assert_eq!(snapshot(&store), before);
        assert_eq!(
            store.apply(&[op(a, Action::Increase, 1)]).unwrap().results[0].version,
            4
        );
    }

    #[test]
    fn undo_restores_states_and_known_count() {
        let (mut store, a, b) = two_skus();
        let c = store.intern("c").unwrap();
        let ops = [
            op(a, Action::Set, 20),
            op(c, Action::Increase, 3),
            op(a, Action::Reserve, 1),
        ];
        let before: Vec<_> = ops.iter().map(|op| (op.sku, store.get(op.sku))).collect();
        let all_before = snapshot(&store);
        store.apply(&ops).unwrap();
        assert_eq!(store.known_len(), 3);
        store.undo(&before);
        assert_eq!(snapshot(&store), all_before);
        assert_eq!((store.known_len(), store.get(c)), (2, Stock::default()));
        assert_eq!(store.get(b), stock(2, 0, 1));
        assert!(store.forget(c), "undone to never-written, so forgettable");
    }

    #[test]
    #[should_panic(expected = "undo would move")]
    fn undo_cannot_move_forward() {
        let (mut store, a, _) = two_skus();
        store.undo(&[(a, stock(1, 0, 9))]);
    }

    #[test]
    fn forget_frees_never_written_slots_for_reuse() {
        let (mut store, a, _) = two_skus();
        assert!(!store.forget(a), "a known SKU is kept");
        assert_eq!(store.name(a), "a");
        for round in 0..100 {
            let id = store.intern(&format!("peek-{round}")).unwrap();
            assert_eq!(id, SkuId(2), "the freed slot is reused");
            assert!(store.forget(id));
            assert_eq!(store.lookup(&format!("peek-{round}")), None);
        }
        assert_eq!(store.interned_len(), 2);
        let x = store.intern("x").unwrap();
        let y = store.intern("y").unwrap();
        assert_eq!((x, y), (SkuId(2), SkuId(3)));
        store.apply(&[op(y, Action::Set, 1)]).unwrap();
        assert!(store.forget(x));
        assert!(!store.forget(y));
        let z = store.intern("z").unwrap();
        assert_eq!((z, store.name(z), store.get(z)), (x, "z", Stock::default()));
        let names: Vec<_> = store.known().map(|(id, _)| store.name(id)).collect();
        assert_eq!(names, ["a", "b", "y"]);
    }

    #[test]
    #[should_panic(expected = "is not a live SKU")]
    fn a_forgotten_id_is_dead() {
        let mut store = Store::new();
        let id = store.intern("gone").unwrap();
        assert!(store.forget(id));
        store.get(id);
    }

    #[test]
    fn restore_sets_state_as_is() {
        let mut store = Store::new();
        let a = store.restore("a", stock(5, 5, 41)).unwrap();
        assert_eq!((store.get(a), store.known_len()), (stock(5, 5, 41), 1));
        assert_eq!(store.restore("a", stock(6, 0, 42)), Ok(a));
        assert_eq!((store.get(a), store.known_len()), (stock(6, 0, 42), 1));
        assert_eq!(
            store.restore("batch", stock(1, 0, 1)),
            Err(OpError::InvalidSku)
        );
        assert_eq!(store.interned_len(), 1);
        let applied = store.apply(&[op(a, Action::Increase, 1)]).unwrap();
        assert_eq!(applied.results, vec![stock(7, 0, 43)]);
    }

    #[test]
    fn restore_refuses_broken_stock() {
        let broken = [stock(1, 2, 1), stock(ON_HAND_MAX + 1, 0, 1), stock(1, 0, 0)];
        for stock in broken {
            let result = std::panic::catch_unwind(|| Store::new().restore("a", stock));
            assert!(result.is_err(), "{stock:?} accepted");
        }
    }
}
