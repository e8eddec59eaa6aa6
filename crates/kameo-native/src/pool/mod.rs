//! The parent's pool core, as plain Rust under the `core::PoolCore` facade.
//!
//! * [`state`]: `PoolState`, the request path (encode, send or queue, answer, requeue).
//! * [`inbound`]: what workers send (the read loop, frames, the handshake).
//! * [`effects`]: loop and event-callback calls done after the core's borrow ended.
//! * [`py`]: the Python calls made on futures.
//!
//! Which worker gets a request (`kameo_core::scheduler`), stream buffers and their credit
//! (`kameo_core::streams`) and the counters (`kameo_core::stats`) are in `kameo-core`, shared
//! with the Rust host; here they are instantiated with the Python waiters ([`Target`]).
//!
//! Layering (acyclic): `py` -> `effects` -> `state` -> `inbound`.

pub mod effects;
mod inbound;
mod py;
pub mod state;

pub use effects::Effects;
pub use py::wake;
pub use state::PoolState;

use crate::link::Target;

/// The parent's request queue and dispatch, with Python waiters.
pub type Scheduler = kameo_core::scheduler::Scheduler<Target>;
/// A request waiting for a worker.
pub type Queued = kameo_core::scheduler::Queued<Target>;
