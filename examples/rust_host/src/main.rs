//! `make demo-rust`: decide on the example's orders with Python strategy workers and print
//! the decisions, with what each Rust feed produced.
//!
//! The interpreter (with kameo installed) is the first argument, else `KAMEO_PYTHON`, else
//! `python3` on PATH.

use std::process::ExitCode;
use std::time::Instant;

use kameo_example_trading::{run_with, Action, MarketData, TARGET};

#[tokio::main]
async fn main() -> ExitCode {
    let python = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("KAMEO_PYTHON").ok())
        .unwrap_or_else(|| "python3".into());
    let market = MarketData::new();
    let t0 = Instant::now();
    let decisions = match run_with(&python, market.clone()).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("kameo-example-trading: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} decisions from {TARGET} (2 workers, {python}) in {:.0} ms:",
        decisions.len(),
        t0.elapsed().as_secs_f64() * 1000.0
    );
    for d in &decisions {
        let feed = market.feed(&d.symbol).unwrap_or_default();
        let action = match d.action {
            Action::Buy => "buy ",
            Action::Skip => "skip",
        };
        let stream = if feed.dropped_early {
            "dropped early"
        } else if feed.finished {
            "ran to its end"
        } else {
            "still open"
        };
        println!(
            "  {:<5} {action} at {:>8.2} after {:>3} ticks; the Rust feed produced {:>3} of {} ({stream})",
            d.symbol, d.price, d.ticks_seen, feed.produced, feed.series_len
        );
    }
    ExitCode::SUCCESS
}
