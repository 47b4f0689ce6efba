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

/// A connection's yes/no states, one bit each: as nine `bool`s they took nine bytes and pushed
/// `Connection` a word over (see `CONNECTION_BYTES_MAX`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags(u16);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Flag {
    /// WRITABLE interest is registered (only while the queue is non-empty).
    WriteRegistered = 1 << 0,
    /// In the loop's list of connections to flush before sleeping.
    FlushPending = 1 << 1,
    /// In the loop's list of connections to read again (fairness budget or resumed reading).
    ReadPending = 1 << 2,
    /// Reading stopped because our queue to this peer is above the high mark: a client that
    /// sends requests but never reads replies must not grow our memory.
    ReadPaused = 1 << 3,
    /// Above the high mark; `on_buffer_drain` fires when it falls below the low mark.
    AboveHighMark = 1 << 4,
    /// The handler asked for `on_buffer_drain` once the queue is at or below the low mark,
    /// whether or not it passed the high mark (chunked replies built one at a time).
    DrainWanted = 1 << 5,
    /// The handler stopped reading this connection (writes in flight at their bound); it is
    /// read again when the handler releases it.
    ReadsHeld = 1 << 6,
    /// The hard limit was hit (signalled once; the connection is then closed).
    OverHardLimit = 1 << 7,
    /// Bytes read but not yet consumed by the handler (a partial frame or request) wait in the
    /// loop's `pending_inputs`, beside the slab.
    HoldsInput = 1 << 8,
}

impl Flags {
    pub fn has(self, flag: Flag) -> bool {
        self.0 & flag as u16 != 0
    }

    pub fn set(&mut self, flag: Flag, on: bool) {
        if on {
            self.0 |= flag as u16;
        } else {
            self.0 &= !(flag as u16);
        }
    }
}

pub struct Connection {
    pub stream: TcpStream,
    pub generation: u32,
    pub state: ConnState,
    pub peer_ip: IpAddr,
    pub peer_port: u16,
    pub send_queue: SendQueue,
    pub flags: Flags,
    /// The peer takes compressed frames decompressed with a window of 2^this bytes (0: it takes
    /// none): queued frames whose compressed twin fits it are sent as the twin. A power of two
    /// kept as its exponent, so the field fits in a byte.
    pub compressed_window_bits: u8,
    pub close_reason: Option<CloseReason>,
    /// The handler's deadline (timer ticks), 0 = none.
    pub deadline_tick: u64,
    /// Tick of the live wheel entry, 0 = none.
    pub armed_tick: u64,
}

/// Bytes of loop state per connection, in a release build: 80 (128 before issue 12; the bound
/// was 144, a debug build's size). The send queue 32, the two timer ticks 16, the peer's
/// address and port 19, the socket and the generation 8, the flags 2, and the state, the close
/// reason and the window exponent a byte each. Partial input (`EventLoop::pending_inputs`), TLS sessions
/// (`EventLoop::tls_sessions`) and proxied clients' addresses (`Core::proxied_clients`) live
/// beside the slab, so an idle, plain, direct connection carries no state for any of them.
/// Debug builds add 16 bytes: mio keeps a selector id in each socket there. The slab's entry is
/// no bigger (its tag hides in the state's spare values). Raise only with a reason.
const CONNECTION_BYTES_MAX: usize = if cfg!(debug_assertions) { 96 } else { 80 };
const _: () = assert!(std::mem::size_of::<Connection>() <= CONNECTION_BYTES_MAX);

impl Connection {
    pub fn new(stream: TcpStream, generation: u32, peer_ip: IpAddr, peer_port: u16) -> Self {
        Connection {
            stream,
            generation,
            state: ConnState::Open,
            peer_ip,
            peer_port,
            send_queue: SendQueue::default(),
            flags: Flags::default(),
            compressed_window_bits: 0,
            close_reason: None,
            deadline_tick: 0,
            armed_tick: 0,
        }
    }
}
