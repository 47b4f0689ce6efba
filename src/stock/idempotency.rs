//! The idempotency key cache (PROTOCOL.md "Operations", idempotency).
//!
//! A write that carries a key records `(key, fingerprint of the request, result)` once it is
//! applied. A repeat of the key with the same fingerprint gets the recorded result back
//! ([`Lookup::Hit`]) and changes nothing; the same key with another request is
//! [`Lookup::Mismatch`] (`bad_request`). Only applied writes record their key, so a rejected
//! write may be retried with the same key. Keys live at least `ttl_secs` (the contract says 24
//! hours); the caller persists them ([`IdempotencyCache::iter`]) so they survive a restart.
//!
//! No clock: every call that needs the time takes `now_secs`, so tests drive it.
//!
//! Bounded memory, by refusal rather than eviction: at `keys_max` keys younger than the TTL,
//! [`IdempotencyCache::insert`] returns [`CacheFull`] instead of forgetting one. Forgetting a
//! young key would silently break the contract ("remembered at least 24 hours"): a client's retry
//! would apply its write twice. Refusing the new write instead (the caller answers
//! `unavailable`) is loud, safe to retry later, and only happens under a key flood that the
//! operator should size `keys_max` for. Memory is at most `keys_max` entries of two copies of a
//! key (<= 128 bytes each) plus the result (one `(SkuId, Stock)` per op, bounded by the batch
//! limit).
//!
//! Recommended order for a keyed write, in one event-loop turn: [`IdempotencyCache::lookup`];
//! on a miss [`IdempotencyCache::check_room`], `Store::apply`, then `insert` at once, so no
//! other write can take the room in between; if the log write then fails, undo the store and
//! [`IdempotencyCache::remove`] the key.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use super::ops::Action;
use super::store::{SkuId, Stock};

/// Longest idempotency key, in bytes (PROTOCOL.md: 1..=128 bytes).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// How long a key is remembered at least (PROTOCOL.md: at least 24 hours).
pub const IDEMPOTENCY_TTL_SECS: u64 = 24 * 3600;

/// Whether `key` is a key the contract allows: 1..=[`IDEMPOTENCY_KEY_BYTES_MAX`] bytes. The
/// API checks this (`bad_request`) before the cache sees the key.
pub fn key_is_valid(key: &str) -> bool {
    (1..=IDEMPOTENCY_KEY_BYTES_MAX).contains(&key.len())
}

/// One op as fingerprinted: `(sku name, action, amount, if_version)`.
pub type FingerprintOp<'a> = (&'a str, Action, u64, Option<u64>);

/// A stable 64-bit digest of a write request, to tell a true repeat from a reused key.
///
/// FNV-1a 64, written out here rather than taken from `std::hash`, because fingerprints are
/// persisted: the value must be the same across builds, Rust versions and restarts. It is not
/// collision-resistant, which is acceptable: a key belongs to one client, and a crafted collision
/// only earns that client its own earlier result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// `kind` of a single-op write (`stock_update`, `POST /stock/{sku}`).
    pub const KIND_SINGLE: u8 = 1;
    /// `kind` of a batch (`stock_batch`, `POST /stock/batch`), so a batch of one op differs
    /// from the single op.
    pub const KIND_BATCH: u8 = 2;

    /// The fingerprint of a request of `kind` made of `ops`: `(sku name, action, amount,
    /// if_version)` each, amount being `quantity` for `set` and `change` otherwise. Fields an
    /// action ignores are not part of the request, so they do not change the fingerprint.
    pub fn of_ops(kind: u8, ops: &[FingerprintOp]) -> Fingerprint {
        let mut builder = FingerprintBuilder::new(kind);
        for &(sku, action, amount, if_version) in ops {
            builder.op(sku, action, amount, if_version);
        }
        builder.finish()
    }
}

/// Builds a [`Fingerprint`] op by op, for callers that would otherwise collect a `Vec` of tuples.
/// `FingerprintBuilder::new(k)` + `op(..)` for each op + `finish()` equals
/// `Fingerprint::of_ops(k, ops)`.
///
/// Encoding: a format byte, `kind`, then per op the name's length (u64 LE) and bytes, the
/// action's code, the amount (u64 LE), and `0` or `1` + version (u64 LE); finally the op count.
/// Every field has a fixed width or a length prefix, so two different requests never encode to
/// the same bytes.
#[derive(Clone, Debug)]
pub struct FingerprintBuilder {
    hash: Fnv1a64,
    ops_len: u64,
}

/// Bumped if the encoding above ever changes, so old and new fingerprints cannot be confused.
const FINGERPRINT_FORMAT: u8 = 1;

impl FingerprintBuilder {
    /// Starts a request of `kind` (see [`Fingerprint::KIND_SINGLE`], [`Fingerprint::KIND_BATCH`]).
    pub fn new(kind: u8) -> FingerprintBuilder {
        let mut hash = Fnv1a64::new();
        hash.write(&[FINGERPRINT_FORMAT, kind]);
        FingerprintBuilder { hash, ops_len: 0 }
    }

    /// Adds the next op.
    pub fn op(&mut self, sku: &str, action: Action, amount: u64, if_version: Option<u64>) {
        self.hash.write(&(sku.len() as u64).to_le_bytes());
        self.hash.write(sku.as_bytes());
        self.hash.write(&[action_code(action)]);
        self.hash.write(&amount.to_le_bytes());
        match if_version {
            None => self.hash.write(&[0]),
            Some(version) => {
                self.hash.write(&[1]);
                self.hash.write(&version.to_le_bytes());
            }
        }
        self.ops_len += 1;
    }

    /// Adds the hold of the op just added (or of a hold message), with its `ttl_ms`.
    pub fn hold(&mut self, hold: &str, ttl_ms: Option<u64>) {
        self.hash.write(b"hold");
        self.hash.write(&(hold.len() as u64).to_le_bytes());
        self.hash.write(hold.as_bytes());
        match ttl_ms {
            None => self.hash.write(&[0]),
            Some(ttl_ms) => {
                self.hash.write(&[1]);
                self.hash.write(&ttl_ms.to_le_bytes());
            }
        }
    }

    /// The fingerprint of the ops added so far.
    pub fn finish(mut self) -> Fingerprint {
        self.hash.write(&self.ops_len.to_le_bytes());
        Fingerprint(self.hash.0)
    }
}

/// Fixed codes for the hash, independent of the enum's declaration order, which may change.
fn action_code(action: Action) -> u8 {
    match action {
        Action::Set => 1,
        Action::Increase => 2,
        Action::Decrease => 3,
        Action::Reserve => 4,
        Action::Release => 5,
        Action::Commit => 6,
    }
}

/// FNV-1a, 64-bit (http://www.isthe.com/chongo/tech/comp/fnv/).
#[derive(Clone, Debug)]
struct Fnv1a64(u64);

impl Fnv1a64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new() -> Fnv1a64 {
        Fnv1a64(Self::OFFSET_BASIS)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(Self::PRIME);
        }
    }
}

/// What the cache knows of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// Never seen, or seen longer than the TTL ago: apply the write.
    Miss,
    /// Applied before with the same request: reply with this result, marked duplicate.
    Hit(&'a [(SkuId, Stock)]),
    /// Applied before with a different request: `bad_request`, change nothing.
    Mismatch,
}

/// `insert` found `keys_max` keys younger than the TTL: the write must be refused
/// (`unavailable`) rather than a young key forgotten. See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheFull {
    /// The configured limit that was reached.
    pub keys_max: usize,
}

impl fmt::Display for CacheFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "idempotency cache full: {} keys younger than the TTL",
            self.keys_max
        )
    }
}

impl std::error::Error for CacheFull {}

/// Recorded writes by idempotency key. See the module docs for the contract.
#[derive(Debug)]
pub struct IdempotencyCache {
    keys_max: usize,
    ttl_secs: u64,
    /// INVARIANT: `entries.len() <= keys_max`, and each entry has exactly one record in `order`
    /// with its `seq`.
    entries: HashMap<Box<str>, Entry>,
    /// Insertion order, oldest first, so `expire` only looks at the front. A record whose `seq`
    /// differs from its key's entry is stale (the key was inserted again, or removed) and is
    /// skipped. INVARIANT: `order.len() <= 2 * keys_max + 1`, kept by compacting.
    order: VecDeque<Queued>,
    /// Next insertion's sequence number: tells a key's current record from stale ones.
    seq_next: u64,
}

#[derive(Debug)]
struct Entry {
    fingerprint: Fingerprint,
    result: Vec<(SkuId, Stock)>,
    created_secs: u64,
    seq: u64,
}

#[derive(Debug)]
struct Queued {
    key: Box<str>,
    created_secs: u64,
    seq: u64,
}

impl IdempotencyCache {
    /// An empty cache holding at most `keys_max` keys, each for at least `ttl_secs`
    /// ([`IDEMPOTENCY_TTL_SECS`] in production). `keys_max` 0 refuses every keyed write.
    pub fn new(keys_max: usize, ttl_secs: u64) -> IdempotencyCache {
        IdempotencyCache {
            keys_max,
            ttl_secs,
            entries: HashMap::new(),
            order: VecDeque::new(),
            seq_next: 0,
        }
    }

    /// The limit given to `new`.
    pub fn keys_max(&self) -> usize {
        self.keys_max
    }

    /// The TTL given to `new`.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Keys held, including any past the TTL that `expire` has not dropped yet.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What the cache knows of `key` for a request with `fingerprint`, at `now_secs`. A key
    /// older than the TTL is a miss even before `expire` drops it.
    pub fn lookup(&self, key: &str, fingerprint: Fingerprint, now_secs: u64) -> Lookup<'_> {
        match self.entries.get(key) {
            Some(entry) if self.is_expired(entry.created_secs, now_secs) => Lookup::Miss,
            Some(entry) if entry.fingerprint == fingerprint => Lookup::Hit(&entry.result),
            Some(_) => Lookup::Mismatch,
            None => Lookup::Miss,
        }
    }

    /// Whether `insert(key, .., now_secs)` would succeed, after expiring old keys. Lets the
    /// caller refuse a write before applying it.
    pub fn check_room(&mut self, key: &str, now_secs: u64) -> Result<(), CacheFull> {
        self.expire(now_secs);
        if self.entries.len() < self.keys_max || self.entries.contains_key(key) {
            Ok(())
        } else {
            Err(CacheFull {
                keys_max: self.keys_max,
            })
        }
    }

    /// Records that the request `fingerprint` under `key` was applied with `result`, at
    /// `created_secs` (now, or the original time when restoring a snapshot). A key already held
    /// is replaced (log replay may repeat a snapshot's key). Expires old keys first; then, if
    /// `keys_max` keys are held, refuses with [`CacheFull`] rather than forget one.
    ///
    /// Panics on a key outside 1..=128 bytes: the API validates keys before they get here.
    pub fn insert(
        &mut self,
        key: &str,
        fingerprint: Fingerprint,
        result: Vec<(SkuId, Stock)>,
        created_secs: u64,
    ) -> Result<(), CacheFull> {
        assert!(key_is_valid(key), "idempotency key of {} bytes", key.len());
        self.check_room(key, created_secs)?;
        let seq = self.seq_next;
        self.seq_next += 1;
        let entry = Entry {
            fingerprint,
            result,
            created_secs,
            seq,
        };
        self.entries.insert(key.into(), entry);
        self.order.push_back(Queued {
            key: key.into(),
            created_secs,
            seq,
        });
        self.compact();
        Ok(())
    }

    /// Forgets `key` (a write whose log record failed must not stay recorded). Returns whether
    /// it was held.
    pub fn remove(&mut self, key: &str) -> bool {
        // Its record in `order` becomes stale and is skipped.
        self.entries.remove(key).is_some()
    }

    /// Drops keys older than the TTL at `now_secs`. Amortised O(1) per key: it pops from the
    /// front of the insertion order and stops at the first young record. If `created_secs` went
    /// backwards between inserts (clock step, restore order), a key may be dropped later than
    /// its TTL, never earlier.
    pub fn expire(&mut self, now_secs: u64) {
        while let Some(front) = self.order.front() {
            let current = self.is_current(front);
            if current && !self.is_expired(front.created_secs, now_secs) {
                break;
            }
            let front = self.order.pop_front().expect("front() was Some");
            if current {
                self.entries.remove(&front.key);
            }
        }
    }

    /// Every key held, oldest insertion first: `(key, fingerprint, result, created_secs)`. For
    /// snapshots; re-inserting them in this order rebuilds the same cache.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Fingerprint, &[(SkuId, Stock)], u64)> + '_ {
        self.order.iter().filter_map(move |queued| {
            let entry = self.entries.get(&queued.key)?;
            let current = entry.seq == queued.seq;
            current.then_some((
                &*queued.key,
                entry.fingerprint,
                &entry.result[..],
                entry.created_secs,
            ))
        })
    }

    /// A key is kept for `ttl_secs` whole seconds: expired only once strictly older. A clock
    /// that went back makes the age 0, not a huge wrapped number.
    fn is_expired(&self, created_secs: u64, now_secs: u64) -> bool {
        now_secs.saturating_sub(created_secs) > self.ttl_secs
    }

    fn is_current(&self, queued: &Queued) -> bool {
        self.entries
            .get(&queued.key)
            .is_some_and(|entry| entry.seq == queued.seq)
    }

    /// Drops stale records once they could outnumber live ones, so replacing and removing keys
    /// cannot grow `order` without bound. Each pass removes at least `keys_max + 1` records, so
    /// the cost is amortised O(1) per insert.
    fn compact(&mut self) {
        if self.order.len() > self.keys_max.saturating_mul(2) {
            let entries = &self.entries;
            self.order.retain(|queued| {
                entries
                    .get(&queued.key)
                    .is_some_and(|entry| entry.seq == queued.seq)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 100;

    fn fingerprint(amount: u64) -> Fingerprint {
        Fingerprint::of_ops(
            Fingerprint::KIND_SINGLE,
            &[("sku-1", Action::Set, amount, None)],
        )
    }

    fn result(version: u64) -> Vec<(SkuId, Stock)> {
        vec![(
            SkuId(0),
            Stock {
                on_hand: 1,
                reserved: 0,
                version,
            },
        )]
    }

    fn fnv(bytes: &[u8]) -> u64 {
        let mut hash = Fnv1a64::new();
        hash.write(bytes);
        hash.0
    }

    #[test]
    fn fnv1a_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn fingerprint_is_pinned() {
        // Persisted in snapshots: if this changes, old keys stop matching their repeats.
        let ops = [
            ("sku-1", Action::Reserve, 3, Some(7)),
            ("b", Action::Set, 0, None),
        ];
        let pinned = Fingerprint::of_ops(Fingerprint::KIND_BATCH, &ops);
        // Cross-checked against an independent Python implementation of the encoding.
        assert_eq!(pinned, Fingerprint(0x32fa_92d2_4e83_345f));
    }

    #[test]
    fn fingerprint_tells_requests_apart() {
        use Action::*;
        let base = [("a", Set, 5, None)];
        let single = Fingerprint::of_ops(Fingerprint::KIND_SINGLE, &base);
        assert_eq!(single, Fingerprint::of_ops(Fingerprint::KIND_SINGLE, &base));
        let mut builder = FingerprintBuilder::new(Fingerprint::KIND_SINGLE);
        builder.op("a", Set, 5, None);
        assert_eq!(builder.finish(), single);
        #[rustfmt::skip]
        let others: &[(u8, &[FingerprintOp])] = &[
            (Fingerprint::KIND_BATCH, &base),
            (Fingerprint::KIND_SINGLE, &[("b", Set, 5, None)]),
            (Fingerprint::KIND_SINGLE, &[("a", Increase, 5, None)]),
            (Fingerprint::KIND_SINGLE, &[("a", Set, 6, None)]),
            (Fingerprint::KIND_SINGLE, &[("a", Set, 5, Some(0))]),
            (Fingerprint::KIND_SINGLE, &[("a", Set, 5, Some(5))]),
            (Fingerprint::KIND_SINGLE, &[]),
            (Fingerprint::KIND_SINGLE, &[("a", Set, 5, None), ("a", Set, 5, None)]),
            (Fingerprint::KIND_BATCH, &[("ab", Set, 5, None), ("c", Set, 5, None)]),
            (Fingerprint::KIND_BATCH, &[("a", Set, 5, None), ("bc", Set, 5, None)]),
            (Fingerprint::KIND_BATCH, &[("bc", Set, 5, None), ("a", Set, 5, None)]),
        ];
        let mut seen = vec![single];
        for &(kind, ops) in others {
            let other = Fingerprint::of_ops(kind, ops);
            assert!(!seen.contains(&other), "{kind} {ops:?} collides");
            seen.push(other);
        }
    }

    #[test]
    fn lookup_miss_hit_mismatch_expiry() {
        let mut cache = IdempotencyCache::new(4, TTL);
        assert_eq!(cache.lookup("k", fingerprint(1), 0), Lookup::Miss);
        cache.insert("k", fingerprint(1), result(1), 1000).unwrap();
        let recorded = result(1);
        #[rustfmt::skip]
        let cases: &[(&str, u64, u64, Lookup)] = &[
            ("k", 1, 1000, Lookup::Hit(&recorded)),
            ("k", 1, 1000 + TTL, Lookup::Hit(&recorded)),
            ("k", 1, 999, Lookup::Hit(&recorded)),
            ("k", 2, 1000, Lookup::Mismatch),
            ("k", 2, 1000 + TTL, Lookup::Mismatch),
            ("k", 1, 1001 + TTL, Lookup::Miss),
            ("k", 2, 1001 + TTL, Lookup::Miss),
            ("K", 1, 1000, Lookup::Miss),
            ("other", 1, 1000, Lookup::Miss),
        ];
        for &(key, amount, now, expected) in cases {
            assert_eq!(
                cache.lookup(key, fingerprint(amount), now),
                expected,
                "{key} {now}"
            );
        }
        cache.expire(1000 + TTL);
        assert_eq!(cache.len(), 1, "kept for the whole TTL");
        cache.expire(1001 + TTL);
        assert!(cache.is_empty());
    }

    #[test]
    fn full_refuses_instead_of_forgetting_young_keys() {
        let mut cache = IdempotencyCache::new(2, TTL);
        cache.insert("a", fingerprint(1), result(1), 10).unwrap();
        cache.insert("b", fingerprint(2), result(2), 20).unwrap();
        assert_eq!(cache.check_room("c", 30), Err(CacheFull { keys_max: 2 }));
        assert_eq!(
            cache.insert("c", fingerprint(3), result(3), 30),
            Err(CacheFull { keys_max: 2 })
        );
        assert_eq!(
            cache.lookup("a", fingerprint(1), 30),
            Lookup::Hit(&result(1))
        );
        // Replacing a held key does not need room.
        assert_eq!(cache.check_room("b", 30), Ok(()));
        cache.insert("b", fingerprint(4), result(4), 30).unwrap();
        assert_eq!(
            cache.lookup("b", fingerprint(4), 30),
            Lookup::Hit(&result(4))
        );
        // Once `a` passes the TTL there is room again.
        cache
            .insert("c", fingerprint(3), result(3), 10 + TTL + 1)
            .unwrap();
        assert_eq!(
            cache.lookup("a", fingerprint(1), 10 + TTL + 1),
            Lookup::Miss
        );
        let keys: Vec<_> = cache.iter().map(|(key, ..)| key).collect();
        assert_eq!(keys, ["b", "c"]);
        assert!(IdempotencyCache::new(0, TTL)
            .insert("a", fingerprint(1), vec![], 0)
            .is_err());
    }

    #[test]
    fn remove_undoes_an_insert() {
        let mut cache = IdempotencyCache::new(1, TTL);
        cache.insert("a", fingerprint(1), result(1), 0).unwrap();
        assert!(cache.remove("a"));
        assert!(!cache.remove("a"));
        assert_eq!(cache.lookup("a", fingerprint(1), 0), Lookup::Miss);
        cache.insert("b", fingerprint(1), result(1), 0).unwrap();
        assert_eq!(cache.iter().count(), 1);
    }

    #[test]
    fn iter_lists_live_keys_in_insertion_order() {
        let mut cache = IdempotencyCache::new(8, TTL);
        for (i, key) in ["x", "y", "z"].into_iter().enumerate() {
            cache
                .insert(key, fingerprint(i as u64), result(i as u64), 5)
                .unwrap();
        }
        cache.insert("x", fingerprint(9), result(9), 6).unwrap();
        let listed: Vec<_> = cache
            .iter()
            .map(|(key, fp, res, at)| (key, fp, res.to_vec(), at))
            .collect();
        let expected = vec![
            ("y", fingerprint(1), result(1), 5),
            ("z", fingerprint(2), result(2), 5),
            ("x", fingerprint(9), result(9), 6),
        ];
        assert_eq!(listed, expected);
        // Restoring from the listing rebuilds the same cache.
        let mut restored = IdempotencyCache::new(8, TTL);
        for (key, fp, res, at) in cache.iter() {
            restored.insert(key, fp, res.to_vec(), at).unwrap();
        }
        let relisted: Vec<_> = restored
            .iter()
            .map(|(key, fp, res, at)| (key, fp, res.to_vec(), at))
            .collect();
        assert_eq!(relisted, expected);
    }

    #[test]
    fn replacing_keys_does_not_grow_the_queue() {
        let mut cache = IdempotencyCache::new(3, TTL);
        for round in 0..1000 {
            cache
                .insert("same", fingerprint(round), result(round), 0)
                .unwrap();
            assert!(
                cache.order.len() <= 2 * 3 + 1,
                "queue of {}",
                cache.order.len()
            );
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.lookup("same", fingerprint(999), 0),
            Lookup::Hit(&result(999))
        );
    }

    #[test]
    fn expiry_with_created_times_out_of_order_is_late_never_early() {
        let mut cache = IdempotencyCache::new(8, TTL);
        cache.insert("late", fingerprint(1), result(1), 50).unwrap();
        cache
            .insert("early", fingerprint(2), result(2), 10)
            .unwrap();
        cache.expire(10 + TTL + 1);
        // `early` is past its TTL: a miss already, dropped once `late` expires too.
        assert_eq!(
            cache.lookup("early", fingerprint(2), 10 + TTL + 1),
            Lookup::Miss
        );
        assert_eq!(
            cache.lookup("late", fingerprint(1), 10 + TTL + 1),
            Lookup::Hit(&result(1))
        );
        assert_eq!(cache.len(), 2);
        cache.expire(50 + TTL + 1);
        assert!(cache.is_empty());
        assert!(cache.order.is_empty());
    }

    #[test]
    #[should_panic(expected = "idempotency key of 0 bytes")]
    fn empty_key_is_a_caller_bug() {
        let _ = IdempotencyCache::new(1, TTL).insert("", fingerprint(1), vec![], 0);
    }

    #[test]
    fn key_validity() {
        assert!(!key_is_valid(""));
        assert!(key_is_valid("k"));
        assert!(key_is_valid(&"k".repeat(IDEMPOTENCY_KEY_BYTES_MAX)));
        assert!(!key_is_valid(&"k".repeat(IDEMPOTENCY_KEY_BYTES_MAX + 1)));
    }
}
