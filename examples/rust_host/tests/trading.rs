//! The trading example against real Python workers: the decisions are the ones the series
//! implies, and a worker that breaks off its `DataFetch` loop stops the Rust stream (it is
//! dropped within a stream window of where the worker stopped, long before its end).
//!
//! The interpreter is `KAMEO_TEST_PYTHON` (set by `make test`), with kameo installed;
//! without it the tests print a notice and pass. Each test gives up after `DEADLINE`.

use std::future::Future;
use std::time::Duration;

use kameo_example_trading::{
    expected_decision, orders, run, run_with, start, trade, Action, MarketData, Order,
    STREAM_WINDOW,
};

const DEADLINE: Duration = Duration::from_secs(60);

fn python() -> Option<String> {
    let python = std::env::var("KAMEO_TEST_PYTHON").ok();
    if python.is_none() {
        println!("KAMEO_TEST_PYTHON is not set: skipping the trading example's tests");
    }
    python
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("the test passed its deadline")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_and_early_break_stops_the_rust_stream() {
    let Some(python) = python() else { return };
    let market = MarketData::new();
    let decisions = within(run_with(&python, market.clone()))
        .await
        .expect("the example runs");

    let orders = orders();
    assert_eq!(decisions.len(), orders.len());
    let (mut buys, mut skips) = (0, 0);
    for (order, d) in orders.iter().zip(&decisions) {
        assert_eq!(d, &expected_decision(order), "the decision on {order:?}");
        let feed = market
            .feed(&order.symbol)
            .expect("the worker fetched its ticks");
        assert_eq!(feed.series_len, kameo_example_trading::SERIES_LEN);
        assert!(feed.produced >= d.ticks_seen, "{feed:?} vs {d:?}");
        match d.action {
            Action::Buy => {
                buys += 1;
                // The premise: the limit is reached well before the series' end.
                assert!(d.ticks_seen + (STREAM_WINDOW as usize) + 1 < feed.series_len);
                assert!(feed.dropped_early, "the break dropped the stream: {feed:?}");
                assert!(!feed.finished, "{feed:?}");
                assert!(feed.produced < feed.series_len, "stopped early: {feed:?}");
                // Credit bounds what was produced ahead of the worker's loop: a window, and
                // the one item polled before waiting for credit.
                assert!(
                    feed.produced <= d.ticks_seen + STREAM_WINDOW as usize + 1,
                    "{feed:?} vs {d:?}"
                );
            }
            Action::Skip => {
                skips += 1;
                assert_eq!(d.ticks_seen, feed.series_len);
                assert!(feed.finished && !feed.dropped_early, "{feed:?}");
                assert_eq!(feed.produced, feed.series_len);
            }
        }
    }
    assert!(buys >= 1 && skips >= 1, "both paths covered: {decisions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_returns_the_decisions() {
    let Some(python) = python() else { return };
    let decisions = within(run(&python)).await.expect("the example runs");
    let expected: Vec<_> = orders().iter().map(expected_decision).collect();
    assert_eq!(decisions, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_error_is_a_remote_value_error() {
    let Some(python) = python() else { return };
    within(async {
        let market = MarketData::new();
        let pool = start(&python, market.clone())
            .await
            .expect("the pool starts");
        let bad = Order {
            symbol: String::new(),
            limit: 1.0,
        };
        let err = trade(&pool, &[bad])
            .await
            .expect_err("an empty symbol fails");
        assert!(err.is_remote("ValueError"), "{err:?}");
        assert!(err.to_string().contains("empty symbol"), "{err}");
        assert!(market.feeds().is_empty());
        // The pool still serves.
        let good = orders();
        let decisions = trade(&pool, &good[..1]).await.expect("the next order");
        assert_eq!(decisions[0], expected_decision(&good[0]));
        pool.close().await.expect("close");
    })
    .await;
}
