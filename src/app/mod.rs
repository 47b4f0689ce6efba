//! The protocol layer between the event loop and a service: HTTP/1.1 requests, the WebSocket
//! upgrade, RFC 6455 message framing, heartbeats and timeouts. A [`Service`] sees whole HTTP
//! requests and whole WebSocket messages; the loop sees only bytes.

pub mod echo;
pub mod protocol;

pub use protocol::Protocol;

use crate::http::request::Request;
use crate::http::response::Response;
use crate::net::send_queue::Compressed;
use crate::net::{ConnId, Ctx, Frame, Pressure};
use crate::ws::deflate;
use crate::ws::frame::{self, OpCode};

/// Protocol-level limits a connection can run into (see `config::Limits`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The first request was not complete within `handshake_timeout_ms` (slowloris).
    HandshakeTimeout,
    /// A WebSocket sent nothing for `idle_timeout_ms`.
    IdleTimeout,
    /// A WebSocket message over `ws_message_bytes_max` (closed with 1009).
    MessageTooBig,
    /// An HTTP request head or body over its limit (431 / 413).
    RequestTooLarge,
}

/// A whole WebSocket data message.
#[derive(Clone, Copy, Debug)]
pub enum WsMessage<'a> {
    Text(&'a str),
    Binary(&'a [u8]),
}

/// What a service does with connections. Callbacks run on the loop thread and must not block.
pub trait Service {
    /// Whether this request is meant as a WebSocket handshake (then it is validated as one:
    /// a request for a WebSocket endpoint without `Upgrade` gets 426).
    fn wants_websocket(&self, req: &Request) -> bool {
        req.is_upgrade()
    }
    /// A plain HTTP request. `Some` is answered at once; `None` means the service queued (or
    /// will queue) the answer itself, closing the connection after it when the request did not
    /// keep the connection alive.
    fn on_request(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) -> Option<Response>;
    /// A valid WebSocket handshake: accept it, or refuse with a response (auth, origin, path).
    fn on_upgrade(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) -> Result<(), Response>;
    /// The `101` is queued; the connection now speaks WebSocket.
    fn on_ws_open(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request);
    fn on_ws_message(&mut self, cx: &mut Ctx<'_>, id: ConnId, message: WsMessage<'_>);
    /// A WebSocket connection ended (for any reason).
    fn on_ws_close(&mut self, cx: &mut Ctx<'_>, id: ConnId);
    fn on_buffer_full(&mut self, _cx: &mut Ctx<'_>, _id: ConnId, _pressure: Pressure) {}
    fn on_buffer_drain(&mut self, _cx: &mut Ctx<'_>, _id: ConnId) {}
    /// A connection ran into a protocol-level limit (it is being closed or refused); for
    /// counting and rate-limited logging.
    fn on_limit(&mut self, _cx: &mut Ctx<'_>, _id: ConnId, _limit: Limit) {}
    fn on_wake(&mut self, _cx: &mut Ctx<'_>) {}
    /// Readiness of an outbound connection the service opened (see [`crate::net::outbound`]).
    fn on_outbound(
        &mut self,
        _cx: &mut Ctx<'_>,
        _id: crate::net::OutboundId,
        _readable: bool,
        _writable: bool,
    ) {
    }
    fn on_reload(&mut self, _cx: &mut Ctx<'_>) {}
    fn before_sleep(&mut self, _cx: &mut Ctx<'_>) {}
    fn can_exit(&self) -> bool {
        true
    }
    fn poll_timeout_ms(&self) -> Option<u64> {
        None
    }
}

/// Frames a text payload once, ready to be queued to one or many connections.
pub fn text_frame(payload: &[u8]) -> Frame {
    data_frame(frame::encode(OpCode::Text, payload))
}

/// Shares complete WebSocket data frames (one, or a run of them) with every connection they are
/// queued to; connections that negotiated permessage-deflate get them compressed, deflated once
/// for all of them, when compressing pays ([`deflate::compress_frames`]).
pub fn data_frame(frames: Vec<u8>) -> Frame {
    Frame::compressible(frames, compress_frames)
}

fn compress_frames(frames: &[u8]) -> Option<Compressed> {
    deflate::compress_frames(frames).map(|run| Compressed {
        bytes: run.bytes,
        window_bytes: run.window_bytes,
    })
}

/// Payload room reserved up front by [`json_frame`]: a stock update fits, so the buffer does not
/// regrow 10 -> 20 -> 40 -> 80 -> 160 bytes while serde writes (serde_json's own `to_vec` starts
/// at 128 for the same reason; benches/frame.rs `encode_json`).
const JSON_FRAME_PAYLOAD_BYTES: usize = 128;

/// Frames a value serialised as JSON, without an intermediate copy of the payload.
pub fn json_frame<T: serde::Serialize + ?Sized>(value: &T) -> Frame {
    let mut writer = frame::FrameWriter::with_capacity(OpCode::Text, JSON_FRAME_PAYLOAD_BYTES);
    // Serialising our own message types into memory cannot fail: they hold no maps with
    // non-string keys and the writer never returns an error.
    serde_json::to_writer(&mut writer, value).expect("serialising a reply into memory");
    data_frame(writer.finish())
}
