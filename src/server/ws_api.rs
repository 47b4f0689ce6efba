//! The WebSocket side of the contract: upgrade (auth, origin, `?skus=`), and each message type.

use log::debug;

use super::auth::{self, Grant, Role};
use super::commit::ReplyTo;
use super::{id_ref, StockService};
use crate::api::messages::{self, ClientRequest, WILDCARD};
use crate::api::{reply, ApiError, ErrorCode};
use crate::http::{Request, Response};
use crate::net::{ConnId, Ctx};

impl StockService {
    pub(super) fn upgrade(
        &mut self,
        _cx: &mut Ctx<'_>,
        id: ConnId,
        req: &Request,
    ) -> Result<(), Response> {
        if !self.config.allowed_origins.is_empty() {
            // Browsers always send Origin; non-browser clients usually don't and are not
            // subject to the same-origin model this check exists for.
            if let Some(origin) = req.header_str("origin") {
                if !self
                    .config
                    .allowed_origins
                    .iter()
                    .any(|o| o == origin || o == "*")
                {
                    self.metrics.rejected_origin_total += 1;
                    return Err(Response::json(
                        403,
                        reply::http_error_body(&ApiError::new(
                            ErrorCode::Unauthorized,
                            "origin not allowed",
                        )),
                    ));
                }
            }
        }
        let grant = self
            .config
            .access
            .check(auth::presented_token(req).as_deref());
        let role = self.config.access.role(&grant);
        if grant == Grant::Invalid || role.is_none() {
            self.metrics.count_error(ErrorCode::Unauthorized);
            let message = if grant == Grant::Invalid {
                "invalid token"
            } else {
                "a token is required"
            };
            return Err(Response::json(
                401,
                reply::http_error_body(&ApiError::new(ErrorCode::Unauthorized, message)),
            ));
        }
        let session = self.session(id);
        session.role = role;
        session.websocket = true;
        Ok(())
    }

    pub(super) fn ws_open(&mut self, cx: &mut Ctx<'_>, id: ConnId, req: &Request) {
        self.metrics.ws_opened_total += 1;
        match req.query_param("skus") {
            Some(list) => {
                let skus: Vec<String> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                // Answered exactly as if the client had sent a subscribe.
                if skus.len() > self.config.message_limits.skus_per_message_max {
                    let error = ApiError::new(ErrorCode::TooLarge, "too many SKUs in ?skus=");
                    self.reply(cx, id, reply::error(None, &error), false, false);
                    return;
                }
                let checked: Result<Vec<String>, ApiError> = skus
                    .into_iter()
                    .map(|s| {
                        if s == WILDCARD {
                            Ok(s)
                        } else {
                            messages::check_sku(&s).map(|()| s)
                        }
                    })
                    .collect();
                match checked {
                    Ok(skus) => self.subscribe(cx, id, None, skus),
                    Err(error) => self.reply(cx, id, reply::error(None, &error), false, false),
                }
            }
            // The Workerman-style page: connect at `/` and hear everything, no reply.
            None if req.path == "/" => self.subs.subscribe_all(id),
            None => {}
        }
    }

    pub(super) fn ws_text(&mut self, cx: &mut Ctx<'_>, id: ConnId, text: &str) {
        let parsed = messages::parse_message(text, &self.config.message_limits);
        let request = match parsed.request {
            Ok(request) => request,
            Err(error) => {
                debug!("{id} bad message: {}", error.code.as_str());
                self.metrics.count_error(error.code);
                self.reply(
                    cx,
                    id,
                    reply::error(id_ref(&parsed.id), &error),
                    false,
                    false,
                );
                return;
            }
        };
        match request {
            ClientRequest::Ping => self.reply(
                cx,
                id,
                reply::bare("pong", id_ref(&parsed.id)),
                false,
                false,
            ),
            ClientRequest::Get(skus) => self.reply_states(cx, id, "stock", parsed.id, skus, false),
            ClientRequest::Subscribe(skus) => self.subscribe(cx, id, parsed.id, skus),
            ClientRequest::Unsubscribe(skus) => {
                let mut released = Vec::new();
                for name in &skus {
                    if name == WILDCARD {
                        self.subs.unsubscribe_all(id);
                    } else if let Some(sku) = self.store.lookup(name) {
                        self.fanout.forget(id, sku);
                        released.extend(self.subs.unsubscribe(id, sku));
                    }
                }
                self.forget_unused(released);
                self.reply(
                    cx,
                    id,
                    reply::bare("unsubscribed", id_ref(&parsed.id)),
                    false,
                    false,
                );
            }
            ClientRequest::Write(write) => {
                let reply_to = ReplyTo::WebSocket { id: parsed.id };
                if self.role(id) != Some(Role::Write) {
                    let error = ApiError::new(
                        ErrorCode::Unauthorized,
                        "writing needs a token with write rights",
                    );
                    self.refuse(cx, id, &reply_to, &error);
                    return;
                }
                if !self.allow_write(cx, id) {
                    let error = ApiError::new(
                        ErrorCode::RateLimited,
                        "too many writes on this connection; slow down",
                    );
                    self.refuse(cx, id, &reply_to, &error);
                    return;
                }
                self.write(cx, id, write, reply_to);
            }
        }
    }

    /// Per-connection write rate limit: a fixed one-second window.
    pub(super) fn allow_write(&mut self, cx: &Ctx<'_>, id: ConnId) -> bool {
        let limit = self.config.writes_per_conn_per_sec;
        if limit == 0 {
            return true;
        }
        let now = cx.now_ms();
        let session = self.session(id);
        if now >= session.window_start_ms + 1000 {
            session.window_start_ms = now;
            session.window_writes = 0;
        }
        if session.window_writes >= limit {
            self.metrics.rate_limited_total += 1;
            return false;
        }
        session.window_writes += 1;
        true
    }

    fn subscribe(
        &mut self,
        cx: &mut Ctx<'_>,
        id: ConnId,
        request_id: Option<serde_json::Value>,
        skus: Vec<String>,
    ) {
        let max = self.config.subscriptions_per_conn_max;
        let new_names = skus.iter().filter(|s| *s != WILDCARD).count();
        if self.subs.count(id) + new_names > max {
            let error = ApiError::new(
                ErrorCode::TooLarge,
                format!("at most {max} subscriptions per connection"),
            );
            self.metrics.count_error(ErrorCode::TooLarge);
            self.reply(
                cx,
                id,
                reply::error(request_id.as_ref(), &error),
                false,
                false,
            );
            return;
        }
        let mut wildcard = false;
        let mut named = Vec::with_capacity(skus.len());
        for name in skus {
            if name == WILDCARD {
                wildcard = true;
                continue;
            }
            // Names were validated by the parser; intern cannot refuse them.
            if let Ok(sku) = self.store.intern(&name) {
                self.subs.subscribe(id, sku);
                named.push(name);
            }
        }
        if wildcard {
            self.subs.subscribe_all(id);
        }
        self.reply_states(cx, id, "subscribed", request_id, named, wildcard);
    }
}
