//! The write path with the network taken out: parse a client message, apply it to the store,
//! serialise and frame the ack and the broadcast (issue 3 aims at >= 200,000 single ops/s on
//! one core).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use stocksync::api::messages::{parse_message, ClientRequest, MessageLimits};
use stocksync::api::reply;
use stocksync::stock::{Stock, Store};

const SKUS: usize = 10_000;

fn messages(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let sku = i % SKUS;
            match i % 4 {
                0 => format!(r#"{{"type":"stock_update","id":{i},"stock":{{"id":"sku-{sku}","action":"increase","change":5}}}}"#),
                1 => format!(r#"{{"type":"stock_update","id":{i},"stock":{{"id":"sku-{sku}","action":"reserve","change":1}}}}"#),
                2 => format!(r#"{{"type":"stock_update","id":{i},"stock":{{"id":"sku-{sku}","action":"commit","change":1}}}}"#),
                _ => format!(r#"{{"type":"stock_update","id":{i},"stock":{{"id":"sku-{sku}","action":"set","quantity":100}}}}"#),
            }
        })
        .collect()
}

/// One op through parse -> intern -> apply -> ack frame + broadcast frame.
fn one(store: &mut Store, limits: &MessageLimits, text: &str) -> usize {
    let parsed = parse_message(text, limits);
    let Ok(ClientRequest::Write(write)) = parsed.request else {
        panic!("bench input is a write")
    };
    let spec = &write.ops[0];
    let sku = store.intern(&spec.sku).expect("valid sku");
    let op = spec.bind(sku);
    let applied = match store.apply(&[op]) {
        Ok(applied) => applied,
        Err(_) => return 0,
    };
    let states: Vec<(&str, Stock)> = vec![(store.name(sku), applied.results[0])];
    let ack = reply::ack(parsed.id.as_ref(), false, &states, false);
    let update = reply::stock_update(store.name(sku), applied.changed[0].1);
    ack.len() + update.len()
}

fn write_path(c: &mut Criterion) {
    let limits = MessageLimits::default();
    let input = messages(40_000);
    let mut store = Store::new();
    for i in 0..SKUS {
        let sku = store.intern(&format!("sku-{i}")).unwrap();
        let op = stocksync::stock::Op::new(sku, stocksync::stock::Action::Set, 1_000_000);
        store.apply(&[op]).unwrap();
    }
    let mut group = c.benchmark_group("write_path");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("single_op_parse_apply_frame", |b| {
        b.iter(|| {
            i = (i + 1) % input.len();
            black_box(one(&mut store, &limits, &input[i]))
        })
    });
    group.bench_function("parse_only", |b| {
        b.iter(|| {
            i = (i + 1) % input.len();
            black_box(parse_message(&input[i], &limits).request.is_ok())
        })
    });
    group.bench_function("broadcast_frame_only", |b| {
        let s = Stock {
            on_hand: 1234,
            reserved: 56,
            version: 789,
        };
        b.iter(|| black_box(reply::stock_update("sku-1234", s).len()))
    });
    group.finish();
}

criterion_group!(benches, write_path);
criterion_main!(benches);
