//! The JSON of every reply, written straight into a frame or body buffer: no intermediate
//! value tree, one buffer per reply (or per broadcast, shared by every subscriber).
//!
//! SKU ids are validated `[A-Za-z0-9._:/-]`, so they are written without escaping; free text
//! (error messages, echoed ids) goes through serde_json's escaping.

use std::io::Write;

use serde_json::Value;

use super::error::ApiError;
use crate::net::Frame;
use crate::stock::Stock;
use crate::ws::frame::{FrameWriter, OpCode};

/// Writes a state object `{"id":..,"quantity":..,"on_hand":..,"reserved":..,"version":..}`.
///
/// Pieces and integers written directly rather than through `write!`: the formatting machinery
/// (`fmt::write`, `pad_integral`) was a tenth of the instructions of a write's whole path.
pub fn write_state<W: Write>(out: &mut W, name: &str, stock: Stock) {
    // Writing into memory cannot fail (Vec and FrameWriter never return errors).
    let _ = out.write_all(br#"{"id":""#);
    let _ = out.write_all(name.as_bytes());
    let _ = out.write_all(br#"","quantity":"#);
    write_u64(out, stock.quantity());
    let _ = out.write_all(br#","on_hand":"#);
    write_u64(out, stock.on_hand);
    let _ = out.write_all(br#","reserved":"#);
    write_u64(out, stock.reserved);
    let _ = out.write_all(br#","version":"#);
    write_u64(out, stock.version);
    let _ = out.write_all(b"}");
}

/// An integer in decimal.
pub fn write_u64<W: Write>(out: &mut W, n: u64) {
    let _ = out.write_all(itoa::Buffer::new().format(n).as_bytes());
}

pub fn write_states<'a, W: Write>(out: &mut W, states: impl IntoIterator<Item = (&'a str, Stock)>) {
    let _ = out.write_all(b"[");
    for (i, (name, stock)) in states.into_iter().enumerate() {
        if i > 0 {
            let _ = out.write_all(b",");
        }
        write_state(out, name, stock);
    }
    let _ = out.write_all(b"]");
}

fn write_head<W: Write>(out: &mut W, kind: &str, id: Option<&Value>) {
    let _ = out.write_all(br#"{"type":""#);
    let _ = out.write_all(kind.as_bytes());
    let _ = out.write_all(b"\"");
    if let Some(id) = id {
        let _ = out.write_all(br#","id":"#);
        let _ = serde_json::to_writer(&mut *out, id);
    }
}

/// Builds one text frame by writing its JSON payload in place.
pub fn frame(build: impl FnOnce(&mut FrameWriter)) -> Frame {
    let mut writer = FrameWriter::with_capacity(OpCode::Text, 128);
    build(&mut writer);
    crate::app::data_frame(writer.finish())
}

/// `{"type":"stock_update","stock":STATE}`: the broadcast, built once per change.
pub fn stock_update(name: &str, stock: Stock) -> Frame {
    frame(|out| {
        let _ = out.write_all(br#"{"type":"stock_update","stock":"#);
        write_state(out, name, stock);
        let _ = out.write_all(b"}");
    })
}

/// A reply of `kind` carrying `"stock": [..]` (subscribed, stock).
pub fn with_states<'a>(
    kind: &str,
    id: Option<&Value>,
    states: impl IntoIterator<Item = (&'a str, Stock)>,
) -> Frame {
    frame(|out| {
        write_head(out, kind, id);
        let _ = out.write_all(br#","stock":"#);
        write_states(out, states);
        let _ = out.write_all(b"}");
    })
}

/// One chunk of a snapshot reply (PROTOCOL.md "Limits"): `{"type":KIND,"id":..,"stock":[..]}`
/// with states taken from `states` while their JSON stays within `chunk_bytes_max` (at least
/// one state, so no chunk is ever empty of progress). Each state comes with its position in the
/// scan; the position of the first state left out is returned, and the reply then says
/// `"more":true`. A `continuation` chunk (type `snapshot`) that ends the scan says
/// `"more":false`; a first chunk that holds everything has no `more`, as before chunking.
pub fn states_chunk<'a>(
    kind: &str,
    id: Option<&Value>,
    continuation: bool,
    states: impl Iterator<Item = (usize, &'a str, Stock)>,
    chunk_bytes_max: usize,
) -> (Frame, Option<usize>) {
    let mut rest = None;
    let frame = frame(|out| {
        write_head(out, kind, id);
        let _ = out.write_all(br#","stock":["#);
        let mut scratch = Vec::with_capacity(256);
        let mut states_bytes = 0;
        for (position, name, stock) in states {
            scratch.clear();
            if states_bytes > 0 {
                scratch.push(b',');
            }
            write_state(&mut scratch, name, stock);
            if states_bytes > 0 && states_bytes + scratch.len() > chunk_bytes_max {
                rest = Some(position);
                break;
            }
            states_bytes += scratch.len();
            let _ = out.write_all(&scratch);
        }
        let _ = out.write_all(b"]");
        match (rest.is_some(), continuation) {
            (true, _) => {
                let _ = out.write_all(br#","more":true"#);
            }
            (false, true) => {
                let _ = out.write_all(br#","more":false"#);
            }
            (false, false) => {}
        }
        let _ = out.write_all(b"}");
    });
    (frame, rest)
}

/// A reply with only a type (pong, unsubscribed).
pub fn bare(kind: &str, id: Option<&Value>) -> Frame {
    frame(|out| {
        write_head(out, kind, id);
        let _ = out.write_all(b"}");
    })
}

/// `{"type":"ack",..}`: one state for a single op, an array for a batch.
pub fn ack(id: Option<&Value>, batch: bool, states: &[(&str, Stock)], duplicate: bool) -> Frame {
    frame(|out| {
        write_head(out, "ack", id);
        let _ = out.write_all(br#","stock":"#);
        match (batch, states.first()) {
            (false, Some(&(name, stock))) => write_state(out, name, stock),
            _ => write_states(out, states.iter().copied()),
        }
        if duplicate {
            let _ = out.write_all(br#","duplicate":true"#);
        }
        let _ = out.write_all(b"}");
    })
}

/// `{"id":HOLD,"expires_in_ms":N,"lines":[{"id":SKU,"units":N}...]}` (PROTOCOL.md "Holds").
pub fn write_hold<'a, W: Write>(
    out: &mut W,
    hold: &str,
    expires_in_ms: u64,
    lines: impl IntoIterator<Item = (&'a str, u64)>,
) {
    // Hold ids and SKU ids are validated `[A-Za-z0-9._:/-]`: no escaping needed.
    let _ = write!(
        out,
        r#"{{"id":"{hold}","expires_in_ms":{expires_in_ms},"lines":["#
    );
    for (i, (sku, units)) in lines.into_iter().enumerate() {
        if i > 0 {
            let _ = out.write_all(b",");
        }
        let _ = write!(out, r#"{{"id":"{sku}","units":{units}}}"#);
    }
    let _ = out.write_all(b"]}");
}

/// `{"type":"hold","hold":{..}}`: the reply to a hold `get` or `extend`.
pub fn hold<'a>(
    id: Option<&Value>,
    hold: &str,
    expires_in_ms: u64,
    lines: impl IntoIterator<Item = (&'a str, u64)>,
    duplicate: bool,
) -> Frame {
    frame(|out| {
        write_head(out, "hold", id);
        let _ = out.write_all(br#","hold":"#);
        write_hold(out, hold, expires_in_ms, lines);
        if duplicate {
            let _ = out.write_all(br#","duplicate":true"#);
        }
        let _ = out.write_all(b"}");
    })
}

/// `{"type":KIND,"hold":HOLD,"stock":[states]}`: the ack of a hold commit / release (`ack`),
/// and the push to the holder when it expired (`hold_expired`).
pub fn hold_states(
    kind: &str,
    id: Option<&Value>,
    hold: &str,
    states: &[(&str, Stock)],
    duplicate: bool,
) -> Frame {
    frame(|out| {
        write_head(out, kind, id);
        let _ = write!(out, r#","hold":"{hold}","stock":"#);
        write_states(out, states.iter().copied());
        if duplicate {
            let _ = out.write_all(br#","duplicate":true"#);
        }
        let _ = out.write_all(b"}");
    })
}

/// HTTP body `{"hold":HOLD,"stock":[states]}` (+ duplicate).
pub fn http_hold_states_body(hold: &str, states: &[(&str, Stock)], duplicate: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + 96 * states.len());
    let _ = write!(out, r#"{{"hold":"{hold}","stock":"#);
    write_states(&mut out, states.iter().copied());
    if duplicate {
        out.extend_from_slice(br#","duplicate":true"#);
    }
    out.push(b'}');
    out
}

/// HTTP body `{"hold":{..}}` (+ duplicate).
pub fn http_hold_body<'a>(
    hold: &str,
    expires_in_ms: u64,
    lines: impl IntoIterator<Item = (&'a str, u64)>,
    duplicate: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(br#"{"hold":"#);
    write_hold(&mut out, hold, expires_in_ms, lines);
    if duplicate {
        out.extend_from_slice(br#","duplicate":true"#);
    }
    out.push(b'}');
    out
}

fn write_error_fields<W: Write>(out: &mut W, error: &ApiError) {
    let _ = write!(out, r#""code":"{}","message":"#, error.code.as_str());
    let _ = serde_json::to_writer(&mut *out, &error.message);
    if let Some(index) = error.index {
        let _ = write!(out, r#","index":{index}"#);
    }
    if let Some((name, stock)) = &error.stock {
        let _ = out.write_all(br#","stock":"#);
        write_state(out, name, *stock);
    }
}

/// `{"type":"error","id":..,"code":..,"message":..}` (+ index, + stock).
pub fn error(id: Option<&Value>, error: &ApiError) -> Frame {
    frame(|out| {
        write_head(out, "error", id);
        let _ = out.write_all(b",");
        write_error_fields(out, error);
        let _ = out.write_all(b"}");
    })
}

/// HTTP error body: `{"error":{"code":..,"message":..}}`.
pub fn http_error_body(error: &ApiError) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + error.message.len());
    out.extend_from_slice(br#"{"error":{"#);
    write_error_fields(&mut out, error);
    out.extend_from_slice(b"}}");
    out
}

/// HTTP success body `{"stock":STATE or [STATES]}` (+ `"duplicate":true`).
pub fn http_stock_body(states: &[(&str, Stock)], as_list: bool, duplicate: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + 96 * states.len());
    out.extend_from_slice(br#"{"stock":"#);
    match (as_list, states.first()) {
        (false, Some(&(name, stock))) => write_state(&mut out, name, stock),
        _ => write_states(&mut out, states.iter().copied()),
    }
    if duplicate {
        out.extend_from_slice(br#","duplicate":true"#);
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorCode;

    fn payload(frame: &Frame) -> Value {
        // Server frames are unmasked; small payloads have a 2-byte header.
        let len = if frame[1] == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[len..]).unwrap()
    }

    #[test]
    fn replies_are_valid_json_with_contract_fields() {
        let s = Stock {
            on_hand: 10,
            reserved: 3,
            version: 4,
        };
        let v = payload(&stock_update("sku-1", s));
        assert_eq!(v["type"], "stock_update");
        assert_eq!(v["stock"]["quantity"], 7);
        assert_eq!(v["stock"]["on_hand"], 10);
        assert_eq!(v["stock"]["reserved"], 3);
        assert_eq!(v["stock"]["version"], 4);
        assert_eq!(v["stock"]["id"], "sku-1");

        let id = Value::from("req \"1\"");
        let v = payload(&ack(
            Some(&id),
            true,
            &[("a", s), ("b", Stock::default())],
            true,
        ));
        assert_eq!(v["id"], "req \"1\"");
        assert_eq!(v["stock"].as_array().unwrap().len(), 2);
        assert_eq!(v["duplicate"], true);

        let mut e = ApiError::new(ErrorCode::VersionConflict, "conflict \u{1F600}").at(Some(2));
        e.stock = Some(("a".into(), s));
        let v = payload(&error(Some(&Value::from(5)), &e));
        assert_eq!(v["code"], "version_conflict");
        assert_eq!(v["index"], 2);
        assert_eq!(v["stock"]["version"], 4);
        assert_eq!(v["id"], 5);

        let body: Value = serde_json::from_slice(&http_error_body(&e)).unwrap();
        assert_eq!(body["error"]["code"], "version_conflict");
        let body: Value =
            serde_json::from_slice(&http_stock_body(&[("a", s)], false, false)).unwrap();
        assert_eq!(body["stock"]["version"], 4);

        let v = payload(&hold(
            Some(&Value::from(1)),
            "h",
            250,
            [("a", 2), ("b", 1)],
            false,
        ));
        assert_eq!(v["type"], "hold");
        assert_eq!(v["hold"]["id"], "h");
        assert_eq!(v["hold"]["expires_in_ms"], 250);
        assert_eq!(v["hold"]["lines"][1]["id"], "b");
        assert_eq!(v["hold"]["lines"][1]["units"], 1);
        let v = payload(&hold_states("hold_expired", None, "h", &[("a", s)], false));
        assert_eq!(v["type"], "hold_expired");
        assert_eq!(v["stock"][0]["reserved"], 3);
        let body: Value =
            serde_json::from_slice(&http_hold_states_body("h", &[("a", s)], true)).unwrap();
        assert_eq!(
            (body["hold"].as_str(), body["duplicate"].as_bool()),
            (Some("h"), Some(true))
        );
        let body: Value = serde_json::from_slice(&http_hold_body("h", 5, [], false)).unwrap();
        assert_eq!(body["hold"]["lines"], serde_json::json!([]));
    }
}
