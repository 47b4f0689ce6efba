//! The subscription index: SKU -> subscribers for fan-out, connection -> SKUs so a close is
//! cheap, and the `*` set.
//!
//! A connection subscribed to `*` and to some SKUs by name would be listed twice for those SKUs;
//! instead its named subscriptions go dormant (kept per connection, absent from the per-SKU
//! lists) while the wildcard is on, so fan-out never checks for duplicates.
//!
//! Every SKU id held here counts as a reference: `unsubscribe` and `remove_conn` report SKUs
//! whose last reference went, so the caller may `Store::forget` ones never written.

use crate::net::ConnId;
use crate::stock::SkuId;

/// Marks a dormant subscription (the connection has `*`).
const DORMANT: u32 = u32::MAX;

/// Marks a connection without `*` in `ConnSubs::wildcard_position`.
const NO_WILDCARD: u32 = u32::MAX;

impl ConnSubs {
    /// Where `sku` is (Ok) or would go (Err) in `skus`, which is sorted by SKU so that a
    /// connection naming thousands of SKUs is searched in log time, not scanned.
    fn find(&self, sku: SkuId) -> Result<usize, usize> {
        self.skus.binary_search_by_key(&sku, |&(k, _)| k)
    }

    /// Position in `Subscriptions::wildcard`, if the connection hears `*`.
    fn wildcard(&self) -> Option<u32> {
        (self.wildcard_position != NO_WILDCARD).then_some(self.wildcard_position)
    }

    fn set_wildcard(&mut self, position: Option<u32>) {
        // The list holds one entry per connection slot at most, far fewer than u32::MAX.
        assert!(
            position != Some(NO_WILDCARD),
            "`*` list position out of range"
        );
        self.wildcard_position = position.unwrap_or(NO_WILDCARD);
    }

    fn take_wildcard(&mut self) -> Option<u32> {
        let position = self.wildcard();
        self.wildcard_position = NO_WILDCARD;
        position
    }
}

/// One per connection slot: 32 bytes (the generation, the position in the `*` list with a
/// sentinel for none instead of an `Option` and its padding, and the list of named SKUs, an
/// empty `Vec` header for a connection that names none).
struct ConnSubs {
    generation: u32,
    /// Position in `wildcard`, or NO_WILDCARD.
    wildcard_position: u32,
    /// (SKU, position in `by_sku[sku]`, or DORMANT), sorted by SKU.
    skus: Vec<(SkuId, u32)>,
}

const CONN_SUBS_BYTES_MAX: usize = 32;
const _: () = assert!(std::mem::size_of::<ConnSubs>() <= CONN_SUBS_BYTES_MAX);

impl Default for ConnSubs {
    fn default() -> Self {
        ConnSubs {
            generation: 0,
            wildcard_position: NO_WILDCARD,
            skus: Vec::new(),
        }
    }
}

#[derive(Default)]
pub struct Subscriptions {
    by_sku: Vec<Vec<ConnId>>,
    refs: Vec<u32>,
    wildcard: Vec<ConnId>,
    by_conn: Vec<ConnSubs>,
}

impl Subscriptions {
    pub fn new() -> Self {
        Self::default()
    }

    fn conn_mut(&mut self, id: ConnId) -> &mut ConnSubs {
        let index = id.index as usize;
        if self.by_conn.len() <= index {
            self.by_conn.resize_with(index + 1, ConnSubs::default);
        }
        let subs = &mut self.by_conn[index];
        if subs.generation != id.generation {
            // A previous connection in this slot left nothing behind (remove_conn empties it).
            debug_assert!(subs.skus.is_empty() && subs.wildcard().is_none());
            subs.generation = id.generation;
        }
        subs
    }

    fn conn(&self, id: ConnId) -> Option<&ConnSubs> {
        self.by_conn
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
    }

    /// Whether any connection names `sku` (actively or dormant behind a `*`).
    pub fn is_held(&self, sku: SkuId) -> bool {
        self.refs.get(sku.0 as usize).is_some_and(|&n| n > 0)
    }

    /// SKUs this connection names (active or dormant).
    pub fn count(&self, id: ConnId) -> usize {
        self.conn(id).map_or(0, |s| s.skus.len())
    }

    pub fn has_wildcard(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|s| s.wildcard().is_some())
    }

    pub fn is_subscribed(&self, id: ConnId, sku: SkuId) -> bool {
        self.conn(id)
            .is_some_and(|s| s.wildcard().is_some() || s.find(sku).is_ok())
    }

    /// The connections that hear about `sku`: named subscribers, then `*` subscribers; no
    /// connection is in both.
    pub fn subscribers(&self, sku: SkuId) -> (&[ConnId], &[ConnId]) {
        let named = self
            .by_sku
            .get(sku.0 as usize)
            .map_or(&[][..], |v| v.as_slice());
        (named, &self.wildcard)
    }

    /// The connections subscribed to `*`.
    pub fn wildcard(&self) -> &[ConnId] {
        &self.wildcard
    }

    /// Subscribes `id` to `sku`; false if it already was.
    pub fn subscribe(&mut self, id: ConnId, sku: SkuId) -> bool {
        let slot = sku.0 as usize;
        if self.by_sku.len() <= slot {
            self.by_sku.resize_with(slot + 1, Vec::new);
            self.refs.resize(slot + 1, 0);
        }
        let conn = self.conn_mut(id);
        let Err(at) = conn.find(sku) else {
            return false;
        };
        let position = if conn.wildcard().is_some() {
            DORMANT
        } else {
            let list = &mut self.by_sku[slot];
            list.push(id);
            (list.len() - 1) as u32
        };
        self.by_conn[id.index as usize]
            .skus
            .insert(at, (sku, position));
        self.refs[slot] += 1;
        true
    }

    pub fn subscribe_all(&mut self, id: ConnId) {
        if self.conn_mut(id).wildcard().is_some() {
            return;
        }
        self.wildcard.push(id);
        let position = (self.wildcard.len() - 1) as u32;
        let index = id.index as usize;
        self.by_conn[index].set_wildcard(Some(position));
        // Named subscriptions go dormant so no SKU lists this connection twice.
        for i in 0..self.by_conn[index].skus.len() {
            let (sku, pos) = self.by_conn[index].skus[i];
            if pos != DORMANT {
                self.detach(sku, pos);
                self.by_conn[index].skus[i].1 = DORMANT;
            }
        }
    }

    /// Removes `id` from `by_sku[sku]` at `pos`, fixing the position of the one moved there.
    fn detach(&mut self, sku: SkuId, pos: u32) {
        let list = &mut self.by_sku[sku.0 as usize];
        list.swap_remove(pos as usize);
        if let Some(&moved) = list.get(pos as usize) {
            let moved_subs = &mut self.by_conn[moved.index as usize];
            let at = moved_subs
                .find(sku)
                .expect("a listed subscriber names the SKU");
            moved_subs.skus[at].1 = pos;
        }
    }

    fn detach_wildcard(&mut self, pos: u32) {
        self.wildcard.swap_remove(pos as usize);
        if let Some(&moved) = self.wildcard.get(pos as usize) {
            self.by_conn[moved.index as usize].set_wildcard(Some(pos));
        }
    }

    /// Unsubscribes `id` from `sku`. Returns the SKU if this was its last reference.
    pub fn unsubscribe(&mut self, id: ConnId, sku: SkuId) -> Option<SkuId> {
        let conn = self.conn(id)?;
        let at = conn.find(sku).ok()?;
        let (_, pos) = self.by_conn[id.index as usize].skus.remove(at);
        if pos != DORMANT {
            self.detach(sku, pos);
        }
        self.release(sku)
    }

    fn release(&mut self, sku: SkuId) -> Option<SkuId> {
        let refs = &mut self.refs[sku.0 as usize];
        *refs -= 1;
        (*refs == 0).then_some(sku)
    }

    /// Removes the wildcard; dormant named subscriptions wake up.
    pub fn unsubscribe_all(&mut self, id: ConnId) {
        let Some(pos) = self.conn(id).and_then(ConnSubs::wildcard) else {
            return;
        };
        self.detach_wildcard(pos);
        let index = id.index as usize;
        self.by_conn[index].set_wildcard(None);
        for i in 0..self.by_conn[index].skus.len() {
            let sku = self.by_conn[index].skus[i].0;
            let list = &mut self.by_sku[sku.0 as usize];
            list.push(id);
            self.by_conn[index].skus[i].1 = (list.len() - 1) as u32;
        }
    }

    /// Forgets every subscription of a closed connection; SKUs that lost their last reference
    /// are appended to `released`.
    pub fn remove_conn(&mut self, id: ConnId, released: &mut Vec<SkuId>) {
        if self.conn(id).is_none() {
            return;
        }
        let index = id.index as usize;
        if let Some(pos) = self.by_conn[index].take_wildcard() {
            self.detach_wildcard(pos);
        }
        let skus = std::mem::take(&mut self.by_conn[index].skus);
        for (sku, pos) in skus {
            if pos != DORMANT {
                self.detach(sku, pos);
            }
            released.extend(self.release(sku));
        }
    }

    /// SKUs named by `id` (for tests and diagnostics).
    pub fn skus_of(&self, id: ConnId) -> Vec<SkuId> {
        self.conn(id)
            .map_or_else(Vec::new, |c| c.skus.iter().map(|&(k, _)| k).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn c(i: u32) -> ConnId {
        ConnId {
            index: i,
            generation: 1,
        }
    }

    fn hearers(s: &Subscriptions, sku: SkuId) -> BTreeSet<ConnId> {
        let (named, all) = s.subscribers(sku);
        let mut set = BTreeSet::new();
        for &id in named.iter().chain(all) {
            assert!(set.insert(id), "{id} listed twice for {sku:?}");
        }
        set
    }

    #[test]
    fn wildcard_and_named_never_duplicate_and_unsubscribe_rules_hold() {
        let mut s = Subscriptions::new();
        let a = SkuId(0);
        assert!(s.subscribe(c(1), a));
        assert!(!s.subscribe(c(1), a));
        s.subscribe_all(c(1));
        assert_eq!(hearers(&s, a), [c(1)].into());
        // Unsubscribing the named SKU keeps it covered by `*`.
        assert_eq!(s.unsubscribe(c(1), a), Some(a));
        assert_eq!(hearers(&s, a), [c(1)].into());
        s.subscribe(c(1), a);
        s.unsubscribe_all(c(1));
        assert_eq!(hearers(&s, a), [c(1)].into());
        assert_eq!(hearers(&s, SkuId(5)), BTreeSet::new());
        let mut released = Vec::new();
        s.remove_conn(c(1), &mut released);
        assert_eq!(released, vec![a]);
        assert_eq!(hearers(&s, a), BTreeSet::new());
    }

    #[derive(Debug, Clone)]
    enum Step {
        Sub(u32, u32),
        Unsub(u32, u32),
        All(u32),
        NoAll(u32),
        Close(u32),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..6u32, 0..5u32).prop_map(|(c, k)| Step::Sub(c, k)),
            (0..6u32, 0..5u32).prop_map(|(c, k)| Step::Unsub(c, k)),
            (0..6u32).prop_map(Step::All),
            (0..6u32).prop_map(Step::NoAll),
            (0..6u32).prop_map(Step::Close),
        ]
    }

    proptest! {
        #[test]
        fn index_matches_a_naive_model(steps in proptest::collection::vec(step(), 1..200)) {
            let mut s = Subscriptions::new();
            let mut named: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
            let mut all: BTreeSet<u32> = BTreeSet::new();
            for st in steps {
                match st {
                    Step::Sub(conn, k) => { s.subscribe(c(conn), SkuId(k)); named.entry(conn).or_default().insert(k); }
                    Step::Unsub(conn, k) => {
                        let had = named.entry(conn).or_default().remove(&k);
                        let last = had && !named.values().any(|v| v.contains(&k));
                        prop_assert_eq!(s.unsubscribe(c(conn), SkuId(k)).is_some(), last);
                    }
                    Step::All(conn) => { s.subscribe_all(c(conn)); all.insert(conn); }
                    Step::NoAll(conn) => { s.unsubscribe_all(c(conn)); all.remove(&conn); }
                    Step::Close(conn) => {
                        let mut released = Vec::new();
                        s.remove_conn(c(conn), &mut released);
                        named.remove(&conn); all.remove(&conn);
                        for k in released { prop_assert!(!named.values().any(|v| v.contains(&k.0))); }
                    }
                }
                for k in 0..5u32 {
                    let expected: BTreeSet<ConnId> = (0..6u32)
                        .filter(|conn| all.contains(conn) || named.get(conn).is_some_and(|v| v.contains(&k)))
                        .map(c).collect();
                    prop_assert_eq!(hearers(&s, SkuId(k)), expected);
                }
            }
        }
    }
}
