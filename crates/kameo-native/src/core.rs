//! The parent's hot path: one `PoolCore` per pool owns every worker connection, the reply slots
//! keyed by correlation id, the stream buffers, and the FIFO of requests waiting for a worker.
//!
//! There is no I/O thread. The asyncio loop watches each worker socket (`loop.add_reader`) and
//! calls [`PoolCore::on_readable`], which reads what is there, decodes every complete frame and
//! resolves the waiting futures in one call; requests are written straight from
//! [`PoolCore::submit`], or coalesced and written once per loop iteration when the worker
//! already has requests in flight. So a round trip costs no thread hop at all.
//!
//! `PoolCore` is the `#[pymethods]` facade: each call borrows it once and runs plain Rust in
//! `crate::pool` (`PoolState` and its parts). Methods that need to call back into Python
//! (loop.add_writer, the event callback) collect what to do in `pool::Effects` while the core
//! is borrowed and do it after the borrow ends, so Python code never re-enters a borrowed core.

use crate::codec::{self, Options};
use crate::errors;
use crate::link::{Link, Target};
use crate::pool::Scheduler;
use crate::pool::{Effects, PoolState};
use kameo_core::link::LinkState;
use kameo_core::progress::Progress;
use kameo_core::stats::Stats;
use kameo_core::streams::{Streams, Take};
use kameo_core::wait;
use kameo_proto::frame::{self, Kind};
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

type PyObject = Py<PyAny>;

#[pyclass(module = "kameo._native")]
pub struct PoolCore {
    state: PoolState,
    loop_: PyObject,
    on_event: PyObject,
}

fn no_stream(id: u64) -> PyErr {
    PyKeyError::new_err(format!("no stream {id}"))
}

impl PoolCore {
    /// Run `f` on the borrowed state, then its effects.
    #[inline]
    fn with<'py, R>(
        slf: &Bound<'py, Self>,
        f: impl FnOnce(&mut PoolState, Python<'py>, &mut Effects) -> PyResult<R>,
    ) -> PyResult<R> {
        let py = slf.py();
        let mut fx = Effects::default();
        let r = {
            let mut core = slf.borrow_mut();
            f(&mut core.state, py, &mut fx)
        };
        fx.run(
            slf.as_any(),
            || slf.borrow().loop_.clone_ref(py),
            || slf.borrow().on_event.clone_ref(py),
        )?;
        r
    }
}

#[pymethods]
impl PoolCore {
    /// `concurrency` = requests a worker runs at once (max_concurrency); `prefetch` = requests
    /// sent ahead to a busy worker (with `adaptive_prefetch`: at most, fewer when its requests
    /// take long);
    /// `stream_window` = stream items a worker may send ahead of the consumer;
    /// `max_tasks` = requests after which a worker retires (0: never);
    /// `max_memory` = RSS in bytes over which a worker retires, checked after its answers;
    /// `welcome` = the config dict sent to each worker after its HELLO.
    #[new]
    #[pyo3(signature = (loop_, on_event, secret, welcome, *, max_frame_bytes, concurrency, prefetch, stream_window, adaptive_prefetch=false, max_tasks=0, max_memory=None, allow_pickle=false, shm_threshold=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        loop_: PyObject,
        on_event: PyObject,
        secret: Vec<u8>,
        welcome: &Bound<'_, PyAny>,
        max_frame_bytes: usize,
        concurrency: usize,
        prefetch: usize,
        stream_window: u32,
        adaptive_prefetch: bool,
        max_tasks: u64,
        max_memory: Option<u64>,
        allow_pickle: bool,
        shm_threshold: Option<usize>,
    ) -> PyResult<Self> {
        let py = welcome.py();
        let welcome = codec::encode_to_vec(welcome, &Options::INLINE)
            .map_err(|e| errors::serialization(py, e.describe("config")))?;
        let state = PoolState {
            links: Vec::new(),
            sched: Scheduler::new(concurrency, prefetch, adaptive_prefetch),
            streams: Streams::new(stream_window),
            next_id: 1,
            max_frame: max_frame_bytes,
            max_tasks,
            max_memory,
            stats: Stats::new(),
            secret,
            welcome,
            flush_scheduled: false,
            opts: Options {
                allow_pickle,
                shm_threshold: shm_threshold.unwrap_or(usize::MAX).max(1),
                recycler: Some(Default::default()),
                arrays: codec::Arrays::Parent,
                refs: codec::RefMode::Refuse,
                ref_hook: None,
            },
            ref_key: 0,
            observed: None,
        };
        Ok(PoolCore {
            state,
            loop_,
            on_event,
        })
    }

    /// Take ownership of a spawned worker's socket (non-blocking) and progress page, both
    /// from `spawn_worker`.
    fn add_worker(&mut self, worker_id: u32, pid: u32, fd: i32, progress_fd: i32) -> PyResult<()> {
        // SAFETY: the caller hands over ownership of fd, a connected Unix stream socket.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        let progress = Progress::open(progress_fd)?;
        let max_frame = self.state.max_frame;
        self.state
            .links
            .push(Link::new(worker_id, pid, sock, progress, max_frame));
        Ok(())
    }

    /// Encode `msg` and send it to the least-loaded worker, or queue it (FIFO) until one has
    /// room; `fut` gets the reply. Raises SerializationError or ProtocolError (oversize)
    /// without sending anything. Returns the request id. `timed`: `fut` has a timeout timer
    /// (`fut._kameo_timer`), cancelled when the request is resolved.
    #[pyo3(signature = (msg, fut, trace=None, retries=0, timed=false))]
    fn submit(
        slf: &Bound<'_, Self>,
        msg: &Bound<'_, PyAny>,
        fut: PyObject,
        trace: Option<&str>,
        retries: u32,
        timed: bool,
    ) -> PyResult<u64> {
        Self::with(slf, |core, py, fx| {
            let target = Target::Ask(fut, timed);
            let (id, _) = core.submit(py, target, retries, fx, |core, id| {
                let (frame, segs) = core.encode_request(py, Kind::Request, id, msg, trace)?;
                Ok((frame, segs, None))
            })?;
            Ok(id)
        })
    }

    /// Like `submit`, as a CALL frame (an operation on remote objects, `op`). It is pinned to
    /// `worker`, or to the worker of the remote object references it holds: sent only there
    /// (waiting for it while it is busy or starting) and never run elsewhere (no retries).
    /// Raises RefError for refs of another pool or of two workers, refs of another worker than
    /// `worker`, or a worker that is gone. Returns (id, the worker it is pinned to or None).
    #[pyo3(signature = (op, fut, trace=None, retries=0, timed=false, worker=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit_call(
        slf: &Bound<'_, Self>,
        op: &Bound<'_, PyAny>,
        fut: PyObject,
        trace: Option<&str>,
        retries: u32,
        timed: bool,
        worker: Option<u32>,
    ) -> PyResult<(u64, Option<u32>)> {
        Self::with(slf, |core, py, fx| {
            core.submit(py, Target::Ask(fut, timed), retries, fx, |core, id| {
                core.encode_call(py, Kind::Call, id, op, trace, worker)
            })
        })
    }

    /// Like `submit_stream`, as a CALL_STREAM frame, pinned as `submit_call` is.
    #[pyo3(signature = (op, trace=None, worker=None))]
    fn submit_call_stream(
        slf: &Bound<'_, Self>,
        op: &Bound<'_, PyAny>,
        trace: Option<&str>,
        worker: Option<u32>,
    ) -> PyResult<(u64, Option<u32>)> {
        Self::with(slf, |core, py, fx| {
            core.submit(py, Target::Stream, 0, fx, |core, id| {
                core.encode_call(py, Kind::CallStream, id, op, trace, worker)
            })
        })
    }

    /// Tell worker `worker_id` to forget the remote objects `numbers` (a RELEASE frame, written
    /// behind the requests already sent to it). False if the worker is gone.
    fn release(slf: &Bound<'_, Self>, worker_id: u32, numbers: Vec<u64>) -> PyResult<bool> {
        Self::with(slf, |core, py, fx| {
            if core.link_index(worker_id).is_none() {
                return Ok(false);
            }
            let body = frame::release_body(&numbers);
            core.control(py, worker_id, Kind::Release, 0, &body, fx);
            Ok(true)
        })
    }

    /// (worker_id, in_flight, retiring) of each worker that takes calls (ready or retiring).
    fn loads(&self) -> Vec<(u32, usize, bool)> {
        self.state
            .links
            .iter()
            .filter(|l| matches!(l.state, LinkState::Ready | LinkState::Draining))
            .map(|l| (l.id, l.in_flight(), l.state == LinkState::Draining))
            .collect()
    }

    /// Like `submit`, for a generator handler: items collect in a stream buffer read with
    /// `stream_take`. Returns the request id.
    #[pyo3(signature = (msg, trace=None))]
    fn submit_stream(
        slf: &Bound<'_, Self>,
        msg: &Bound<'_, PyAny>,
        trace: Option<&str>,
    ) -> PyResult<u64> {
        Self::with(slf, |core, py, fx| {
            let (id, _) = core.submit(py, Target::Stream, 0, fx, |core, id| {
                let (frame, segs) = core.encode_request(py, Kind::RequestStream, id, msg, trace)?;
                Ok((frame, segs, None))
            })?;
            Ok(id)
        })
    }

    /// Record the timing of each request from now on (`on`), for the pool's `CallFinished`
    /// events, or stop and forget what was recorded.
    fn set_observe(&mut self, on: bool) {
        let s = &mut self.state;
        match (on, s.observed.is_some()) {
            (true, false) => s.observed = Some(HashMap::new()),
            (false, true) => s.observed = None,
            _ => {}
        }
    }

    /// The timing of request `id`, recorded since `set_observe(True)`, once: (the worker it
    /// was sent to or None, seconds from submission until it was sent, seconds from then
    /// until it was resolved, or until now for a request resolved in Python: timed out,
    /// cancelled). None if nothing was recorded for it.
    fn take_timing(&mut self, id: u64) -> Option<(Option<u32>, f64, f64)> {
        let t = self.state.observed.as_mut()?.remove(&id)?;
        Some(t.split(Instant::now()))
    }

    /// Take every buffered item of stream `id`. Returns `(items, finished)`; raises the
    /// stream's exception once its items are exhausted. Taking items grants the worker credit.
    fn stream_take<'py>(slf: &Bound<'py, Self>, id: u64) -> PyResult<(Bound<'py, PyList>, bool)> {
        Self::with(slf, |core, py, fx| {
            let (taken, grant) = core
                .streams
                .take(id, |items| PyList::new(py, items))
                .map_err(|_| no_stream(id))?;
            if let Some(g) = grant {
                let body = frame::credit_body(g.credit);
                core.control(py, g.worker, Kind::Credit, id, &body, fx);
            }
            match taken {
                Take::Items(items) => items.map(|items| (items, false)),
                Take::Pending => Ok((PyList::empty(py), false)),
                Take::Finished(Ok(())) => Ok((PyList::empty(py), true)),
                Take::Finished(Err(exc)) => Err(PyErr::from_value(exc.into_bound(py))),
            }
        })
    }

    /// Resolve `fut` (with None) when stream `id` has items or has finished.
    fn stream_wait(&mut self, py: Python<'_>, id: u64, fut: PyObject) -> PyResult<()> {
        let now = self
            .state
            .streams
            .wait(id, fut)
            .map_err(|_| no_stream(id))?;
        crate::pool::wake(py, now);
        Ok(())
    }

    /// Stop stream `id`: a queued request is dropped, a running one is cancelled in the worker
    /// (its generator's `finally` runs); items still arriving are discarded.
    fn stream_cancel(slf: &Bound<'_, Self>, id: u64) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            if let Some(wid) = core.streams.cancel(id) {
                core.control(py, wid, Kind::Cancel, id, b"", fx);
            }
            Ok(())
        })
    }

    /// Cancel request `id` in the worker running it (an `ask` whose caller gave up).
    fn cancel(slf: &Bound<'_, Self>, id: u64) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            if let Some(wid) = core.link_running(id).map(|l| l.id) {
                core.control(py, wid, Kind::Cancel, id, b"", fx);
            }
            Ok(())
        })
    }

    /// Send an answer frame for callback `id` to a worker: ITEM (with `final`), END or ERROR.
    /// Raises SerializationError/ProtocolError for a value that cannot be sent. Returns False
    /// if the worker is gone.
    /// END carries no body; for ITEM and ERROR `value` is encoded, `None` included.
    #[pyo3(signature = (worker_id, kind, id, value, is_final=false))]
    fn send(
        slf: &Bound<'_, Self>,
        worker_id: u32,
        kind: u8,
        id: u64,
        value: &Bound<'_, PyAny>,
        is_final: bool,
    ) -> PyResult<bool> {
        Self::with(slf, |core, py, fx| {
            core.send_answer(py, worker_id, kind, id, value, is_final, fx)
        })
    }

    /// Wait at most `timeout` seconds for the worker that has request `id` to answer, or for
    /// `loop_fd` (the event loop's selector) to have anything to report; then read the
    /// worker's answers if it did. The caller makes sure the loop has nothing else to run, so
    /// this is the wait the loop would make, minus a loop iteration. False when nothing was
    /// read (the request still waits in the parent or in an output buffer, the time ran out, or
    /// something else is ready): the caller then waits for the loop as usual.
    fn wait_answer(slf: &Bound<'_, Self>, id: u64, loop_fd: i32, timeout: f64) -> PyResult<bool> {
        let (wid, sock) = {
            let core = slf.borrow();
            let Some(link) = core.state.link_running(id) else {
                return Ok(false);
            };
            if link.closed || link.pending_out() || core.state.flush_scheduled {
                return Ok(false);
            }
            (link.id, link.sock.as_raw_fd())
        };
        let ts = wait::timeout(timeout);
        let readable = slf
            .py()
            .detach(|| wait::wait_alone(sock, loop_fd, wait::spin(), &ts));
        if !readable {
            return Ok(false);
        }
        Self::on_readable(slf, wid)?;
        Ok(true)
    }

    /// Called by the loop when a worker socket is readable.
    fn on_readable(slf: &Bound<'_, Self>, worker_id: u32) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            core.on_readable(py, worker_id, fx);
            Ok(())
        })
    }

    /// Called by the loop when a worker socket with buffered output is writable.
    fn on_writable(slf: &Bound<'_, Self>, worker_id: u32) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            core.on_writable(py, worker_id, fx);
            Ok(())
        })
    }

    /// Write coalesced requests (scheduled once per loop iteration by `submit`).
    fn flush(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            core.flush_scheduled = false;
            core.flush_links(py, fx);
            Ok(())
        })
    }

    /// Move queued requests to workers with room (after a worker became ready).
    fn dispatch_queued(slf: &Bound<'_, Self>) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            core.dispatch(py, fx);
            core.flush_links(py, fx);
            Ok(())
        })
    }

    /// Send a control frame (e.g. SHUTDOWN) to one worker, best effort; it gets no new work.
    fn send_control(slf: &Bound<'_, Self>, worker_id: u32, kind: u8) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            if let Some(kind) = Kind::from_u8(kind) {
                core.control(py, worker_id, kind, 0, b"", fx);
            }
            if let Some(idx) = core.link_index(worker_id) {
                core.links[idx].state = LinkState::Draining;
            }
            Ok(())
        })
    }

    /// Forget a worker whose process is gone; its socket is closed.
    ///
    /// The worker recorded in its progress page how many of the requests sent to it it took
    /// up. Unanswered requests among those may have run: they fail with `exc` (or run again
    /// elsewhere if they have retries left, i.e. idempotent asks); the rest never ran and go
    /// back to the front of the queue, in their order.
    /// Returns (failed, requeued) counts.
    fn remove_worker(
        slf: &Bound<'_, Self>,
        worker_id: u32,
        exc: &Bound<'_, PyAny>,
    ) -> PyResult<(usize, usize)> {
        Self::with(slf, |core, py, fx| {
            Ok(match core.link_index(worker_id) {
                Some(idx) => core.remove_worker(py, idx, exc, fx),
                None => (0, 0),
            })
        })
    }

    /// Fail every queued request with `exc` (no worker can take them). Returns the count.
    fn fail_queued(&mut self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> usize {
        self.state.fail_queued(py, exc)
    }

    /// Requests not finished yet: queued in the parent or in flight on a worker.
    fn outstanding(&self) -> usize {
        self.state.outstanding()
    }

    /// Workers (by id) from which nothing arrived for `timeout` seconds.
    fn silent_workers(&self, timeout: f64) -> Vec<u32> {
        let limit = Duration::from_secs_f64(timeout.max(0.0));
        self.state
            .links
            .iter()
            .filter(|l| {
                matches!(l.state, LinkState::Ready | LinkState::Draining)
                    && l.last_seen.elapsed() > limit
            })
            .map(|l| l.id)
            .collect()
    }

    /// Stop giving a worker new requests (it finishes what it has, then `drained` fires).
    fn retire(slf: &Bound<'_, Self>, worker_id: u32) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            core.retire(py, worker_id, fx);
            Ok(())
        })
    }

    /// Whether request `id` is still in flight on some worker (returns its worker id).
    fn running_on(&self, id: u64) -> Option<u32> {
        self.state.link_running(id).map(|l| l.id)
    }

    /// (completed, errors, retries, p50 seconds, p99 seconds) since the pool started.
    fn stats(&self) -> (u64, u64, u64, Option<f64>, Option<f64>) {
        let s = &self.state.stats;
        (
            s.completed,
            s.errors,
            s.retries,
            s.quantile(0.5),
            s.quantile(0.99),
        )
    }

    /// (worker_id, pid, state, in_flight, completed) for each connected worker.
    fn worker_stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        self.state
            .links
            .iter()
            .map(|l| {
                let state = match l.state {
                    LinkState::Connecting | LinkState::Loading => "starting",
                    LinkState::Ready if l.in_flight() > 0 => "busy",
                    LinkState::Ready => "ready",
                    LinkState::Draining => "stopping",
                };
                (l.id, l.pid, state, l.in_flight(), l.completed).into_pyobject(py)
            })
            .collect()
    }

    /// The pool's key: CALLs take remote object references whose `_key` is this one.
    fn set_ref_key(&mut self, key: u64) {
        self.state.ref_key = key;
    }

    /// Set what a remote object reference in a reply or stream item becomes:
    /// `hook(worker_id, number, type_name) -> object`; an exception it raises fails that
    /// request.
    fn set_ref_hook(&mut self, hook: PyObject) {
        self.state.opts.ref_hook = Some(std::sync::Arc::new(hook));
    }

    /// Requests waiting in the parent for a worker.
    #[getter]
    fn queued(&self) -> usize {
        self.state.sched.len()
    }

    /// Requests submitted since the pool started.
    #[getter]
    fn asks(&self) -> u64 {
        self.state.sched.asks
    }

    /// Answers that arrived for requests whose caller had given up (not in `stats()`).
    #[getter]
    fn abandoned_answers(&self) -> u64 {
        self.state.stats.abandoned
    }

    /// Open stream buffers (for tests of flow control).
    #[getter]
    fn open_streams(&self) -> usize {
        self.state.streams.len()
    }

    #[getter]
    fn max_frame_bytes(&self) -> usize {
        self.state.max_frame
    }
}
