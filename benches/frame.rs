//! RFC 6455 framing costs in isolation: server frame encoding (plain copy and `FrameWriter` +
//! serde_json, which is how a broadcast is built once), client payload unmasking, and decoding of
//! single frames and of a read buffer holding 100 frames.
//!
//! `cargo bench --bench frame`; results and method in docs/BENCHMARKS.md.

use std::time::Duration;

use criterion::{
    black_box, criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput,
};
use serde::Serialize;
use stocksync::app::json_frame;
use stocksync::ws::frame::{self, FrameWriter, OpCode};
use stocksync::ws::mask::{apply_mask, apply_mask_plain};
use stocksync::ws::{Decoder, Message};

/// A typical broadcast payload: one stock state (PROTOCOL.md `stock_update`).
const SMALL_JSON: &str = r#"{"type":"stock_update","stock":{"id":"sku-12345","quantity":95,"on_hand":100,"reserved":5,"version":4242}}"#;
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const MESSAGE_BYTES_MAX: usize = 1024 * 1024;

#[derive(Serialize)]
struct State<'a> {
    id: &'a str,
    quantity: u64,
    on_hand: u64,
    reserved: u64,
    version: u64,
}

#[derive(Serialize)]
struct Update<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    stock: State<'a>,
}

fn update() -> Update<'static> {
    Update {
        kind: "stock_update",
        stock: State {
            id: "sku-12345",
            quantity: 95,
            on_hand: 100,
            reserved: 5,
            version: 4242,
        },
    }
}

/// A masked client frame (what a browser sends).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&KEY);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask_plain(&mut out[start..], KEY);
    out
}

fn payloads() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("small_json", SMALL_JSON.as_bytes().to_vec()),
        ("1KiB", vec![b'a'; 1024]),
        ("64KiB", vec![b'a'; 64 * 1024]),
    ]
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for (name, payload) in payloads() {
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_with_input(BenchmarkId::new("text", name), &payload, |b, p| {
            b.iter(|| frame::encode(OpCode::Text, black_box(p)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("encode_json");
    group.throughput(Throughput::Elements(1));
    let value = update();
    // Serialised straight into the frame buffer; the header is written in front at the end.
    group.bench_function("frame_writer", |b| {
        b.iter(|| {
            let mut writer = FrameWriter::new(OpCode::Text);
            serde_json::to_writer(&mut writer, black_box(&value)).unwrap();
            writer.finish()
        })
    });
    // The same with room for a typical update reserved up front (no regrowth).
    group.bench_function("frame_writer_capacity_128", |b| {
        b.iter(|| {
            let mut writer = FrameWriter::with_capacity(OpCode::Text, 128);
            serde_json::to_writer(&mut writer, black_box(&value)).unwrap();
            writer.finish()
        })
    });
    // The naive way for comparison: serialise to a Vec, then copy into a frame.
    group.bench_function("to_vec_then_encode", |b| {
        b.iter(|| {
            let json = serde_json::to_vec(black_box(&value)).unwrap();
            frame::encode(OpCode::Text, &json)
        })
    });
    // What the server calls: FrameWriter, then the shared `Frame` (Rc<[u8]>) handle.
    group.bench_function("app_json_frame", |b| {
        b.iter(|| json_frame(black_box(&value)))
    });
    group.finish();
}

fn mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for len in [1024usize, 64 * 1024] {
        let mut buf = vec![0x5au8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(BenchmarkId::new("word", len), |b| {
            b.iter(|| apply_mask(black_box(&mut buf), KEY))
        });
        group.bench_function(BenchmarkId::new("plain", len), |b| {
            b.iter(|| apply_mask_plain(black_box(&mut buf), KEY))
        });
    }
    group.finish();
}

fn decoded_len(message: Option<Message<'_>>) -> usize {
    match message {
        Some(Message::Text(t)) => t.len(),
        Some(Message::Binary(b)) => b.len(),
        _ => 0,
    }
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    for (name, payload) in payloads() {
        let opcode = if name == "small_json" { 0x1 } else { 0x2 };
        let wire = client_frame(opcode, &payload);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        // The decoder unmasks in place, so each iteration gets a fresh copy (not timed).
        group.bench_function(BenchmarkId::new("single", name), |b| {
            let mut decoder = Decoder::new(MESSAGE_BYTES_MAX);
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let (used, message) = decoder.decode(buf).unwrap().unwrap();
                    used + decoded_len(message)
                },
                BatchSize::SmallInput,
            )
        });
    }

    // A read buffer holding 100 frames, as a busy client's socket read would: small JSON
    // texts with a ping and a 1 KiB binary now and then.
    let mut batch = Vec::new();
    for i in 0..100 {
        match i % 10 {
            4 => batch.extend(client_frame(0x9, b"hb")),
            9 => batch.extend(client_frame(0x2, &[7u8; 1024])),
            _ => batch.extend(client_frame(0x1, SMALL_JSON.as_bytes())),
        }
    }
    group.throughput(Throughput::Elements(100));
    group.bench_function("buffer_of_100_frames", |b| {
        let mut decoder = Decoder::new(MESSAGE_BYTES_MAX);
        b.iter_batched_ref(
            || batch.clone(),
            |buf| {
                let mut at = 0;
                let mut total = 0;
                while at < buf.len() {
                    let (used, message) = decoder.decode(&mut buf[at..]).unwrap().unwrap();
                    total += decoded_len(message);
                    at += used;
                }
                total
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn config() -> Criterion {
    // The machine is shared (2 cores): short runs, enough samples for a stable median.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = encode, mask, decode
}
criterion_main!(benches);
