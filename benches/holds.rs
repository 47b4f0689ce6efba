//! The hold table's deadline structure (`stock::holds`): the cost of expiring one hold with
//! 1k, 100k and 1M live holds (it must not grow with their number: a heap pop is O(log n),
//! no scan), and the memory per live hold (counted by a wrapping allocator, printed once).
//!
//! Run: `cargo bench --bench holds`. Numbers and method: docs/BENCHMARKS.md "Holds".

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use stocksync::stock::holds::{HoldLimits, Holds, Settle, Take};
use stocksync::stock::{Action, Op, SkuId, Stock, Store};

#[path = "../tests/common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::live_bytes;

const T0: u64 = 1_700_000_000_000;
const SKUS: u32 = 1_000;

/// A store of `SKUS` SKUs and `n` live holds of one unit each, ids like a cart id
/// (`cart-00000042`), deadlines an hour on, spread over a second.
fn table(n: usize) -> (Store, Holds, Vec<SkuId>) {
    let mut store = Store::new();
    let skus: Vec<SkuId> = (0..SKUS)
        .map(|i| {
            let stock = Stock {
                on_hand: 1_000_000_000,
                reserved: 0,
                version: 1,
            };
            store.restore(&format!("sku-{i}"), stock).unwrap()
        })
        .collect();
    let limits = HoldLimits {
        holds_max: n + 1_000_000,
        ..HoldLimits::default()
    };
    let mut holds = Holds::new(limits);
    for i in 0..n {
        let hold = format!("cart-{i:08}");
        let op = Op::held(skus[i % SKUS as usize], Action::Reserve, 1);
        let take = Some(Take {
            hold: &hold,
            ttl_ms: Some(3_600_000 + (i % 1000) as u64),
        });
        holds.write(&mut store, &[op], &[take], T0).unwrap();
    }
    (store, holds, skus)
}

fn expire_one(c: &mut Criterion) {
    let mut group = c.benchmark_group("hold_expire_one");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for n in [1_000usize, 100_000, 1_000_000] {
        let before = live_bytes();
        let (mut store, mut holds, skus) = table(n);
        let bytes = live_bytes() - before;
        println!(
            "{n} live holds: {bytes} heap bytes with their store, {:.0} bytes per hold",
            bytes as f64 / n as f64
        );
        let mut serial = 0u64;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    // Untimed: a hold due before every other one.
                    serial += 1;
                    let hold = format!("due-{serial}");
                    let now = T0 + serial;
                    let op = Op::held(skus[(serial % 7) as usize], Action::Reserve, 1);
                    let take = Some(Take {
                        hold: &hold,
                        ttl_ms: Some(100),
                    });
                    holds.write(&mut store, &[op], &[take], now).unwrap();
                    // Timed: find it by deadline and expire it, as the engine's timer does.
                    let started = Instant::now();
                    let due = holds.due(now + 100).map(Box::<str>::from).unwrap();
                    let expired = holds.settle(&mut store, &due, Settle::Expire, now + 100);
                    spent += started.elapsed();
                    assert!(expired.is_ok());
                }
                spent
            })
        });
    }
    group.finish();
}

criterion_group!(benches, expire_one);
criterion_main!(benches);
