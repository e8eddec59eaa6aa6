//! kameo-host's trading example: a Rust program asks Python strategy workers
//! (`strategy.py`, `execute_trade`) to decide on orders; each worker streams price ticks
//! from the host's `trading.DataFetch` callback, a Rust [`CallbackHandler`] producing them
//! lazily, and breaks off as soon as a tick reaches the order's limit, which drops the
//! host's stream.
//!
//! [`MarketData`] is that handler and the log of what it did: how many ticks each feed
//! produced, and whether its stream was dropped before its end (the worker stopped early) or
//! ran to the end. It is shared (an `Arc`) between the pool and the caller, which reads it
//! after the run.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use kameo_host::{CallbackError, CallbackHandler, Error, ItemStream, Pool};
use serde::{Deserialize, Serialize};

/// Ticks in each symbol's price series.
pub const SERIES_LEN: usize = 500;

/// The pool's stream window: how many ticks a feed may send ahead of the worker's loop.
/// A small one makes an early break visible: the host stops producing within a window of
/// where the worker stopped.
pub const STREAM_WINDOW: u32 = 16;

/// The worker's handler (`strategy.py` in this crate's directory).
pub const TARGET: &str = "strategy:execute_trade";

/// An order the host asks a worker to decide on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Order {
    /// The instrument.
    pub symbol: String,
    /// Buy at the first tick whose price reaches this.
    pub limit: f64,
}

/// What the worker passes to `kameo.trading.DataFetch(...)`.
#[derive(Deserialize, Debug, Clone)]
pub struct FetchReq {
    /// The instrument whose ticks to stream.
    pub symbol: String,
}

/// One item of a `DataFetch` stream, as the worker sees it (a dict).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Tick {
    /// The instrument.
    pub symbol: String,
    /// The tick's index in the series, from 0.
    pub seq: u32,
    /// The price, in cents precision.
    pub price: f64,
}

/// The worker's decision (a unit enum variant travels as its name, a str).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A tick reached the limit.
    Buy,
    /// The series ended without reaching it.
    Skip,
}

/// What `execute_trade` returns.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Decision {
    /// The order's instrument.
    pub symbol: String,
    /// Buy or skip.
    pub action: Action,
    /// The price of the last tick the worker read.
    pub price: f64,
    /// How many ticks the worker read.
    pub ticks_seen: usize,
}

/// The log of one `DataFetch` call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedLog {
    /// The length of its series.
    pub series_len: usize,
    /// How many ticks the host's stream produced.
    pub produced: usize,
    /// The stream reached its end (the worker read every tick).
    pub finished: bool,
    /// The stream was dropped before its end: the worker broke off (CANCEL).
    pub dropped_early: bool,
}

/// The `trading.DataFetch` callback handler, and the log of its feeds, by symbol. Clones
/// share the log.
#[derive(Clone, Default)]
pub struct MarketData {
    feeds: Arc<Mutex<BTreeMap<String, FeedLog>>>,
}

impl MarketData {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every feed so far, by symbol.
    pub fn feeds(&self) -> BTreeMap<String, FeedLog> {
        lock(&self.feeds).clone()
    }

    /// The feed of `symbol`, if a worker asked for it.
    pub fn feed(&self, symbol: &str) -> Option<FeedLog> {
        lock(&self.feeds).get(symbol).cloned()
    }

    /// Wait (up to `timeout`) until no feed is still open, i.e. each one finished or was
    /// dropped. A worker's CANCEL aborts the feed's task, and the stream is dropped when the
    /// runtime next runs that task: that can be a moment after the ask that caused it has
    /// its answer. True if all were settled in time.
    pub async fn settled(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if lock(&self.feeds)
                .values()
                .all(|f| f.finished || f.dropped_early)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CallbackHandler for MarketData {
    type Request = FetchReq;
    type Item = Tick;

    async fn handle(&self, req: FetchReq) -> Result<ItemStream<Tick>, CallbackError> {
        if req.symbol.is_empty() {
            // The worker's loop raises a ValueError (kameo.RemoteError).
            return Err(CallbackError::new("ValueError", "DataFetch: empty symbol"));
        }
        let series = price_series(&req.symbol);
        lock(&self.feeds).insert(
            req.symbol.clone(),
            FeedLog {
                series_len: series.len(),
                ..FeedLog::default()
            },
        );
        Ok(ItemStream::new(PriceFeed {
            symbol: req.symbol,
            series,
            next: 0,
            feeds: self.feeds.clone(),
        }))
    }
}

/// A lazily produced tick stream: the pool polls it only while the worker has credit.
struct PriceFeed {
    symbol: String,
    series: Vec<f64>,
    next: usize,
    feeds: Arc<Mutex<BTreeMap<String, FeedLog>>>,
}

impl PriceFeed {
    fn log(&self, f: impl FnOnce(&mut FeedLog)) {
        if let Some(log) = lock(&self.feeds).get_mut(&self.symbol) {
            f(log);
        }
    }
}

impl Stream for PriceFeed {
    type Item = Result<Tick, CallbackError>;

    fn poll_next(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(&price) = this.series.get(this.next) else {
            this.log(|l| l.finished = true);
            return Poll::Ready(None);
        };
        let tick = Tick {
            symbol: this.symbol.clone(),
            seq: this.next as u32,
            price,
        };
        this.next += 1;
        let produced = this.next;
        this.log(|l| l.produced = produced);
        Poll::Ready(Some(Ok(tick)))
    }
}

impl Drop for PriceFeed {
    fn drop(&mut self) {
        self.log(|l| {
            if !l.finished {
                l.dropped_early = true;
            }
        });
    }
}

/// The symbol's price series: a deterministic random walk with an upward drift (an LCG
/// seeded by the symbol's FNV-1a hash), in cents.
pub fn price_series(symbol: &str) -> Vec<f64> {
    let mut seed = symbol.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut price = 50.0 + (seed % 150) as f64;
    (0..SERIES_LEN)
        .map(|_| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            // a step of -0.9% .. +1.1% of the price
            let step = ((seed >> 33) % 2001) as f64 / 100_000.0 - 0.009;
            price = (price * (1.0 + step)).max(0.01);
            (price * 100.0).round() / 100.0
        })
        .collect()
}

/// The example's orders: three limits a little above the opening price (reached early, so
/// the worker breaks off) and one at three times it (never reached: the worker reads every tick).
pub fn orders() -> Vec<Order> {
    [
        ("AAPL", 1.01),
        ("MSFT", 1.02),
        ("NVDA", 1.03),
        ("TSLA", 3.0),
    ]
    .into_iter()
    .map(|(symbol, above)| {
        let open = price_series(symbol)[0];
        Order {
            symbol: symbol.into(),
            limit: (open * above * 100.0).round() / 100.0,
        }
    })
    .collect()
}

/// What the strategy decides on `order`, computed here from the same series (the test's
/// reference).
pub fn expected_decision(order: &Order) -> Decision {
    let series = price_series(&order.symbol);
    let hit = series.iter().position(|&p| p >= order.limit);
    let (action, last) = match hit {
        Some(i) => (Action::Buy, i),
        None => (Action::Skip, series.len() - 1),
    };
    Decision {
        symbol: order.symbol.clone(),
        action,
        price: series[last],
        ticks_seen: last + 1,
    }
}

/// This crate's directory, where `strategy.py` is: the workers' PYTHONPATH.
pub fn module_dir() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

/// A pool of two strategy workers run by `python` (an interpreter with kameo installed),
/// with `market` as their `trading.DataFetch` callback.
pub async fn start(python: &str, market: MarketData) -> Result<Pool, Error> {
    Pool::builder(TARGET)
        .size(2)
        .python(python)
        .env("PYTHONPATH", module_dir())
        .stream_window(STREAM_WINDOW)
        .callback("trading.DataFetch", market)
        .start()
        .await
}

/// Ask for a decision on every order at once (the two workers share them), in order.
pub async fn trade(pool: &Pool, orders: &[Order]) -> Result<Vec<Decision>, Error> {
    futures::future::join_all(orders.iter().map(|o| pool.ask::<_, Decision>(o)))
        .await
        .into_iter()
        .collect()
}

/// [`run`] with the caller's [`MarketData`], to read its feeds afterwards. The pool is
/// closed before it returns, and the feeds have settled (finished or dropped).
pub async fn run_with(python: &str, market: MarketData) -> Result<Vec<Decision>, Error> {
    let pool = start(python, market.clone()).await?;
    let decisions = trade(&pool, &orders()).await;
    pool.close().await?;
    market.settled(Duration::from_secs(5)).await;
    decisions
}

/// Start the pool, decide on [`orders`], close the pool.
pub async fn run(python: &str) -> Result<Vec<Decision>, Error> {
    run_with(python, MarketData::new()).await
}
