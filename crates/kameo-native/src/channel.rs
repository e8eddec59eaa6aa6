//! The worker's end of the connection.
//!
//! A `Channel` wraps the inherited socket. The reading half and the writing half have their own
//! locks, so a handler thread can reply while the main thread waits for input. Blocking calls
//! release the GIL; no lock is ever held while the GIL is being acquired.

use crate::codec::{self, Options, Segments};
use crate::errors;
use crate::frames::{self, Body, EncodeFrameError, IntoPyErr};
use kameo_core::frames::{raw_frame, Head, Inbox, Incoming};
use kameo_core::outbox::Outbox;
use kameo_core::progress::Progress;
use kameo_core::shm::Recycler;
use kameo_core::sys::lock;
use kameo_core::wait;
use kameo_proto::frame::{self, Kind};
use kameo_proto::handshake::Hello;
use kameo_proto::PROTOCOL_VERSION;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Pseudo-kinds reported by `recv` for events that are not frames.
const OVERSIZE: u32 = 0x100;
const UNDECODABLE: u32 = 0x101;

#[derive(Default)]
struct Arrivals {
    next: u64,
    index: HashMap<u64, u64>,
}

#[pyclass(module = "kameo._native", frozen)]
pub struct Channel {
    sock: Arc<UnixStream>,
    reader: Mutex<Inbox>,
    out: Arc<Outbox>,
    /// Arrival index of each request received and not yet taken up (see `progress`).
    arrivals: Mutex<Arrivals>,
    progress: OnceLock<Progress>,
    max_frame: AtomicUsize,
    allow_pickle: AtomicBool,
    shm_threshold: AtomicUsize,
    /// Segments reused for large bytes-like values we send.
    recycler: Arc<Recycler>,
    /// What a remote object reference in a CALL body becomes (`set_ref_hook`).
    ref_hook: OnceLock<codec::RefHook>,
}

impl Channel {
    fn max_frame(&self) -> usize {
        self.max_frame.load(Ordering::Relaxed)
    }

    fn opts(&self) -> Options {
        Options {
            allow_pickle: self.allow_pickle.load(Ordering::Relaxed),
            shm_threshold: self.shm_threshold.load(Ordering::Relaxed),
            recycler: Some(Arc::clone(&self.recycler)),
            arrays: codec::Arrays::Worker,
            refs: codec::RefMode::Worker,
            ref_hook: self.ref_hook.get().cloned(),
        }
    }

    /// Queue an encoded frame (encoded with the GIL before the writer lock is taken).
    fn push_frame(&self, buf: Vec<u8>) {
        self.push_frame_with(buf, Segments::new());
    }

    fn push_frame_with(&self, buf: Vec<u8>, segs: Segments) {
        self.out.push(buf, segs);
    }

    /// Write queued frames (GIL released); see [`Outbox::write_out`].
    fn write_out(&self, py: Python<'_>) -> PyResult<bool> {
        if self.out.is_empty() {
            return Ok(true); // keep the GIL: nothing to write
        }
        py.detach(|| self.out.write_out()).map_err(write_error)
    }

    /// Number a request in arrival order (the parent numbers its sends the same way).
    fn arrived(&self, kind: u8, id: u64) {
        if Kind::is_request(kind) {
            let mut a = lock(&self.arrivals);
            let index = a.next;
            a.next += 1;
            a.index.insert(id, index);
        }
    }

    fn item_frame(
        &self,
        py: Python<'_>,
        id: u64,
        value: &Bound<'_, PyAny>,
        is_final: bool,
    ) -> PyResult<(Vec<u8>, Segments)> {
        let head = Head::new(Kind::Item as u8, id).is_final(is_final);
        frames::encode_frame(head, Body::Value(value), &self.opts(), self.max_frame())
            .map_err(|e| e.into_pyerr(py, "item", "item"))
    }

    fn encode_value_frame(
        &self,
        kind: Kind,
        id: u64,
        value: &Bound<'_, PyAny>,
    ) -> Result<(Vec<u8>, Segments), EncodeFrameError> {
        let head = Head::new(kind as u8, id);
        frames::encode_frame(head, Body::Value(value), &self.opts(), self.max_frame())
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
        let head = Head::new(Kind::Error as u8, id);
        frames::encode_frame(
            head,
            Body::Value(info.as_any()),
            &Options::INLINE,
            usize::MAX,
        )
        .map(|(buf, _)| buf)
        .map_err(|e| e.into_pyerr(py, "error", "error"))
    }
}

#[pymethods]
impl Channel {
    /// Wrap the inherited socket `fd` (takes ownership). Starts in blocking mode.
    #[new]
    fn new(fd: i32, max_frame_bytes: usize) -> PyResult<Self> {
        // SAFETY: the worker hands over the descriptor it inherited; nothing else uses it.
        let sock = Arc::new(unsafe { UnixStream::from_raw_fd(fd) });
        Ok(Channel {
            out: Outbox::new(Arc::clone(&sock)),
            sock,
            reader: Mutex::new(Inbox::new(max_frame_bytes)),
            arrivals: Mutex::new(Arrivals::default()),
            progress: OnceLock::new(),
            max_frame: max_frame_bytes.into(),
            allow_pickle: AtomicBool::new(false),
            shm_threshold: AtomicUsize::new(usize::MAX),
            recycler: Arc::default(),
            ref_hook: OnceLock::new(),
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
        self.max_frame.store(max_frame_bytes, Ordering::Relaxed);
        lock(&self.reader).set_max_frame(max_frame_bytes);
    }

    /// Adopt the pool's codec options (after WELCOME): pickle, and the size from which
    /// buffers travel in shared memory (None: never).
    #[pyo3(signature = (allow_pickle, shm_threshold=None))]
    fn set_codec(&self, allow_pickle: bool, shm_threshold: Option<usize>) {
        self.allow_pickle.store(allow_pickle, Ordering::Relaxed);
        self.shm_threshold.store(
            shm_threshold.unwrap_or(usize::MAX).max(1),
            Ordering::Relaxed,
        );
    }

    /// Map the progress page inherited as `fd` (takes ownership).
    fn set_progress(&self, fd: i32) -> PyResult<()> {
        let page = Progress::open(fd)?;
        self.progress.set(page).map_err(|_| {
            PyErr::new::<pyo3::exceptions::PyRuntimeError, _>("progress page already set")
        })
    }

    /// Take up request `id` (before running it, or before dropping it unrun when it is the
    /// next in arrival order): the parent then knows it may have run. With `started=False`
    /// (a request removed from the middle of the queue, answered without running) it is only
    /// forgotten.
    #[pyo3(signature = (id, started=true))]
    fn take(&self, id: u64, started: bool) {
        let index = lock(&self.arrivals).index.remove(&id);
        if let (Some(index), true, Some(page)) = (index, started, self.progress.get()) {
            page.take(index);
        }
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
        self.push_frame(raw_frame(Kind::Hello as u8, 0, &body));
        self.flush(py).map(|_| ())
    }

    /// Queue a frame of `kind` with an encoded `value` body (READY, STARTUP_FAILED, ...).
    fn send(&self, py: Python<'_>, kind: u8, id: u64, value: &Bound<'_, PyAny>) -> PyResult<()> {
        // Startup frames, inline and not bounded here (the parent bounds them).
        let (buf, _) = frames::encode_frame(
            Head::new(kind, id),
            Body::Value(value),
            &Options::INLINE,
            usize::MAX,
        )
        .map_err(|e| e.into_pyerr(py, "value", "value"))?;
        self.push_frame(buf);
        Ok(())
    }

    /// Queue a LOG frame carrying `records` (`(dropped, [record tuple, ...])`, see
    /// `kameo._worker_log`), encoded inline within the pool's frame limit. False, and nothing
    /// queued, if the frame would be over that limit (the caller splits the batch or drops
    /// it); SerializationError for a value the codec cannot encode.
    fn log(&self, py: Python<'_>, records: &Bound<'_, PyAny>) -> PyResult<bool> {
        let head = Head::new(Kind::Log as u8, 0);
        match frames::encode_frame(
            head,
            Body::Value(records),
            &Options::INLINE,
            self.max_frame(),
        ) {
            Ok((buf, _)) => {
                self.push_frame(buf);
                Ok(true)
            }
            Err(e) if e.is_oversize() => Ok(false),
            Err(e) => Err(e.into_pyerr(py, "log records", "log")),
        }
    }

    /// Queue the reply to `id`. A value that cannot be encoded, or is over the frame limit,
    /// becomes an error reply naming the problem, so the caller always gets an answer.
    fn reply(&self, py: Python<'_>, id: u64, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let (buf, segs) = match self.encode_value_frame(Kind::Reply, id, value) {
            Ok(b) => b,
            Err(e) => {
                let kind = if e.is_oversize() {
                    "protocol"
                } else {
                    "serialization"
                };
                let msg = e.message("reply", "reply");
                (Self::error_frame(py, id, kind, "", &msg)?, Segments::new())
            }
        };
        self.push_frame_with(buf, segs);
        Ok(())
    }

    /// Queue the reply to `rid` if `value` can be encoded without pickle (remote object
    /// references included); else queue nothing and return False. A value over the frame limit
    /// still becomes the protocol error reply, as with `reply` (True).
    fn try_reply(&self, py: Python<'_>, rid: u64, value: &Bound<'_, PyAny>) -> PyResult<bool> {
        let opts = Options {
            allow_pickle: false,
            ..self.opts()
        };
        let head = Head::new(Kind::Reply as u8, rid);
        let (buf, segs) =
            match frames::encode_frame(head, Body::Value(value), &opts, self.max_frame()) {
                Ok(b) => b,
                Err(e) if e.is_oversize() => {
                    let msg = e.message("reply", "reply");
                    (
                        Self::error_frame(py, rid, "protocol", "", &msg)?,
                        Segments::new(),
                    )
                }
                Err(_) => return Ok(false),
            };
        self.push_frame_with(buf, segs);
        Ok(true)
    }

    /// Set what a remote object reference arriving in a CALL body becomes:
    /// `hook(worker_id, number, type_name) -> object` (once per channel).
    fn set_ref_hook(&self, hook: Py<PyAny>) -> PyResult<()> {
        self.ref_hook
            .set(Arc::new(hook))
            .map_err(|_| PyErr::new::<pyo3::exceptions::PyRuntimeError, _>("ref hook already set"))
    }

    /// Queue an error reply; `info` is a dict {kind, type, message, traceback}.
    fn error(&self, py: Python<'_>, id: u64, info: &Bound<'_, PyAny>) -> PyResult<()> {
        let (buf, segs) = match self.encode_value_frame(Kind::Error, id, info) {
            Ok(b) => b,
            // (an error info over the limit, too, is reported as a serialization error)
            Err(e) => {
                let msg = e.message("value", "error");
                (
                    Self::error_frame(py, id, "serialization", "", &msg)?,
                    Segments::new(),
                )
            }
        };
        self.push_frame_with(buf, segs);
        Ok(())
    }

    /// Write queued frames. Blocking mode: until all are written (GIL released).
    /// Non-blocking mode: as much as the socket takes; returns True when nothing is left.
    fn flush(&self, py: Python<'_>) -> PyResult<bool> {
        self.write_out(py)
    }

    /// Read what is available and decode every complete frame.
    ///
    /// Returns a list of `(kind, id, final, body, trace)` tuples, or None at end of stream.
    /// `body` is decoded for REQUEST, REQUEST_STREAM, CALL, CALL_STREAM, WELCOME, ITEM and
    /// ERROR, an int for CREDIT, a list of object numbers for RELEASE, a str for REJECT and for the
    /// pseudo-kinds OVERSIZE/UNDECODABLE (for UNDECODABLE, the exception instance when the ref
    /// hook raised one), else None;
    /// `trace` is the envelope's traceparent or None. With `block`, first writes every queued
    /// frame, then waits (GIL released) until at least one frame or EOF arrives; without,
    /// returns what is already there (maybe []).
    #[pyo3(signature = (block=true))]
    fn recv<'py>(&self, py: Python<'py>, block: bool) -> PyResult<Option<Bound<'py, PyList>>> {
        // Never wait for the parent while it waits for us: what is queued is written first,
        // in the same GIL release as the read when there is nothing to return yet.
        let mut unwritten = block && !self.out.is_empty();
        let out = PyList::empty(py);
        let mut guard = lock(&self.reader);
        let inbox: &mut Inbox = &mut guard;
        let opts = self.opts();
        loop {
            while let Some(ev) = inbox
                .next_frame()
                .map_err(|e| errors::protocol(py, e.to_string()))?
            {
                let item = match ev {
                    Incoming::Frame(env, segs) => {
                        let trace = match env.trace {
                            Some(t) => PyString::new(py, &String::from_utf8_lossy(t)).into_any(),
                            None => py.None().into_bound(py),
                        };
                        self.arrived(env.kind, env.id);
                        let (kind, body) = match env.kind() {
                            Some(
                                Kind::Request
                                | Kind::RequestStream
                                | Kind::Call
                                | Kind::CallStream
                                | Kind::Welcome
                                | Kind::Item
                                | Kind::Error,
                            ) => match codec::decode_full(py, env.body, &opts, &segs) {
                                Ok(v) => (u32::from(env.kind), v),
                                // The hook refused a reference: its exception, to answer with.
                                Err(codec::DecodeFail::Hook(exc)) => {
                                    (UNDECODABLE, exc.into_value(py).into_bound(py).into_any())
                                }
                                Err(e) => {
                                    let msg = format!("frame {} could not be decoded: {e}", env.id);
                                    (UNDECODABLE, PyString::new(py, &msg).into_any())
                                }
                            },
                            Some(Kind::Credit) => {
                                let n = frame::credit_count(env.body);
                                (u32::from(env.kind), n.into_pyobject(py)?.into_any())
                            }
                            Some(Kind::Release) => match frame::release_numbers(env.body) {
                                Some(nums) => {
                                    (u32::from(env.kind), PyList::new(py, nums)?.into_any())
                                }
                                None => {
                                    let msg = format!(
                                        "release frame of {} bytes is malformed",
                                        env.body.len()
                                    );
                                    (UNDECODABLE, PyString::new(py, &msg).into_any())
                                }
                            },
                            Some(Kind::Reject) => {
                                let reason = String::from_utf8_lossy(env.body);
                                (u32::from(env.kind), PyString::new(py, &reason).into_any())
                            }
                            _ => (u32::from(env.kind), py.None().into_bound(py)),
                        };
                        (kind, env.id, env.is_final(), body, trace).into_pyobject(py)?
                    }
                    Incoming::Oversize {
                        kind,
                        id,
                        size,
                        limit,
                    } => {
                        self.arrived(kind, id); // the parent numbered it too
                        let msg = format!("frame of {size} bytes is over max_frame_bytes={limit}");
                        (OVERSIZE, id, true, msg, py.None()).into_pyobject(py)?
                    }
                };
                out.append(item)?;
            }
            if !out.is_empty() {
                if unwritten {
                    self.write_out(py)?;
                }
                return Ok(Some(out));
            }
            let fd = self.sock.as_raw_fd();
            let result = if block {
                let written = py.detach(|| {
                    if std::mem::take(&mut unwritten) {
                        self.out.write_out()?;
                    }
                    wait::spin_until_readable(fd, wait::spin());
                    Ok(inbox.read(fd, 0))
                });
                match written {
                    Err(e) => return Err(write_error(e)),
                    Ok(read) => read,
                }
            } else {
                inbox.read(fd, libc::MSG_DONTWAIT)
            };
            match result {
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

    /// Queue one stream item for call `id` (FLAG_FINAL with `final`). A value that cannot be
    /// encoded raises SerializationError (nothing is queued).
    #[pyo3(signature = (id, value, is_final=false))]
    fn item(
        &self,
        py: Python<'_>,
        id: u64,
        value: &Bound<'_, PyAny>,
        is_final: bool,
    ) -> PyResult<()> {
        let (buf, segs) = self.item_frame(py, id, value, is_final)?;
        self.push_frame_with(buf, segs);
        Ok(())
    }

    /// Queue one stream item for call `id` and write it promptly, in batches: at once after a
    /// pause, else within `LINGER` (100 µs) of being queued (a sync generator's fast path).
    /// A value that cannot be encoded raises SerializationError (nothing is queued).
    fn item_paced(&self, py: Python<'_>, id: u64, value: &Bound<'_, PyAny>) -> PyResult<()> {
        let (buf, segs) = self.item_frame(py, id, value, false)?;
        if self.out.push_paced(buf, segs) {
            self.write_out(py)?;
        }
        Ok(())
    }

    /// Queue a frame with an empty body (END, CANCEL, STARTED, ...).
    fn signal(&self, kind: u8, id: u64) {
        self.push_frame(raw_frame(kind, id, b""));
    }

    /// Queue CREDIT for `n` more items of call `id`.
    fn credit(&self, id: u64, n: u32) {
        self.push_frame(raw_frame(Kind::Credit as u8, id, &frame::credit_body(n)));
    }

    /// Queue CALLBACK `id` for the parent handler at `path`, on behalf of request `request_id`.
    #[pyo3(signature = (id, path, data, request_id, trace=None))]
    fn callback(
        &self,
        py: Python<'_>,
        id: u64,
        path: &str,
        data: &Bound<'_, PyAny>,
        request_id: u64,
        trace: Option<&str>,
    ) -> PyResult<()> {
        let body = (path, data, request_id).into_pyobject(py)?;
        let head = Head::new(Kind::Callback as u8, id).trace(trace);
        let (buf, segs) =
            frames::encode_frame(head, Body::Record(&body), &self.opts(), self.max_frame())
                .map_err(|e| e.into_pyerr(py, "callback data", "callback"))?;
        self.push_frame_with(buf, segs);
        Ok(())
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
    const REQUEST_STREAM: u8 = Kind::RequestStream as u8;
    #[classattr]
    const ITEM: u8 = Kind::Item as u8;
    #[classattr]
    const END: u8 = Kind::End as u8;
    #[classattr]
    const ERROR: u8 = Kind::Error as u8;
    #[classattr]
    const CREDIT: u8 = Kind::Credit as u8;
    #[classattr]
    const HEARTBEAT: u8 = Kind::Heartbeat as u8;
    #[classattr]
    const CALL: u8 = Kind::Call as u8;
    #[classattr]
    const CALL_STREAM: u8 = Kind::CallStream as u8;
    #[classattr]
    const RELEASE: u8 = Kind::Release as u8;
    #[classattr]
    const LOG: u8 = Kind::Log as u8;
    #[classattr]
    const OVERSIZE: u32 = OVERSIZE;
    #[classattr]
    const UNDECODABLE: u32 = UNDECODABLE;
}

/// A failed write: the parent gone is EOFError, as for a read.
fn write_error(e: io::Error) -> PyErr {
    if e.kind() == io::ErrorKind::BrokenPipe {
        PyErr::new::<pyo3::exceptions::PyEOFError, _>("parent closed the connection")
    } else {
        e.into()
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.out.close(); // ends the pacing thread, if one started
    }
}
