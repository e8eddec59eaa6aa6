//! `kameo-core`: the host side of kameo without Python, shared by both hosts over one
//! implementation: the pyo3 extension `kameo._native` (crate `kameo-native`, a Python parent
//! and the worker's channel) and the Rust host (`kameo-host`, a tokio parent with serde
//! messages). Nothing here knows Python: what a host keeps per request (an asyncio future, a
//! tokio sender) is a type parameter, and errors are `io::Error`s or plain values that each host
//! turns into its own (a Python exception, a Rust error enum).
//!
//! The wire format itself (frames, envelopes, the handshake, value encoding primitives) is in
//! `kameo-proto`; this crate is what moves those frames between processes:
//!
//! * [`sys`]: small libc helpers (locks, memfds, error codes); the leaf.
//! * [`events`]: names of the events a pool core reports about its workers.
//! * [`fdio`]: socket reads and writes carrying descriptors (SCM_RIGHTS).
//! * [`frames`]: building a frame around a host-encoded body; splitting what a socket reads
//!   into frames ([`frames::Inbox`]).
//! * [`link`]: one worker connection as a parent sees it, generic over the request's waiter.
//! * [`scheduler`]: which worker gets a request, the FIFO, what a lost worker's requests
//!   become (generic over the waiter).
//! * [`progress`]: the progress page, how far a worker got (read after its death).
//! * [`shm`]: shared-memory segments (sealed, recycled) and the copy-on-write view of one.
//! * [`spawn`]: starting a worker (socketpair + exec, the secret, PDEATHSIG, process group).
//! * [`wait`]: spinning and waiting for a peer without a wake-up.
//! * [`outbox`]: a worker's outgoing frame queue with paced writes.
//! * [`stats`]: a pool's counters and latency histogram.
//! * [`streams`]: stream buffers and their credit, generic over the item type.

#![deny(missing_docs)]

pub mod events;
pub mod fdio;
pub mod frames;
pub mod link;
pub mod outbox;
pub mod progress;
pub mod scheduler;
pub mod shm;
pub mod spawn;
pub mod stats;
pub mod streams;
pub mod sys;
pub mod wait;
