//! The parent's pool core, as plain Rust under the `core::PoolCore` facade.
//!
//! * [`state`]: `PoolState`, the request path (encode, send or queue, answer, requeue).
//! * [`inbound`]: what workers send (the read loop, frames, the handshake).
//! * [`scheduler`]: which worker gets a request, the FIFO, what a lost worker's requests
//!   become. No Python.
//! * [`streams`]: stream buffers and their credit. No Python.
//! * [`stats`]: counters and the latency histogram. No Python.
//! * [`effects`]: loop and event-callback calls done after the core's borrow ended.
//! * [`py`]: the Python calls made on futures.
//!
//! Layering (acyclic): `py` -> `effects`; `stats`, `streams`, `scheduler` -> `state` ->
//! `inbound`.

pub mod effects;
mod inbound;
mod py;
pub mod scheduler;
pub mod state;
pub mod stats;
pub mod streams;

pub use effects::Effects;
pub use py::wake;
pub use state::PoolState;
