//! The parent's pool core, as plain Rust under the `core::PoolCore` facade.
//!
//! * [`state`]: `PoolState`, the request path (encode, send or queue, answer, requeue).
//! * [`inbound`]: what workers send (the read loop, frames, the handshake).
//! * [`scheduler`]: which worker gets a request, the FIFO, what a lost worker's requests
//!   become. No Python.
//! * [`effects`]: loop and event-callback calls done after the core's borrow ended.
//! * [`py`]: the Python calls made on futures.
//!
//! Stream buffers and their credit (`kameo_core::streams`) and the counters
//! (`kameo_core::stats`) are in `kameo-core`, shared with the Rust host.
//!
//! Layering (acyclic): `py` -> `effects`; `scheduler` -> `state` -> `inbound`.

pub mod effects;
mod inbound;
mod py;
pub mod scheduler;
pub mod state;

pub use effects::Effects;
pub use py::wake;
pub use state::PoolState;
