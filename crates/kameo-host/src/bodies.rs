//! The frame bodies the host builds and reads, as serde types over serde_py: WELCOME's
//! configuration, error dicts both ways, READY, LOG records and CALLBACK's envelope. The
//! names and shapes are the protocol's (`docs/protocol.md`), the same the Python parent uses.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::error::{CallbackError, Error};

/// WELCOME: the pool configuration a worker loads.
#[derive(Serialize)]
pub(crate) struct Welcome<'a> {
    pub target: &'a str,
    pub init: Option<&'a str>,
    pub initargs: Option<()>,
    pub max_concurrency: u32,
    pub max_frame_bytes: u64,
    pub sys_path: Option<()>,
    pub callbacks: Vec<&'a str>,
    pub stream_window: u32,
    pub heartbeat_interval: f64,
    pub allow_pickle: bool,
    /// None: the worker sends every value inline (this host maps no segments it did not ask
    /// for; it still reads them if a worker sends any).
    pub shm_threshold: Option<u64>,
    /// `{"": 20}` forwards INFO and above of every logger; None forwards nothing.
    pub log_levels: Option<std::collections::BTreeMap<&'a str, u32>>,
}

/// An error dict (ERROR and STARTUP_FAILED bodies); unknown keys are ignored.
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct ErrorInfo {
    pub kind: Option<String>,
    #[serde(rename = "type")]
    pub type_name: Option<String>,
    pub message: Option<String>,
    pub traceback: Option<String>,
    pub stage: Option<String>,
    pub what: Option<String>,
}

impl ErrorInfo {
    /// The error a caller gets for this ERROR of worker `worker_id` (pid `pid`).
    pub fn into_error(self, worker_id: u32, pid: u32) -> Error {
        let message = self.message.unwrap_or_default();
        let where_ = format!("worker {worker_id} (pid {pid})");
        match self.kind.as_deref().unwrap_or("remote") {
            "protocol" => Error::Protocol {
                message: format!("{message} [{where_}]"),
            },
            "serialization" => Error::Serialization {
                path: "$".into(),
                message: format!("{message} [{where_}]"),
            },
            "cancelled" => Error::Protocol {
                message: format!("the call was cancelled in {where_}"),
            },
            _ => Error::Remote {
                type_name: self
                    .type_name
                    .unwrap_or_else(|| "builtins.Exception".into()),
                message,
                traceback: self.traceback.unwrap_or_default(),
                worker_id,
                pid,
            },
        }
    }
}

/// Decode an error dict; a body that is not one is a protocol error.
pub(crate) fn error_of(body: &[u8], worker_id: u32, pid: u32) -> Error {
    match crate::serde_py::from_wire::<ErrorInfo>(body) {
        Ok(info) => info.into_error(worker_id, pid),
        Err(e) => Error::Protocol {
            message: format!("worker {worker_id} (pid {pid}) sent a malformed error reply ({e})"),
        },
    }
}

/// The error dict sent to a worker for a callback handler's error: kind `remote`, with the
/// built-in class named, so that the worker raises a `RemoteError` that is also that class.
#[derive(Serialize)]
pub(crate) struct CallbackErrorInfo<'a> {
    pub kind: &'a str,
    #[serde(rename = "type")]
    pub type_name: String,
    pub module: &'a str,
    pub qualname: &'a str,
    pub message: &'a str,
    pub traceback: &'a str,
}

impl<'a> CallbackErrorInfo<'a> {
    pub fn of(e: &'a CallbackError) -> Self {
        CallbackErrorInfo {
            kind: "remote",
            type_name: format!("builtins.{}", e.type_name),
            module: "builtins",
            qualname: &e.type_name,
            message: &e.message,
            traceback: "",
        }
    }

    /// For a path no handler is registered at.
    pub fn not_found(message: &'a str) -> Self {
        CallbackErrorInfo {
            kind: "callback_not_found",
            type_name: "kameo.errors.CallbackNotFound".into(),
            module: "kameo.errors",
            qualname: "CallbackNotFound",
            message,
            traceback: "",
        }
    }
}

/// CALLBACK's body, first pass: the path only.
pub(crate) type CallbackPath = (String, IgnoredAny, IgnoredAny);

/// LOG's body: `(dropped, records)`.
pub(crate) type LogBody = (u64, Vec<LogRecord>);

/// One forwarded `logging` record.
pub(crate) type LogRecord = (
    String,         // name
    i64,            // levelno
    String,         // message
    Option<String>, // exc_text
    Option<String>, // stack_info
    f64,            // created
    String,         // pathname
    i64,            // lineno
    String,         // funcName
    String,         // threadName
);
