//! Criterion benches: frame encode/decode and envelope routing over a pipelined buffer.
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use kameo_proto::frame::{write_frame, Event, FrameReader, Kind};
use kameo_proto::wire::Value;
use std::collections::HashMap;

fn small_body() -> Vec<u8> {
    let v = Value::Dict(vec![
        (Value::Str("symbol".into()), Value::Str("AAPL".into())),
        (Value::Str("qty".into()), Value::Int(100)),
        (Value::Str("price".into()), Value::Float(187.25)),
        (Value::Str("side".into()), Value::Str("buy".into())),
        (Value::Str("id".into()), Value::Int(123_456)),
    ]);
    let mut b = Vec::new();
    v.encode(&mut b);
    b
}

fn bench(c: &mut Criterion) {
    let body = small_body();
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_small", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            write_frame(
                &mut out,
                Kind::Request as u8,
                black_box(42),
                None,
                black_box(&body),
            )
        })
    });
    let mut one = Vec::new();
    write_frame(&mut one, Kind::Reply as u8, 42, None, &body);
    g.bench_function("decode_small", |b| {
        let mut r = FrameReader::new(1 << 26);
        b.iter(|| {
            r.feed(black_box(&one));
            match r.next_event().unwrap() {
                Some(Event::Frame(e)) => e.id,
                _ => unreachable!(),
            }
        })
    });
    g.finish();

    // Routing: decode 1,000 pipelined replies and resolve their slots by correlation id.
    let mut batch = Vec::new();
    for id in 0..1000u64 {
        write_frame(&mut batch, Kind::Reply as u8, id, None, &body);
    }
    let mut g = c.benchmark_group("routing");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("route_1000_replies", |b| {
        let mut r = FrameReader::new(1 << 26);
        let mut slots: HashMap<u64, usize> = HashMap::with_capacity(1024);
        b.iter(|| {
            for id in 0..1000u64 {
                slots.insert(id, id as usize);
            }
            r.feed(&batch);
            let mut done = 0usize;
            while let Some(Event::Frame(e)) = r.next_event().unwrap() {
                done += slots.remove(&e.id).unwrap() + e.body.len();
            }
            done
        })
    });
    g.finish();

    let mut g = c.benchmark_group("value");
    g.bench_function("validate_small", |b| {
        b.iter(|| Value::decode(black_box(&body)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
