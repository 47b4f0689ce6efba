//! Snapshots in chunks (PROTOCOL.md "Limits that protect the server"): a `subscribed` or
//! `stock` reply bigger than [`SNAPSHOT_CHUNK_BYTES_MAX`] of states goes out one chunk at a
//! time, each built from the visible state when the connection has drained the one before.
//!
//! Why this keeps the contract:
//! - Memory: a client that does not read holds about one chunk in its send queue; the rest of
//!   its snapshot is a cursor (a slot number or an index into the names it asked for).
//! - Versions never go back: a chunk reads [`Engine::visible`](crate::engine::Engine::visible)
//!   at the moment it is built, which is never older than a broadcast already sent (broadcasts
//!   follow visible state), and every later broadcast or conflated state of a SKU is newer
//!   still. Updates to SKUs of later chunks may arrive between chunks; that is allowed.
//! - A SKU first written after the scan passed its slot (a reused slot) is not in the
//!   snapshot, but a `*` subscriber is already subscribed, so it hears that write's update.
//! - One snapshot at a time per connection: a second `subscribe`/`get` while one is still
//!   going waits behind it (queued here as a cursor), so chunks of two replies never mix.

use std::collections::VecDeque;

use serde_json::Value;

use super::StockService;
use crate::api::reply;
use crate::net::{ConnId, Ctx, Frame};

/// Bytes of states in one chunk. Below the usual 1 MiB message limit of WebSocket clients,
/// and about the send queue's high mark, so a stalled reader costs one chunk.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 256 * 1024;

/// Snapshots waiting for a connection (the first one is being sent). Its length is bounded by
/// the requests one read delivers: reads pause while the connection is above its high mark,
/// which every unfinished chunk keeps it near. Kept only while non-empty
/// (`StockService::snapshots`), so a connection that got its snapshot holds none.
pub(super) type Snapshots = VecDeque<Snapshot>;

/// Where a snapshot's scan resumes.
enum Cursor {
    /// Every known SKU, from this store slot on.
    Known { next_slot: u32 },
    /// The SKUs a client named, from this index on.
    Named { names: Vec<String>, next: usize },
}

pub(super) struct Snapshot {
    kind: &'static str,
    id: Option<Value>,
    cursor: Cursor,
    /// The first chunk went out: the rest are `snapshot` messages.
    started: bool,
}

impl Snapshot {
    pub(super) fn new(
        kind: &'static str,
        id: Option<Value>,
        names: Vec<String>,
        all_known: bool,
    ) -> Self {
        let cursor = if all_known {
            Cursor::Known { next_slot: 0 }
        } else {
            Cursor::Named { names, next: 0 }
        };
        Snapshot {
            kind,
            id,
            cursor,
            started: false,
        }
    }
}

impl StockService {
    /// Starts a states reply to `id`: its first chunk now, unless another snapshot is still
    /// going to this connection (then it waits its turn).
    pub(super) fn start_snapshot(&mut self, cx: &mut Ctx<'_>, id: ConnId, snapshot: Snapshot) {
        let snapshots = self.snapshots.entry(id).or_default();
        snapshots.push_back(snapshot);
        if snapshots.len() == 1 {
            self.send_next_chunk(cx, id);
        }
    }

    /// Whether a snapshot is being sent to `id`.
    pub(super) fn snapshot_pending(&self, id: ConnId) -> bool {
        self.snapshots.contains_key(&id)
    }

    /// Sends the next chunk of the current snapshot (called when the connection drained the
    /// previous one), and asks to hear when it has drained this one if more remain.
    pub(super) fn send_next_chunk(&mut self, cx: &mut Ctx<'_>, id: ConnId) {
        if !cx.is_open(id) {
            self.snapshots.remove(&id);
            return;
        }
        let Some(mut snapshot) = self.snapshots.get_mut(&id).and_then(VecDeque::pop_front) else {
            return;
        };
        let (frame, done) = self.chunk(&mut snapshot);
        cx.send(id, frame);
        let snapshots = self.snapshots.entry(id).or_default();
        if !done {
            snapshots.push_front(snapshot);
        }
        // The next chunk (or the next snapshot's first) waits for this one to drain. With none
        // left the entry goes, and its queue's storage with it.
        if snapshots.is_empty() {
            self.snapshots.remove(&id);
        } else {
            cx.notify_when_drained(id);
        }
    }

    /// Builds the snapshot's next chunk from the visible state; true when it was the last.
    fn chunk(&self, snapshot: &mut Snapshot) -> (Frame, bool) {
        let kind = if snapshot.started {
            "snapshot"
        } else {
            snapshot.kind
        };
        let continuation = snapshot.started;
        snapshot.started = true;
        let id = snapshot.id.as_ref();
        let (frame, rest) = match &mut snapshot.cursor {
            Cursor::Known { next_slot } => {
                let skus = self.engine.skus();
                let states = skus
                    .known_from(*next_slot)
                    .map(|(sku, _)| (sku.0 as usize, skus.name(sku), self.visible(sku)))
                    .filter(|(_, _, stock)| stock.version > 0);
                let (frame, rest) =
                    reply::states_chunk(kind, id, continuation, states, SNAPSHOT_CHUNK_BYTES_MAX);
                if let Some(slot) = rest {
                    *next_slot = u32::try_from(slot).expect("positions are store slots (u32)");
                }
                (frame, rest)
            }
            Cursor::Named { names, next } => {
                let states = names
                    .iter()
                    .enumerate()
                    .skip(*next)
                    .map(|(i, name)| (i, name.as_str(), self.visible_by_name(name)));
                let (frame, rest) =
                    reply::states_chunk(kind, id, continuation, states, SNAPSHOT_CHUNK_BYTES_MAX);
                if let Some(index) = rest {
                    *next = index;
                }
                (frame, rest)
            }
        };
        (frame, rest.is_none())
    }
}
