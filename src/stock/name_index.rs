//! Name -> [`SkuId`] for the store: a hash table of bare ids, looked up by the names the store
//! keeps in its slots.
//!
//! A `HashMap<Box<str>, SkuId>` kept each name a second time on the heap (a 24-byte entry and
//! an allocation per SKU) and hashed a new name twice (the lookup, then the insert). Here an
//! entry is the 4-byte id, and [`NameIndex::find`] and [`NameIndex::insert`] share one hash.
//! foldhash with a per-process random seed: names come from clients, so the hash must not be
//! predictable (a fixed hash would let them pile names into one bucket), and SipHash, the std
//! default, was 40% of loading 1M SKUs.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::SkuId;

#[derive(Default)]
pub struct NameIndex {
    table: HashTable<SkuId>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for NameIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NameIndex")
            .field("len", &self.table.len())
            .finish()
    }
}

/// A name's hash, computed once per operation.
#[derive(Clone, Copy)]
pub struct NameHash(u64);

impl NameIndex {
    pub fn hash(&self, name: &str) -> NameHash {
        NameHash(self.hasher.hash_one(name))
    }

    /// The id whose slot in `names` holds `name`.
    pub fn find(&self, names: &[Box<str>], hash: NameHash, name: &str) -> Option<SkuId> {
        self.table
            .find(hash.0, |&id| &*names[id.slot()] == name)
            .copied()
    }

    /// Adds `id`, whose slot in `names` already holds the name `hash` was computed from, which
    /// is not in the index yet.
    pub fn insert(&mut self, names: &[Box<str>], hash: NameHash, id: SkuId) {
        let hasher = &self.hasher;
        self.table
            .insert_unique(hash.0, id, |&other| hasher.hash_one(&*names[other.slot()]));
    }

    /// Removes `id`, whose name hashes to `hash`; false if it was not there.
    pub fn remove(&mut self, hash: NameHash, id: SkuId) -> bool {
        match self.table.find_entry(hash.0, |&other| other == id) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Room for `additional` more names without growing (growing rehashes every name).
    pub fn reserve(&mut self, names: &[Box<str>], additional: usize) {
        let hasher = &self.hasher;
        self.table
            .reserve(additional, |&id| hasher.hash_one(&*names[id.slot()]));
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }
}
