//! The application's side of the loop: the [`Handler`] callbacks, what a send achieved, and
//! the counters the loop keeps for metrics.

use super::connection::{CloseReason, ConnId};
use super::ctx::Ctx;
use super::outbound::OutboundId;

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
    /// An outbound connection opened with [`Ctx::connect`] is readable and/or writable (or
    /// failed: the next read or write says how). Read and write until `WouldBlock`.
    fn on_outbound(
        &mut self,
        _cx: &mut Ctx<'_>,
        _id: OutboundId,
        _readable: bool,
        _writable: bool,
    ) {
    }
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
    /// `recv` calls on client sockets (one per message when reads stop at a short read).
    pub reads_total: u64,
    /// Turns of the event loop (one `epoll_wait` each).
    pub loop_iterations_total: u64,
    /// Turns woken by a helper thread (the log's "durable"), not by a socket or a timer.
    pub loop_wakeups_total: u64,
    pub handler_panics_total: u64,
    /// TLS connections that failed their handshake or a record (plain text on the TLS port too).
    pub tls_failures_total: u64,
}
