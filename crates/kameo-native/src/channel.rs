//! The worker's end of the connection.
//!
//! A `Channel` wraps the inherited socket. The reading half and the writing half have their own
//! locks, so a handler thread can reply while the main thread waits for input. Blocking calls
//! release the GIL; no lock is ever held while the GIL is being acquired.

use crate::codec;
use crate::errors;
use kameo_proto::frame::{self, Event, FrameReader, Kind};
use kameo_proto::handshake::Hello;
use kameo_proto::PROTOCOL_VERSION;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Pseudo-kinds reported by `recv` for events that are not frames.
const OVERSIZE: u32 = 0x100;
const UNDECODABLE: u32 = 0x101;

struct WriteHalf {
    out: Vec<u8>,
    pos: usize,
}

#[pyclass(module = "kameo._native", frozen)]
pub struct Channel {
    sock: UnixStream,
    reader: Mutex<FrameReader>,
    writer: Mutex<WriteHalf>,
    max_frame: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Channel {
    fn max_frame(&self) -> usize {
        self.max_frame.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Append a frame whose body is produced by `body` (with the GIL, before locking).
    fn push_frame(&self, py: Python<'_>, buf: Vec<u8>) {
        let _ = py;
        let mut w = lock(&self.writer);
        if w.out.is_empty() {
            w.out = buf;
            w.pos = 0;
        } else {
            w.out.extend_from_slice(&buf);
        }
    }

    fn encode_value_frame(
        &self,
        kind: Kind,
        id: u64,
        value: &Bound<'_, PyAny>,
    ) -> Result<Vec<u8>, String> {
        let mut buf = Vec::with_capacity(128);
        let start = frame::begin_frame(&mut buf, kind as u8, id, None);
        codec::encode_into(&mut buf, value).map_err(|e| {
            e.describe(if kind == Kind::Reply {
                "reply"
            } else {
                "value"
            })
        })?;
        let size = buf.len() - frame::LEN_PREFIX;
        if size > self.max_frame() {
            return Err(format!(
                "the reply frame is {size} bytes, over max_frame_bytes={}; raise Pool(max_frame_bytes=...) or return less",
                self.max_frame()
            ));
        }
        frame::finish_frame(&mut buf, start).expect("checked against max_frame");
        Ok(buf)
    }

    fn error_frame(
        py: Python<'_>,
        id: u64,
        kind: &str,
        type_name: &str,
        message: &str,
    ) -> PyResult<Vec<u8>> {
        let info = pyo3::types::PyDict::new(py);
        info.set_item("kind", kind)?;
        info.set_item("type", type_name)?;
        info.set_item("message", message)?;
        info.set_item("traceback", "")?;
        let mut buf = Vec::with_capacity(128);
        let start = frame::begin_frame(&mut buf, Kind::Error as u8, id, None);
        codec::encode_into(&mut buf, info.as_any())
            .map_err(|e| errors::serialization(py, e.describe("error")))?;
        frame::finish_frame(&mut buf, start).expect("small");
        Ok(buf)
    }
}

#[pymethods]
impl Channel {
    /// Wrap the inherited socket `fd` (takes ownership). Starts in blocking mode.
    #[new]
    fn new(fd: i32, max_frame_bytes: usize) -> PyResult<Self> {
        // SAFETY: the worker hands over the descriptor it inherited; nothing else uses it.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        Ok(Channel {
            sock,
            reader: Mutex::new(FrameReader::new(max_frame_bytes)),
            writer: Mutex::new(WriteHalf {
                out: Vec::new(),
                pos: 0,
            }),
            max_frame: max_frame_bytes.into(),
        })
    }

    fn fileno(&self) -> i32 {
        self.sock.as_raw_fd()
    }

    fn set_blocking(&self, blocking: bool) -> PyResult<()> {
        Ok(self.sock.set_nonblocking(!blocking)?)
    }

    /// Adopt the pool's frame limit (after WELCOME).
    fn set_max_frame(&self, max_frame_bytes: usize) {
        self.max_frame
            .store(max_frame_bytes, std::sync::atomic::Ordering::Relaxed);
        lock(&self.reader).set_max_frame(max_frame_bytes);
    }

    /// Send HELLO.
    fn hello(&self, py: Python<'_>, worker_id: u32, pid: u32, secret: Vec<u8>) -> PyResult<()> {
        let body = Hello {
            version: PROTOCOL_VERSION,
            worker_id,
            pid,
            secret,
        }
        .encode();
        let mut buf = Vec::new();
        frame::write_frame(&mut buf, Kind::Hello as u8, 0, None, &body);
        self.push_frame(py, buf);
        self.flush(py).map(|_| ())
    }

    /// Queue a frame of `kind` with an encoded `value` body (READY, STARTUP_FAILED, ...).
    fn send(&self, py: Python<'_>, kind: u8, id: u64, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut buf = Vec::with_capacity(64);
        let start = frame::begin_frame(&mut buf, kind, id, None);
        codec::encode_into(&mut buf, value)
            .map_err(|e| errors::serialization(py, e.describe("value")))?;
        frame::finish_frame(&mut buf, start).expect("small");
        self.push_frame(py, buf);
        Ok(())
    }

    /// Queue STARTED for request `id`.
    fn started(&self, py: Python<'_>, id: u64) {
        let mut buf = Vec::with_capacity(16);
        frame::write_frame(&mut buf, Kind::Started as u8, id, None, b"");
        self.push_frame(py, buf);
    }

    /// Queue the reply to `id`. A value that cannot be encoded, or is over the frame limit,
    /// becomes an error reply naming the problem, so the caller always gets an answer.
    fn reply(&self, py: Python<'_>, id: u64, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = match self.encode_value_frame(Kind::Reply, id, value) {
            Ok(b) => b,
            Err(msg) => {
                let kind = if msg.contains("max_frame_bytes") {
                    "protocol"
                } else {
                    "serialization"
                };
                Self::error_frame(py, id, kind, "", &msg)?
            }
        };
        self.push_frame(py, buf);
        Ok(())
    }

    /// Queue an error reply; `info` is a dict {kind, type, message, traceback}.
    fn error(&self, py: Python<'_>, id: u64, info: &Bound<'_, PyAny>) -> PyResult<()> {
        let buf = match self.encode_value_frame(Kind::Error, id, info) {
            Ok(b) => b,
            Err(msg) => Self::error_frame(py, id, "serialization", "", &msg)?,
        };
        self.push_frame(py, buf);
        Ok(())
    }

    /// Write queued frames. Blocking mode: until all are written (GIL released).
    /// Non-blocking mode: as much as the socket takes; returns True when nothing is left.
    fn flush(&self, py: Python<'_>) -> PyResult<bool> {
        let done = py.detach(|| -> io::Result<bool> {
            let mut w = lock(&self.writer);
            while w.pos < w.out.len() {
                let pos = w.pos;
                match (&self.sock).write(&w.out[pos..]) {
                    Ok(n) => w.pos += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            w.out.clear();
            w.pos = 0;
            Ok(true)
        });
        match done {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                Err(PyErr::new::<pyo3::exceptions::PyEOFError, _>(
                    "parent closed the connection",
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Read what is available and decode every complete frame.
    ///
    /// Returns a list of `(kind, id, body)` tuples (body decoded for REQUEST and WELCOME, a str
    /// for REJECT and for the pseudo-kinds OVERSIZE/UNDECODABLE, else None), or None at end of
    /// stream. Blocking mode waits (GIL released) until at least one frame or EOF arrives;
    /// non-blocking mode may return an empty list.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyList>>> {
        let out = PyList::empty(py);
        let mut guard = lock(&self.reader);
        let reader: &mut FrameReader = &mut guard;
        loop {
            while let Some(ev) = reader
                .next_event()
                .map_err(|e| errors::protocol(py, e.to_string()))?
            {
                let (kind, id, body): (u32, u64, Bound<'py, PyAny>) = match ev {
                    Event::Frame(env) => match env.kind() {
                        Some(Kind::Request) | Some(Kind::Welcome) => {
                            match codec::decode(py, env.body) {
                                Ok(v) => (u32::from(env.kind), env.id, v),
                                Err(e) => {
                                    let msg =
                                        format!("request {} could not be decoded: {e}", env.id);
                                    (UNDECODABLE, env.id, PyString::new(py, &msg).into_any())
                                }
                            }
                        }
                        Some(Kind::Reject) => {
                            let reason = String::from_utf8_lossy(env.body);
                            (
                                u32::from(env.kind),
                                env.id,
                                PyString::new(py, &reason).into_any(),
                            )
                        }
                        _ => (u32::from(env.kind), env.id, py.None().into_bound(py)),
                    },
                    Event::Oversize {
                        id, size, limit, ..
                    } => {
                        let msg = format!(
                            "request frame of {size} bytes is over max_frame_bytes={limit}"
                        );
                        (OVERSIZE, id, PyString::new(py, &msg).into_any())
                    }
                };
                out.append((kind, id, body))?;
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
            let mut sock = &self.sock;
            match py.detach(|| reader.read_from(&mut sock)) {
                Ok(0) => return Ok(None),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    py.check_signals()?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(out)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Kinds, for the Python side.
    #[classattr]
    const REQUEST: u8 = Kind::Request as u8;
    #[classattr]
    const CANCEL: u8 = Kind::Cancel as u8;
    #[classattr]
    const SHUTDOWN: u8 = Kind::Shutdown as u8;
    #[classattr]
    const WELCOME: u8 = Kind::Welcome as u8;
    #[classattr]
    const REJECT: u8 = Kind::Reject as u8;
    #[classattr]
    const READY: u8 = Kind::Ready as u8;
    #[classattr]
    const STARTUP_FAILED: u8 = Kind::StartupFailed as u8;
    #[classattr]
    const OVERSIZE: u32 = OVERSIZE;
    #[classattr]
    const UNDECODABLE: u32 = UNDECODABLE;
}
