//! The poll loop: accept, read, dispatch to the [`Handler`], flush, time out, reap.
//!
//! One iteration: poll; handle every event (reads deliver bytes to the handler, which queues
//! replies); expire timers; `before_sleep` (the durability layer hands its batch to the disk
//! here); dispatch buffer-full / buffer-drain; flush every connection with queued data, one
//! vectored write each; reap closed connections. Redis' `beforeSleep` is the model.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::connection::{CloseReason, ConnId, ConnState, Connection, Flag};
use super::ctx::{mark_closed, Core, Ctx};
use super::handler::{Handler, LoopStats, Pressure};
use super::send_queue::Flushed;
use super::timer::{Entry, TimerWheel, TICK_MS};
use super::tls::{TlsAcceptor, TlsSession};
use crate::config::{Limits, READ_CHUNK_BYTES};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Events taken from the kernel per poll.
const EVENTS_PER_POLL_MAX: usize = 1024;
/// Reads from one connection per readiness event before others get a turn; the connection is
/// revisited in the same iteration's re-read pass (edge-triggered: nobody would wake us again).
const READS_PER_TURN_MAX: usize = 16;
/// Rounds of flush -> drain callback -> flush in one iteration; the rest waits for the next one.
const FLUSH_ROUNDS_MAX: usize = 4;
/// After a failed accept (out of descriptors), the loop tries again this much later.
const ACCEPT_RETRY_MS: u64 = 100;
/// Spare capacity a connection's pending-input buffer may keep beyond what it holds.
const PENDING_RETAINED_BYTES_MAX: usize = 64 * 1024;
/// Warnings about the same refused-accept cause are logged at most this often.
const LIMIT_LOG_INTERVAL_MS: u64 = 10_000;

/// Why an accept was refused; each cause is logged on its own interval, so a flood of one
/// does not hide the others.
#[derive(Clone, Copy)]
enum AcceptRefusal {
    AcceptError = 0,
    ConnectionsMax = 1,
    PerIp = 2,
}

pub struct EventLoop<H: Handler> {
    poll: Poll,
    events: Events,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Option<Signals>,
    waker: Arc<Waker>,
    conns: Slab<Connection>,
    core: Core,
    read_buf: Vec<u8>,
    timer_out: Vec<Entry>,
    /// The flush list's other half: `flush_all` works through one while the flushes it makes
    /// add to the other (see there). Empty between iterations.
    flush_spare: Vec<u32>,
    /// Likewise for the re-read list.
    read_spare: Vec<u32>,
    /// This iteration's readiness, copied out of `events` so handlers can borrow the loop.
    ready: Vec<Readiness>,
    /// When to try accepting again after a failed accept.
    accept_retry_at_ms: Option<u64>,
    /// Set when the listener speaks TLS: every accepted connection gets a session from it.
    tls: Option<TlsAcceptor>,
    /// Input read but not yet consumed by the handler (a partial frame or request), by slab
    /// index. Beside the slab rather than in `Connection`: few connections have a message
    /// half-arrived at any moment, so the others carry no buffer header for it; input is read
    /// into the loop's one shared buffer and copied out only when a partial message is left.
    /// INVARIANT: holds an entry for slot `i` exactly while `conns[i]` has
    /// `Flag::HoldsInput`, and
    /// every entry's length is at most `Limits::read_buffer_bytes_max`.
    pending_inputs: HashMap<u32, Vec<u8>, foldhash::fast::RandomState>,
    /// Each TLS connection's session, by slab index (`None` for free slots). Beside the slab
    /// rather than in `Connection`, so that a plain server's connections carry no TLS state at
    /// all; empty unless the listener speaks TLS. A rustls session is about a kilobyte: boxed.
    /// INVARIANT: `tls_sessions[i]` is `Some` exactly while slot `i` holds a TLS connection.
    tls_sessions: Vec<Option<Box<TlsSession>>>,
    handler: H,
}

/// One connection's (or source's) readiness in this iteration.
#[derive(Clone, Copy)]
struct Readiness {
    token: Token,
    readable: bool,
    writable: bool,
    short_read_drains: bool,
}

struct Signals {
    pipe: UnixStream,
    terminate: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
}

impl<H: Handler> EventLoop<H> {
    /// Binds the listener (SO_REUSEPORT) and prepares the loop. The handler is built by
    /// `make_handler`, which receives the loop's waker for its helper threads.
    pub fn bind(
        addr: SocketAddr,
        limits: Limits,
        make_handler: impl FnOnce(Arc<Waker>) -> H,
    ) -> io::Result<Self> {
        let mut limits = limits;
        limits
            .validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.0))?;
        // Refusing a connection cleanly (and counting it) beats running into EMFILE, where the
        // kernel keeps it waiting in the backlog: keep the limit under the descriptor limit.
        match super::listener::raise_fd_limit() {
            Ok(fits) if (limits.connections_max as u64) > fits => {
                info!(
                    "connections_max {} lowered to {fits}: the process may open only {} files",
                    limits.connections_max,
                    fits + super::listener::FDS_RESERVED
                );
                limits.connections_max = fits.max(1) as usize;
            }
            Ok(_) => {}
            Err(e) => warn!("cannot read the open-file limit: {e}"),
        }
        let poll = Poll::new()?;
        let mut listener = super::listener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let registry = poll.registry().try_clone()?;
        let handler = make_handler(waker.clone());
        Ok(EventLoop {
            poll,
            events: Events::with_capacity(EVENTS_PER_POLL_MAX),
            listener: Some(listener),
            local_addr,
            signals: None,
            waker,
            conns: Slab::new(),
            core: Core {
                registry,
                limits,
                start: Instant::now(),
                now_ms: 0,
                next_generation: 1,
                flush_list: Vec::new(),
                read_list: Vec::new(),
                reap_list: Vec::new(),
                pressure_list: Vec::new(),
                drain_list: Vec::new(),
                timers: TimerWheel::new(),
                per_ip: HashMap::new(),
                proxied_clients: HashMap::new(),
                stats: LoopStats::default(),
                stopping: false,
                last_limit_log_ms: [0; 3],
                outbound: super::outbound::OutboundSet::default(),
            },
            read_buf: vec![0; READ_CHUNK_BYTES],
            timer_out: Vec::new(),
            flush_spare: Vec::new(),
            read_spare: Vec::new(),
            ready: Vec::with_capacity(EVENTS_PER_POLL_MAX),
            accept_retry_at_ms: None,
            tls: None,
            pending_inputs: HashMap::default(),
            tls_sessions: Vec::new(),
            handler,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// From now on the listener speaks TLS (HTTPS and `wss://` on the one port).
    pub fn set_tls(&mut self, acceptor: TlsAcceptor) {
        self.tls = Some(acceptor);
    }

    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Routes SIGINT/SIGTERM (graceful shutdown) and SIGHUP (reload) into this loop.
    pub fn handle_signals(&mut self) -> io::Result<()> {
        // Both ends non-blocking: the signal handler must never block (a full pipe already
        // holds a pending wake-up), and the read end joins the poll.
        let (read_end, write_end) = std::os::unix::net::UnixStream::pair()?;
        read_end.set_nonblocking(true)?;
        write_end.set_nonblocking(true)?;
        let mut read_end = UnixStream::from_std(read_end);
        let terminate = Arc::new(AtomicBool::new(false));
        let reload = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, terminate.clone())?;
            signal_hook::low_level::pipe::register(signal, write_end.try_clone()?)?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, write_end)?;
        self.poll
            .registry()
            .register(&mut read_end, SIGNALS, Interest::READABLE)?;
        self.signals = Some(Signals {
            pipe: read_end,
            terminate,
            reload,
        });
        Ok(())
    }

    /// Runs until shut down; returns the handler.
    pub fn run(mut self) -> io::Result<H> {
        let mut shutdown_deadline_ms: Option<u64> = None;
        // The handler's own work (opening outbound links, say) starts before the first sleep,
        // not after the first event.
        self.guarded_global(|h, cx| h.before_sleep(cx));
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.core.now_ms = self.core.start.elapsed().as_millis() as u64;
            self.core.stats.loop_iterations_total += 1;
            let mut ready = std::mem::take(&mut self.ready);
            ready.extend(self.events.iter().map(|e| Readiness {
                token: e.token(),
                readable: e.is_readable() || e.is_read_closed() || e.is_error(),
                writable: e.is_writable() || e.is_write_closed(),
                // With the peer's FIN or an error in the same event, a short read has not
                // seen everything: the end is still to be read, and no new edge announces it.
                short_read_drains: !(e.is_read_closed() || e.is_error()),
            }));
            for &Readiness {
                token,
                readable,
                writable,
                short_read_drains,
            } in &ready
            {
                match token {
                    LISTENER => self.accept_all(),
                    WAKER => {
                        self.core.stats.loop_wakeups_total += 1;
                        self.guarded_global(|h, cx| h.on_wake(cx));
                    }
                    SIGNALS => self.read_signals(),
                    Token(index) if index >= super::outbound::OUTBOUND_TOKEN_BASE => {
                        if let Some(id) = self.core.outbound.id_of(index) {
                            self.guarded_global(|h, cx| h.on_outbound(cx, id, readable, writable));
                        }
                    }
                    Token(index) => {
                        if writable {
                            self.flush(index as u32);
                        }
                        if readable {
                            self.read(index as u32, short_read_drains);
                        }
                    }
                }
            }
            ready.clear();
            self.ready = ready;
            self.reread();
            if self
                .accept_retry_at_ms
                .is_some_and(|at| self.core.now_ms >= at)
            {
                self.accept_retry_at_ms = None;
                self.accept_all();
            }
            self.expire_timers();
            if self.core.stopping && shutdown_deadline_ms.is_none() {
                self.begin_shutdown();
                shutdown_deadline_ms = Some(self.core.now_ms + self.core.limits.shutdown_grace_ms);
            }
            self.guarded_global(|h, cx| h.before_sleep(cx));
            self.dispatch_pressure();
            for _ in 0..FLUSH_ROUNDS_MAX {
                self.flush_all();
                if !self.dispatch_pressure() {
                    break;
                }
            }
            self.reap();
            if let Some(deadline) = shutdown_deadline_ms {
                let drained = self.conns.is_empty() && self.handler.can_exit();
                if drained || self.core.now_ms >= deadline {
                    if !drained {
                        warn!(
                            "shutdown grace period over with {} connections open; exiting",
                            self.conns.len()
                        );
                    }
                    info!("shutdown complete");
                    return Ok(self.handler);
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.core.read_list.is_empty() || !self.core.flush_list.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = self.core.start.elapsed().as_millis() as u64;
        let mut timeout = self.core.timers.next_timeout_ms(now);
        if let Some(handler_ms) = self.handler.poll_timeout_ms() {
            timeout = Some(timeout.map_or(handler_ms, |t| t.min(handler_ms)));
        }
        if self.core.stopping {
            timeout = Some(timeout.map_or(TICK_MS, |t| t.min(TICK_MS)));
        }
        if let Some(at) = self.accept_retry_at_ms {
            let wait = at.saturating_sub(now);
            timeout = Some(timeout.map_or(wait, |t| t.min(wait)));
        }
        timeout.map(Duration::from_millis)
    }

    fn cx(&mut self) -> (Ctx<'_>, &mut H) {
        (
            Ctx {
                conns: &mut self.conns,
                core: &mut self.core,
            },
            &mut self.handler,
        )
    }

    /// Runs a callback that is not about one connection; a panic there is logged and survived.
    fn guarded_global(&mut self, f: impl FnOnce(&mut H, &mut Ctx<'_>)) {
        let (mut cx, handler) = self.cx();
        if panic::catch_unwind(AssertUnwindSafe(|| f(handler, &mut cx))).is_err() {
            self.core.stats.handler_panics_total += 1;
            error!("a handler callback panicked; the loop carries on");
        }
    }

    /// Runs a callback about connection `id`; a panic there closes that connection.
    fn guarded<R>(
        &mut self,
        id: ConnId,
        fallback: R,
        f: impl FnOnce(&mut H, &mut Ctx<'_>) -> R,
    ) -> R {
        let (mut cx, handler) = self.cx();
        match panic::catch_unwind(AssertUnwindSafe(|| f(handler, &mut cx))) {
            Ok(r) => r,
            Err(_) => {
                self.core.stats.handler_panics_total += 1;
                error!("handler panicked on connection {id}; closing it");
                if let Some(conn) = self.conns.get_mut(id.index as usize) {
                    if conn.generation == id.generation {
                        mark_closed(&mut self.core, id.index, conn, CloseReason::HandlerPanic);
                    }
                }
                fallback
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (stream, addr) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: the pending connections stay in the backlog and,
                    // edge-triggered, nothing would wake us for them: retry shortly.
                    self.log_limit(
                        AcceptRefusal::AcceptError,
                        format_args!("accept failed: {e}"),
                    );
                    let now = self.core.start.elapsed().as_millis() as u64;
                    self.accept_retry_at_ms = Some(now + ACCEPT_RETRY_MS);
                    return;
                }
            };
            self.admit(stream, addr);
        }
    }

    fn log_limit(&mut self, cause: AcceptRefusal, message: std::fmt::Arguments<'_>) {
        let now = self.core.start.elapsed().as_millis() as u64;
        let last = &mut self.core.last_limit_log_ms[cause as usize];
        if *last == 0 || now >= *last + LIMIT_LOG_INTERVAL_MS {
            *last = now.max(1);
            warn!("{message}");
        }
    }

    fn admit(&mut self, mut stream: mio::net::TcpStream, addr: SocketAddr) {
        if self.conns.len() >= self.core.limits.connections_max {
            self.core.stats.rejected_limit_total += 1;
            let max = self.core.limits.connections_max;
            self.log_limit(
                AcceptRefusal::ConnectionsMax,
                format_args!("connection limit ({max}) reached; refusing {addr}"),
            );
            return; // dropping the stream closes it
        }
        let ip = addr.ip();
        // A trusted proxy carries many clients: its connections are counted per client once
        // the request head names one (`Ctx::set_client_ip`), not refused here per proxy.
        let via_proxy = self.core.limits.trusted_proxies.contains(&ip);
        let per_ip = self.core.per_ip.get(&ip).copied().unwrap_or(0);
        if !via_proxy && per_ip as usize >= self.core.limits.connections_per_ip_max {
            self.core.stats.rejected_per_ip_total += 1;
            let max = self.core.limits.connections_per_ip_max;
            self.log_limit(
                AcceptRefusal::PerIp,
                format_args!("per-IP connection limit ({max}) reached for {ip}"),
            );
            return;
        }
        // Frames are small and latency matters more than packet count.
        if let Err(e) = stream.set_nodelay(true) {
            debug!("set_nodelay failed for {addr}: {e}");
        }
        // Bounds what a stalled client parks in kernel memory, so the send queue's marks (and
        // conflation) engage after a known amount rather than after tcp_wmem's maximum.
        let send_buffer = self.core.limits.socket_send_buffer_bytes;
        if send_buffer > 0 {
            if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(send_buffer) {
                debug!("SO_SNDBUF failed for {addr}: {e}");
            }
        }
        let tls = match self.tls.as_ref().map(TlsAcceptor::session) {
            None => None,
            Some(Ok(session)) => Some(Box::new(session)),
            Some(Err(e)) => {
                warn!("could not start a TLS session for {addr}: {e}");
                return;
            }
        };
        let entry = self.conns.vacant_entry();
        let index = entry.key() as u32;
        if let Err(e) =
            self.core
                .registry
                .register(&mut stream, Token(index as usize), Interest::READABLE)
        {
            warn!("could not register a connection from {addr}: {e}");
            return;
        }
        let generation = self.core.next_generation;
        self.core.next_generation = self.core.next_generation.wrapping_add(1).max(1);
        entry.insert(Connection::new(stream, generation, ip, addr.port()));
        if let Some(session) = tls {
            let slot = index as usize;
            if self.tls_sessions.len() <= slot {
                self.tls_sessions.resize_with(slot + 1, || None);
            }
            self.tls_sessions[slot] = Some(session);
        }
        *self.core.per_ip.entry(ip).or_insert(0) += 1;
        self.core.stats.accepted_total += 1;
        let id = ConnId { index, generation };
        debug!("{id} open from {addr}");
        self.guarded(id, (), |h, cx| h.on_open(cx, id));
        // Bytes may already be waiting; with edge-triggered readiness we must look now.
        self.read(index, false);
    }

    fn read_signals(&mut self) {
        let Some(signals) = self.signals.as_mut() else {
            return;
        };
        let mut sink = [0u8; 64];
        while matches!(signals.pipe.read(&mut sink), Ok(n) if n > 0) {}
        if signals.terminate.swap(false, Ordering::Relaxed) {
            info!("termination signal received; shutting down gracefully");
            self.core.stopping = true;
        }
        if signals.reload.swap(false, Ordering::Relaxed) {
            info!("SIGHUP received; reloading");
            if let Some(tls) = self.tls.as_mut() {
                // New connections get the new pair; open ones keep theirs.
                match tls.reload() {
                    Ok(()) => info!(
                        "TLS certificate reloaded from {}",
                        tls.files().cert.display()
                    ),
                    Err(e) => error!("TLS certificate reload failed, keeping the old one: {e}"),
                }
            }
            self.guarded_global(|h, cx| h.on_reload(cx));
        }
    }

    fn begin_shutdown(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.core.registry.deregister(&mut listener);
        }
        self.guarded_global(|h, cx| h.on_shutdown(cx));
    }

    /// Reads until the socket would block, or (`short_read_drains`) until a read returns less
    /// than it asked for: a stream socket gives less only when it has no more, and data that
    /// arrives after that raises a new edge. That saves the second, empty `recv` per message
    /// that "read until EAGAIN" costs (one of three syscalls per single write).
    fn read(&mut self, index: u32, short_read_drains: bool) {
        for _ in 0..READS_PER_TURN_MAX {
            let Some(conn) = self.conns.get_mut(index as usize) else {
                return;
            };
            let id = ConnId {
                index,
                generation: conn.generation,
            };
            match conn.state {
                ConnState::Closed => return,
                ConnState::Open
                    if conn.flags.has(Flag::ReadsHeld)
                        || conn.send_queue.bytes() > self.core.limits.send_queue_high_bytes =>
                {
                    // Backpressure: a peer that does not read our replies is not read either.
                    conn.flags.set(Flag::ReadPaused, true);
                    return;
                }
                _ => {}
            }
            let tls = tls_session(&mut self.tls_sessions, index);
            let is_tls = tls.is_some();
            let result = match tls {
                None => conn.stream.read(&mut self.read_buf),
                Some(tls) => {
                    let result = tls.read(&mut conn.stream, &mut self.read_buf);
                    // Handshake messages to send: flush even if nothing is queued.
                    if tls.wants_write()
                        && !conn.flags.has(Flag::FlushPending)
                        && !conn.flags.has(Flag::WriteRegistered)
                    {
                        conn.flags.set(Flag::FlushPending, true);
                        self.core.flush_list.push(index);
                    }
                    result
                }
            };
            self.core.stats.reads_total += 1;
            let n = match result {
                Ok(0) => {
                    let reason = match conn.state {
                        ConnState::Open => CloseReason::Peer,
                        _ => CloseReason::Local,
                    };
                    mark_closed(&mut self.core, index, conn, reason);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("{id} read error: {e}");
                    let reason = match e.kind() {
                        // UnexpectedEof: a TLS peer closed TCP without close_notify.
                        io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof => {
                            CloseReason::Peer
                        }
                        io::ErrorKind::InvalidData if is_tls => {
                            self.core.stats.tls_failures_total += 1;
                            CloseReason::Tls
                        }
                        _ => CloseReason::Io,
                    };
                    mark_closed(&mut self.core, index, conn, reason);
                    return;
                }
            };
            self.core.stats.bytes_in_total += n as u64;
            // TLS reads decrypted bytes, which say nothing about the socket's.
            let drained = short_read_drains && !is_tls && n < self.read_buf.len();
            if conn.state != ConnState::Open {
                if drained {
                    return;
                }
                continue; // closing: discard late input
            }
            self.deliver(id, n);
            if drained {
                return;
            }
        }
        // Budget spent with the socket possibly still readable: come back this iteration.
        if let Some(conn) = self.conns.get_mut(index as usize) {
            if !conn.flags.has(Flag::ReadPending) && conn.state != ConnState::Closed {
                conn.flags.set(Flag::ReadPending, true);
                self.core.read_list.push(index);
            }
        }
    }

    /// Hands `read_buf[..n]` (behind any pending partial input) to the handler and keeps the
    /// unconsumed rest, within the read limit.
    fn deliver(&mut self, id: ConnId, n: usize) {
        let index = id.index as usize;
        let limit = self.core.limits.read_buffer_bytes_max;
        let conn = &mut self.conns[index];
        if !conn.flags.has(Flag::HoldsInput) {
            let mut buf = std::mem::take(&mut self.read_buf);
            let consumed = self
                .guarded(id, n, |h, cx| h.on_message(cx, id, &mut buf[..n]))
                .min(n);
            self.keep_rest(id, &buf[consumed..n], limit);
            self.read_buf = buf;
            return;
        }
        conn.flags.set(Flag::HoldsInput, false);
        let mut pending = self
            .pending_inputs
            .remove(&id.index)
            .expect("HoldsInput is set only while pending_inputs has the connection's bytes");
        if pending.len() + n > limit {
            self.overflow(id);
            return;
        }
        pending.extend_from_slice(&self.read_buf[..n]);
        let len = pending.len();
        let consumed = self
            .guarded(id, len, |h, cx| h.on_message(cx, id, &mut pending))
            .min(len);
        pending.drain(..consumed);
        // Keep a buffer only while a partial message exists: idle connections hold no input
        // memory.
        if pending.is_empty() {
            return;
        }
        if let Some(conn) = self.conns.get_mut(index) {
            if conn.generation == id.generation && conn.state == ConnState::Open {
                // A big message was consumed and a small tail is left: give the big buffer
                // back. While one message is still growing, keep the capacity (shrinking on
                // every read would copy it over and over).
                if pending.capacity() > PENDING_RETAINED_BYTES_MAX
                    && pending.capacity() > 4 * pending.len()
                {
                    pending.shrink_to_fit();
                }
                conn.flags.set(Flag::HoldsInput, true);
                self.pending_inputs.insert(id.index, pending);
            }
        }
    }

    fn keep_rest(&mut self, id: ConnId, rest: &[u8], limit: usize) {
        if rest.is_empty() {
            return;
        }
        if rest.len() > limit {
            self.overflow(id);
            return;
        }
        if let Some(conn) = self.conns.get_mut(id.index as usize) {
            if conn.generation == id.generation && conn.state == ConnState::Open {
                conn.flags.set(Flag::HoldsInput, true);
                self.pending_inputs.insert(id.index, rest.to_vec());
            }
        }
    }

    fn overflow(&mut self, id: ConnId) {
        self.core.stats.read_overflow_total += 1;
        warn!("{id} input buffer limit exceeded; closing");
        if let Some(conn) = self.conns.get_mut(id.index as usize) {
            mark_closed(
                &mut self.core,
                id.index,
                conn,
                CloseReason::ReadBufferOverflow,
            );
        }
    }

    fn reread(&mut self) {
        // Connections re-added while we work wait for the next iteration (zero poll timeout).
        let spare = std::mem::take(&mut self.read_spare);
        let mut list = std::mem::replace(&mut self.core.read_list, spare);
        for &index in &list {
            if let Some(conn) = self.conns.get_mut(index as usize) {
                conn.flags.set(Flag::ReadPending, false);
                self.read(index, false);
            }
        }
        list.clear();
        self.read_spare = list;
    }

    fn expire_timers(&mut self) {
        let now_tick = self.core.now_ms / TICK_MS;
        let mut fired = std::mem::take(&mut self.timer_out);
        self.core.timers.expire(now_tick, &mut fired);
        for entry in fired.drain(..) {
            let Some(conn) = self.conns.get_mut(entry.index as usize) else {
                continue;
            };
            if !entry.is_armed_for(conn.armed_tick) {
                continue; // stale: superseded by an earlier deadline, or another connection
            }
            conn.armed_tick = 0;
            if conn.state == ConnState::Closed {
                continue;
            }
            // The connection's timer comes round at least once per ping or idle interval: if
            // its queue is empty by then, the storage kept from its last burst goes back.
            conn.send_queue.release_spare();
            let id = ConnId {
                index: entry.index,
                generation: conn.generation,
            };
            // Decided by the connection's own deadline, not by the entry (see `Entry`).
            if conn.deadline_tick > now_tick {
                // The deadline moved later since this entry was armed.
                let tick = conn.deadline_tick;
                conn.armed_tick = tick;
                self.core.timers.schedule(entry.index, tick);
                continue;
            }
            conn.deadline_tick = 0;
            match conn.state {
                ConnState::Open => self.guarded(id, (), |h, cx| h.on_timer(cx, id)),
                // Lingered too long over its goodbye.
                _ => mark_closed(
                    &mut self.core,
                    entry.index,
                    conn,
                    CloseReason::LingerTimeout,
                ),
            }
        }
        self.timer_out = fired;
    }

    /// Dispatches buffer-full / buffer-drain callbacks. Returns whether any callback ran.
    fn dispatch_pressure(&mut self) -> bool {
        let mut any = false;
        loop {
            let pressure = std::mem::take(&mut self.core.pressure_list);
            let drains = std::mem::take(&mut self.core.drain_list);
            if pressure.is_empty() && drains.is_empty() {
                return any;
            }
            any = true;
            for (id, level) in pressure {
                self.guarded(id, (), |h, cx| h.on_buffer_full(cx, id, level));
                if level == Pressure::Hard {
                    if let Some(conn) = self.conns.get_mut(id.index as usize) {
                        if conn.generation == id.generation && conn.state == ConnState::Open {
                            self.core.stats.send_queue_overflow_total += 1;
                            mark_closed(
                                &mut self.core,
                                id.index,
                                conn,
                                CloseReason::SendQueueOverflow,
                            );
                        } else if conn.generation == id.generation {
                            self.core.stats.send_queue_overflow_total += 1;
                        }
                    }
                }
            }
            for id in drains {
                self.guarded(id, (), |h, cx| h.on_buffer_drain(cx, id));
            }
        }
    }

    fn flush_all(&mut self) {
        // The two lists take turns, so neither gives back its capacity: a list as long as the
        // subscribers is not re-grown from empty on every loop turn.
        let spare = std::mem::take(&mut self.flush_spare);
        let mut list = std::mem::replace(&mut self.core.flush_list, spare);
        for &index in &list {
            if let Some(conn) = self.conns.get_mut(index as usize) {
                conn.flags.set(Flag::FlushPending, false);
            }
        }
        for &index in &list {
            self.flush(index);
        }
        list.clear();
        self.flush_spare = list;
    }

    fn flush(&mut self, index: u32) {
        let budget = self.core.limits.flush_bytes_per_turn_max;
        let low = self.core.limits.send_queue_low_bytes;
        let core = &mut self.core;
        let Some(conn) = self.conns.get_mut(index as usize) else {
            return;
        };
        if conn.state == ConnState::Closed || conn.state == ConnState::Draining {
            return;
        }
        let id = ConnId {
            index,
            generation: conn.generation,
        };
        let written = match tls_session(&mut self.tls_sessions, index) {
            None => conn.send_queue.write_to(&mut conn.stream, budget),
            Some(tls) => {
                let closing = conn.state == ConnState::Closing;
                tls.flush(&mut conn.stream, &mut conn.send_queue, budget, closing)
            }
        };
        let outcome = match written {
            Ok((written, outcome)) => {
                core.stats.bytes_out_total += written as u64;
                core.stats.writes_total += 1;
                outcome
            }
            Err(e) => {
                debug!("{id} write error: {e}");
                let reason = match e.kind() {
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => CloseReason::Peer,
                    _ => CloseReason::Io,
                };
                mark_closed(core, index, conn, reason);
                return;
            }
        };
        if (conn.flags.has(Flag::AboveHighMark) || conn.flags.has(Flag::DrainWanted))
            && conn.send_queue.bytes() <= low
        {
            conn.flags.set(Flag::AboveHighMark, false);
            conn.flags.set(Flag::DrainWanted, false);
            core.drain_list.push(id);
            if conn.flags.has(Flag::ReadPaused) && !conn.flags.has(Flag::ReadsHeld) {
                conn.flags.set(Flag::ReadPaused, false);
                if !conn.flags.has(Flag::ReadPending) {
                    conn.flags.set(Flag::ReadPending, true);
                    core.read_list.push(index);
                }
            }
        }
        match outcome {
            Flushed::All => {
                if conn.flags.has(Flag::WriteRegistered) {
                    conn.flags.set(Flag::WriteRegistered, false);
                    let token = Token(index as usize);
                    if let Err(e) =
                        core.registry
                            .reregister(&mut conn.stream, token, Interest::READABLE)
                    {
                        debug!("{id} reregister failed: {e}");
                        mark_closed(core, index, conn, CloseReason::Io);
                        return;
                    }
                }
                if conn.state == ConnState::Closing {
                    // Everything said: send our FIN, then wait for the peer's (or the linger
                    // timer) before releasing the socket.
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                    conn.state = ConnState::Draining;
                }
            }
            Flushed::WouldBlock => {
                if !conn.flags.has(Flag::WriteRegistered) {
                    conn.flags.set(Flag::WriteRegistered, true);
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    let token = Token(index as usize);
                    if let Err(e) = core.registry.reregister(&mut conn.stream, token, interest) {
                        debug!("{id} reregister failed: {e}");
                        mark_closed(core, index, conn, CloseReason::Io);
                    }
                }
            }
            Flushed::Budget => {
                if !conn.flags.has(Flag::FlushPending) {
                    conn.flags.set(Flag::FlushPending, true);
                    core.flush_list.push(index);
                }
            }
        }
    }

    fn reap(&mut self) {
        while !self.core.reap_list.is_empty() {
            let list = std::mem::take(&mut self.core.reap_list);
            for index in list {
                let Some(conn) = self.conns.try_remove(index as usize) else {
                    continue;
                };
                if conn.flags.has(Flag::HoldsInput) {
                    self.pending_inputs.remove(&index);
                }
                if let Some(slot) = self.tls_sessions.get_mut(index as usize) {
                    *slot = None;
                }
                let mut stream = conn.stream;
                let _ = self.core.registry.deregister(&mut stream);
                drop(stream);
                // A proxied connection is counted against the client its proxy named.
                let counted_ip = match self.core.proxied_clients.is_empty() {
                    true => conn.peer_ip,
                    false => self
                        .core
                        .proxied_clients
                        .remove(&index)
                        .unwrap_or(conn.peer_ip),
                };
                if let Some(count) = self.core.per_ip.get_mut(&counted_ip) {
                    *count -= 1;
                    if *count == 0 {
                        self.core.per_ip.remove(&counted_ip);
                    }
                }
                self.core.stats.closed_total += 1;
                let id = ConnId {
                    index,
                    generation: conn.generation,
                };
                let reason = conn.close_reason.unwrap_or(CloseReason::Peer);
                debug!(
                    "{id} closed ({}) from {}:{}",
                    reason.name(),
                    conn.peer_ip,
                    conn.peer_port
                );
                self.guarded_global(|h, cx| h.on_close(cx, id, reason));
            }
        }
    }
}

/// The TLS session of the connection in slot `index`, if it has one.
fn tls_session(sessions: &mut [Option<Box<TlsSession>>], index: u32) -> Option<&mut TlsSession> {
    sessions
        .get_mut(index as usize)
        .and_then(|slot| slot.as_deref_mut())
}
