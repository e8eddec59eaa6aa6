//! The kameo wire protocol, independent of Python.
//!
//! * [`frame`]: length-prefixed frames carrying an envelope (kind, flags, correlation id,
//!   optional W3C trace context) and a body, with an incremental, cancellation-safe reader.
//! * [`handshake`]: the worker's `HELLO` (magic, protocol version, worker id, pid, pool secret).
//! * [`wire`]: the tags and bounds-checked primitives of the value encoding (serde_py), plus a
//!   pure-Rust [`wire::Value`] model used to validate untrusted input in tests and fuzzing.
//!
//! `docs/protocol.md` in the repository is the normative description; this crate implements it.

pub mod frame;
pub mod handshake;
pub mod wire;

/// The protocol version spoken by this build. A peer with another version is refused at the
/// handshake with a message naming both.
pub const PROTOCOL_VERSION: u16 = 4;
