//! An echo service: every text or binary message is sent straight back, and an upgrade is
//! accepted on any path. It exercises the core alone (loop, HTTP upgrade, RFC 6455) and is what
//! WebSocket conformance suites such as Autobahn's fuzzingclient expect to talk to.

use super::{data_frame, Service, WsMessage};
use crate::http::{Request, Response};
use crate::net::{ConnId, Ctx};
use crate::ws::frame::{self, OpCode};

pub struct Echo;

impl Service for Echo {
    fn wants_websocket(&self, req: &Request) -> bool {
        req.is_upgrade()
    }

    fn on_request(&mut self, _cx: &mut Ctx<'_>, _id: ConnId, _req: &Request) -> Option<Response> {
        Some(
            Response::text(426, "this is a WebSocket echo server\n").header("Upgrade", "websocket"),
        )
    }

    fn on_upgrade(&mut self, _: &mut Ctx<'_>, _: ConnId, _: &Request) -> Result<(), Response> {
        Ok(())
    }

    fn on_ws_open(&mut self, _cx: &mut Ctx<'_>, _id: ConnId, _req: &Request) {}

    fn on_ws_message(&mut self, cx: &mut Ctx<'_>, id: ConnId, message: WsMessage<'_>) {
        let bytes = match message {
            WsMessage::Text(text) => frame::encode(OpCode::Text, text.as_bytes()),
            WsMessage::Binary(data) => frame::encode(OpCode::Binary, data),
        };
        // Compressed back (once, if it pays) to a client that negotiated permessage-deflate.
        cx.send(id, data_frame(bytes));
    }

    fn on_ws_close(&mut self, _cx: &mut Ctx<'_>, _id: ConnId) {}
}
