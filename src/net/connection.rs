//! One client connection as the loop sees it: socket, state, pending input and the send queue.

use std::fmt;
use std::net::IpAddr;

use mio::net::TcpStream;

use super::send_queue::SendQueue;

/// A connection's name: slab index plus a generation, so an id kept across iterations (waiting on
/// a log write, say) never reaches a later connection that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.index, self.generation)
    }
}

/// Workerman's connection states, as an explicit set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Reading and writing.
    Open,
    /// No more input is delivered; queued output is flushed, then the write side is shut down.
    Closing,
    /// Write side shut down; reading (and discarding) until the peer's FIN or the linger timer,
    /// so the kernel does not answer late input with a RST that could destroy our last bytes.
    Draining,
    /// Done: reaped at the end of the iteration.
    Closed,
}

impl ConnState {
    pub fn name(self) -> &'static str {
        match self {
            ConnState::Open => "open",
            ConnState::Closing => "closing",
            ConnState::Draining => "draining",
            ConnState::Closed => "closed",
        }
    }
}

/// Why a connection ended (for logs, metrics and the handler).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed its side (EOF) or reset.
    Peer,
    /// A socket error.
    Io,
    /// We closed it after flushing (protocol close, HTTP `Connection: close`, ...).
    Local,
    /// The handler asked for an immediate close.
    Aborted,
    /// Unsent data passed the hard limit.
    SendQueueOverflow,
    /// Unconsumed input passed its limit.
    ReadBufferOverflow,
    /// A closing connection did not drain within the linger time.
    LingerTimeout,
    /// The server is shutting down.
    Shutdown,
    /// A handler callback panicked.
    HandlerPanic,
    /// The TLS handshake or a record failed (including plain text on the TLS port).
    Tls,
}

impl CloseReason {
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Peer => "peer",
            CloseReason::Io => "io_error",
            CloseReason::Local => "local",
            CloseReason::Aborted => "aborted",
            CloseReason::SendQueueOverflow => "send_queue_overflow",
            CloseReason::ReadBufferOverflow => "read_buffer_overflow",
            CloseReason::LingerTimeout => "linger_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::HandlerPanic => "handler_panic",
            CloseReason::Tls => "tls_error",
        }
    }
}

pub struct Connection {
    pub stream: TcpStream,
    pub generation: u32,
    pub state: ConnState,
    pub peer_ip: IpAddr,
    pub peer_port: u16,
    /// Bytes read but not yet consumed by the handler (a partial frame or request). Empty and
    /// unallocated for an idle connection: input is read into the loop's shared buffer.
    /// INVARIANT: `pending_input.len() <= Limits::read_buffer_bytes_max`.
    pub pending_input: Vec<u8>,
    pub send_queue: SendQueue,
    /// WRITABLE interest is registered (only while the queue is non-empty).
    pub write_registered: bool,
    /// In the loop's list of connections to flush before sleeping.
    pub flush_pending: bool,
    /// In the loop's list of connections to read again (fairness budget or resumed reading).
    pub read_pending: bool,
    /// Reading stopped because our queue to this peer is above the high mark: a client that
    /// sends requests but never reads replies must not grow our memory.
    pub read_paused: bool,
    /// Above the high mark; `on_buffer_drain` fires when it falls below the low mark.
    pub above_high_mark: bool,
    /// The handler asked for `on_buffer_drain` once the queue is at or below the low mark,
    /// whether or not it passed the high mark (chunked replies built one at a time).
    pub drain_wanted: bool,
    /// The handler stopped reading this connection (writes in flight at their bound); it is
    /// read again when the handler releases it.
    pub reads_held: bool,
    /// The hard limit was hit (signalled once; the connection is then closed).
    pub over_hard_limit: bool,
    /// The peer takes compressed frames decompressed with a window of 2^this bytes (0: it takes
    /// none): queued frames whose compressed twin fits it are sent as the twin. A power of two
    /// kept as its exponent, so the field fits in a byte of what was padding.
    pub compressed_window_bits: u8,
    pub close_reason: Option<CloseReason>,
    /// The handler's deadline (timer ticks), 0 = none.
    pub deadline_tick: u64,
    /// Tick of the live wheel entry, 0 = none.
    pub armed_tick: u64,
}

/// Bytes of loop state per connection: 128 before permessage-deflate; its one byte
/// (`compressed_window_bits`) costs a word of alignment, and the handler's two flags
/// (`drain_wanted` for chunked snapshots, `reads_held` for bounded writes in flight) another.
/// TLS sessions (`EventLoop::tls_sessions`) and proxied clients' addresses
/// (`Core::proxied_clients`) live beside the slab, so a plain, direct connection carries no
/// state for either. Raise only with a reason.
const CONNECTION_BYTES_MAX: usize = 144;
const _: () = assert!(std::mem::size_of::<Connection>() <= CONNECTION_BYTES_MAX);

impl Connection {
    pub fn new(stream: TcpStream, generation: u32, peer_ip: IpAddr, peer_port: u16) -> Self {
        Connection {
            stream,
            generation,
            state: ConnState::Open,
            peer_ip,
            peer_port,
            pending_input: Vec::new(),
            send_queue: SendQueue::default(),
            write_registered: false,
            flush_pending: false,
            read_pending: false,
            read_paused: false,
            above_high_mark: false,
            drain_wanted: false,
            reads_held: false,
            over_hard_limit: false,
            compressed_window_bits: 0,
            close_reason: None,
            deadline_tick: 0,
            armed_tick: 0,
        }
    }
}
