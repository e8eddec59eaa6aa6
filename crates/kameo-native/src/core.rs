//! The parent's hot path: one `PoolCore` per pool owns every worker connection, the reply slots
//! keyed by correlation id, and the FIFO of requests waiting for a worker.
//!
//! There is no I/O thread. The asyncio loop watches each worker socket (`loop.add_reader`) and
//! calls [`PoolCore::on_readable`], which reads what is there, decodes every complete frame and
//! resolves the waiting futures in one call; requests are written straight from
//! [`PoolCore::submit`], or coalesced and written once per loop iteration when the worker
//! already has requests in flight. So a round trip costs no thread hop at all.
//!
//! Methods that need to call back into Python (loop.add_writer, the event callback) collect
//! what to do while the core is borrowed and do it after the borrow ends, so Python code never
//! re-enters a borrowed core.

use crate::codec;
use crate::errors;
use kameo_proto::frame::{self, Event, FrameReader, Kind};
use kameo_proto::handshake::{secrets_equal, Hello};
use kameo_proto::PROTOCOL_VERSION;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LinkState {
    /// Spawned, waiting for HELLO.
    Connecting,
    /// HELLO accepted, WELCOME sent, waiting for READY.
    Loading,
    /// Serving requests.
    Ready,
    /// No new requests (shutting down or retiring).
    Draining,
}

struct Slot {
    fut: Py<PyAny>,
    /// The encoded frame, kept until the worker says it started the request so that an
    /// unstarted request can be sent to another worker if this one dies.
    frame: Option<Vec<u8>>,
}

struct Queued {
    id: u64,
    frame: Vec<u8>,
    fut: Py<PyAny>,
}

struct Link {
    id: u32,
    pid: u32,
    sock: UnixStream,
    state: LinkState,
    /// Taken out while its frames are handled, so the handler can borrow the link.
    reader: Option<FrameReader>,
    out: Vec<u8>,
    out_pos: usize,
    writer_armed: bool,
    slots: HashMap<u64, Slot>,
    completed: u64,
}

impl Link {
    fn in_flight(&self) -> usize {
        self.slots.len()
    }

    fn pending_out(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Write as much of `out` as the socket takes. Err only for a broken connection.
    fn write_out(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Send `data` now if nothing is queued before it, buffering what the socket does not take.
    fn send_now(&mut self, data: &[u8]) -> io::Result<()> {
        if self.pending_out() {
            self.out.extend_from_slice(data);
            return self.write_out();
        }
        let mut pos = 0;
        while pos < data.len() {
            match self.sock.write(&data[pos..]) {
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.extend_from_slice(&data[pos..]);
        Ok(())
    }
}

/// Work to do once the core is no longer borrowed.
#[derive(Default)]
struct Effects {
    /// (worker id, event name, payload) for the pool's event callback.
    events: Vec<(u32, &'static str, PyObject)>,
    arm_writers: Vec<(u32, i32)>,
    disarm_writers: Vec<i32>,
    schedule_flush: bool,
}

type PyObject = Py<PyAny>;

#[pyclass(module = "kameo._native")]
pub struct PoolCore {
    links: Vec<Link>,
    queue: VecDeque<Queued>,
    next_id: u64,
    max_frame: usize,
    window: usize,
    secret: Vec<u8>,
    welcome: Vec<u8>,
    flush_scheduled: bool,
    loop_: PyObject,
    on_event: PyObject,
    asks: u64,
}

fn oversize_message(what: &str, size: usize, limit: usize) -> String {
    format!(
        "{what} is {size} bytes, over max_frame_bytes={limit}; raise Pool(max_frame_bytes=...) or send less"
    )
}

impl PoolCore {
    fn link_index(&self, worker_id: u32) -> Option<usize> {
        self.links.iter().position(|l| l.id == worker_id)
    }

    /// Least-loaded ready worker with room in its window.
    fn pick(&self) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, l) in self.links.iter().enumerate() {
            if l.state == LinkState::Ready {
                let n = l.in_flight();
                if n < self.window && best.is_none_or(|(_, b)| n < b) {
                    best = Some((i, n));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// Register the slot, then write (or coalesce) the frame.
    fn send_to(
        &mut self,
        idx: usize,
        id: u64,
        frame: Vec<u8>,
        fut: PyObject,
        fx: &mut Effects,
        coalesce: bool,
    ) {
        let link = &mut self.links[idx];
        let busy = link.in_flight() > 0;
        let result = if coalesce && busy {
            link.out.extend_from_slice(&frame);
            if !self.flush_scheduled {
                self.flush_scheduled = true;
                fx.schedule_flush = true;
            }
            Ok(())
        } else {
            link.send_now(&frame)
        };
        link.slots.insert(
            id,
            Slot {
                fut,
                frame: Some(frame),
            },
        );
        match result {
            Ok(()) => {
                if link.pending_out() && !link.writer_armed && !(coalesce && busy) {
                    link.writer_armed = true;
                    fx.arm_writers.push((link.id, link.sock.as_raw_fd()));
                }
            }
            Err(e) => fx
                .events
                .push((link.id, "io_error", lazy_str(e.to_string()))),
        }
    }

    /// Move queued requests to workers with room.
    fn dispatch(&mut self, py: Python<'_>, fx: &mut Effects) {
        while !self.queue.is_empty() {
            let Some(idx) = self.pick() else { break };
            let q = self.queue.pop_front().expect("not empty");
            if is_done(py, q.fut.bind(py)) {
                continue; // cancelled while waiting
            }
            self.send_to(idx, q.id, q.frame, q.fut, fx, true);
        }
    }

    fn flush_links(&mut self, fx: &mut Effects) {
        for link in &mut self.links {
            if link.pending_out() && !link.writer_armed {
                match link.write_out() {
                    Ok(()) if link.pending_out() => {
                        link.writer_armed = true;
                        fx.arm_writers.push((link.id, link.sock.as_raw_fd()));
                    }
                    Ok(()) => {}
                    Err(e) => fx
                        .events
                        .push((link.id, "io_error", lazy_str(e.to_string()))),
                }
            }
        }
    }

    fn handle_frame(
        &mut self,
        py: Python<'_>,
        idx: usize,
        env: &frame::Envelope<'_>,
        fx: &mut Effects,
    ) {
        let link = &mut self.links[idx];
        let wid = link.id;
        match (env.kind(), link.state) {
            (Some(Kind::Reply), LinkState::Ready | LinkState::Draining) => {
                if let Some(slot) = link.slots.remove(&env.id) {
                    link.completed += 1;
                    let fut = slot.fut.bind(py);
                    if !is_done(py, fut) {
                        match codec::decode(py, env.body) {
                            Ok(v) => set_result(py, fut, &v),
                            Err(e) => set_exception(
                                py,
                                fut,
                                errors::serialization(
                                    py,
                                    format!("reply from worker {wid} (pid {}) could not be decoded: {e}", link.pid),
                                ),
                            ),
                        }
                    }
                }
            }
            (Some(Kind::Error), LinkState::Ready | LinkState::Draining) => {
                if let Some(slot) = link.slots.remove(&env.id) {
                    link.completed += 1;
                    let fut = slot.fut.bind(py);
                    if !is_done(py, fut) {
                        let exc = match codec::decode(py, env.body) {
                            Ok(info) => errors::make(py, "_from_worker", (info, wid, link.pid)),
                            Err(e) => errors::protocol(
                                py,
                                format!("error reply from worker {wid} (pid {}) could not be decoded: {e}", link.pid),
                            ),
                        };
                        set_exception(py, fut, exc);
                    }
                }
            }
            (Some(Kind::Started), LinkState::Ready | LinkState::Draining) => {
                if let Some(slot) = link.slots.get_mut(&env.id) {
                    slot.frame = None;
                }
            }
            (Some(Kind::Hello), LinkState::Connecting) => {
                let verdict = match Hello::decode(env.body, PROTOCOL_VERSION) {
                    Err(e) => Err(e.to_string()),
                    Ok(h) if !secrets_equal(&h.secret, &self.secret) => {
                        Err("the peer did not present this pool's secret".to_string())
                    }
                    Ok(h) if h.worker_id != wid => Err(format!(
                        "the peer claims worker id {}, expected {wid}",
                        h.worker_id
                    )),
                    Ok(h) if h.pid != link.pid => Err(format!(
                        "the peer claims pid {}, but worker {wid} is pid {}",
                        h.pid, link.pid
                    )),
                    Ok(_) => Ok(()),
                };
                match verdict {
                    Ok(()) => {
                        let mut f = Vec::with_capacity(self.welcome.len() + 16);
                        frame::write_frame(&mut f, Kind::Welcome as u8, 0, None, &self.welcome);
                        link.state = LinkState::Loading;
                        if let Err(e) = link.send_now(&f) {
                            fx.events.push((wid, "io_error", lazy_str(e.to_string())));
                        }
                    }
                    Err(reason) => {
                        let mut f = Vec::new();
                        frame::write_frame(&mut f, Kind::Reject as u8, 0, None, reason.as_bytes());
                        let _ = link.send_now(&f);
                        fx.events.push((wid, "rejected", lazy_str(reason)));
                    }
                }
            }
            (Some(Kind::Ready), LinkState::Loading) => {
                link.state = LinkState::Ready;
                let info = codec::decode(py, env.body)
                    .map(|v| v.unbind())
                    .unwrap_or_else(|_| py.None());
                fx.events.push((wid, "ready", info));
            }
            (Some(Kind::StartupFailed), LinkState::Loading) => {
                let info = codec::decode(py, env.body)
                    .map(|v| v.unbind())
                    .unwrap_or_else(|_| py.None());
                link.state = LinkState::Draining;
                fx.events.push((wid, "startup_failed", info));
            }
            (kind, state) => {
                let what = match kind {
                    Some(k) => format!(
                        "unexpected {} frame while the worker is {state:?}",
                        k.name()
                    ),
                    None => format!("unknown frame kind {}", env.kind),
                };
                let message = format!(
                    "worker {wid} (pid {}) sent {what} (id {})",
                    link.pid, env.id
                );
                if let Some(slot) = link.slots.remove(&env.id) {
                    set_exception(py, slot.fut.bind(py), errors::protocol(py, message.clone()));
                }
                let fatal = state != LinkState::Ready && state != LinkState::Draining;
                fx.events.push((
                    wid,
                    if fatal {
                        "protocol_error"
                    } else {
                        "protocol_warning"
                    },
                    lazy_str(message),
                ));
            }
        }
    }

    fn run_effects(slf: &Bound<'_, Self>, fx: Effects) -> PyResult<()> {
        let py = slf.py();
        if fx.schedule_flush || !fx.arm_writers.is_empty() || !fx.disarm_writers.is_empty() {
            let loop_ = slf.borrow().loop_.clone_ref(py);
            let loop_ = loop_.bind(py);
            if fx.schedule_flush {
                loop_.call_method1(
                    intern!(py, "call_soon"),
                    (slf.getattr(intern!(py, "flush"))?,),
                )?;
            }
            for fd in fx.disarm_writers {
                loop_.call_method1(intern!(py, "remove_writer"), (fd,))?;
            }
            if !fx.arm_writers.is_empty() {
                let cb = slf.getattr(intern!(py, "on_writable"))?;
                for (wid, fd) in fx.arm_writers {
                    loop_.call_method1(intern!(py, "add_writer"), (fd, &cb, wid))?;
                }
            }
        }
        if !fx.events.is_empty() {
            let cb = slf.borrow().on_event.clone_ref(py);
            for (wid, name, payload) in fx.events {
                cb.call1(py, (wid, name, payload))?;
            }
        }
        Ok(())
    }
}

fn lazy_str(s: String) -> PyObject {
    // SAFETY-free: every caller runs with the GIL held (inside a #[pymethods] call).
    Python::attach(|py| pyo3::types::PyString::new(py, &s).into_any().unbind())
}

fn is_done(py: Python<'_>, fut: &Bound<'_, PyAny>) -> bool {
    fut.call_method0(intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(true)
}

fn set_result(py: Python<'_>, fut: &Bound<'_, PyAny>, v: &Bound<'_, PyAny>) {
    if let Err(e) = fut.call_method1(intern!(py, "set_result"), (v,)) {
        e.write_unraisable(py, Some(fut));
    }
}

fn set_exception(py: Python<'_>, fut: &Bound<'_, PyAny>, exc: PyErr) {
    if is_done(py, fut) {
        return;
    }
    if let Err(e) = fut.call_method1(intern!(py, "set_exception"), (exc.into_value(py),)) {
        e.write_unraisable(py, Some(fut));
    }
}

#[pymethods]
impl PoolCore {
    /// `window` = requests in flight per worker (max_concurrency + prefetch);
    /// `welcome` = the config dict sent to each worker after its HELLO.
    #[new]
    fn new(
        loop_: PyObject,
        on_event: PyObject,
        secret: Vec<u8>,
        welcome: &Bound<'_, PyAny>,
        max_frame_bytes: usize,
        window: usize,
    ) -> PyResult<Self> {
        let py = welcome.py();
        let welcome = codec::encode_to_vec(welcome)
            .map_err(|e| errors::serialization(py, e.describe("config")))?;
        Ok(PoolCore {
            links: Vec::new(),
            queue: VecDeque::new(),
            next_id: 1,
            max_frame: max_frame_bytes,
            window: window.max(1),
            secret,
            welcome,
            flush_scheduled: false,
            loop_,
            on_event,
            asks: 0,
        })
    }

    /// Take ownership of a spawned worker's socket (non-blocking, from `spawn_worker`).
    fn add_worker(&mut self, worker_id: u32, pid: u32, fd: i32) {
        // SAFETY: the caller hands over ownership of fd, a connected Unix stream socket.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        // Worker → parent frames may be as large as the limit plus the reply's envelope.
        self.links.push(Link {
            id: worker_id,
            pid,
            sock,
            state: LinkState::Connecting,
            reader: Some(FrameReader::new(self.max_frame)),
            out: Vec::new(),
            out_pos: 0,
            writer_armed: false,
            slots: HashMap::new(),
            completed: 0,
        });
    }

    /// Encode `msg` and send it to the least-loaded worker, or queue it (FIFO) until one has
    /// room. Raises SerializationError or ProtocolError (oversize) without sending anything.
    #[pyo3(signature = (msg, fut, trace=None))]
    fn submit(
        slf: &Bound<'_, Self>,
        msg: &Bound<'_, PyAny>,
        fut: PyObject,
        trace: Option<&str>,
    ) -> PyResult<()> {
        let py = slf.py();
        let mut fx = Effects::default();
        {
            let mut core = slf.borrow_mut();
            let id = core.next_id;
            let mut buf = Vec::with_capacity(128);
            let trace = trace
                .map(str::as_bytes)
                .filter(|t| t.len() <= frame::MAX_TRACE_LEN);
            let start = frame::begin_frame(&mut buf, Kind::Request as u8, id, trace);
            codec::encode_into(&mut buf, msg)
                .map_err(|e| errors::serialization(py, e.describe("message")))?;
            let size = buf.len() - frame::LEN_PREFIX;
            if size > core.max_frame {
                return Err(errors::protocol(
                    py,
                    oversize_message("the request frame", size, core.max_frame),
                ));
            }
            frame::finish_frame(&mut buf, start).expect("checked against max_frame");
            core.next_id += 1;
            core.asks += 1;
            if core.queue.is_empty() {
                if let Some(idx) = core.pick() {
                    core.send_to(idx, id, buf, fut, &mut fx, true);
                } else {
                    core.queue.push_back(Queued {
                        id,
                        frame: buf,
                        fut,
                    });
                }
            } else {
                core.queue.push_back(Queued {
                    id,
                    frame: buf,
                    fut,
                });
            }
        }
        Self::run_effects(slf, fx)
    }

    /// Called by the loop when a worker socket is readable.
    fn on_readable(slf: &Bound<'_, Self>, worker_id: u32) -> PyResult<()> {
        let py = slf.py();
        let mut fx = Effects::default();
        {
            let mut core = slf.borrow_mut();
            let core = &mut *core;
            let Some(idx) = core.link_index(worker_id) else {
                return Ok(());
            };
            let mut reader = core.links[idx].reader.take().expect("reader present");
            loop {
                let link = &mut core.links[idx];
                let n = match reader.read_from(&mut link.sock) {
                    Ok(0) => {
                        fx.events.push((worker_id, "eof", py.None()));
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        fx.events
                            .push((worker_id, "io_error", lazy_str(e.to_string())));
                        break;
                    }
                };
                let (wid, pid) = (link.id, link.pid);
                let mut broken = None;
                loop {
                    match reader.next_event() {
                        Ok(None) => break,
                        Ok(Some(Event::Frame(env))) => core.handle_frame(py, idx, &env, &mut fx),
                        Ok(Some(Event::Oversize {
                            kind,
                            id,
                            size,
                            limit,
                        })) => {
                            let message = format!(
                                "worker {wid} (pid {pid}) sent a {} frame of {size} bytes, over max_frame_bytes={limit}",
                                Kind::from_u8(kind).map_or("unknown", |k| k.name())
                            );
                            if let Some(slot) = core.links[idx].slots.remove(&id) {
                                set_exception(
                                    py,
                                    slot.fut.bind(py),
                                    errors::protocol(py, message.clone()),
                                );
                            }
                            fx.events.push((wid, "protocol_warning", lazy_str(message)));
                        }
                        Err(e) => {
                            broken = Some(format!("worker {wid} (pid {pid}): {e}"));
                            break;
                        }
                    }
                }
                if let Some(msg) = broken {
                    fx.events.push((worker_id, "protocol_error", lazy_str(msg)));
                    break;
                }
                if n < 16 * 1024 {
                    break; // drained what was there; the loop calls again when more arrives
                }
            }
            core.links[idx].reader = Some(reader);
            core.dispatch(py, &mut fx);
            core.flush_links(&mut fx);
        }
        Self::run_effects(slf, fx)
    }

    /// Called by the loop when a worker socket with buffered output is writable.
    fn on_writable(slf: &Bound<'_, Self>, worker_id: u32) -> PyResult<()> {
        let mut fx = Effects::default();
        {
            let mut core = slf.borrow_mut();
            if let Some(idx) = core.link_index(worker_id) {
                let link = &mut core.links[idx];
                match link.write_out() {
                    Ok(()) if !link.pending_out() => {
                        link.writer_armed = false;
                        fx.disarm_writers.push(link.sock.as_raw_fd());
                    }
                    Ok(()) => {}
                    Err(e) => {
                        link.writer_armed = false;
                        fx.disarm_writers.push(link.sock.as_raw_fd());
                        fx.events
                            .push((worker_id, "io_error", lazy_str(e.to_string())));
                    }
                }
            }
        }
        Self::run_effects(slf, fx)
    }

    /// Write coalesced requests (scheduled once per loop iteration by `submit`).
    fn flush(slf: &Bound<'_, Self>) -> PyResult<()> {
        let mut fx = Effects::default();
        {
            let mut core = slf.borrow_mut();
            core.flush_scheduled = false;
            core.flush_links(&mut fx);
        }
        Self::run_effects(slf, fx)
    }

    /// Move queued requests to workers with room (after a worker became ready).
    fn dispatch_queued(slf: &Bound<'_, Self>) -> PyResult<()> {
        let py = slf.py();
        let mut fx = Effects::default();
        {
            let mut core = slf.borrow_mut();
            core.dispatch(py, &mut fx);
            core.flush_links(&mut fx);
        }
        Self::run_effects(slf, fx)
    }

    /// Send a control frame (e.g. SHUTDOWN) to one worker, best effort.
    fn send_control(&mut self, worker_id: u32, kind: u8) {
        if let Some(idx) = self.link_index(worker_id) {
            let link = &mut self.links[idx];
            let mut f = Vec::with_capacity(16);
            frame::write_frame(&mut f, kind, 0, None, b"");
            let _ = link.send_now(&f);
            let _ = link.write_out();
            if link.state == LinkState::Ready {
                link.state = LinkState::Draining;
            }
        }
    }

    /// Stop sending new work to a worker (it keeps its in-flight requests).
    fn drain_worker(&mut self, worker_id: u32) {
        if let Some(idx) = self.link_index(worker_id) {
            self.links[idx].state = LinkState::Draining;
        }
    }

    /// Forget a worker whose process is gone. Requests it had started fail with `exc`;
    /// requests it had not started go back to the front of the queue, in their order.
    /// Returns (failed, requeued) counts. The socket is closed.
    fn remove_worker(
        slf: &Bound<'_, Self>,
        worker_id: u32,
        exc: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, usize)> {
        let py = slf.py();
        let mut fx = Effects::default();
        let counts = {
            let mut core = slf.borrow_mut();
            let Some(idx) = core.link_index(worker_id) else {
                return Ok((0, 0));
            };
            let link = core.links.remove(idx);
            if link.writer_armed {
                fx.disarm_writers.push(link.sock.as_raw_fd());
            }
            let mut unstarted = Vec::new();
            let mut failed = 0;
            for (id, slot) in link.slots {
                match slot.frame {
                    Some(frame) => unstarted.push(Queued {
                        id,
                        frame,
                        fut: slot.fut,
                    }),
                    None => {
                        failed += 1;
                        let fut = slot.fut.bind(py);
                        if !is_done(py, fut) {
                            let _ = fut.call_method1(intern!(py, "set_exception"), (exc,));
                        }
                    }
                }
            }
            unstarted.sort_by_key(|q| q.id);
            let requeued = unstarted.len();
            for q in unstarted.into_iter().rev() {
                core.queue.push_front(q);
            }
            core.dispatch(py, &mut fx);
            core.flush_links(&mut fx);
            (failed, requeued)
        };
        Self::run_effects(slf, fx)?;
        Ok(counts)
    }

    /// Fail every queued request with `exc` (no worker can take them). Returns the count.
    fn fail_queued(&mut self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> usize {
        let n = self.queue.len();
        for q in self.queue.drain(..) {
            let fut = q.fut.bind(py);
            if !is_done(py, fut) {
                let _ = fut.call_method1(intern!(py, "set_exception"), (exc,));
            }
        }
        n
    }

    /// Every future still waiting: queued or in flight.
    fn pending_futures<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let futs = self.queue.iter().map(|q| q.fut.clone_ref(py)).chain(
            self.links
                .iter()
                .flat_map(|l| l.slots.values().map(|s| s.fut.clone_ref(py))),
        );
        PyList::new(py, futs)
    }

    /// (worker_id, pid, state, in_flight, completed) for each connected worker.
    fn worker_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.links
            .iter()
            .map(|l| {
                let state = match l.state {
                    LinkState::Connecting | LinkState::Loading => "starting",
                    LinkState::Ready if l.in_flight() > 0 => "busy",
                    LinkState::Ready => "ready",
                    LinkState::Draining => "stopping",
                };
                PyTuple::new(
                    py,
                    [
                        l.id.into_pyobject(py)?.into_any(),
                        l.pid.into_pyobject(py)?.into_any(),
                        state.into_pyobject(py)?.into_any(),
                        l.in_flight().into_pyobject(py)?.into_any(),
                        l.completed.into_pyobject(py)?.into_any(),
                    ],
                )
            })
            .collect()
    }

    /// Requests waiting in the parent for a worker.
    #[getter]
    fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Requests submitted since the pool started.
    #[getter]
    fn asks(&self) -> u64 {
        self.asks
    }

    #[getter]
    fn max_frame_bytes(&self) -> usize {
        self.max_frame
    }
}
