//! The WebSocket side of the contract: upgrade (auth, origin, `?skus=`), and each message type.

use log::{debug, warn};

use super::auth::{self, Grant, Role};
use super::commit::ReplyTo;
use super::metrics::LimitHit;
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
        if let Grant::Token { name, .. } = grant {
            self.session_tokens.insert(id, name.into());
        }
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
            ClientRequest::HoldGet(hold) => {
                let reply_to = ReplyTo::WebSocket { id: parsed.id };
                let frame = match self.engine.hold_view(&hold, crate::engine::wall_ms()) {
                    Ok(view) => self.hold_view_frame(&reply_to, &view, false).0,
                    Err(error) => {
                        self.metrics.count_error(error.code);
                        reply::error(id_ref(&parsed_id(&reply_to)), &error)
                    }
                };
                self.reply(cx, id, frame, false, false);
            }
            ClientRequest::Subscribe(skus) => self.subscribe(cx, id, parsed.id, skus),
            ClientRequest::Unsubscribe(skus) => {
                let mut released = Vec::new();
                for name in &skus {
                    if name == WILDCARD {
                        self.subs.unsubscribe_all(id);
                    } else if let Some(sku) = self.engine.skus().lookup(name) {
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
                // A refcount bump, not a copy of the name, per write.
                let token = self.session_tokens.get(&id).cloned();
                if let Err(error) = self.allow_write(cx, id, token.as_deref()) {
                    self.refuse(cx, id, &reply_to, &error);
                    return;
                }
                self.write(cx, id, write, reply_to);
            }
        }
    }

    /// Write rate limits, each a fixed one-second window: per connection, then per token
    /// (summed over every connection and request presenting it). A refused write counts
    /// against neither.
    pub(super) fn allow_write(
        &mut self,
        cx: &Ctx<'_>,
        id: ConnId,
        token: Option<&str>,
    ) -> Result<(), ApiError> {
        let now = cx.now_ms();
        let per_conn = self.config.writes_per_conn_per_sec;
        if per_conn > 0 {
            let session = self.session(id);
            if now >= session.window_start_ms + 1000 {
                session.window_start_ms = now;
                session.window_writes = 0;
            }
            if session.window_writes >= per_conn {
                self.metrics.rate_limited_total += 1;
                self.limit_hit(cx, id, LimitHit::WriteRateConnection);
                return Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!("over {per_conn} writes per second on this connection; slow down"),
                ));
            }
        }
        let per_token = self.config.writes_per_token_per_sec;
        if let (Some(name), true) = (token, per_token > 0) {
            if !self.token_rates.allow(name, now, per_token) {
                self.metrics.rate_limited_total += 1;
                self.limit_hit(cx, id, LimitHit::WriteRateToken);
                return Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!("over {per_token} writes per second for this token; slow down"),
                ));
            }
        }
        if per_conn > 0 {
            self.session(id).window_writes += 1;
        }
        Ok(())
    }

    /// After a tokens reload, closes (1008) every WebSocket opened with a token that is gone
    /// or whose secret or role changed: revoking a leaked token takes effect at once, not when
    /// its holder next reconnects. HTTP checks the token on every request and needs nothing.
    pub(super) fn revoke_sessions(&mut self, cx: &mut Ctx<'_>, before: &[auth::Token]) {
        let now = &self.config.access.tokens;
        let unchanged = |name: &str| {
            let old = before.iter().find(|t| t.name == name);
            let new = now.iter().find(|t| t.name == name);
            matches!((old, new), (Some(o), Some(n))
                if o.role == n.role
                    && auth::constant_time_eq(o.secret.as_bytes(), n.secret.as_bytes()))
        };
        let mut revoked: Vec<(ConnId, std::rc::Rc<str>)> = self
            .session_tokens
            .iter()
            .filter(|(_, name)| !unchanged(name))
            .map(|(&id, name)| (id, name.clone()))
            .collect();
        revoked.sort_unstable_by_key(|&(id, _)| id);
        for (id, name) in revoked {
            if !cx.is_open(id) {
                continue; // a session left over from a closed connection
            }
            warn!("{id}: token `{name}` revoked by reload; closing");
            let close =
                crate::ws::frame::encode_close(crate::ws::close::POLICY_VIOLATION, "token revoked");
            cx.send_final(id, crate::net::Frame::from(close));
            cx.close(id);
            self.session(id).role = None;
            self.session_tokens.remove(&id);
        }
    }

    /// Counts a limit hit and warns about it, at most once per interval per limit (a flood of
    /// bad clients must not become a flood of log lines).
    pub(super) fn limit_hit(&mut self, cx: &Ctx<'_>, id: ConnId, limit: LimitHit) {
        if let Some(hits) = self.metrics.limits.hit(limit, cx.now_ms()) {
            let peer = cx
                .peer(id)
                .map_or_else(|| "?".to_string(), |p| p.ip().to_string());
            warn!(
                "{id} from {peer}: limit {} hit ({hits} time(s) since the last warning)",
                limit.name()
            );
        }
    }

    fn subscribe(
        &mut self,
        cx: &mut Ctx<'_>,
        id: ConnId,
        request_id: Option<serde_json::Value>,
        skus: Vec<String>,
    ) {
        let mut wildcard = false;
        let mut named = Vec::with_capacity(skus.len());
        // SKUs this message newly subscribed: a name already held (or repeated in the
        // message) takes no new slot, so only these count against the limit.
        let mut added = Vec::new();
        for name in skus {
            if name == WILDCARD {
                wildcard = true;
                continue;
            }
            // Names were validated by the parser; intern cannot refuse them.
            if let Ok(sku) = self.engine.intern(&name) {
                if self.subs.subscribe(id, sku) {
                    added.push(sku);
                }
                named.push(name);
            }
        }
        let max = self.config.subscriptions_per_conn_max;
        if self.subs.count(id) > max {
            // Refused as a whole: undo this message's subscriptions.
            let released: Vec<_> = added
                .into_iter()
                .filter_map(|sku| self.subs.unsubscribe(id, sku))
                .collect();
            self.forget_unused(released);
            let error = ApiError::new(
                ErrorCode::TooLarge,
                format!("at most {max} subscriptions per connection"),
            );
            self.metrics.count_error(ErrorCode::TooLarge);
            self.limit_hit(cx, id, LimitHit::Subscriptions);
            self.reply(
                cx,
                id,
                reply::error(request_id.as_ref(), &error),
                false,
                false,
            );
            return;
        }
        if wildcard {
            self.subs.subscribe_all(id);
        }
        self.reply_states(cx, id, "subscribed", request_id, named, wildcard);
    }
}

/// The request id of a WebSocket reply target.
fn parsed_id(reply_to: &ReplyTo) -> Option<serde_json::Value> {
    match reply_to {
        ReplyTo::WebSocket { id } => id.clone(),
        ReplyTo::Http(_) => None,
    }
}
