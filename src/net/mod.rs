//! The event-driven core: one mio poll loop per process, modelled on Workerman's.
//!
//! Contract for users of this module:
//! - Connections live in a slab and are named by a [`ConnId`] (slab index + generation), so an id
//!   held across loop iterations (e.g. while a log write is in flight) can never reach a newer
//!   connection that reused the slot.
//! - The loop knows nothing of HTTP or WebSocket: it hands raw bytes to a [`Handler`] and writes
//!   shared, immutable [`Frame`]s. Writes queued during an iteration are flushed just before the
//!   loop sleeps, one vectored write per connection, so many frames queued to one connection in an
//!   iteration cost one syscall.
//! - Edge-triggered readiness: the loop reads until `WouldBlock` (or a fairness budget, after
//!   which it comes back on its own), and registers WRITABLE only while a send queue is non-empty.
//! - Closing is deferred: a connection is marked and reaped at the end of the iteration, so no
//!   slot is reused while events for it are still in the batch.

pub mod connection;
pub mod ctx;
pub mod event_loop;
pub mod handler;
pub mod listener;
pub mod outbound;
pub mod send_queue;
pub mod timer;
pub mod tls;

pub use connection::{CloseReason, ConnId, ConnState};
pub use ctx::{Ctx, PerIpLimit};
pub use event_loop::EventLoop;
pub use handler::{Handler, LoopStats, Pressure, SendStatus};
pub use outbound::OutboundId;
pub use send_queue::Frame;
pub use tls::{TlsAcceptor, TlsError, TlsFiles};
