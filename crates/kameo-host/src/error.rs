//! The host's one error type, [`Error`]: every failure the Python pool distinguishes, with what a
//! user needs to act on it (which worker, which pid, the exit code or signal, the remote
//! traceback, the last lines of the worker's stderr). And [`CallbackError`], what a callback
//! handler answers the worker with.

use std::fmt;
use std::time::Duration;

/// Why a call, a stream or the pool failed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The worker's handler raised: the Python exception's qualified type name
    /// (`"builtins.ValueError"`), message and formatted traceback.
    Remote {
        /// Qualified name of the exception's class.
        type_name: String,
        /// `str(exception)`.
        message: String,
        /// The worker's formatted traceback.
        traceback: String,
        /// The worker that ran the call.
        worker_id: u32,
        /// Its process id.
        pid: u32,
    },
    /// The worker died (or was killed: no heartbeat, a call that did not stop when
    /// cancelled) while the call may have been running in it.
    WorkerCrashed {
        /// The worker's id in the pool.
        worker_id: u32,
        /// Its process id.
        pid: u32,
        /// Its exit status, if it exited.
        exit_code: Option<i32>,
        /// The signal that killed it, if one did.
        signal: Option<i32>,
        /// The last lines it wrote to stderr.
        stderr_tail: Vec<String>,
    },
    /// A worker could not be started: the interpreter is missing, the target does not
    /// import, the init hook raised, the handshake failed, or it did not become ready in
    /// time.
    Startup {
        /// What went wrong, and what to do about it.
        message: String,
        /// The worker concerned, if one was started.
        worker_id: Option<u32>,
        /// Its process id, if one was started.
        pid: Option<u32>,
        /// The worker's traceback (empty if there is none).
        traceback: String,
        /// The last lines it wrote to stderr.
        stderr_tail: Vec<String>,
    },
    /// The call did not finish within its timeout (it was cancelled in the worker).
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The pool is closed (or closing: it takes no new calls).
    Closed,
    /// A frame broke the protocol (an oversize message, a malformed or unexpected frame).
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// A value could not be encoded or decoded.
    Serialization {
        /// Where in the value (`$.orders[3].qty`).
        path: String,
        /// What was wrong there.
        message: String,
    },
}

impl Error {
    /// The worker concerned, if any.
    pub fn worker_id(&self) -> Option<u32> {
        match self {
            Error::Remote { worker_id, .. } | Error::WorkerCrashed { worker_id, .. } => {
                Some(*worker_id)
            }
            Error::Startup { worker_id, .. } => *worker_id,
            _ => None,
        }
    }

    /// A remote exception of this Python type: its qualified name (`"builtins.ValueError"`)
    /// or its bare class name (`"ValueError"`).
    pub fn is_remote(&self, type_name: &str) -> bool {
        match self {
            Error::Remote { type_name: t, .. } => {
                t == type_name || t.rsplit('.').next() == Some(type_name)
            }
            _ => false,
        }
    }
}

/// How a process ended, for messages: "exit code 3", "signal 9 (SIGKILL)".
pub(crate) fn exit_reason(exit_code: Option<i32>, signal: Option<i32>) -> String {
    match (exit_code, signal) {
        (_, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        (Some(code), None) => format!("exit code {code}"),
        (None, None) => "exit status unknown".to_string(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGINT => "SIGINT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

fn write_tail(f: &mut fmt::Formatter<'_>, tail: &[String]) -> fmt::Result {
    if !tail.is_empty() {
        write!(f, "\nlast lines of its stderr:")?;
        for line in tail {
            write!(f, "\n  {line}")?;
        }
    }
    Ok(())
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Remote {
                type_name,
                message,
                traceback,
                worker_id,
                pid,
            } => {
                write!(
                    f,
                    "{type_name}: {message} (in worker {worker_id}, pid {pid})"
                )?;
                if !traceback.is_empty() {
                    write!(f, "\nremote traceback:\n{}", traceback.trim_end())?;
                }
                Ok(())
            }
            Error::WorkerCrashed {
                worker_id,
                pid,
                exit_code,
                signal,
                stderr_tail,
            } => {
                write!(
                    f,
                    "worker {worker_id} (pid {pid}) died while running the call: {}",
                    exit_reason(*exit_code, *signal)
                )?;
                write_tail(f, stderr_tail)
            }
            Error::Startup {
                message,
                worker_id,
                pid,
                traceback,
                stderr_tail,
            } => {
                match (worker_id, pid) {
                    (Some(w), Some(p)) => write!(f, "worker {w} (pid {p}) failed to start: ")?,
                    (Some(w), None) => write!(f, "worker {w} failed to start: ")?,
                    _ => write!(f, "the pool failed to start: ")?,
                }
                f.write_str(message)?;
                if !traceback.is_empty() {
                    write!(f, "\nremote traceback:\n{}", traceback.trim_end())?;
                }
                write_tail(f, stderr_tail)
            }
            Error::Timeout { after } => write!(
                f,
                "the call did not finish within {after:?} (it was cancelled in the worker)"
            ),
            Error::Closed => f.write_str("the pool is closed"),
            Error::Protocol { message } => write!(f, "protocol error: {message}"),
            Error::Serialization { path, message } => write!(f, "at {path}: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<crate::serde_py::SerdeError> for Error {
    fn from(e: crate::serde_py::SerdeError) -> Self {
        Error::Serialization {
            path: e.path,
            message: e.message,
        }
    }
}

/// What a callback handler answers a worker with instead of items: the worker's
/// `kameo.<module>.<Type>(...)` raises `kameo.RemoteError`, which is also an instance of the
/// Python built-in exception named here when there is one (`ValueError`, `KeyError`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackError {
    /// The Python exception type the worker sees (a built-in's name, e.g. `"ValueError"`).
    pub type_name: String,
    /// Its message.
    pub message: String,
}

impl CallbackError {
    /// An error of Python type `type_name` (a built-in exception name, e.g. `"KeyError"`).
    pub fn new(type_name: impl Into<String>, message: impl Into<String>) -> Self {
        CallbackError {
            type_name: type_name.into(),
            message: message.into(),
        }
    }

    /// A `RuntimeError` with this message.
    pub fn msg(message: impl Into<String>) -> Self {
        CallbackError::new("RuntimeError", message)
    }
}

impl fmt::Display for CallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.message)
    }
}

impl std::error::Error for CallbackError {}

impl From<crate::serde_py::SerdeError> for CallbackError {
    fn from(e: crate::serde_py::SerdeError) -> Self {
        CallbackError::new("TypeError", e.to_string())
    }
}
