//! WebSocket protocol (RFC 6455), server side: bytes in, bytes out, no sockets.
//!
//! Nothing here reads, writes or owns a socket, a timer or a connection; the caller (`net`) owns the
//! buffers and the I/O, and this module only turns bytes into values and values into bytes:
//!
//! - [`handshake`]: checks an upgrade request's method, version and headers and produces the `101`
//!   response or a refusal (RFC 6455 §4.2).
//! - [`codec`]: [`Decoder`] turns the client's frames, unmasked in place in the caller's read buffer,
//!   into [`Message`]s, enforcing RFC 6455 §5 and a message size limit. `Ok(None)` means "need more
//!   bytes" and consumes nothing; an error carries the close code to fail the connection with.
//! - [`frame`]: frame headers; encoding of server frames ([`frame::encode`], [`frame::FrameWriter`] for
//!   building a broadcast frame once, in place).
//! - [`mask`]: the XOR masking of client payloads.
//! - [`close`]: close status codes.
//! - [`extensions`]: the permessage-deflate negotiation (RFC 7692 §5, §7.1).
//! - [`deflate`]: compressing server frames once for every connection that negotiated it, and
//!   inflating client messages within the message size limit (RFC 7692 §7.2).
//!
//! Server frames are never masked. The only extension negotiated is permessage-deflate; no
//! subprotocol is.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod close;
pub mod codec;
pub mod deflate;
pub mod extensions;
pub mod frame;
pub mod handshake;
pub mod mask;

#[cfg(test)]
mod test_client;

pub use codec::{CloseFrame, Decoder, Message, ProtocolError};
pub use frame::OpCode;
