//! [`Protocol`]: the event-loop [`Handler`] that speaks HTTP/1.1 and RFC 6455 to every
//! connection and hands whole requests and messages to a [`Service`].
//!
//! Per connection it keeps only a phase (HTTP or WebSocket with its small decoder) and two
//! timestamps; partial input lives in the loop's per-connection buffer only while it exists.

use log::{debug, warn};

use super::{Limit, Service, WsMessage};
use crate::http::request::{self, Request};
use crate::http::response::Response;
use crate::net::{CloseReason, ConnId, Ctx, Frame, Handler, Pressure};
use crate::ws::close;
use crate::ws::codec::{Decoder, Message};
use crate::ws::extensions;
use crate::ws::frame::{self, OpCode};
use crate::ws::handshake;

enum Phase {
    /// Waiting for (more) HTTP requests; `served` counts the ones answered so far, and
    /// `continued` whether the request in progress got its `100 Continue`.
    Http {
        served: u32,
        continued: bool,
    },
    WebSocket {
        decoder: Decoder,
        last_ping_ms: u64,
    },
    /// The last HTTP request said `Connection: close`; input after it is ignored.
    Done,
}

struct ConnProto {
    phase: Phase,
    last_input_ms: u64,
}

/// Per-connection protocol state: five words. The phase (four: for a WebSocket the decoder's
/// two boxes, `None` while idle, its 32-bit message limit beside its compression flag, whose
/// spare values also hold `Phase`'s tag, and the last ping) and the last input. 48 while the
/// decoder kept its limit in a word of its own; inflaters live only inside a message.
const CONN_PROTO_BYTES_MAX: usize = 40;
const _: () = assert!(std::mem::size_of::<ConnProto>() <= CONN_PROTO_BYTES_MAX);

/// Refused handshakes are warned about at most this often (a scan with bad tokens or a
/// misconfigured client would otherwise flood the log); the rest go to debug.
const REFUSAL_WARN_INTERVAL_MS: u64 = 10_000;

pub struct Protocol<S: Service> {
    /// Indexed by `ConnId::index`; `None` for free slots.
    conns: Vec<Option<ConnProto>>,
    http_limits: request::Limits,
    /// When a refused handshake was last warned about, and refusals since.
    refusal_warned_ms: u64,
    refusals_unwarned: u64,
    pub service: S,
}

impl<S: Service> Protocol<S> {
    pub fn new(service: S, limits: &crate::config::Limits) -> Self {
        Protocol {
            conns: Vec::new(),
            refusal_warned_ms: 0,
            refusals_unwarned: 0,
            http_limits: request::Limits {
                headers_max: limits.http_headers_max,
                head_bytes_max: limits.http_head_bytes_max,
                body_bytes_max: limits.http_body_bytes_max,
            },
            service,
        }
    }

    fn is_websocket(&self, id: ConnId) -> bool {
        matches!(
            self.conns.get(id.index as usize),
            Some(Some(ConnProto {
                phase: Phase::WebSocket { .. },
                ..
            }))
        )
    }

    fn handle_request(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: Request) {
        let now = cx.now_ms();
        if let Err(e) = request::require_host(&req) {
            let response = Response::json(e.status(), http_error_body(&e)).close();
            cx.send(id, Frame::from(response.to_bytes()));
            cx.close(id);
            if let Some(Some(state)) = self.conns.get_mut(id.index as usize) {
                state.phase = Phase::Done;
            }
            return;
        }
        if cx.via_trusted_proxy(id) && !self.attribute_client(cx, id, &req) {
            return;
        }
        if self.service.wants_websocket(&req) {
            self.handle_upgrade(cx, id, req);
            return;
        }
        let keep_alive = match self.service.on_request(cx, id, &req) {
            Some(response) => {
                let keep_alive = req.keep_alive() && response.keep_alive;
                let response = if keep_alive {
                    response
                } else {
                    response.close()
                };
                cx.send(
                    id,
                    Frame::from(response.for_request(&req).to_bytes_for(req.method)),
                );
                if !keep_alive {
                    cx.close(id);
                }
                keep_alive
            }
            None => req.keep_alive(),
        };
        if !keep_alive {
            // Nothing after a request that ends the connection is read.
            if let Some(Some(state)) = self.conns.get_mut(id.index as usize) {
                state.phase = Phase::Done;
            }
            return;
        }
        if let Some(Some(state)) = self.conns.get_mut(id.index as usize) {
            if let Phase::Http { served, continued } = &mut state.phase {
                *served = served.saturating_add(1);
                *continued = false;
            }
        }
        cx.set_deadline_ms(id, now + cx.limits().idle_timeout_ms);
    }

    fn handle_upgrade(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: Request) {
        let headers = req.header_pairs();
        let key = match handshake::validate(&req.method_name, req.minor_version, &headers) {
            Ok(key) => key.to_vec(),
            Err(e) => {
                self.refused(cx, id, format_args!("WebSocket handshake refused: {e}"));
                cx.send(id, Frame::from(handshake::rejection(&e)));
                cx.close(id);
                return;
            }
        };
        // RFC 7692: the first acceptable permessage-deflate offer, unless compression is off.
        let deflate = if cx.limits().ws_compression {
            extensions::negotiate(&headers)
        } else {
            None
        };
        drop(headers);
        if let Err(response) = self.service.on_upgrade(cx, id, &req) {
            self.refused(
                cx,
                id,
                format_args!("WebSocket upgrade refused with {}", response.status),
            );
            cx.send(id, Frame::from(response.close().to_bytes()));
            cx.close(id);
            return;
        }
        let response_extensions = deflate.map(|agreed| agreed.response_value());
        cx.send(
            id,
            Frame::from(handshake::response_101_with(
                &key,
                response_extensions.as_deref(),
            )),
        );
        if let Some(agreed) = deflate {
            debug!("{id} permessage-deflate: {agreed:?}");
            cx.set_compressed_window(id, agreed.window_bytes());
        }
        let now = cx.now_ms();
        if let Some(Some(state)) = self.conns.get_mut(id.index as usize) {
            state.phase = Phase::WebSocket {
                decoder: Decoder::new(cx.limits().ws_message_bytes_max)
                    .with_compression(deflate.is_some()),
                last_ping_ms: now,
            };
        }
        self.schedule_ws_timer(cx, id);
        self.service.on_ws_open(cx, id, &req);
    }

    /// A request from a trusted proxy: the connection is counted against (and logged as) the
    /// client its `X-Forwarded-For` names. Every request does this, since a proxy may reuse one
    /// upstream connection for several clients. False when that client is over its per-IP
    /// connection limit: the request was answered 429 and the connection is closing.
    fn attribute_client(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) -> bool {
        let Some(client) = forwarded_client(req) else {
            return true; // no (usable) header: the proxy itself is the client
        };
        let proxy = cx.socket_peer(id);
        match cx.set_client_ip(id, client) {
            Ok(()) => {
                debug!("{id} client {client} via proxy {proxy:?}");
                true
            }
            Err(limit) => {
                self.refused(
                    cx,
                    id,
                    format_args!(
                        "request refused: per-IP connection limit ({}) for {client} via proxy",
                        limit.max
                    ),
                );
                let body = serde_json::json!({"error": {
                    "code": "rate_limited",
                    "message": "too many connections from this client address",
                }});
                let response = Response::json(429, body.to_string().into_bytes()).close();
                cx.send(id, Frame::from(response.to_bytes()));
                cx.close(id);
                if let Some(Some(state)) = self.conns.get_mut(id.index as usize) {
                    state.phase = Phase::Done;
                }
                false
            }
        }
    }

    /// Logs a refused handshake or request: a warning at most every
    /// `REFUSAL_WARN_INTERVAL_MS` (with the count since the last one), debug otherwise.
    fn refused(&mut self, cx: &Ctx<'_>, id: ConnId, what: std::fmt::Arguments<'_>) {
        let now = cx.now_ms();
        let peer = cx.peer(id).map(|p| p.ip());
        if self.refusal_warned_ms == 0 || now >= self.refusal_warned_ms + REFUSAL_WARN_INTERVAL_MS {
            let earlier = std::mem::take(&mut self.refusals_unwarned);
            warn!("{id} from {peer:?}: {what} ({earlier} more refused since the last warning)");
            self.refusal_warned_ms = now.max(1);
        } else {
            self.refusals_unwarned += 1;
            debug!("{id} from {peer:?}: {what}");
        }
    }

    /// Next wake-up for a WebSocket: the earlier of the idle deadline and the next ping.
    fn schedule_ws_timer(&self, cx: &mut Ctx<'_>, id: ConnId) {
        let Some(Some(state)) = self.conns.get(id.index as usize) else {
            return;
        };
        let Phase::WebSocket { last_ping_ms, .. } = state.phase else {
            return;
        };
        let limits = cx.limits();
        let mut at = state.last_input_ms + limits.idle_timeout_ms;
        if limits.ping_interval_ms > 0 {
            at = at.min(last_ping_ms + limits.ping_interval_ms);
        }
        cx.set_deadline_ms(id, at);
    }

    /// Fails the WebSocket connection (RFC 6455 §7.1.7): a close frame with `code`, then close.
    fn fail(cx: &mut Ctx<'_>, id: ConnId, code: u16, reason: &str) {
        cx.send_final(id, Frame::from(frame::encode_close(code, reason)));
        cx.close(id);
    }
}

/// The contract's JSON error body (PROTOCOL.md "HTTP API") for a request refused before it
/// reached the service.
fn http_error_body(e: &request::ParseError) -> Vec<u8> {
    let code = match e.status() {
        413 | 431 => "too_large",
        _ => "bad_request",
    };
    serde_json::json!({"error": {"code": code, "message": e.to_string()}})
        .to_string()
        .into_bytes()
}

/// The client a proxy names: the last address of the last `X-Forwarded-For` header, which is the
/// hop the (trusted) proxy itself added; whatever the client wrote before it is not believed.
/// Accepts `1.2.3.4`, `2001:db8::1`, and the `1.2.3.4:5678` / `[2001:db8::1]:5678` some proxies
/// write.
fn forwarded_client(req: &Request) -> Option<std::net::IpAddr> {
    let header = req.header_values("x-forwarded-for").last()?;
    let last = std::str::from_utf8(header).ok()?.rsplit(',').next()?.trim();
    last.parse::<std::net::IpAddr>()
        .ok()
        .or_else(|| last.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// Codes we may echo back in a close reply; anything else is answered with 1000.
fn echoable(code: u16) -> bool {
    close::is_valid_received(code)
}

impl<S: Service> Handler for Protocol<S> {
    fn on_open(&mut self, cx: &mut Ctx<'_>, id: ConnId) {
        let index = id.index as usize;
        if self.conns.len() <= index {
            self.conns.resize_with(index + 1, || None);
        }
        let now = cx.now_ms();
        self.conns[index] = Some(ConnProto {
            phase: Phase::Http {
                served: 0,
                continued: false,
            },
            last_input_ms: now,
        });
        // Slowloris: the first request (or upgrade) must be complete within this.
        cx.set_deadline_ms(id, now + cx.limits().handshake_timeout_ms);
    }

    fn on_message(&mut self, cx: &mut Ctx<'_>, id: ConnId, data: &mut [u8]) -> usize {
        let now = cx.now_ms();
        let mut consumed = 0;
        // A connection over its hard send limit is about to be closed: answer nothing more.
        while consumed < data.len() && cx.is_open(id) && !cx.is_over_limit(id) {
            let Some(Some(state)) = self.conns.get_mut(id.index as usize) else {
                break;
            };
            state.last_input_ms = now;
            match &mut state.phase {
                Phase::Http { continued, .. } => {
                    match request::parse(&data[consumed..], &self.http_limits) {
                        Ok(None) => {
                            // RFC 9110 §10.1.1: a client that asked may wait for this before
                            // sending the body (curl does, for a second).
                            if !*continued
                                && request::expects_continue(&data[consumed..], &self.http_limits)
                            {
                                *continued = true;
                                cx.send(id, Frame::from(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]));
                            }
                            break;
                        }
                        Ok(Some((req, used))) => {
                            consumed += used;
                            self.handle_request(cx, id, req);
                        }
                        Err(e) => {
                            debug!("{id} bad HTTP request: {e}");
                            if matches!(e.status(), 413 | 431) {
                                self.service.on_limit(cx, id, Limit::RequestTooLarge);
                            }
                            let response = Response::json(e.status(), http_error_body(&e)).close();
                            cx.send(id, Frame::from(response.to_bytes()));
                            cx.close(id);
                            return data.len();
                        }
                    }
                }
                Phase::Done => return data.len(),
                Phase::WebSocket { decoder, .. } => {
                    match decoder.decode(&mut data[consumed..]) {
                        Ok(None) => break,
                        Ok(Some((used, message))) => {
                            consumed += used;
                            match message {
                                None => {}
                                Some(Message::Text(text)) => {
                                    self.service.on_ws_message(cx, id, WsMessage::Text(text))
                                }
                                Some(Message::Binary(bytes)) => {
                                    self.service.on_ws_message(cx, id, WsMessage::Binary(bytes))
                                }
                                Some(Message::Ping(payload)) => {
                                    cx.send(id, Frame::from(frame::encode(OpCode::Pong, payload)));
                                }
                                Some(Message::Pong(_)) => {}
                                Some(Message::Close(received)) => {
                                    // RFC 6455 §5.5.1: answer a close with a close, echoing its
                                    // code, then close the TCP connection.
                                    let reply = match received {
                                        Some(c) if echoable(c.code) => {
                                            frame::encode_close(c.code, "")
                                        }
                                        Some(_) => frame::encode_close(close::NORMAL, ""),
                                        None => frame::encode(OpCode::Close, &[]),
                                    };
                                    cx.send_final(id, Frame::from(reply));
                                    cx.close(id);
                                    return data.len();
                                }
                            }
                        }
                        Err(e) => {
                            debug!("{id} WebSocket protocol error: {e}");
                            if e.close_code() == close::MESSAGE_TOO_BIG {
                                self.service.on_limit(cx, id, Limit::MessageTooBig);
                            }
                            Self::fail(cx, id, e.close_code(), &e.to_string());
                            return data.len();
                        }
                    }
                }
            }
        }
        consumed
    }

    fn on_close(&mut self, cx: &mut Ctx<'_>, id: ConnId, reason: CloseReason) {
        let was_websocket = self.is_websocket(id);
        if let Some(slot) = self.conns.get_mut(id.index as usize) {
            *slot = None;
        }
        if reason == CloseReason::SendQueueOverflow {
            warn!("{id} closed: send queue over its hard limit");
        }
        if was_websocket {
            self.service.on_ws_close(cx, id);
        }
    }

    fn on_buffer_full(&mut self, cx: &mut Ctx<'_>, id: ConnId, pressure: Pressure) {
        self.service.on_buffer_full(cx, id, pressure);
        if pressure == Pressure::Hard && cx.is_open(id) {
            if self.is_websocket(id) {
                Self::fail(cx, id, close::POLICY_VIOLATION, "send queue limit exceeded");
            } else {
                cx.close(id);
            }
        }
    }

    fn on_buffer_drain(&mut self, cx: &mut Ctx<'_>, id: ConnId) {
        self.service.on_buffer_drain(cx, id);
    }

    fn on_timer(&mut self, cx: &mut Ctx<'_>, id: ConnId) {
        let now = cx.now_ms();
        // Copied, not cloned: `Limits` holds a list (trusted proxies) and this runs per ping.
        let idle_timeout_ms = cx.limits().idle_timeout_ms;
        let ping_interval_ms = cx.limits().ping_interval_ms;
        let Some(Some(state)) = self.conns.get_mut(id.index as usize) else {
            return;
        };
        match &mut state.phase {
            Phase::Http { served: 0, .. } => {
                debug!("{id} handshake timeout");
                self.service.on_limit(cx, id, Limit::HandshakeTimeout);
                let body = serde_json::json!({"error": {"code": "bad_request",
                    "message": "no complete request within the handshake timeout"}});
                let response = Response::json(408, body.to_string().into_bytes()).close();
                cx.send(id, Frame::from(response.to_bytes()));
                cx.close(id);
            }
            Phase::Http { .. } | Phase::Done => {
                debug!("{id} idle keep-alive connection closed");
                cx.close(id);
            }
            Phase::WebSocket { last_ping_ms, .. } => {
                if now >= state.last_input_ms + idle_timeout_ms {
                    debug!("{id} idle timeout");
                    self.service.on_limit(cx, id, Limit::IdleTimeout);
                    Self::fail(cx, id, close::GOING_AWAY, "idle timeout");
                    return;
                }
                if ping_interval_ms > 0 && now >= *last_ping_ms + ping_interval_ms {
                    *last_ping_ms = now;
                    cx.send(id, Frame::from(frame::encode(OpCode::Ping, &[])));
                }
                self.schedule_ws_timer(cx, id);
            }
        }
    }

    fn on_wake(&mut self, cx: &mut Ctx<'_>) {
        self.service.on_wake(cx);
    }

    fn on_outbound(
        &mut self,
        cx: &mut Ctx<'_>,
        id: crate::net::OutboundId,
        readable: bool,
        writable: bool,
    ) {
        self.service.on_outbound(cx, id, readable, writable);
    }

    fn on_reload(&mut self, cx: &mut Ctx<'_>) {
        self.service.on_reload(cx);
    }

    fn on_shutdown(&mut self, cx: &mut Ctx<'_>) {
        for id in cx.open_ids() {
            if self.is_websocket(id) {
                Self::fail(cx, id, close::GOING_AWAY, "server shutting down");
            } else {
                cx.close(id);
            }
        }
    }

    fn before_sleep(&mut self, cx: &mut Ctx<'_>) {
        self.service.before_sleep(cx);
    }

    fn can_exit(&self) -> bool {
        self.service.can_exit()
    }

    fn poll_timeout_ms(&self) -> Option<u64> {
        self.service.poll_timeout_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with(headers: &str) -> Request {
        let head = format!("GET /ws HTTP/1.1\r\nHost: shop\r\n{headers}\r\n");
        let (req, _) = request::parse(head.as_bytes(), &request::Limits::default())
            .expect("a valid head")
            .expect("a complete head");
        req
    }

    #[test]
    fn forwarded_client_is_the_last_hop_of_the_last_header() {
        let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
        let cases: &[(&str, Option<std::net::IpAddr>)] = &[
            ("", None),
            ("X-Forwarded-For: 203.0.113.7\r\n", ip("203.0.113.7")),
            // What the client wrote comes first; the proxy appends what it saw.
            (
                "X-Forwarded-For: 10.9.9.9, 203.0.113.7\r\n",
                ip("203.0.113.7"),
            ),
            (
                "X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-For: 198.51.100.2\r\n",
                ip("198.51.100.2"),
            ),
            ("x-forwarded-for: 2001:db8::1\r\n", ip("2001:db8::1")),
            ("X-Forwarded-For: 203.0.113.7:5678\r\n", ip("203.0.113.7")),
            ("X-Forwarded-For: [2001:db8::1]:443\r\n", ip("2001:db8::1")),
            ("X-Forwarded-For: unknown\r\n", None),
            ("X-Forwarded-For: 203.0.113.7, garbage\r\n", None),
            ("X-Forwarded-For: \r\n", None),
        ];
        for (headers, expected) in cases {
            assert_eq!(
                forwarded_client(&request_with(headers)),
                *expected,
                "{headers:?}"
            );
        }
    }
}
