//! Client messages (PROTOCOL.md "WebSocket") parsed into typed requests.
//!
//! Every message gets an answer: a malformed one yields an [`ApiError`] with the contract's code,
//! never a closed connection. The request `id` is recovered whenever the text is a JSON object,
//! so even an error reply echoes it.

use serde_json::{Map, Value};

use super::error::{ApiError, ErrorCode};
use crate::stock::idempotency::{key_is_valid, FingerprintBuilder};
use crate::stock::{holds, sku, Action, Fingerprint, Op};

/// Limits on one message's contents; past them the reply is `too_large`.
#[derive(Clone, Copy, Debug)]
pub struct MessageLimits {
    /// SKUs named in one subscribe / unsubscribe / get.
    pub skus_per_message_max: usize,
    /// Ops in one batch.
    pub batch_ops_max: usize,
}

impl Default for MessageLimits {
    fn default() -> Self {
        MessageLimits {
            skus_per_message_max: 1_000,
            batch_ops_max: 100,
        }
    }
}

/// The SKU name that means "every SKU" in subscribe / unsubscribe.
pub const WILDCARD: &str = "*";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientRequest {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Get(Vec<String>),
    Write(WriteRequest),
    /// `{"type":"hold","action":"get","hold":ID}`: a read.
    HoldGet(String),
    Ping,
}

/// A single op (`stock_update`) or an atomic batch (`stock_batch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    pub batch: bool,
    pub ops: Vec<OpSpec>,
    pub idempotency_key: Option<String>,
    /// A `hold` message's commit / release / extend (then `ops` is empty).
    pub hold: Option<HoldCommand>,
}

/// A write that acts on a whole hold (PROTOCOL.md "Holds").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldCommand {
    pub hold: String,
    pub action: HoldAction,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldAction {
    Commit,
    Release,
    Extend { ttl_ms: u64 },
}

impl HoldAction {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldAction::Commit => "commit",
            HoldAction::Release => "release",
            HoldAction::Extend { .. } => "extend",
        }
    }
}

/// One op as sent, validated but not yet bound to a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpSpec {
    pub sku: String,
    pub action: Action,
    pub amount: u64,
    pub if_version: Option<u64>,
    /// The hold a `reserve` takes into, with the `ttl_ms` it carries.
    pub hold: Option<String>,
    pub ttl_ms: Option<u64>,
}

impl WriteRequest {
    /// The request's identity for idempotency: the same ops (single or batch) give the same
    /// fingerprint whether they came over WebSocket or HTTP (one key space).
    pub fn fingerprint(&self) -> Fingerprint {
        if let Some(command) = &self.hold {
            let (kind, ttl_ms) = match command.action {
                HoldAction::Commit => (3, None),
                HoldAction::Release => (4, None),
                HoldAction::Extend { ttl_ms } => (5, Some(ttl_ms)),
            };
            let mut builder = FingerprintBuilder::new(kind);
            builder.hold(&command.hold, ttl_ms);
            return builder.finish();
        }
        let mut builder = FingerprintBuilder::new(if self.batch { 2 } else { 1 });
        for op in &self.ops {
            builder.op(&op.sku, op.action, op.amount, op.if_version);
            // Only ops with a hold add bytes: the fingerprints of plain writes (stored with
            // their keys in the log) stay what they were.
            if let Some(hold) = &op.hold {
                builder.hold(hold, op.ttl_ms);
            }
        }
        builder.finish()
    }
}

impl OpSpec {
    pub fn bind(&self, sku: crate::stock::SkuId) -> Op {
        Op {
            sku,
            action: self.action,
            amount: self.amount,
            if_version: self.if_version,
            held: self.hold.is_some(),
        }
    }
}

/// A parsed message: the `id` to echo, and the request or why it was refused.
pub struct Parsed {
    pub id: Option<Value>,
    pub request: Result<ClientRequest, ApiError>,
}

pub fn parse_message(text: &str, limits: &MessageLimits) -> Parsed {
    super::hot_parse::parse(text, limits).unwrap_or_else(|| parse_general(text, limits))
}

/// Every message, through a `Value` tree: the parse that owns every refusal and its wording
/// ([`super::hot_parse`] stands in for it on the common messages it accepts).
pub(super) fn parse_general(text: &str, limits: &MessageLimits) -> Parsed {
    let value: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return Parsed {
                id: None,
                request: Err(ApiError::bad_request(format!(
                    "message is not valid JSON: {e}"
                ))),
            }
        }
    };
    let Value::Object(mut object) = value else {
        return Parsed {
            id: None,
            request: Err(ApiError::bad_request("message must be a JSON object")),
        };
    };
    // PROTOCOL.md: an id is a string or a number. Anything else is refused, and not echoed
    // (an object or array id would let a client make us copy arbitrary JSON into replies).
    let id = match object.remove("id") {
        None => None,
        Some(id @ (Value::String(_) | Value::Number(_))) => Some(id),
        Some(_) => {
            return Parsed {
                id: None,
                request: Err(ApiError::bad_request("`id` must be a string or a number")),
            }
        }
    };
    let request = parse_object(&object, limits);
    Parsed { id, request }
}

fn parse_object(
    object: &Map<String, Value>,
    limits: &MessageLimits,
) -> Result<ClientRequest, ApiError> {
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(ApiError::bad_request("`type` must be a string")),
        None => return Err(ApiError::bad_request("message needs a `type`")),
    };
    match kind {
        "subscribe" => Ok(ClientRequest::Subscribe(parse_skus(object, limits, true)?)),
        "unsubscribe" => Ok(ClientRequest::Unsubscribe(parse_skus(
            object, limits, true,
        )?)),
        "get" => Ok(ClientRequest::Get(parse_skus(object, limits, false)?)),
        "ping" => Ok(ClientRequest::Ping),
        "stock_update" => {
            let op_value = object
                .get("stock")
                .ok_or_else(|| ApiError::bad_request("stock_update needs a `stock` op"))?;
            let (op, op_key) = parse_op(op_value, None)?;
            let key = merge_keys(parse_key(object.get("idempotency_key"))?, op_key)?;
            Ok(ClientRequest::Write(WriteRequest {
                batch: false,
                ops: vec![op],
                idempotency_key: key,
                hold: None,
            }))
        }
        "stock_batch" => {
            let ops = parse_batch_ops(object.get("ops"), limits)?;
            let key = parse_key(object.get("idempotency_key"))?;
            Ok(ClientRequest::Write(WriteRequest {
                batch: true,
                ops,
                idempotency_key: key,
                hold: None,
            }))
        }
        "hold" => parse_hold_message(object),
        other => Err(ApiError::new(
            ErrorCode::UnknownType,
            format!("unknown message type `{}`", truncate(other, 64)),
        )),
    }
}

/// Parses the `ops` array of a batch (WebSocket message or HTTP body).
pub fn parse_batch_ops(
    ops: Option<&Value>,
    limits: &MessageLimits,
) -> Result<Vec<OpSpec>, ApiError> {
    let ops = match ops {
        Some(Value::Array(ops)) => ops,
        Some(_) => return Err(ApiError::bad_request("`ops` must be an array of ops")),
        None => return Err(ApiError::bad_request("a batch needs `ops`")),
    };
    if ops.is_empty() {
        return Err(ApiError::bad_request("a batch needs at least one op"));
    }
    if ops.len() > limits.batch_ops_max {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "a batch holds at most {} ops, got {}",
                limits.batch_ops_max,
                ops.len()
            ),
        ));
    }
    ops.iter()
        .enumerate()
        .map(|(index, op)| {
            parse_op(op, None)
                .map(|(op, _)| op)
                .map_err(|e| e.at(Some(index)))
        })
        .collect()
}

fn parse_skus(
    object: &Map<String, Value>,
    limits: &MessageLimits,
    wildcard_ok: bool,
) -> Result<Vec<String>, ApiError> {
    let list = match object.get("skus") {
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::bad_request("`skus` must be an array of SKU ids")),
        None => return Err(ApiError::bad_request("message needs `skus`")),
    };
    if list.len() > limits.skus_per_message_max {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "at most {} SKUs per message, got {}",
                limits.skus_per_message_max,
                list.len()
            ),
        ));
    }
    list.iter()
        .map(|value| match value {
            Value::String(name) if wildcard_ok && name == WILDCARD => Ok(name.clone()),
            Value::String(name) => check_sku(name).map(|()| name.clone()),
            _ => Err(ApiError::new(
                ErrorCode::InvalidSku,
                "SKU ids must be strings",
            )),
        })
        .collect()
}

pub fn check_sku(name: &str) -> Result<(), ApiError> {
    sku::validate(name).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidSku,
            format!("invalid SKU id `{}`: {e}", truncate(name, 140)),
        )
    })
}

/// Parses one op object. `path_sku` is the SKU named by an HTTP path (then the body has no
/// `id`). Returns the op and an op-level idempotency key, if any.
pub fn parse_op(
    value: &Value,
    path_sku: Option<&str>,
) -> Result<(OpSpec, Option<String>), ApiError> {
    let Value::Object(op) = value else {
        return Err(ApiError::bad_request("an op must be a JSON object"));
    };
    let sku = match (path_sku, op.get("id")) {
        // The path names the SKU; a body `id` may repeat it but not contradict it (which
        // would leave a reader of the body believing another SKU was written).
        (Some(name), Some(Value::String(body))) if body != name => {
            return Err(ApiError::bad_request(format!(
                "body `id` `{}` differs from the SKU in the path",
                truncate(body, 140)
            )))
        }
        (Some(_), Some(id)) if !id.is_string() => {
            return Err(ApiError::bad_request("op `id` must be a string"))
        }
        (Some(name), _) => name.to_string(),
        (None, Some(Value::String(name))) => name.clone(),
        (None, Some(_)) => {
            return Err(ApiError::new(
                ErrorCode::InvalidSku,
                "op `id` must be a string",
            ))
        }
        (None, None) => {
            return Err(ApiError::new(
                ErrorCode::InvalidSku,
                "op needs an `id` (the SKU)",
            ))
        }
    };
    check_sku(&sku)?;
    let action = match op.get("action") {
        Some(Value::String(name)) => Action::parse(name).ok_or_else(|| {
            ApiError::new(
                ErrorCode::UnknownAction,
                format!("unknown action `{}`", truncate(name, 64)),
            )
        })?,
        Some(_) => return Err(ApiError::bad_request("`action` must be a string")),
        None => return Err(ApiError::bad_request("op needs an `action`")),
    };
    let amount = Op::check_amount(action, op.get(action.amount_field()).and_then(integer))
        .map_err(|e| ApiError::from_op(&e, &sku))?;
    let if_version =
        match op.get("if_version") {
            None => None,
            // `null` is not "absent": a client that meant a version and sent none must hear it.
            Some(value) => Some(value.as_u64().ok_or_else(|| {
                ApiError::bad_request("`if_version` must be a non-negative integer")
            })?),
        };
    let key = parse_key(op.get("idempotency_key"))?;
    let hold = match op.get("hold") {
        None | Some(Value::Null) => None,
        Some(_) if action != Action::Reserve => {
            return Err(ApiError::bad_request(
                "`hold` goes only on a `reserve` op (act on a hold with a `hold` message)",
            ))
        }
        Some(value) => Some(parse_hold_id(Some(value))?),
    };
    // `ttl_ms` means something only with `hold`; without it the field is ignored, like any
    // field an action does not use.
    let ttl_ms = match (&hold, op.get("ttl_ms")) {
        (Some(_), Some(value)) if !value.is_null() => Some(parse_ttl(Some(value))?),
        _ => None,
    };
    Ok((
        OpSpec {
            sku,
            action,
            amount,
            if_version,
            hold,
            ttl_ms,
        },
        key,
    ))
}

/// A hold id (PROTOCOL.md "Holds": 1 to 128 bytes of `[A-Za-z0-9._:/-]`); else `bad_request`.
pub fn parse_hold_id(value: Option<&Value>) -> Result<String, ApiError> {
    match value {
        Some(Value::String(id)) if holds::hold_id_is_valid(id) => Ok(id.clone()),
        Some(_) => Err(ApiError::bad_request(
            "`hold` must be 1 to 128 bytes of [A-Za-z0-9._:/-]",
        )),
        None => Err(ApiError::bad_request("a hold message needs `hold`")),
    }
}

/// `ttl_ms`: an integer in `TTL_MS_MIN..=TTL_MS_MAX`; missing, mistyped or out of range is
/// `bad_request` (PROTOCOL.md "Holds", details). A lower `--hold-ttl-max-ms` is checked by
/// the engine.
pub fn parse_ttl(value: Option<&Value>) -> Result<u64, ApiError> {
    let range = holds::TTL_MS_MIN..=holds::TTL_MS_MAX;
    match value.and_then(Value::as_u64) {
        Some(ttl_ms) if range.contains(&ttl_ms) => Ok(ttl_ms),
        _ => Err(ApiError::bad_request(format!(
            "`ttl_ms` must be an integer in {}..={}",
            range.start(),
            range.end()
        ))),
    }
}

/// `{"type":"hold","action":A,"hold":ID,...}`.
fn parse_hold_message(object: &Map<String, Value>) -> Result<ClientRequest, ApiError> {
    let hold = parse_hold_id(object.get("hold"))?;
    let action = match object.get("action") {
        Some(Value::String(name)) => name.as_str(),
        Some(_) => return Err(ApiError::bad_request("`action` must be a string")),
        None => return Err(ApiError::bad_request("a hold message needs an `action`")),
    };
    let action = match action {
        "get" => return Ok(ClientRequest::HoldGet(hold)),
        "commit" => HoldAction::Commit,
        "release" => HoldAction::Release,
        "extend" => HoldAction::Extend {
            ttl_ms: parse_ttl(object.get("ttl_ms"))?,
        },
        other => {
            return Err(ApiError::new(
                ErrorCode::UnknownAction,
                format!("unknown hold action `{}`", truncate(other, 64)),
            ))
        }
    };
    Ok(ClientRequest::Write(WriteRequest {
        batch: false,
        ops: Vec::new(),
        idempotency_key: parse_key(object.get("idempotency_key"))?,
        hold: Some(HoldCommand { hold, action }),
    }))
}

/// An integer JSON number (`5`, not `5.0` or `"5"`), widened so that out-of-range values can be
/// reported as sent.
fn integer(value: &Value) -> Option<i128> {
    match value {
        Value::Number(n) => n
            .as_u64()
            .map(i128::from)
            .or_else(|| n.as_i64().map(i128::from)),
        _ => None,
    }
}

pub fn parse_key(value: Option<&Value>) -> Result<Option<String>, ApiError> {
    match value {
        // `null` is not "no key", as with `if_version`: a client that meant to send a key and
        // sent none would have its retry applied twice.
        None => Ok(None),
        Some(Value::String(key)) if key_is_valid(key) => Ok(Some(key.clone())),
        Some(_) => Err(ApiError::bad_request(
            "`idempotency_key` must be a string of 1 to 128 bytes",
        )),
    }
}

/// Two places may carry a key (message and op, header and body): they must agree.
pub fn merge_keys(a: Option<String>, b: Option<String>) -> Result<Option<String>, ApiError> {
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(ApiError::bad_request(
            "two different idempotency keys on one request",
        )),
        (Some(a), _) => Ok(Some(a)),
        (None, b) => Ok(b),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClientRequest, ApiError> {
        parse_message(text, &MessageLimits::default()).request
    }

    fn code(text: &str) -> ErrorCode {
        parse(text).expect_err(text).code
    }

    #[test]
    fn valid_messages() {
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientRequest::Ping);
        assert_eq!(
            parse(r#"{"type":"subscribe","skus":["a","*"]}"#).unwrap(),
            ClientRequest::Subscribe(vec!["a".into(), "*".into()])
        );
        let write = parse(r#"{"type":"stock_update","stock":{"id":"a","action":"increase","change":5,"quantity":9}}"#).unwrap();
        let ClientRequest::Write(w) = write else {
            panic!()
        };
        assert_eq!(
            w.ops[0],
            OpSpec {
                sku: "a".into(),
                action: Action::Increase,
                amount: 5,
                if_version: None,
                hold: None,
                ttl_ms: None,
            }
        );
        let batch = parse(r#"{"type":"stock_batch","idempotency_key":"k","ops":[{"id":"a","action":"set","quantity":0,"if_version":3}]}"#).unwrap();
        let ClientRequest::Write(w) = batch else {
            panic!()
        };
        assert!(w.batch);
        assert_eq!(w.idempotency_key.as_deref(), Some("k"));
        assert_eq!(w.ops[0].if_version, Some(3));
    }

    #[test]
    fn id_is_echoed_even_on_errors() {
        let parsed = parse_message(r#"{"id":7,"type":"nope"}"#, &MessageLimits::default());
        assert_eq!(parsed.id, Some(Value::from(7)));
        assert_eq!(parsed.request.unwrap_err().code, ErrorCode::UnknownType);
    }

    #[test]
    fn error_codes_table() {
        let cases = [
            ("not json", ErrorCode::BadRequest),
            ("[1,2]", ErrorCode::BadRequest),
            (r#"{"skus":[]}"#, ErrorCode::BadRequest),
            (r#"{"type":5}"#, ErrorCode::BadRequest),
            (r#"{"type":"launch"}"#, ErrorCode::UnknownType),
            (r#"{"type":"subscribe"}"#, ErrorCode::BadRequest),
            (r#"{"type":"subscribe","skus":"a"}"#, ErrorCode::BadRequest),
            (
                r#"{"type":"subscribe","skus":["bad sku"]}"#,
                ErrorCode::InvalidSku,
            ),
            (r#"{"type":"get","skus":["*"]}"#, ErrorCode::InvalidSku),
            (r#"{"type":"get","skus":[1]}"#, ErrorCode::InvalidSku),
            (r#"{"type":"stock_update"}"#, ErrorCode::BadRequest),
            (
                r#"{"type":"stock_update","stock":{"action":"set","quantity":1}}"#,
                ErrorCode::InvalidSku,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"batch","action":"set","quantity":1}}"#,
                ErrorCode::InvalidSku,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"steal","change":1}}"#,
                ErrorCode::UnknownAction,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","change":1}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"increase"}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"increase","change":1.5}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"increase","change":"1"}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"increase","change":0}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"reserve","change":1000000001}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"set","quantity":-1}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"set","quantity":1000000000001}}"#,
                ErrorCode::InvalidChange,
            ),
            (
                r#"{"type":"stock_update","stock":{"id":"a","action":"set","quantity":1,"if_version":-2}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"stock_update","idempotency_key":"x","stock":{"id":"a","action":"set","quantity":1,"idempotency_key":"y"}}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"type":"stock_update","idempotency_key":"","stock":{"id":"a","action":"set","quantity":1}}"#,
                ErrorCode::BadRequest,
            ),
            (r#"{"type":"stock_batch","ops":[]}"#, ErrorCode::BadRequest),
            (r#"{"type":"stock_batch","ops":{}}"#, ErrorCode::BadRequest),
        ];
        for (text, expected) in cases {
            assert_eq!(code(text), expected, "{text}");
        }
    }

    #[test]
    fn limits_give_too_large() {
        let limits = MessageLimits {
            skus_per_message_max: 2,
            batch_ops_max: 1,
        };
        let r = parse_message(r#"{"type":"get","skus":["a","b","c"]}"#, &limits).request;
        assert_eq!(r.unwrap_err().code, ErrorCode::TooLarge);
        let op = r#"{"id":"a","action":"set","quantity":1}"#;
        let text = format!(r#"{{"type":"stock_batch","ops":[{op},{op}]}}"#);
        assert_eq!(
            parse_message(&text, &limits).request.unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn batch_errors_carry_the_index() {
        let e = parse(r#"{"type":"stock_batch","ops":[{"id":"a","action":"set","quantity":1},{"id":"a","action":"x"}]}"#)
            .unwrap_err();
        assert_eq!((e.code, e.index), (ErrorCode::UnknownAction, Some(1)));
    }

    #[test]
    fn same_key_in_message_and_op_is_fine_and_fingerprints_match_across_forms() {
        let a = parse(r#"{"type":"stock_update","idempotency_key":"k","stock":{"id":"a","action":"reserve","change":2,"idempotency_key":"k"}}"#).unwrap();
        let b = parse(r#"{"type":"stock_update","stock":{"id":"a","action":"reserve","change":2,"idempotency_key":"k"}}"#).unwrap();
        let (ClientRequest::Write(a), ClientRequest::Write(b)) = (a, b) else {
            panic!()
        };
        assert_eq!(a.fingerprint(), b.fingerprint());
        let c =
            parse(r#"{"type":"stock_update","stock":{"id":"a","action":"reserve","change":3}}"#)
                .unwrap();
        let ClientRequest::Write(c) = c else { panic!() };
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
