//! Outbound connections the loop watches for the handler (a database link, say), on the same
//! poll as the clients. The loop knows nothing of what is spoken on them: it connects without
//! blocking, reports readiness to [`Handler::on_outbound`](super::Handler::on_outbound), and
//! the handler reads and writes the socket itself until `WouldBlock` (edge-triggered, like
//! every other socket of the loop), then closes it with [`Ctx::disconnect`](super::Ctx).

use std::io;
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Outbound connections one loop may hold at once; a handler needs a few (a command link and a
/// subscription link), so more is a leak.
pub const OUTBOUND_MAX: usize = 16;

/// First poll token of the outbound range, far above any client slab index.
pub(super) const OUTBOUND_TOKEN_BASE: usize = 1 << 40;

/// An outbound connection's name: slot plus generation, so a stale id never reaches a newer
/// connection in the same slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OutboundId {
    pub index: u32,
    pub generation: u32,
}

pub(super) struct Outbound {
    pub(super) stream: TcpStream,
    pub(super) generation: u32,
}

#[derive(Default)]
pub(super) struct OutboundSet {
    slots: Slab<Outbound>,
    next_generation: u32,
}

impl OutboundSet {
    /// Starts a non-blocking connect; readiness (writable once connected, or an error) comes
    /// as an outbound event.
    pub(super) fn connect(
        &mut self,
        registry: &Registry,
        addr: SocketAddr,
    ) -> io::Result<OutboundId> {
        if self.slots.len() >= OUTBOUND_MAX {
            return Err(io::Error::other("too many outbound connections"));
        }
        let mut stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let entry = self.slots.vacant_entry();
        let index = entry.key();
        registry.register(
            &mut stream,
            Token(OUTBOUND_TOKEN_BASE + index),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.next_generation = self.next_generation.wrapping_add(1).max(1);
        let generation = self.next_generation;
        entry.insert(Outbound { stream, generation });
        Ok(OutboundId {
            index: index as u32,
            generation,
        })
    }

    pub(super) fn get_mut(&mut self, id: OutboundId) -> Option<&mut TcpStream> {
        self.slots
            .get_mut(id.index as usize)
            .filter(|o| o.generation == id.generation)
            .map(|o| &mut o.stream)
    }

    pub(super) fn disconnect(&mut self, registry: &Registry, id: OutboundId) {
        let live = self
            .slots
            .get(id.index as usize)
            .is_some_and(|o| o.generation == id.generation);
        if live {
            let mut outbound = self.slots.remove(id.index as usize);
            let _ = registry.deregister(&mut outbound.stream);
        }
    }

    /// The id of a token in the outbound range, if its slot is live.
    pub(super) fn id_of(&self, token: usize) -> Option<OutboundId> {
        let index = token.checked_sub(OUTBOUND_TOKEN_BASE)?;
        self.slots.get(index).map(|o| OutboundId {
            index: index as u32,
            generation: o.generation,
        })
    }
}
