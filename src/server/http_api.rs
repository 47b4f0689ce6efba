//! The HTTP side of the contract (PROTOCOL.md "HTTP API"), on the same port as `/ws`.

use std::sync::OnceLock;

use serde_json::Value;

use super::auth::{self, Grant, Role};
use super::commit::{Body, Outgoing, ReplyTo};
use super::metrics::{self, Snapshot};
use super::{browser, StockService};
use crate::api::messages::{self, HoldAction, HoldCommand, WriteRequest};
use crate::api::{reply, ApiError, ErrorCode};
use crate::http::cors::{self, AllowOrigin};
use crate::http::{Match, Method, Request, Response, Router};
use crate::net::{ConnId, Ctx, Frame};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    StockOne,
    StockMany,
    WriteOne,
    WriteBatch,
    HoldOne,
    HoldAction,
    Health,
    Metrics,
    Dashboard,
    ClientScript,
    ClientModule,
}

fn router() -> &'static Router<Route> {
    static ROUTER: OnceLock<Router<Route>> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let mut r = Router::new();
        r.add(Method::Get, "/stock/{*sku}", Route::StockOne)
            .add(Method::Get, "/stock", Route::StockMany)
            .add(Method::Post, "/stock/batch", Route::WriteBatch)
            .add(Method::Post, "/stock/{*sku}", Route::WriteOne)
            // Hold ids may contain `/`: the action is the last segment of the tail.
            .add(Method::Get, "/holds/{*hold}", Route::HoldOne)
            .add(Method::Post, "/holds/{*hold}", Route::HoldAction)
            .add(Method::Get, "/healthz", Route::Health)
            .add(Method::Get, "/metrics", Route::Metrics)
            .add(Method::Get, "/", Route::Dashboard)
            .add(Method::Get, "/client.js", Route::ClientScript)
            .add(Method::Get, "/client.mjs", Route::ClientModule);
        r
    })
}

fn error_response(error: &ApiError) -> Response {
    Response::json(error.code.http_status(), reply::http_error_body(error))
}

/// How one request wants its response framed: whether the connection stays open, and the CORS
/// headers its `Origin` earned (decided once, when the request arrives, since a reply may be
/// built later, when its write is durable).
#[derive(Clone, Debug)]
pub(super) struct HttpReply {
    pub keep_alive: bool,
    pub cors: Option<AllowOrigin>,
}

impl HttpReply {
    /// `response` with this request's CORS headers and connection handling.
    pub fn finish(&self, response: Response) -> Response {
        let response = cors::with_cors(response, self.cors.as_ref());
        if self.keep_alive {
            response
        } else {
            response.close()
        }
    }
}

impl StockService {
    /// Serves one request: `Some` answers now, `None` means the answer is queued (a write
    /// waiting for the log, or a reply behind one).
    pub(super) fn handle_http(
        &mut self,
        cx: &mut Ctx<'_>,
        id: ConnId,
        req: &Request,
    ) -> Option<Response> {
        self.metrics.http_requests_total += 1;
        let http = &HttpReply {
            keep_alive: req.keep_alive(),
            cors: AllowOrigin::for_request(&self.config.allowed_origins, req.header_str("origin")),
        };
        let (route, param) = match router().find(req.method, &req.path) {
            // The path parameter (a SKU id) is percent-decoded (PROTOCOL.md "Limits"):
            // `/stock/shop%3A1%2Fred` names `shop:1/red`. A broken escape names no SKU.
            Match::Found { route, param } => match param.map(crate::http::percent_decode) {
                Some(None) => {
                    let error = ApiError::new(
                        ErrorCode::InvalidSku,
                        "the SKU in the path has a broken percent-escape",
                    );
                    return self.answer(cx, id, error_response(&error), http);
                }
                decoded => (route, decoded.flatten()),
            },
            Match::NotFound => {
                let error =
                    ApiError::new(ErrorCode::NotFound, format!("no route for {}", req.path));
                return self.answer(cx, id, error_response(&error), http);
            }
            // A CORS preflight (or a plain OPTIONS): no route registers OPTIONS, so every
            // known path lands here with the methods it serves.
            Match::MethodNotAllowed { allow } if req.method == Method::Options => {
                let response = cors::preflight(&allow, http.cors.as_ref());
                let bare = HttpReply {
                    cors: None,
                    ..http.clone()
                };
                return self.answer(cx, id, response, &bare);
            }
            Match::MethodNotAllowed { allow } => {
                let error = ApiError::new(
                    ErrorCode::MethodNotAllowed,
                    format!("{} not allowed here", req.method_name),
                );
                return self.answer(cx, id, error_response(&error).header("Allow", allow), http);
            }
        };
        // Health and metrics are for operators and load balancers: no token needed.
        match route {
            Route::Health => return self.answer(cx, id, self.health(cx), http),
            Route::Metrics => {
                let body = self.metrics_text(cx);
                let response = Response::new(200).body(
                    "text/plain; version=0.0.4; charset=utf-8",
                    body.into_bytes(),
                );
                return self.answer(cx, id, response, http);
            }
            Route::Dashboard => return self.answer(cx, id, browser::dashboard(), http),
            Route::ClientScript | Route::ClientModule => {
                let source = if route == Route::ClientScript {
                    browser::CLIENT_JS
                } else {
                    browser::CLIENT_MJS
                };
                // The script carries `Access-Control-Allow-Origin: *` of its own (any page may
                // load it); the request's CORS answer would only repeat the header.
                let bare = HttpReply {
                    cors: None,
                    ..http.clone()
                };
                return self.answer(cx, id, browser::script(source), &bare);
            }
            _ => {}
        }
        let grant = self
            .config
            .access
            .check(auth::presented_token(req).as_deref());
        let role = self.config.access.role(&grant);
        if grant == Grant::Invalid || role.is_none() {
            let message = if grant == Grant::Invalid {
                "invalid token"
            } else {
                "a token is required"
            };
            let error = ApiError::new(ErrorCode::Unauthorized, message);
            self.metrics.count_error(error.code);
            return self.answer(cx, id, error_response(&error), http);
        }
        match route {
            Route::StockOne => {
                let name = param.unwrap_or_default();
                if let Err(error) = messages::check_sku(&name) {
                    return self.answer(cx, id, error_response(&error), http);
                }
                self.answer_read(id, http, move |service| {
                    let mut body = Vec::with_capacity(128);
                    reply::write_state(&mut body, &name, service.visible_by_name(&name));
                    Response::json(200, body)
                })
            }
            Route::StockMany => {
                let list = req.query_param("skus").unwrap_or_default();
                let names: Vec<&str> = list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect();
                if names.len() > self.config.message_limits.skus_per_message_max {
                    let error = ApiError::new(ErrorCode::TooLarge, "too many SKUs in ?skus=");
                    return self.answer(cx, id, error_response(&error), http);
                }
                if let Some(error) = names.iter().find_map(|n| messages::check_sku(n).err()) {
                    return self.answer(cx, id, error_response(&error), http);
                }
                let names: Vec<String> = names.into_iter().map(String::from).collect();
                self.answer_read(id, http, move |service| {
                    let states: Vec<(&str, crate::stock::Stock)> = names
                        .iter()
                        .map(|n| (n.as_str(), service.visible_by_name(n)))
                        .collect();
                    Response::json(200, reply::http_stock_body(&states, true, false))
                })
            }
            Route::HoldOne => {
                let reply_to = ReplyTo::Http(http.clone());
                let hold = Value::String(param.unwrap_or_default());
                let view = messages::parse_hold_id(Some(&hold))
                    .and_then(|hold| self.engine.hold_view(&hold, crate::engine::wall_ms()));
                match view {
                    Ok(view) => {
                        // The frame is the whole response; sent behind this connection's
                        // waiting replies, if any.
                        let (frame, close_after) = self.hold_view_frame(&reply_to, &view, false);
                        self.reply(cx, id, frame, close_after, false);
                        None
                    }
                    Err(error) => {
                        self.metrics.count_error(error.code);
                        self.answer(cx, id, error_response(&error), http)
                    }
                }
            }
            Route::WriteOne | Route::WriteBatch | Route::HoldAction => {
                let reply_to = ReplyTo::Http(http.clone());
                if role != Some(Role::Write) {
                    let error = ApiError::new(
                        ErrorCode::Unauthorized,
                        "writing needs a token with write rights",
                    );
                    self.refuse(cx, id, &reply_to, &error);
                    return None;
                }
                let token = match &grant {
                    Grant::Token { name, .. } => Some(name.as_str()),
                    _ => None,
                };
                if let Err(error) = self.allow_write(cx, id, token) {
                    self.refuse(cx, id, &reply_to, &error);
                    return None;
                }
                match parse_write(req, route, param.as_deref(), &self.config.message_limits) {
                    Ok(write) => self.write(cx, id, write, reply_to),
                    Err(error) => self.refuse(cx, id, &reply_to, &error),
                }
                None
            }
            Route::Health
            | Route::Metrics
            | Route::Dashboard
            | Route::ClientScript
            | Route::ClientModule => unreachable!("answered above"),
        }
    }

    /// Answers now unless this connection has replies waiting (pipelining keeps order).
    fn answer(
        &mut self,
        cx: &mut Ctx<'_>,
        id: ConnId,
        response: Response,
        http: &HttpReply,
    ) -> Option<Response> {
        let response = http.finish(response);
        if self.session_ref(id).is_some_and(|s| s.outbox_pending > 0) {
            let close_after = !http.keep_alive;
            self.reply(cx, id, Frame::from(response.to_bytes()), close_after, false);
            return None;
        }
        Some(response)
    }

    /// Answers a read now, or, when this connection has replies waiting (a pipelined write
    /// still on its way to the log), builds it when its turn comes: a read pipelined after a
    /// write sees that write.
    fn answer_read(
        &mut self,
        id: ConnId,
        http: &HttpReply,
        build: impl FnOnce(&StockService) -> Response + 'static,
    ) -> Option<Response> {
        if !self.session_ref(id).is_some_and(|s| s.outbox_pending > 0) {
            return Some(http.finish(build(self)));
        }
        self.session(id).outbox_pending += 1;
        let close_after = !http.keep_alive;
        let http = http.clone();
        let body = Body::Build(Box::new(move |service: &StockService| {
            Frame::from(http.finish(build(service)).to_bytes())
        }));
        self.outbox.push_back(Outgoing::Reply {
            seq: self.engine.last_ticket(),
            to: id,
            body,
            close_after,
        });
        None
    }

    fn health(&self, cx: &Ctx<'_>) -> Response {
        let status = self.engine.status();
        // A full key store refuses every keyed write (`unavailable`): a balancer that routes
        // writes by /healthz must hear that too (PROTOCOL.md "Limits"). Only the embedded
        // engine bounds its keys; Redis expires them itself.
        let keys_full = self.engine.kind() == "embedded"
            && status.idempotency_keys >= self.config.idempotency_keys_max;
        let refusing = status.refusing.or_else(|| {
            keys_full.then(|| {
                format!(
                    "idempotency key store full ({} keys): keyed writes are refused",
                    self.config.idempotency_keys_max
                )
            })
        });
        let mut body = serde_json::json!({
            "status": if refusing.is_none() { "ok" } else { "unavailable" },
            "pid": std::process::id(),
            "engine": self.engine.kind(),
            "writable": refusing.is_none(),
            "reason": refusing,
            "role": self.config.role_name,
            "uptime_seconds": self.uptime_secs(cx),
            "connections": cx.connection_count(),
            "store": {
                "skus": self.engine.skus().known_len(),
                "writable": refusing.is_none(),
                "reason": refusing,
                "idempotency_keys": status.idempotency_keys,
            },
        });
        if let Some(fields) = body.as_object_mut() {
            self.engine.health(fields);
        }
        let status = if refusing.is_none() { 200 } else { 503 };
        Response::json(status, body.to_string().into_bytes())
    }

    fn metrics_text(&self, cx: &Ctx<'_>) -> String {
        let log_stats = self.engine.log_stats();
        let status = self.engine.status();
        let mut text = metrics::render(&Snapshot {
            service: &self.metrics,
            loop_stats: cx.stats(),
            fanout: &self.fanout.stats,
            log: &log_stats,
            connections_open: cx.connection_count(),
            skus_known: self.engine.skus().known_len(),
            idempotency_keys: status.idempotency_keys,
            writes_refused: status.refusing.is_some(),
            uptime_seconds: self.uptime_secs(cx),
            holds: status.holds,
        });
        metrics::single(
            &mut text,
            "stocksync_outbox_entries",
            "gauge",
            "Writes in flight and the replies queued behind them.",
            self.outbox.len(),
        );
        metrics::single(
            &mut text,
            "stocksync_outbox_entries_peak",
            "gauge",
            "Most outbox entries at once since start.",
            self.metrics.outbox_entries_peak,
        );
        metrics::single(
            &mut text,
            "stocksync_connections_held",
            "gauge",
            "Connections not read because their writes in flight are at the bound.",
            self.held.len(),
        );
        self.engine.render_metrics(&mut text);
        text
    }
}

/// Parses the body of `POST /stock/{sku}` (an op without `id`) or `POST /stock/batch`.
fn parse_write(
    req: &Request,
    route: Route,
    sku: Option<&str>,
    limits: &messages::MessageLimits,
) -> Result<WriteRequest, ApiError> {
    // A hold's commit or release needs no body: an empty one reads as `{}`.
    let body: Value = if req.body.is_empty() && route == Route::HoldAction {
        Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_slice(&req.body)
            .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?
    };
    if !body.is_object() {
        return Err(ApiError::bad_request("body must be a JSON object"));
    }
    let header_key = match req.header_str("idempotency-key") {
        Some(key) => messages::parse_key(Some(&Value::String(key.to_string())))?,
        None if req.header("idempotency-key").is_some() => {
            return Err(ApiError::bad_request(
                "Idempotency-Key must be 1 to 128 bytes of text",
            ))
        }
        None => None,
    };
    let body_key = messages::parse_key(body.get("idempotency_key"))?;
    let key = messages::merge_keys(header_key, body_key)?;
    if route == Route::HoldAction {
        let tail = sku.unwrap_or_default();
        let (hold, action) = tail.rsplit_once('/').unwrap_or((tail, ""));
        let hold = messages::parse_hold_id(Some(&Value::String(hold.to_string())))?;
        let action = match action {
            "commit" => HoldAction::Commit,
            "release" => HoldAction::Release,
            "extend" => HoldAction::Extend {
                ttl_ms: messages::parse_ttl(body.get("ttl_ms"))?,
            },
            _ => {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    "POST /holds/{id}/commit, /release or /extend",
                ))
            }
        };
        return Ok(WriteRequest {
            batch: false,
            ops: Vec::new(),
            idempotency_key: key,
            hold: Some(HoldCommand { hold, action }),
        });
    }
    if route == Route::WriteBatch {
        let ops = messages::parse_batch_ops(body.get("ops"), limits)?;
        return Ok(WriteRequest {
            batch: true,
            ops,
            idempotency_key: key,
            hold: None,
        });
    }
    let sku = sku.unwrap_or_default();
    let (op, _) = messages::parse_op(&body, Some(sku))?;
    Ok(WriteRequest {
        batch: false,
        ops: vec![op],
        idempotency_key: key,
        hold: None,
    })
}
