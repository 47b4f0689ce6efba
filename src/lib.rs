//! stocksync: a real-time inventory sync server.
//!
//! Layers, each depending only on those below it:
//! - [`stock`]: the authoritative stock store and its rules (no I/O).
//! - [`ws`], [`http`]: RFC 6455 and HTTP/1.1 as bytes in, bytes out (no sockets).
//! - [`net`]: the single-threaded mio event loop, connections in a slab, shared frames.
//! - [`app`]: the protocol layer joining them (upgrade, framing, heartbeats, timeouts).
//! - [`broadcast`], [`api`], [`server`]: subscriptions, fan-out and the stock service itself.

pub mod api;
pub mod app;
pub mod broadcast;
pub mod cli;
pub mod config;
pub mod engine;
pub mod http;
pub mod net;
pub mod server;
pub mod stock;
pub mod wal;
pub mod ws;
