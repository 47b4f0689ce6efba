//! A typed, borrowing parse of the messages that carry the load: `stock_update`, `stock_batch`,
//! `subscribe`, `unsubscribe`, `get` and `ping`.
//!
//! The general parse in [`super::messages`] builds a `serde_json::Value` tree (a `BTreeMap` per
//! object, a `String` per key and value) and then walks it; for a single write that was most of
//! the CPU the server spent on it (callgrind: about 8,000 of 21,000 instructions per op). Here
//! the JSON is read straight into a struct whose strings borrow from the message (or own their
//! text when it has escapes, as PHP's `\/` for `/`).
//!
//! This parse only ever accepts: it answers `None` for anything it cannot represent exactly (a
//! `null` where the contract refuses one, a repeated field, an unknown type) or that would be
//! refused, and the caller then runs the general parse, which owns every error message. So a
//! message gets the same answer from both, which a differential test below checks.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::ops::Deref;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::messages::{check_sku, MessageLimits, OpSpec, Parsed, WILDCARD};
use super::{ClientRequest, WriteRequest};
use crate::stock::idempotency::key_is_valid;
use crate::stock::{holds, Action, Op};

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Text<'a>>,
    #[serde(default, deserialize_with = "echo_id")]
    id: Option<Value>,
    #[serde(borrow)]
    stock: Option<Object<OpFields<'a>>>,
    #[serde(borrow)]
    ops: Option<Vec<Object<OpFields<'a>>>>,
    #[serde(borrow)]
    skus: Option<Vec<Text<'a>>>,
    #[serde(default, deserialize_with = "not_null", borrow)]
    idempotency_key: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct OpFields<'a> {
    #[serde(borrow)]
    id: Option<Text<'a>>,
    #[serde(borrow)]
    action: Option<Text<'a>>,
    change: Option<i64>,
    quantity: Option<i64>,
    #[serde(default, deserialize_with = "not_null")]
    if_version: Option<u64>,
    #[serde(default, deserialize_with = "not_null", borrow)]
    idempotency_key: Option<Text<'a>>,
    #[serde(borrow)]
    hold: Option<Text<'a>>,
    ttl_ms: Option<u64>,
}

/// A JSON object and nothing else: a derived struct also takes an array of its fields in order
/// (`["ping","x"]`), which the contract refuses.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }

        deserializer.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// A JSON string, borrowed from the message unless it has escapes.
struct Text<'a>(Cow<'a, str>);

impl Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// A field the contract refuses as `null` ("null is not absent"): present means a value, so a
/// `null` fails this parse and the general one says why.
fn not_null<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// The message `id`, echoed in the reply: a string or a number, nothing else (not `null`).
fn echo_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    struct IdVisitor;

    impl<'de> Visitor<'de> for IdVisitor {
        type Value = Value;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or a number")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
            serde_json::Number::from_f64(v)
                .map(Value::Number)
                .ok_or_else(|| E::custom("not a finite number"))
        }
    }

    deserializer.deserialize_any(IdVisitor).map(Some)
}

/// The message as the general parse would read it, when it is one this parse can stand for.
pub(super) fn parse(text: &str, limits: &MessageLimits) -> Option<Parsed> {
    let Object(message) = serde_json::from_str::<Object<Message>>(text).ok()?;
    let request = match message.kind.as_deref()? {
        "ping" => ClientRequest::Ping,
        "subscribe" => ClientRequest::Subscribe(skus(message.skus?, limits, true)?),
        "unsubscribe" => ClientRequest::Unsubscribe(skus(message.skus?, limits, true)?),
        "get" => ClientRequest::Get(skus(message.skus?, limits, false)?),
        "stock_update" => {
            let stock = message.stock?;
            let (op, op_key) = op(&stock.0)?;
            let key = match (key(message.idempotency_key.as_deref())?, op_key) {
                (Some(a), Some(b)) if a != b => return None,
                (a, b) => a.or(b),
            };
            ClientRequest::Write(WriteRequest {
                batch: false,
                ops: vec![op],
                idempotency_key: key.map(str::to_owned),
                hold: None,
            })
        }
        "stock_batch" => {
            let fields = message.ops?;
            if fields.is_empty() || fields.len() > limits.batch_ops_max {
                return None;
            }
            let mut ops = Vec::with_capacity(fields.len());
            for fields in &fields {
                // A key on an op of a batch is checked and not used (the batch's own counts).
                ops.push(op(&fields.0)?.0);
            }
            ClientRequest::Write(WriteRequest {
                batch: true,
                ops,
                idempotency_key: key(message.idempotency_key.as_deref())?.map(str::to_owned),
                hold: None,
            })
        }
        _ => return None,
    };
    Some(Parsed {
        id: message.id,
        request: Ok(request),
    })
}

fn skus(names: Vec<Text<'_>>, limits: &MessageLimits, wildcard_ok: bool) -> Option<Vec<String>> {
    if names.len() > limits.skus_per_message_max {
        return None;
    }
    names
        .into_iter()
        .map(|name| {
            let ok = (wildcard_ok && &*name == WILDCARD) || check_sku(&name).is_ok();
            ok.then(|| name.0.into_owned())
        })
        .collect()
}

/// `Some(None)`: no key; `None`: a key the contract refuses.
fn key(key: Option<&str>) -> Option<Option<&str>> {
    match key {
        None => Some(None),
        Some(key) => key_is_valid(key).then_some(Some(key)),
    }
}

fn op<'f>(fields: &'f OpFields<'_>) -> Option<(OpSpec, Option<&'f str>)> {
    let sku = fields.id.as_deref()?;
    check_sku(sku).ok()?;
    let action = Action::parse(fields.action.as_deref()?)?;
    let sent = match action.amount_field() {
        "quantity" => fields.quantity,
        _ => fields.change,
    };
    let amount = Op::check_amount(action, sent.map(i128::from)).ok()?;
    let op_key = key(fields.idempotency_key.as_deref())?;
    let hold = match fields.hold.as_deref() {
        None => None,
        Some(hold) if action == Action::Reserve && holds::hold_id_is_valid(hold) => Some(hold),
        Some(_) => return None,
    };
    let ttl_ms = match (hold, fields.ttl_ms) {
        (Some(_), Some(ttl_ms)) if (holds::TTL_MS_MIN..=holds::TTL_MS_MAX).contains(&ttl_ms) => {
            Some(ttl_ms)
        }
        (Some(_), Some(_)) => return None,
        _ => None,
    };
    Some((
        OpSpec {
            sku: sku.to_owned(),
            action,
            amount,
            if_version: fields.if_version,
            hold: hold.map(str::to_owned),
            ttl_ms,
        },
        op_key,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::messages::{parse_general, parse_message};
    use super::*;
    use proptest::prelude::*;

    fn same(text: &str, limits: &MessageLimits) {
        let general = parse_general(text, limits);
        let both = parse_message(text, limits);
        assert_eq!(both.id, general.id, "id of {text}");
        assert_eq!(both.request, general.request, "request of {text}");
    }

    #[test]
    fn the_hot_messages_take_this_parse() {
        let limits = MessageLimits::default();
        for text in [
            r#"{"type":"ping","id":1}"#,
            r#"{"type":"subscribe","skus":["a","*"],"id":"x"}"#,
            r#"{"type":"get","skus":["a","b"]}"#,
            r#"{"type":"stock_update","id":-3,"stock":{"id":"a","action":"increase","change":5}}"#,
            r#"{"type":"stock_update","idempotency_key":"k","stock":{"id":"a","action":"reserve","change":2,"hold":"cart-1","ttl_ms":60000,"idempotency_key":"k"}}"#,
            r#"{"type":"stock_batch","id":2.5,"ops":[{"id":"a","action":"set","quantity":0,"if_version":3},{"id":"b","action":"commit","change":1}]}"#,
            // Escapes (PHP's json_encode writes `/` as `\/`) are read, not passed on.
            r#"{"type":"get","skus":["a\/b"]}"#,
            r#"{"type":"stock_update","stock":{"id":"shirt\/red","action":"reserve","change":1,"hold":"cart\/1","ttl_ms":60000},"idempotency_key":"k\u0041"}"#,
        ] {
            assert!(parse(text, &limits).is_some(), "{text}");
            same(text, &limits);
        }
    }

    #[test]
    fn what_it_cannot_stand_for_goes_to_the_general_parse() {
        let limits = MessageLimits {
            skus_per_message_max: 2,
            batch_ops_max: 2,
        };
        for text in [
            // Arrays where the contract wants objects (a derived struct would take them as its
            // fields in order), a repeated field, nulls the contract refuses.
            r#"["ping","x",null,null,null]"#,
            r#"{"type":"stock_update","stock":["sku-1","increase",5,null,0,"k",null,null]}"#,
            r#"{"type":"stock_batch","ops":[["sku-1","increase",5]]}"#,
            r#"{"type":"ping","type":"ping"}"#,
            r#"{"type":"ping","id":null}"#,
            r#"{"type":"stock_update","stock":{"id":"a","action":"set","quantity":1,"if_version":null}}"#,
            r#"{"type":"stock_update","idempotency_key":null,"stock":{"id":"a","action":"set","quantity":1}}"#,
            // Refusals, whose messages the general parse writes.
            r#"{"type":"get","skus":["*"]}"#,
            r#"{"type":"get","skus":["a","b","c"]}"#,
            r#"{"type":"stock_batch","ops":[]}"#,
            r#"{"type":"stock_update","idempotency_key":"x","stock":{"id":"a","action":"set","quantity":1,"idempotency_key":"y"}}"#,
            r#"{"type":"stock_update","stock":{"id":"a","action":"increase","change":1.0}}"#,
            r#"{"type":"stock_update","stock":{"id":"a","action":"release","change":1,"hold":"h"}}"#,
            r#"{"type":"stock_update","stock":{"id":"a","action":"reserve","change":1,"hold":"h","ttl_ms":5}}"#,
            r#"{"type":"hold","action":"get","hold":"h"}"#,
            r#"{"id":[1],"type":"ping"}"#,
        ] {
            assert!(parse(text, &limits).is_none(), "{text}");
            same(text, &limits);
        }
    }

    /// A field left out (weight `absent`), with a plausible value (weight 16) or with a wrong
    /// one (weight 1): wrong type, `null`, escaped, out of range.
    fn field(
        name: &'static str,
        absent: u32,
        good: &'static [&'static str],
        bad: &'static [&'static str],
    ) -> BoxedStrategy<Option<String>> {
        let named = move |v: &'static str| Some(format!("\"{name}\":{v}"));
        prop_oneof![
            absent => Just(None),
            16 => proptest::sample::select(good).prop_map(named),
            1 => proptest::sample::select(bad).prop_map(named),
        ]
        .boxed()
    }

    /// An op: mostly plausible, with every field sometimes of the wrong type, `null`, escaped,
    /// out of range or repeated.
    fn op() -> impl Strategy<Value = String> {
        let fields = (
            field(
                "id",
                1,
                &["\"a\"", "\"sku-1\""],
                &["\"a\\/b\"", "\"\"", "\"batch\"", "\"b c\"", "1", "null"],
            ),
            field(
                "action",
                1,
                &["\"increase\"", "\"set\"", "\"reserve\"", "\"release\""],
                &["\"steal\"", "null", "1"],
            ),
            field(
                "change",
                1,
                &["1", "5"],
                &[
                    "0",
                    "-1",
                    "1.5",
                    "2.0",
                    "\"1\"",
                    "null",
                    "18446744073709551616",
                    "1000000001",
                ],
            ),
            field(
                "quantity",
                1,
                &["0", "7"],
                &["-1", "1e3", "null", "1000000000001"],
            ),
            field(
                "if_version",
                6,
                &["0", "3"],
                &["-2", "null", "\"3\"", "1.0"],
            ),
            field(
                "idempotency_key",
                6,
                &["\"k\"", "\"j\""],
                &["\"\"", "null", "1", "\"k\\u0041\""],
            ),
            field("hold", 30, &["\"cart-1\"", "null"], &["\"bad hold\"", "1"]),
            field("ttl_ms", 6, &["60000", "null"], &["5", "\"x\"", "86400001"]),
            field("action", 80, &["\"set\""], &["\"increase\""]),
            field("other", 6, &["[1,{\"a\":null}]"], &["\"x\""]),
        );
        fields.prop_map(|f| {
            // The second `action`, when there, is a repeated field.
            let all = [f.0, f.1, f.2, f.3, f.4, f.5, f.6, f.7, f.8, f.9];
            let body: Vec<String> = all.into_iter().flatten().collect();
            format!("{{{}}}", body.join(","))
        })
    }

    /// Messages built from the fields the contract knows, each sometimes wrong in some way.
    fn message() -> impl Strategy<Value = String> {
        let kind = proptest::sample::select(
            &[
                "\"stock_update\"",
                "\"stock_update\"",
                "\"stock_batch\"",
                "\"stock_batch\"",
                "\"subscribe\"",
                "\"unsubscribe\"",
                "\"get\"",
                "\"ping\"",
                "\"hold\"",
                "null",
                "5",
            ][..],
        );
        let id = field(
            "id",
            2,
            &["1", "\"r-1\"", "-4", "2.5"],
            &["null", "[1]", "{}", "\"a\\\"b\""],
        );
        // An op or a message is sometimes an array of values: never accepted as an object.
        let stock = prop_oneof![
            1 => Just(None),
            6 => op().prop_map(Some),
            1 => Just(Some("null".into())),
            1 => Just(Some("[\"a\",\"increase\",1]".into())),
        ];
        let ops = prop_oneof![
            1 => Just(None),
            5 => proptest::collection::vec(op(), 0..5).prop_map(|ops| Some(format!("[{}]", ops.join(",")))),
            1 => Just(Some("{}".to_string())),
        ];
        let skus = prop_oneof![
            1 => Just(None),
            3 => proptest::collection::vec(
                proptest::sample::select(&["\"a\"", "\"*\"", "\"b c\"", "1", "\"x\\/y\"", "\"sku-2\""][..]),
                0..5,
            )
            .prop_map(|names| Some(format!("[{}]", names.join(",")))),
        ];
        let key = field("idempotency_key", 6, &["\"k\"", "\"j\""], &["\"\"", "null"]);
        (kind, id, stock, ops, skus, key, any::<bool>(), any::<u8>()).prop_map(
            |(kind, id, stock, ops, skus, key, type_twice, shape)| {
                if shape % 16 == 0 {
                    return format!("[{kind},\"r-1\",null,null,null]");
                }
                let mut body = vec![format!("\"type\":{kind}")];
                body.extend(id);
                body.extend(stock.map(|s| format!("\"stock\":{s}")));
                body.extend(ops.map(|s| format!("\"ops\":{s}")));
                body.extend(skus.map(|s| format!("\"skus\":{s}")));
                body.extend(key);
                if type_twice && kind == "null" {
                    body.push("\"type\":\"ping\"".into());
                }
                format!("{{{}}}", body.join(","))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn both_parses_answer_every_message_alike(text in message()) {
            same(&text, &MessageLimits { skus_per_message_max: 3, batch_ops_max: 3 });
        }
    }
}
