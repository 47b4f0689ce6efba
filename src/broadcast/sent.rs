//! The newest version of each SKU already broadcast, so a subscriber never receives an older
//! version after a newer one, nor the same version twice from two paths (a process's own write
//! and the shared change feed that echoes it).

use crate::stock::SkuId;

/// One `u64` per SKU slot (8 bytes per interned SKU), indexed like the store.
#[derive(Default)]
pub struct SentVersions {
    versions: Vec<u64>,
}

impl SentVersions {
    /// Records `version` as sent for `sku` and says whether it is newer than anything sent
    /// before (only then is it broadcast).
    pub fn advance(&mut self, sku: SkuId, version: u64) -> bool {
        let slot = sku.0 as usize;
        if self.versions.len() <= slot {
            self.versions.resize(slot + 1, 0);
        }
        if version <= self.versions[slot] {
            return false;
        }
        self.versions[slot] = version;
        true
    }

    /// The slot was freed (its SKU was never written); a later SKU in it starts afresh.
    pub fn forget(&mut self, sku: SkuId) {
        if let Some(version) = self.versions.get_mut(sku.0 as usize) {
            *version = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_versions_pass() {
        let mut sent = SentVersions::default();
        let sku = SkuId(3);
        assert!(sent.advance(sku, 1));
        assert!(!sent.advance(sku, 1), "same version twice");
        assert!(sent.advance(sku, 5));
        assert!(!sent.advance(sku, 4), "older after newer");
        sent.forget(sku);
        assert!(sent.advance(sku, 1), "a freed slot starts afresh");
        assert!(!sent.advance(SkuId(0), 0), "version 0 is never a change");
    }
}
