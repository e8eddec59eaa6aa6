//! kameo-host against real Python workers, handler `benchw:echo` (benches/benchw.py):
//!
//! * `ask_round_trip`: one small message (a 6-field order) asked and answered, one at a time,
//!   on 1 worker.
//! * `pipelined_20k`: 20,000 asks issued at once (`join_all`) on 2 workers (asks/s).
//!
//! Two modes:
//!
//! * `cargo bench -p kameo-host --bench host`: criterion (its own statistics and report).
//! * `... --bench host -- --json [--quick]`: fixed-size runs printing JSON lines in the format
//!   of `benches/_report.py` (`workload`, `impl`, `metric`, `value`, `unit`), on a
//!   multi-thread tokio runtime (`impl` `rust_host`) and a current-thread one
//!   (`rust_host_current_thread`); `benches/bench_host.py` runs this next to the Python
//!   parent (`kameo.Pool`) on the same workloads and prints the ratios.
//!
//! The interpreter (kameo installed) is `KAMEO_PYTHON`, else `python3`.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kameo_host::Pool;
use serde::{Deserialize, Serialize};

const PIPELINED: usize = 20_000;

/// The message: the same fields as bench_pool.py's MSG.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
struct Msg {
    symbol: String,
    qty: u32,
    price: f64,
    side: String,
    tags: Vec<String>,
    id: u64,
}

fn msg() -> Msg {
    Msg {
        symbol: "AAPL".into(),
        qty: 100,
        price: 187.25,
        side: "buy".into(),
        tags: vec!["a".into(), "b".into()],
        id: 123_456,
    }
}

fn python() -> String {
    std::env::var("KAMEO_PYTHON").unwrap_or_else(|_| "python3".into())
}

async fn pool(size: usize) -> Pool {
    let python = python();
    Pool::builder("benchw:echo")
        .size(size)
        .python(&python)
        .env(
            "PYTHONPATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/benches"),
        )
        .start()
        .await
        .unwrap_or_else(|e| panic!("the bench pool with python {python:?}: {e}"))
}

async fn ask(pool: &Pool, m: &Msg) {
    let r: Msg = pool.ask(m).await.expect("echo");
    debug_assert_eq!(&r, m);
    std::hint::black_box(r);
}

/// `n` asks at once; the time they took.
async fn pipelined(pool: &Pool, m: &Msg, n: usize) -> Duration {
    let t = Instant::now();
    let replies = futures::future::join_all((0..n).map(|_| pool.ask::<_, Msg>(m))).await;
    let dt = t.elapsed();
    for r in replies {
        if let Err(e) = r {
            panic!("echo: {e}\n{e:?}")
        }
    }
    dt
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn criterion_benches(c: &mut Criterion) {
    let rt = multi_thread();
    let m = msg();

    let one = rt.block_on(pool(1));
    let mut g = c.benchmark_group("host");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ask_round_trip", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    ask(&one, &m).await;
                }
                t.elapsed()
            })
        })
    });
    g.finish();
    rt.block_on(one.close()).expect("close");

    let two = rt.block_on(pool(2));
    let mut g = c.benchmark_group("host");
    g.throughput(Throughput::Elements(PIPELINED as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("pipelined_20k", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += pipelined(&two, &m, PIPELINED).await;
                }
                total
            })
        })
    });
    g.finish();
    rt.block_on(two.close()).expect("close");
}

struct Sizes {
    rt_warmup: usize,
    rt_n: usize,
    tp_repeats: usize,
}

fn emit(workload: &str, imp: &str, metric: &str, value: f64, unit: &str, extra: &str) {
    println!(
        r#"{{"workload": "{workload}", "impl": "{imp}", "metric": "{metric}", "value": {value:.3}, "unit": "{unit}"{extra}}}"#
    );
}

/// Both workloads on `rt`, as JSON lines for `imp`.
fn json_run(rt: &tokio::runtime::Runtime, imp: &'static str, sz: &Sizes) {
    let m = msg();
    let (rt_warmup, rt_n, tp_repeats) = (sz.rt_warmup, sz.rt_n, sz.tp_repeats);
    let body = async move {
        // Round trips: each timed on its own; p50 etc. in µs.
        let one = pool(1).await;
        for _ in 0..rt_warmup {
            ask(&one, &m).await;
        }
        let mut samples = Vec::with_capacity(rt_n);
        for _ in 0..rt_n {
            let t = Instant::now();
            ask(&one, &m).await;
            samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        one.close().await.expect("close");
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        samples.sort_by(f64::total_cmp);
        let pct = |p: f64| samples[((p * samples.len() as f64) as usize).min(samples.len() - 1)];
        emit(
            "round_trip",
            imp,
            "latency_p50",
            pct(0.5),
            "us",
            &format!(
                r#", "p90_us": {:.2}, "p99_us": {:.2}, "min_us": {:.2}, "mean_us": {mean:.2}, "n": {}"#,
                pct(0.9),
                pct(0.99),
                samples[0],
                samples.len()
            ),
        );

        // Throughput: 20,000 asks at once on 2 workers, a warm-up run, then the repeats.
        let two = pool(2).await;
        pipelined(&two, &m, PIPELINED).await;
        let mut rates: Vec<f64> = Vec::with_capacity(tp_repeats);
        for _ in 0..tp_repeats {
            let dt = pipelined(&two, &m, PIPELINED).await;
            rates.push(PIPELINED as f64 / dt.as_secs_f64());
        }
        two.close().await.expect("close");
        let all = rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        rates.sort_by(f64::total_cmp);
        emit(
            "pipelined",
            imp,
            "throughput",
            rates[rates.len() / 2],
            "asks/s",
            &format!(r#", "n": {PIPELINED}, "workers": 2, "repeats": [{all}]"#),
        );
    };
    rt.block_on(rt.spawn(body)).expect("the bench task");
}

fn main() {
    tracing::subscriber::set_global_default(diag::Warn).unwrap();
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--json") {
        let quick = args.iter().any(|a| a == "--quick");
        let sz = if quick {
            Sizes {
                rt_warmup: 100,
                rt_n: 1000,
                tp_repeats: 3,
            }
        } else {
            Sizes {
                rt_warmup: 500,
                rt_n: 5000,
                tp_repeats: 5,
            }
        };
        json_run(&multi_thread(), "rust_host", &sz);
        json_run(&current_thread(), "rust_host_current_thread", &sz);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}

mod diag {
    use std::fmt::Write;
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};
    pub struct Warn;
    struct V(String);
    impl Visit for V {
        fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
            let _ = write!(self.0, " {}={:?}", f.name(), v);
        }
    }
    impl Subscriber for Warn {
        fn enabled(&self, m: &Metadata<'_>) -> bool {
            *m.level() <= tracing::Level::WARN
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            let mut v = V(String::new());
            e.record(&mut v);
            eprintln!(
                "[{} {}]{}",
                e.metadata().level(),
                e.metadata().target(),
                v.0
            );
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}
