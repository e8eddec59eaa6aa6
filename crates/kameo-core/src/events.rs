//! Names of the events a pool core reports about its workers: in the Python parent, to the
//! pool's `on_event(worker_id, name, payload)` callback, exported to Python as
//! `kameo._native.EVENT_*` so neither side spells them twice; a Rust host names the same
//! events with the same words (in logs and traces).

/// A worker's CALLBACK: payload `(id, body, trace)` (body a str if it could not be decoded).
pub const CALLBACK: &str = "callback";
/// CREDIT for a callback stream: payload `(id, n)`.
pub const CALLBACK_CREDIT: &str = "callback_credit";
/// CANCEL of a callback: payload `id`.
pub const CALLBACK_CANCEL: &str = "callback_cancel";
/// READY: payload the worker's info dict.
pub const READY: &str = "ready";
/// STARTUP_FAILED: payload the worker's info dict.
pub const STARTUP_FAILED: &str = "startup_failed";
/// The handshake was refused: payload the reason.
pub const REJECTED: &str = "rejected";
/// The worker closed its connection: payload None.
pub const EOF: &str = "eof";
/// A read or write failed: payload the error message.
pub const IO_ERROR: &str = "io_error";
/// The worker broke the protocol; it is read no further: payload the message.
pub const PROTOCOL_ERROR: &str = "protocol_error";
/// The worker sent something unexpected while serving; the request concerned failed.
pub const PROTOCOL_WARNING: &str = "protocol_warning";
/// The core stopped giving the worker requests: payload the reason.
pub const RETIRE: &str = "retire";
/// A draining worker has nothing in flight any more: payload None.
pub const DRAINED: &str = "drained";

/// A LOG frame: payload the decoded `(dropped, records)` (a str if it could not be decoded).
pub const LOG: &str = "log";

/// Every event name, with the suffix of its Python constant (`EVENT_<suffix>`).
pub const ALL: [(&str, &str); 13] = [
    ("CALLBACK", CALLBACK),
    ("CALLBACK_CREDIT", CALLBACK_CREDIT),
    ("CALLBACK_CANCEL", CALLBACK_CANCEL),
    ("READY", READY),
    ("STARTUP_FAILED", STARTUP_FAILED),
    ("REJECTED", REJECTED),
    ("EOF", EOF),
    ("IO_ERROR", IO_ERROR),
    ("PROTOCOL_ERROR", PROTOCOL_ERROR),
    ("PROTOCOL_WARNING", PROTOCOL_WARNING),
    ("RETIRE", RETIRE),
    ("DRAINED", DRAINED),
    ("LOG", LOG),
];
