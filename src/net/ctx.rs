//! [`Ctx`]: the handler's view of the loop during a callback — sending shared frames,
//! closing, deadlines — and the loop state it borrows.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use mio::Registry;
use slab::Slab;

use super::connection::{CloseReason, ConnId, ConnState, Connection, Flag};
use super::handler::{LoopStats, Pressure, SendStatus};
use super::outbound::{OutboundId, OutboundSet};
use super::send_queue::Frame;
use super::timer::TimerWheel;
use crate::config::Limits;

/// Loop state besides the connections, borrowed by [`Ctx`].
pub(super) struct Core {
    pub(super) registry: Registry,
    pub(super) limits: Limits,
    pub(super) start: Instant,
    pub(super) now_ms: u64,
    pub(super) next_generation: u32,
    pub(super) flush_list: Vec<u32>,
    pub(super) read_list: Vec<u32>,
    pub(super) reap_list: Vec<u32>,
    pub(super) pressure_list: Vec<(ConnId, Pressure)>,
    pub(super) drain_list: Vec<ConnId>,
    pub(super) timers: TimerWheel,
    pub(super) per_ip: HashMap<IpAddr, u32>,
    /// Connections from a trusted proxy attributed to a client (`Ctx::set_client_ip`), by slab
    /// index: they are counted in `per_ip` under this address, not the proxy's. Beside the slab
    /// so that direct connections carry nothing for it. Entries go when the connection is reaped.
    pub(super) proxied_clients: HashMap<u32, IpAddr>,
    pub(super) stats: LoopStats,
    pub(super) stopping: bool,
    /// When each refused-accept cause (see `AcceptRefusal`) was last logged.
    pub(super) last_limit_log_ms: [u64; 3],
    pub(super) outbound: OutboundSet,
}

/// A client address is at `connections_per_ip_max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerIpLimit {
    pub max: usize,
}

/// The handler's view of the loop during a callback.
pub struct Ctx<'a> {
    pub(super) conns: &'a mut Slab<Connection>,
    pub(super) core: &'a mut Core,
}

impl Ctx<'_> {
    fn conn(&self, id: ConnId) -> Option<&Connection> {
        self.conns
            .get(id.index as usize)
            .filter(|c| c.generation == id.generation)
    }

    /// Milliseconds since the loop started (monotonic), as of this iteration.
    pub fn now_ms(&self) -> u64 {
        self.core.now_ms
    }

    pub fn limits(&self) -> &Limits {
        &self.core.limits
    }

    pub fn stats(&self) -> &LoopStats {
        &self.core.stats
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn is_open(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.state == ConnState::Open)
    }

    /// The client's address: the socket's peer, or for a connection from a trusted proxy the
    /// client the proxy named (its port is unknown: 0).
    pub fn peer(&self, id: ConnId) -> Option<SocketAddr> {
        let conn = self.conn(id)?;
        match self.core.proxied_clients.get(&id.index) {
            Some(&client) => Some(SocketAddr::new(client, 0)),
            None => Some(SocketAddr::new(conn.peer_ip, conn.peer_port)),
        }
    }

    /// The socket's own peer (for a proxied connection: the proxy).
    pub fn socket_peer(&self, id: ConnId) -> Option<SocketAddr> {
        self.conn(id)
            .map(|c| SocketAddr::new(c.peer_ip, c.peer_port))
    }

    /// The connection's socket peer is a `--trusted-proxy`, so the client it names in the
    /// request head may be believed.
    pub fn via_trusted_proxy(&self, id: ConnId) -> bool {
        let proxies = &self.core.limits.trusted_proxies;
        !proxies.is_empty() && self.conn(id).is_some_and(|c| proxies.contains(&c.peer_ip))
    }

    /// Attributes a proxied connection to `client`, the address its proxy named: the per-IP
    /// count moves from the previous address to it, and [`Ctx::peer`] (hence every log line)
    /// reports it. `Err` when `client` already holds its per-IP share of connections; the
    /// connection then stays counted as it was (the handler refuses the request).
    pub fn set_client_ip(&mut self, id: ConnId, client: IpAddr) -> Result<(), PerIpLimit> {
        let core = &mut *self.core;
        let Some(conn) = live_mut(self.conns, id) else {
            return Ok(());
        };
        let counted = core
            .proxied_clients
            .get(&id.index)
            .copied()
            .unwrap_or(conn.peer_ip);
        if counted == client {
            return Ok(());
        }
        let held = core.per_ip.get(&client).copied().unwrap_or(0);
        if held as usize >= core.limits.connections_per_ip_max {
            core.stats.rejected_per_ip_total += 1;
            return Err(PerIpLimit {
                max: core.limits.connections_per_ip_max,
            });
        }
        if let Some(count) = core.per_ip.get_mut(&counted) {
            *count -= 1;
            if *count == 0 {
                core.per_ip.remove(&counted);
            }
        }
        *core.per_ip.entry(client).or_insert(0) += 1;
        if client == conn.peer_ip {
            core.proxied_clients.remove(&id.index);
        } else {
            core.proxied_clients.insert(id.index, client);
        }
        Ok(())
    }

    pub fn queued_bytes(&self, id: ConnId) -> usize {
        self.conn(id).map_or(0, |c| c.send_queue.bytes())
    }

    /// The connection's backlog passed the hard limit: it is about to be closed, so nothing
    /// more should be done for it (no further requests answered).
    pub fn is_over_limit(&self, id: ConnId) -> bool {
        self.conn(id)
            .is_some_and(|c| c.flags.has(Flag::OverHardLimit))
    }

    pub fn is_full(&self, id: ConnId) -> bool {
        self.conn(id)
            .is_some_and(|c| c.flags.has(Flag::AboveHighMark))
    }

    /// Every connection still open (for shutdown).
    pub fn open_ids(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.state == ConnState::Open)
            .map(|(i, c)| ConnId {
                index: i as u32,
                generation: c.generation,
            })
            .collect()
    }

    /// From now on, frames with a compressed twin go to this connection as the twin when it fits
    /// a decompression window of `window_bytes` (0: never). Set once, after the handshake that
    /// negotiated compression.
    pub fn set_compressed_window(&mut self, id: ConnId, window_bytes: usize) {
        if let Some(conn) = live_mut(self.conns, id) {
            // Windows are powers of two (RFC 7692 §7.1.2.1); a rounded-down one is still safe.
            conn.compressed_window_bits = window_bytes.checked_ilog2().map_or(0, |bits| bits as u8);
        }
    }

    /// Asks for one [`Handler::on_buffer_drain`](super::Handler::on_buffer_drain) once this
    /// connection's queue is written down to the low mark: a reply sent in chunks builds the
    /// next chunk only then, so a peer that does not read costs about one chunk.
    pub fn notify_when_drained(&mut self, id: ConnId) {
        let core = &mut *self.core;
        if let Some(conn) = live_mut(self.conns, id) {
            if conn.state != ConnState::Open {
                return;
            }
            conn.flags.set(Flag::DrainWanted, true);
            // The check runs after a flush; make sure one happens even if nothing else is
            // queued (an empty queue is drained at once).
            if !conn.flags.has(Flag::FlushPending) && !conn.flags.has(Flag::WriteRegistered) {
                conn.flags.set(Flag::FlushPending, true);
                core.flush_list.push(id.index);
            }
        }
    }

    /// Stops reading this connection (`hold`) or reads it again: the handler's backpressure,
    /// e.g. while a client's writes in flight are at their bound. Input already read is still
    /// delivered; nothing more is read from the socket until released.
    pub fn hold_reads(&mut self, id: ConnId, hold: bool) {
        let core = &mut *self.core;
        let Some(conn) = live_mut(self.conns, id) else {
            return;
        };
        if conn.flags.has(Flag::ReadsHeld) == hold {
            return;
        }
        conn.flags.set(Flag::ReadsHeld, hold);
        if !hold
            && conn.flags.has(Flag::ReadPaused)
            && conn.send_queue.bytes() <= core.limits.send_queue_high_bytes
        {
            conn.flags.set(Flag::ReadPaused, false);
            if !conn.flags.has(Flag::ReadPending) {
                conn.flags.set(Flag::ReadPending, true);
                core.read_list.push(id.index);
            }
        }
    }

    /// Queues a frame, whatever the connection's pressure (replies are never dropped).
    pub fn send(&mut self, id: ConnId, frame: Frame) -> SendStatus {
        self.enqueue(id, &frame, false)
    }

    /// Queues a clone of `frame` only if the connection is below its high mark: broadcasts use
    /// this and conflate when it answers `Full`. No clone is made unless it is queued.
    pub fn send_unless_full(&mut self, id: ConnId, frame: &Frame) -> SendStatus {
        self.enqueue(id, frame, true)
    }

    /// The one enqueue path: a single slab lookup, since this runs once per subscriber per
    /// broadcast.
    fn enqueue(&mut self, id: ConnId, frame: &Frame, unless_full: bool) -> SendStatus {
        let core = &mut *self.core;
        let Some(conn) = live_mut(self.conns, id) else {
            return SendStatus::Closed;
        };
        if conn.state != ConnState::Open {
            return SendStatus::Closed;
        }
        if unless_full && conn.flags.has(Flag::AboveHighMark) {
            return SendStatus::Full;
        }
        // The compressed twin, when the peer takes it: built once per frame, on the first such
        // peer, and a refcount bump for every other one (no per-subscriber work or allocation).
        let window_bytes = match conn.compressed_window_bits {
            0 => 0,
            bits => 1usize << bits,
        };
        let frame = frame.for_window(window_bytes).clone();
        // The hard limit is on backlog: a frame queued behind more than the limit trips it, so
        // one large reply (a `*` snapshot of many SKUs) to a reader that keeps up is fine.
        let backlog_over_hard = conn.send_queue.bytes() > core.limits.send_queue_bytes_max
            || conn.send_queue.len() >= core.limits.send_queue_frames_max;
        conn.send_queue.push(frame);
        // A connection waiting for writability is flushed by its WRITABLE event; trying it
        // every iteration would only repeat a write the kernel refuses with EAGAIN.
        if !conn.flags.has(Flag::FlushPending) && !conn.flags.has(Flag::WriteRegistered) {
            conn.flags.set(Flag::FlushPending, true);
            core.flush_list.push(id.index);
        }
        let bytes = conn.send_queue.bytes();
        if !conn.flags.has(Flag::AboveHighMark) && bytes > core.limits.send_queue_high_bytes {
            conn.flags.set(Flag::AboveHighMark, true);
            core.pressure_list.push((id, Pressure::High));
        }
        if backlog_over_hard && !conn.flags.has(Flag::OverHardLimit) {
            conn.flags.set(Flag::OverHardLimit, true);
            core.pressure_list.push((id, Pressure::Hard));
        }
        if conn.flags.has(Flag::AboveHighMark) {
            SendStatus::Full
        } else {
            SendStatus::Queued
        }
    }

    /// Queues `frame` even on a closing connection (its last words: a close frame), bypassing
    /// every mark. Used once per connection, so it cannot grow a queue without bound.
    pub fn send_final(&mut self, id: ConnId, frame: Frame) {
        let core = &mut *self.core;
        if let Some(conn) = live_mut(self.conns, id) {
            if conn.state != ConnState::Open {
                return;
            }
            conn.send_queue.push(frame);
            if !conn.flags.has(Flag::FlushPending) {
                conn.flags.set(Flag::FlushPending, true);
                core.flush_list.push(id.index);
            }
        }
    }

    /// Stops delivering input, flushes what is queued, then shuts the write side and closes.
    pub fn close(&mut self, id: ConnId) {
        let linger = self.core.limits.close_linger_ms;
        let now = self.core.now_ms;
        let core = &mut *self.core;
        let Some(conn) = live_mut(self.conns, id) else {
            return;
        };
        if conn.state != ConnState::Open {
            return;
        }
        conn.state = ConnState::Closing;
        conn.close_reason = Some(CloseReason::Local);
        if !conn.flags.has(Flag::FlushPending) {
            conn.flags.set(Flag::FlushPending, true);
            core.flush_list.push(id.index);
        }
        arm(core, id, conn, now + linger);
    }

    /// Closes at once, discarding anything queued.
    pub fn abort(&mut self, id: ConnId, reason: CloseReason) {
        let core = &mut *self.core;
        if let Some(conn) = live_mut(self.conns, id) {
            mark_closed(core, id.index, conn, reason);
        }
    }

    /// Asks for [`Handler::on_timer`] at `at_ms` (loop time). One deadline per connection: a
    /// new one replaces the old. Cheap when moved later, which is the common case.
    pub fn set_deadline_ms(&mut self, id: ConnId, at_ms: u64) {
        let core = &mut *self.core;
        if let Some(conn) = live_mut(self.conns, id) {
            if conn.state == ConnState::Open {
                arm(core, id, conn, at_ms);
            }
        }
    }

    /// Opens an outbound connection (non-blocking); its readiness arrives at
    /// [`Handler::on_outbound`](super::Handler::on_outbound).
    pub fn connect(&mut self, addr: SocketAddr) -> std::io::Result<OutboundId> {
        let core = &mut *self.core;
        core.outbound.connect(&core.registry, addr)
    }

    /// The socket of a live outbound connection, to read and write until `WouldBlock`.
    pub fn outbound(&mut self, id: OutboundId) -> Option<&mut mio::net::TcpStream> {
        self.core.outbound.get_mut(id)
    }

    /// Closes an outbound connection at once; no further events arrive for `id`.
    pub fn disconnect(&mut self, id: OutboundId) {
        let core = &mut *self.core;
        core.outbound.disconnect(&core.registry, id);
    }

    /// Begins a graceful shutdown, as SIGTERM does.
    pub fn stop(&mut self) {
        self.core.stopping = true;
    }
}

/// The connection `id` names, if it is still the one in its slot.
fn live_mut(conns: &mut Slab<Connection>, id: ConnId) -> Option<&mut Connection> {
    conns
        .get_mut(id.index as usize)
        .filter(|c| c.generation == id.generation)
}

pub(super) fn arm(core: &mut Core, id: ConnId, conn: &mut Connection, at_ms: u64) {
    let tick = TimerWheel::tick_of_ms(at_ms).max(1);
    conn.deadline_tick = tick;
    if conn.armed_tick == 0 || tick < conn.armed_tick {
        conn.armed_tick = tick;
        core.timers.schedule(id.index, tick);
    }
}

pub(super) fn mark_closed(core: &mut Core, index: u32, conn: &mut Connection, reason: CloseReason) {
    if conn.state == ConnState::Closed {
        return;
    }
    conn.state = ConnState::Closed;
    // A close we asked for that ended at the peer's FIN is still ours.
    if conn.close_reason.is_none() || reason != CloseReason::Peer {
        conn.close_reason = Some(reason);
    }
    core.reap_list.push(index);
}
