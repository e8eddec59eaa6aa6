//! A Rust host for kameo's Python workers: a tokio program drives a pool of Python processes
//! with typed serde messages, over the same protocol, handshake and crash barrier as the
//! Python parent (`kameo.Pool`), so one worker module serves both.
//!
//! ```no_run
//! use futures::StreamExt;
//! use kameo_host::{CallbackError, CallbackHandler, ItemStream, Pool};
//!
//! #[derive(serde::Serialize)]
//! struct Order { symbol: String, qty: u32 }
//! #[derive(serde::Deserialize, Debug)]
//! struct Fill { price: f64, qty: u32 }
//!
//! struct DataFetch;
//! impl CallbackHandler for DataFetch {
//!     type Request = serde_json::Value;
//!     type Item = f64;
//!     async fn handle(&self, _req: serde_json::Value) -> Result<ItemStream<f64>, CallbackError> {
//!         Ok(ItemStream::iter([101.0, 102.5]))
//!     }
//! }
//!
//! # async fn run() -> Result<(), kameo_host::Error> {
//! let pool = Pool::builder("strategy:execute_trade")  // module:function in the worker
//!     .size(2)
//!     .callback("trading.DataFetch", DataFetch)         // kameo.trading.DataFetch(...) there
//!     .start()
//!     .await?;
//! let fill: Fill = pool.ask(&Order { symbol: "ACME".into(), qty: 5 }).await?;
//! let mut ticks = pool.stream::<_, f64>(&"ACME").await?;
//! while let Some(t) = ticks.next().await {
//!     println!("{}", t?);
//! }
//! pool.close().await?;
//! # Ok(()) }
//! ```
//!
//! The modules, each one concern (`docs/architecture.md` has the map):
//!
//! * [`serde_py`]: any serde type to and from kameo's wire format, and [`Value`].
//! * `builder`, `pool`: the public pool ([`PoolBuilder`], [`Pool`], [`CallOptions`]).
//! * `state`: the pool's shared state under one lock, and the effects run after it.
//! * `worker`: a worker's process start and its driver task (socket, stderr, exit).
//! * `inbound`: what each frame from a worker does (the handshake, answers, callbacks, logs).
//! * `supervisor`: the crash barrier (requeue, `WorkerCrashed`, replacement, heartbeats).
//! * `callbacks`, `serve`: callback handlers ([`CallbackHandler`]) and serving them.
//! * `stream`: [`WorkerStream`]. `process`: spawning, pidfds, signals. `trace`: traceparents.
//! * `bodies`: the frame bodies (WELCOME, error dicts, LOG). `error`: [`Error`].
//!
//! Spawning, frame I/O, the scheduler and stream credit are `kameo-core`'s, shared with the
//! Python extension: there is one implementation of the protocol's parent side.

#![deny(missing_docs)]

mod bodies;
mod builder;
mod callbacks;
mod config;
mod error;
mod inbound;
mod pool;
mod process;
#[allow(missing_docs)] // its value types' fields are the Python types' own (year, month, ...)
pub mod serde_py;
mod serve;
mod state;
mod stream;
mod supervisor;
mod trace;
mod worker;

pub use builder::PoolBuilder;
pub use callbacks::{CallbackHandler, ItemStream};
pub use error::{CallbackError, Error};
pub use pool::{CallOptions, Pool, PoolStats, WorkerInfo};
pub use serde_py::{
    from_wire, from_wire_borrowed, from_wire_with_segments, to_wire, to_wire_into, SerdeError,
    Value,
};
pub use stream::WorkerStream;
