//! Fan-out of stock changes with zero-copy frame reuse and conflation for slow consumers.
//!
//! A change is serialised and framed once; each subscriber's send queue gets a clone of the
//! shared handle (a refcount bump). A subscriber above its high mark gets nothing queued:
//! instead the SKU is remembered in its conflation set, and when its queue drains it receives
//! the newest state of each SKU it missed (versions may skip, never go back). The set holds at
//! most one entry per SKU the connection hears about, so a stalled client costs bounded memory.
//!
//! The fan-out loop allocates nothing per subscriber, formats nothing and logs nothing.

use std::collections::HashSet;

use super::subscriptions::Subscriptions;
use crate::net::{ConnId, Ctx, Frame, SendStatus};
use crate::stock::SkuId;

#[derive(Default)]
struct Conflated {
    generation: u32,
    skus: HashSet<SkuId>,
}

/// Counters for metrics.
#[derive(Clone, Debug, Default)]
pub struct FanoutStats {
    /// Changes broadcast (frames built).
    pub frames_built_total: u64,
    /// Frames queued to subscribers.
    pub deliveries_total: u64,
    /// Deliveries skipped because the subscriber was full (its SKU was conflated instead).
    pub conflated_total: u64,
    /// Newest states sent to subscribers as they drained.
    pub conflated_sent_total: u64,
}

#[derive(Default)]
pub struct Fanout {
    /// Indexed by `ConnId::index`; `None` while the connection keeps up.
    pending: Vec<Option<Box<Conflated>>>,
    /// Slots of `pending` that are `Some`.
    /// INVARIANT: equals `pending.iter().filter(|p| p.is_some()).count()`.
    conflating: usize,
    pub stats: FanoutStats,
}

impl Fanout {
    pub fn new() -> Self {
        Self::default()
    }

    fn pending_mut(&mut self, id: ConnId) -> Option<&mut Conflated> {
        match self.pending.get_mut(id.index as usize) {
            Some(Some(c)) if c.generation == id.generation => Some(c),
            _ => None,
        }
    }

    /// Queues `frame` (the change of `sku`) to every subscriber of `sku`.
    pub fn deliver(&mut self, cx: &mut Ctx<'_>, subs: &Subscriptions, sku: SkuId, frame: &Frame) {
        self.stats.frames_built_total += 1;
        let (named, all) = subs.subscribers(sku);
        for &id in named.iter().chain(all) {
            match cx.send_unless_full(id, frame) {
                SendStatus::Queued => {
                    self.stats.deliveries_total += 1;
                    // Rare: a subscriber that was conflating and is draining now gets this
                    // newer state directly, so its pending entry would be a repeat. Skipped
                    // without touching `pending` while nobody conflates (the common case).
                    if self.conflating > 0 {
                        if let Some(Some(c)) = self.pending.get_mut(id.index as usize) {
                            if c.generation == id.generation {
                                c.skus.remove(&sku);
                            }
                        }
                    }
                }
                SendStatus::Full => {
                    self.stats.conflated_total += 1;
                    self.conflate(id, sku);
                }
                SendStatus::Closed => {}
            }
        }
    }

    /// Queues `frame` — the updates of `skus` back to back, none of which has named
    /// subscribers — to every `*` subscriber: one queue entry and one iovec per subscriber for
    /// a whole loop turn's worth of updates. A full subscriber conflates every SKU in it.
    pub fn deliver_to_wildcard(
        &mut self,
        cx: &mut Ctx<'_>,
        subs: &Subscriptions,
        skus: &[SkuId],
        frame: &Frame,
    ) {
        let updates = skus.len() as u64;
        self.stats.frames_built_total += updates;
        for &id in subs.wildcard() {
            match cx.send_unless_full(id, frame) {
                SendStatus::Queued => {
                    self.stats.deliveries_total += updates;
                    if self.conflating > 0 {
                        if let Some(c) = self.pending_mut(id) {
                            for sku in skus {
                                c.skus.remove(sku);
                            }
                        }
                    }
                }
                SendStatus::Full => {
                    self.stats.conflated_total += updates;
                    for &sku in skus {
                        self.conflate(id, sku);
                    }
                }
                SendStatus::Closed => {}
            }
        }
    }

    fn conflate(&mut self, id: ConnId, sku: SkuId) {
        let index = id.index as usize;
        if self.pending.len() <= index {
            self.pending.resize_with(index + 1, || None);
        }
        let slot = &mut self.pending[index];
        match slot {
            Some(c) if c.generation == id.generation => {
                c.skus.insert(sku);
            }
            _ => {
                if slot.is_none() {
                    self.conflating += 1;
                }
                let mut skus = HashSet::new();
                skus.insert(sku);
                *slot = Some(Box::new(Conflated {
                    generation: id.generation,
                    skus,
                }));
            }
        }
    }

    pub fn has_pending(&self, id: ConnId) -> bool {
        matches!(self.pending.get(id.index as usize), Some(Some(c)) if c.generation == id.generation && !c.skus.is_empty())
    }

    /// The connection drained below its low mark: send the newest state of each SKU it missed,
    /// built by `frame_for` (only SKUs it still hears about), until it fills up again.
    pub fn drain(
        &mut self,
        cx: &mut Ctx<'_>,
        subs: &Subscriptions,
        id: ConnId,
        mut frame_for: impl FnMut(SkuId) -> Frame,
    ) {
        let Some(conflated) = self.pending_mut(id) else {
            return;
        };
        let skus: Vec<SkuId> = conflated.skus.iter().copied().collect();
        let mut sent = 0u64;
        for sku in skus {
            if !subs.is_subscribed(id, sku) {
                self.pending_mut(id).map(|c| c.skus.remove(&sku));
                continue;
            }
            match cx.send_unless_full(id, &frame_for(sku)) {
                SendStatus::Queued => {
                    sent += 1;
                    self.pending_mut(id).map(|c| c.skus.remove(&sku));
                }
                SendStatus::Full | SendStatus::Closed => break,
            }
        }
        self.stats.conflated_sent_total += sent;
        if let Some(Some(c)) = self.pending.get(id.index as usize) {
            if c.skus.is_empty() {
                self.pending[id.index as usize] = None;
                self.conflating -= 1;
            }
        }
    }

    /// Drops what is kept for a closed connection.
    pub fn remove_conn(&mut self, id: ConnId) {
        if let Some(slot) = self.pending.get_mut(id.index as usize) {
            if slot.as_ref().is_some_and(|c| c.generation == id.generation) {
                *slot = None;
                self.conflating -= 1;
            }
        }
    }

    /// A connection stopped hearing about `sku`: forget a pending newest state for it.
    pub fn forget(&mut self, id: ConnId, sku: SkuId) {
        if let Some(c) = self.pending_mut(id) {
            c.skus.remove(&sku);
        }
    }
}
