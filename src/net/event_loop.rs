//! The poll loop: accept, read, dispatch to the [`Handler`], flush, time out, reap.
//!
//! One iteration: poll; handle every event (reads deliver bytes to the handler, which queues
//! replies); expire timers; `before_sleep` (the durability layer hands its batch to the disk
//! here); dispatch buffer-full / buffer-drain; flush every connection with queued data, one
//! vectored write each; reap closed connections. Redis' `beforeSleep` is the model.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use mio::net::{TcpListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use super::connection::{CloseReason, ConnId, ConnState, Connection};
use super::send_queue::{Flushed, Frame};
use super::timer::{Entry, TimerWheel, TICK_MS};
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

/// What happened to a frame handed to [`Ctx::send`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Queued; the connection is below its high mark.
    Queued,
    /// The connection is above its high mark. From `send` the frame was queued anyway; from
    /// `send_unless_full` it was not (the caller conflates).
    Full,
    /// The connection is closed or closing; nothing was queued.
    Closed,
}

/// Which mark a connection's send queue crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// Above `send_queue_high_bytes`: slow down, conflate.
    High,
    /// Above the hard limit: the handler should close the connection (with a reason frame);
    /// if it is still open after the callback, the loop aborts it.
    Hard,
}

/// The application's callbacks (Workerman's onConnect / onMessage / onClose / onBufferFull /
/// onBufferDrain). Each runs inside a panic guard: a panicking callback closes its connection,
/// never the loop.
pub trait Handler {
    fn on_open(&mut self, cx: &mut Ctx<'_>, id: ConnId);
    /// New input. `data` holds every unconsumed byte of this connection; the handler consumes
    /// whole messages from the front and returns how many bytes it consumed. What is left is
    /// kept (bounded by `read_buffer_bytes_max`) and offered again with the next bytes.
    fn on_message(&mut self, cx: &mut Ctx<'_>, id: ConnId, data: &mut [u8]) -> usize;
    fn on_close(&mut self, cx: &mut Ctx<'_>, id: ConnId, reason: CloseReason);
    fn on_buffer_full(&mut self, _cx: &mut Ctx<'_>, _id: ConnId, _pressure: Pressure) {}
    fn on_buffer_drain(&mut self, _cx: &mut Ctx<'_>, _id: ConnId) {}
    /// The deadline set with [`Ctx::set_deadline_ms`] has passed.
    fn on_timer(&mut self, _cx: &mut Ctx<'_>, _id: ConnId) {}
    /// The loop's [`Waker`] was woken (another thread has results for us).
    fn on_wake(&mut self, _cx: &mut Ctx<'_>) {}
    /// SIGHUP (reload).
    fn on_reload(&mut self, _cx: &mut Ctx<'_>) {}
    /// SIGINT/SIGTERM: say goodbye to every connection (the listener is already closed).
    fn on_shutdown(&mut self, _cx: &mut Ctx<'_>) {}
    /// Runs once per iteration before the loop flushes and sleeps.
    fn before_sleep(&mut self, _cx: &mut Ctx<'_>) {}
    /// The loop exits after shutdown only when this is true (e.g. no log write in flight).
    fn can_exit(&self) -> bool {
        true
    }
    /// The longest the loop may sleep for this handler's own work, if any.
    fn poll_timeout_ms(&self) -> Option<u64> {
        None
    }
}

/// Counters kept by the loop, read by the handler for metrics.
#[derive(Clone, Debug, Default)]
pub struct LoopStats {
    pub accepted_total: u64,
    pub rejected_limit_total: u64,
    pub rejected_per_ip_total: u64,
    pub closed_total: u64,
    pub send_queue_overflow_total: u64,
    pub read_overflow_total: u64,
    pub bytes_in_total: u64,
    pub bytes_out_total: u64,
    pub writes_total: u64,
    pub handler_panics_total: u64,
}

/// Loop state besides the connections, borrowed by [`Ctx`].
struct Core {
    registry: Registry,
    limits: Limits,
    start: Instant,
    now_ms: u64,
    next_generation: u32,
    flush_list: Vec<u32>,
    read_list: Vec<u32>,
    reap_list: Vec<u32>,
    pressure_list: Vec<(ConnId, Pressure)>,
    drain_list: Vec<ConnId>,
    timers: TimerWheel,
    per_ip: HashMap<IpAddr, u32>,
    stats: LoopStats,
    stopping: bool,
    /// When each refused-accept cause (see `AcceptRefusal`) was last logged.
    last_limit_log_ms: [u64; 3],
}

/// The handler's view of the loop during a callback.
pub struct Ctx<'a> {
    conns: &'a mut Slab<Connection>,
    core: &'a mut Core,
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

    pub fn peer(&self, id: ConnId) -> Option<SocketAddr> {
        self.conn(id)
            .map(|c| SocketAddr::new(c.peer_ip, c.peer_port))
    }

    pub fn queued_bytes(&self, id: ConnId) -> usize {
        self.conn(id).map_or(0, |c| c.send_queue.bytes())
    }

    /// The connection's backlog passed the hard limit: it is about to be closed, so nothing
    /// more should be done for it (no further requests answered).
    pub fn is_over_limit(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.over_hard_limit)
    }

    pub fn is_full(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.above_high_mark)
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
        let Some(conn) = self
            .conns
            .get_mut(id.index as usize)
            .filter(|c| c.generation == id.generation)
        else {
            return SendStatus::Closed;
        };
        if conn.state != ConnState::Open {
            return SendStatus::Closed;
        }
        if unless_full && conn.above_high_mark {
            return SendStatus::Full;
        }
        let frame = frame.clone();
        // The hard limit is on backlog: a frame queued behind more than the limit trips it, so
        // one large reply (a `*` snapshot of many SKUs) to a reader that keeps up is fine.
        let backlog_over_hard = conn.send_queue.bytes() > core.limits.send_queue_bytes_max
            || conn.send_queue.len() >= core.limits.send_queue_frames_max;
        conn.send_queue.push(frame);
        // A connection waiting for writability is flushed by its WRITABLE event; trying it
        // every iteration would only repeat a write the kernel refuses with EAGAIN.
        if !conn.flush_pending && !conn.write_registered {
            conn.flush_pending = true;
            core.flush_list.push(id.index);
        }
        let bytes = conn.send_queue.bytes();
        if !conn.above_high_mark && bytes > core.limits.send_queue_high_bytes {
            conn.above_high_mark = true;
            core.pressure_list.push((id, Pressure::High));
        }
        if backlog_over_hard && !conn.over_hard_limit {
            conn.over_hard_limit = true;
            core.pressure_list.push((id, Pressure::Hard));
        }
        if conn.above_high_mark {
            SendStatus::Full
        } else {
            SendStatus::Queued
        }
    }

    /// Queues `frame` even on a closing connection (its last words: a close frame), bypassing
    /// every mark. Used once per connection, so it cannot grow a queue without bound.
    pub fn send_final(&mut self, id: ConnId, frame: Frame) {
        let core = &mut *self.core;
        if let Some(conn) = self.conns.get_mut(id.index as usize) {
            if conn.generation != id.generation || conn.state != ConnState::Open {
                return;
            }
            conn.send_queue.push(frame);
            if !conn.flush_pending {
                conn.flush_pending = true;
                core.flush_list.push(id.index);
            }
        }
    }

    /// Stops delivering input, flushes what is queued, then shuts the write side and closes.
    pub fn close(&mut self, id: ConnId) {
        let linger = self.core.limits.close_linger_ms;
        let now = self.core.now_ms;
        let core = &mut *self.core;
        let Some(conn) = self
            .conns
            .get_mut(id.index as usize)
            .filter(|c| c.generation == id.generation)
        else {
            return;
        };
        if conn.state != ConnState::Open {
            return;
        }
        conn.state = ConnState::Closing;
        conn.close_reason = Some(CloseReason::Local);
        if !conn.flush_pending {
            conn.flush_pending = true;
            core.flush_list.push(id.index);
        }
        arm(core, id, conn, now + linger);
    }

    /// Closes at once, discarding anything queued.
    pub fn abort(&mut self, id: ConnId, reason: CloseReason) {
        let core = &mut *self.core;
        if let Some(conn) = self
            .conns
            .get_mut(id.index as usize)
            .filter(|c| c.generation == id.generation)
        {
            mark_closed(core, id.index, conn, reason);
        }
    }

    /// Asks for [`Handler::on_timer`] at `at_ms` (loop time). One deadline per connection: a
    /// new one replaces the old. Cheap when moved later, which is the common case.
    pub fn set_deadline_ms(&mut self, id: ConnId, at_ms: u64) {
        let core = &mut *self.core;
        if let Some(conn) = self
            .conns
            .get_mut(id.index as usize)
            .filter(|c| c.generation == id.generation)
        {
            if conn.state == ConnState::Open {
                arm(core, id, conn, at_ms);
            }
        }
    }

    /// Begins a graceful shutdown, as SIGTERM does.
    pub fn stop(&mut self) {
        self.core.stopping = true;
    }
}

fn arm(core: &mut Core, id: ConnId, conn: &mut Connection, at_ms: u64) {
    let tick = TimerWheel::tick_of_ms(at_ms).max(1);
    conn.deadline_tick = tick;
    if conn.armed_tick == 0 || tick < conn.armed_tick {
        conn.armed_tick = tick;
        core.timers.schedule(Entry {
            index: id.index,
            generation: id.generation,
            tick,
        });
    }
}

fn mark_closed(core: &mut Core, index: u32, conn: &mut Connection, reason: CloseReason) {
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
    /// This iteration's readiness, copied out of `events` so handlers can borrow the loop.
    ready: Vec<(Token, bool, bool)>,
    /// When to try accepting again after a failed accept.
    accept_retry_at_ms: Option<u64>,
    handler: H,
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
                stats: LoopStats::default(),
                stopping: false,
                last_limit_log_ms: [0; 3],
            },
            read_buf: vec![0; READ_CHUNK_BYTES],
            timer_out: Vec::new(),
            ready: Vec::with_capacity(EVENTS_PER_POLL_MAX),
            accept_retry_at_ms: None,
            handler,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.core.now_ms = self.core.start.elapsed().as_millis() as u64;
            let mut ready = std::mem::take(&mut self.ready);
            ready.extend(self.events.iter().map(|e| {
                (
                    e.token(),
                    e.is_readable() || e.is_read_closed() || e.is_error(),
                    e.is_writable() || e.is_write_closed(),
                )
            }));
            for &(token, readable, writable) in &ready {
                match token {
                    LISTENER => self.accept_all(),
                    WAKER => self.guarded_global(|h, cx| h.on_wake(cx)),
                    SIGNALS => self.read_signals(),
                    Token(index) => {
                        if writable {
                            self.flush(index as u32);
                        }
                        if readable {
                            self.read(index as u32);
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
        let per_ip = self.core.per_ip.get(&ip).copied().unwrap_or(0);
        if per_ip as usize >= self.core.limits.connections_per_ip_max {
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
        *self.core.per_ip.entry(ip).or_insert(0) += 1;
        self.core.stats.accepted_total += 1;
        let id = ConnId { index, generation };
        debug!("{id} open from {addr}");
        self.guarded(id, (), |h, cx| h.on_open(cx, id));
        // Bytes may already be waiting; with edge-triggered readiness we must look now.
        self.read(index);
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
            self.guarded_global(|h, cx| h.on_reload(cx));
        }
    }

    fn begin_shutdown(&mut self) {
        if let Some(mut listener) = self.listener.take() {
            let _ = self.core.registry.deregister(&mut listener);
        }
        self.guarded_global(|h, cx| h.on_shutdown(cx));
    }

    fn read(&mut self, index: u32) {
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
                    if conn.send_queue.bytes() > self.core.limits.send_queue_high_bytes =>
                {
                    // Backpressure: a peer that does not read our replies is not read either.
                    conn.read_paused = true;
                    return;
                }
                _ => {}
            }
            let result = conn.stream.read(&mut self.read_buf);
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
                        io::ErrorKind::ConnectionReset => CloseReason::Peer,
                        _ => CloseReason::Io,
                    };
                    mark_closed(&mut self.core, index, conn, reason);
                    return;
                }
            };
            self.core.stats.bytes_in_total += n as u64;
            if conn.state != ConnState::Open {
                continue; // closing: discard late input
            }
            self.deliver(id, n);
        }
        // Budget spent with the socket possibly still readable: come back this iteration.
        if let Some(conn) = self.conns.get_mut(index as usize) {
            if !conn.read_pending && conn.state != ConnState::Closed {
                conn.read_pending = true;
                self.core.read_list.push(index);
            }
        }
    }

    /// Hands `read_buf[..n]` (behind any pending partial input) to the handler and keeps the
    /// unconsumed rest, within the read limit.
    fn deliver(&mut self, id: ConnId, n: usize) {
        let index = id.index as usize;
        let limit = self.core.limits.read_buffer_bytes_max;
        let mut pending = std::mem::take(&mut self.conns[index].pending_input);
        if pending.is_empty() {
            let mut buf = std::mem::take(&mut self.read_buf);
            let consumed = self
                .guarded(id, n, |h, cx| h.on_message(cx, id, &mut buf[..n]))
                .min(n);
            self.keep_rest(id, &buf[consumed..n], limit);
            self.read_buf = buf;
        } else {
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
            if let Some(conn) = self.conns.get_mut(index) {
                if conn.generation == id.generation && conn.state == ConnState::Open {
                    // Keep a buffer only while a partial message exists: idle connections
                    // hold no input memory.
                    if !pending.is_empty() {
                        // A big message was consumed and a small tail is left: give the big
                        // buffer back. While one message is still growing, keep the capacity
                        // (shrinking on every read would copy it over and over).
                        if pending.capacity() > PENDING_RETAINED_BYTES_MAX
                            && pending.capacity() > 4 * pending.len()
                        {
                            pending.shrink_to_fit();
                        }
                        conn.pending_input = pending;
                    }
                }
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
                conn.pending_input = rest.to_vec();
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
        let list = std::mem::take(&mut self.core.read_list);
        for index in list {
            if let Some(conn) = self.conns.get_mut(index as usize) {
                conn.read_pending = false;
                self.read(index);
            }
        }
    }

    fn expire_timers(&mut self) {
        let now_tick = self.core.now_ms / TICK_MS;
        let mut fired = std::mem::take(&mut self.timer_out);
        self.core.timers.expire(now_tick, &mut fired);
        for entry in fired.drain(..) {
            let Some(conn) = self.conns.get_mut(entry.index as usize) else {
                continue;
            };
            if conn.generation != entry.generation || conn.armed_tick != entry.tick {
                continue; // stale: superseded by an earlier deadline, or another connection
            }
            conn.armed_tick = 0;
            if conn.state == ConnState::Closed {
                continue;
            }
            let id = ConnId {
                index: entry.index,
                generation: entry.generation,
            };
            if conn.deadline_tick > now_tick {
                // The deadline moved later since this entry was armed.
                let tick = conn.deadline_tick;
                conn.armed_tick = tick;
                self.core.timers.schedule(Entry { tick, ..entry });
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
        let list = std::mem::take(&mut self.core.flush_list);
        for &index in &list {
            if let Some(conn) = self.conns.get_mut(index as usize) {
                conn.flush_pending = false;
            }
        }
        for index in list {
            self.flush(index);
        }
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
        let outcome = match conn.send_queue.write_to(&mut conn.stream, budget) {
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
        if conn.above_high_mark && conn.send_queue.bytes() <= low {
            conn.above_high_mark = false;
            core.drain_list.push(id);
            if conn.read_paused {
                conn.read_paused = false;
                if !conn.read_pending {
                    conn.read_pending = true;
                    core.read_list.push(index);
                }
            }
        }
        match outcome {
            Flushed::All => {
                if conn.write_registered {
                    conn.write_registered = false;
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
                if !conn.write_registered {
                    conn.write_registered = true;
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    let token = Token(index as usize);
                    if let Err(e) = core.registry.reregister(&mut conn.stream, token, interest) {
                        debug!("{id} reregister failed: {e}");
                        mark_closed(core, index, conn, CloseReason::Io);
                    }
                }
            }
            Flushed::Budget => {
                if !conn.flush_pending {
                    conn.flush_pending = true;
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
                let mut stream = conn.stream;
                let _ = self.core.registry.deregister(&mut stream);
                drop(stream);
                if let Some(count) = self.core.per_ip.get_mut(&conn.peer_ip) {
                    *count -= 1;
                    if *count == 0 {
                        self.core.per_ip.remove(&conn.peer_ip);
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
