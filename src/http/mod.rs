//! HTTP/1.x for the inventory API: bytes in, bytes out, no sockets.
//!
//! - [`request`] turns the start of a read buffer into one whole [`Request`] (head and body) or
//!   says "need more" without consuming anything, in the style of httparse's `Status::Partial`.
//! - [`response`] turns a [`Response`] into the bytes to queue for the socket.
//! - [`router`] maps a method and path to a caller-defined route value.
//! - [`cors`] decides the `Access-Control-*` headers of a response (and answers preflights).
//!
//! Nothing here knows about connections: the caller owns the read buffer, drops the consumed
//! bytes, and closes the connection after a [`ParseError`] (the framing is lost by then).
#![warn(missing_docs)]

pub mod cors;
pub mod percent;
pub mod request;
pub mod response;
pub mod router;

pub use percent::percent_decode;
pub use request::{
    expects_continue, parse, Limits, Method, ParseError, Request, HEADERS_MAX_LIMIT,
};
pub use response::{reason, Response};
pub use router::{Match, Router};
