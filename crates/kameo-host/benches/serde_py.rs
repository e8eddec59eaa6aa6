//! Criterion benches of serde_py: a small struct (the issue's `Order`, and one of five fields)
//! and a 1000-element `Vec<f64>`, each to wire bytes (appended in place) and back; and the
//! same five-field message into `Value` for comparison.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kameo_host::{from_wire, to_wire, to_wire_into, Value};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Order {
    symbol: String,
    qty: u32,
}

#[derive(Serialize, Deserialize)]
struct Trade {
    symbol: String,
    qty: u32,
    price: f64,
    side: String,
    id: u64,
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("serde_py");
    g.throughput(Throughput::Elements(1));
    let order = Order {
        symbol: "AAPL".into(),
        qty: 100,
    };
    let trade = Trade {
        symbol: "AAPL".into(),
        qty: 100,
        price: 187.25,
        side: "buy".into(),
        id: 123_456,
    };
    let prices: Vec<f64> = (0..1000).map(|i| i as f64 * 0.5).collect();
    let mut out = Vec::with_capacity(16 << 10);
    g.bench_function("order_to_wire", |b| {
        b.iter(|| {
            out.clear();
            to_wire_into(&mut out, black_box(&order)).unwrap()
        })
    });
    let ob = to_wire(&order).unwrap();
    g.bench_function("order_from_wire", |b| {
        b.iter(|| from_wire::<Order>(black_box(&ob)).unwrap())
    });
    g.bench_function("trade5_to_wire", |b| {
        b.iter(|| {
            out.clear();
            to_wire_into(&mut out, black_box(&trade)).unwrap()
        })
    });
    let tb = to_wire(&trade).unwrap();
    g.bench_function("trade5_from_wire", |b| {
        b.iter(|| from_wire::<Trade>(black_box(&tb)).unwrap())
    });
    g.bench_function("trade5_into_value", |b| {
        b.iter(|| from_wire::<Value>(black_box(&tb)).unwrap())
    });
    g.bench_function("vec_f64_1000_to_wire", |b| {
        b.iter(|| {
            out.clear();
            to_wire_into(&mut out, black_box(&prices)).unwrap()
        })
    });
    let pb = to_wire(&prices).unwrap();
    g.bench_function("vec_f64_1000_from_wire", |b| {
        b.iter(|| from_wire::<Vec<f64>>(black_box(&pb)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
