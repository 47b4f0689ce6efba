//! permessage-deflate costs and gains on our own messages (docs/BENCHMARKS.md, "Compression"):
//! bytes on the wire for a `stock_update` and for a 10k-SKU snapshot, plain and compressed at
//! zlib levels 1, 6 and 9, and the CPU of one compression (what a broadcast pays once, however
//! many subscribers negotiated), as built by the server's own reply code.
//!
//! `cargo bench --bench deflate`

use std::hint::black_box;
use std::time::Instant;

use flate2::{Compress, Compression, FlushCompress};
use stocksync::api::reply;
use stocksync::stock::Stock;
use stocksync::ws::deflate;

fn stock(i: u64) -> Stock {
    Stock {
        on_hand: 1000 + i * 7 % 500,
        reserved: i % 13,
        version: 1 + i % 40,
    }
}

/// Deflated size and microseconds per compression at `level`.
fn deflate_at(payload: &[u8], level: u32) -> (usize, f64) {
    let mut compress = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    let rounds = (2_000_000 / payload.len().max(1)).clamp(20, 20_000);
    let started = Instant::now();
    for _ in 0..rounds {
        compress.reset();
        out.clear();
        compress
            .compress_vec(black_box(payload), &mut out, FlushCompress::Sync)
            .expect("in-memory deflate");
    }
    let micros = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    (out.len() - deflate::TAIL.len(), micros)
}

fn report(name: &str, frame: &[u8]) {
    let header = stocksync::ws::frame::header_len(frame.len());
    let payload = &frame[header.min(frame.len())..];
    print!("{name:<34} plain {:>8} B", frame.len());
    for level in [1, 6, 9] {
        let (bytes, micros) = deflate_at(payload, level);
        let wire = bytes + stocksync::ws::frame::header_len(bytes);
        print!(
            " | L{level} {wire:>7} B ({:>3.0} %) {micros:>8.1} us",
            100.0 * wire as f64 / frame.len() as f64
        );
    }
    // What the server does: compress_frames at COMPRESSION_LEVEL, above the threshold only.
    let rounds = 200;
    let started = Instant::now();
    let mut sent = frame.len();
    for _ in 0..rounds {
        sent =
            deflate::compress_frames(black_box(frame)).map_or(frame.len(), |run| run.bytes.len());
    }
    let micros = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!(" | server {sent:>7} B {micros:>8.1} us");
}

fn main() {
    println!(
        "threshold {} B, server level {}",
        deflate::COMPRESS_PAYLOAD_BYTES_MIN,
        deflate::COMPRESSION_LEVEL
    );
    report(
        "stock_update, id sku-1",
        &reply::stock_update("sku-1", stock(1)),
    );
    let long_id =
        "shop-eu-west:catalogue/apparel/t-shirts/organic-cotton/crew-neck/navy-blue/size-xl";
    report(
        "stock_update, 82-byte id",
        &reply::stock_update(long_id, stock(2)),
    );
    let max_id = "a".repeat(128);
    report(
        "stock_update, 128-byte id",
        &reply::stock_update(&max_id, stock(3)),
    );
    let ack = reply::ack(None, false, &[("sku-1", stock(4))], false);
    report("ack", &ack);
    for skus in [3usize, 10, 100, 1000, 10_000] {
        let names: Vec<String> = (0..skus).map(|i| format!("sku-{i}")).collect();
        let states = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), stock(i as u64)));
        let frame = reply::with_states("subscribed", None, states);
        report(&format!("subscribed snapshot, {skus} SKUs"), &frame);
    }
}
