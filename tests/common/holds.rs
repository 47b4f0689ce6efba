//! Helpers shared by the holds suites (tests/holds.rs on either engine, tests/redis_holds.rs
//! across processes).

use serde_json::{json, Value};

use super::{request, Ws};

/// A `hold` message (`commit`, `release`, `get`, ...) and its answer.
pub fn hold_msg(ws: &mut Ws, action: &str, hold: &str) -> Value {
    request(ws, json!({"type":"hold","action":action,"hold":hold}))
}

/// The state of `sku` as `get` shows it.
pub fn state(ws: &mut Ws, sku: &str) -> Value {
    let reply = request(ws, json!({"type":"get","skus":[sku]}));
    reply["stock"][0].clone()
}

/// (quantity, on_hand, reserved, version) of a state.
pub fn q(state: &Value) -> (u64, u64, u64, u64) {
    let n = |f: &str| state[f].as_u64().unwrap();
    (n("quantity"), n("on_hand"), n("reserved"), n("version"))
}
