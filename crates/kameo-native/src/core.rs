//! The parent's hot path: one `PoolCore` per pool owns every worker connection, the reply slots
//! keyed by correlation id, the stream buffers, and the FIFO of requests waiting for a worker.
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

use crate::codec::{self, Options, Segments};
use crate::errors;
use crate::events;
use crate::frames::{self, Body, Head, Incoming};
use crate::link::{self, Link, LinkState, Slot, Target};
use crate::progress::Progress;
use crate::wait;
use kameo_proto::frame::{self, Kind};
use kameo_proto::handshake::{secrets_equal, Hello};
use kameo_proto::PROTOCOL_VERSION;
use pyo3::exceptions::PyKeyError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};
use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

type PyObject = Py<PyAny>;

/// Counters and a latency histogram for `Pool.stats()`.
struct Stats {
    /// Answers (replies, errors, ends of streams) that reached a caller still waiting.
    completed: u64,
    /// Error answers among those.
    errors: u64,
    retries: u64,
    /// Answers that arrived for requests the caller had given up on (a future already done,
    /// a cancelled stream): not counted above.
    abandoned: u64,
    /// Geometric buckets, eight per power of two of the latency in nanoseconds (~9% wide).
    buckets: Vec<u64>,
}

impl Stats {
    const PER_OCTAVE: f64 = 8.0;

    fn new() -> Self {
        Stats {
            completed: 0,
            errors: 0,
            retries: 0,
            abandoned: 0,
            buckets: vec![0; 64 * 8],
        }
    }

    fn record(&mut self, d: Duration) {
        self.completed += 1;
        let ns = d.as_nanos().max(1) as f64;
        let i = ((ns.log2() * Self::PER_OCTAVE) as usize).min(self.buckets.len() - 1);
        self.buckets[i] += 1;
    }

    /// The latency (seconds) below which a fraction `q` of completed requests fell.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(2f64.powf((i as f64 + 1.0) / Self::PER_OCTAVE) / 1e9);
            }
        }
        None
    }
}

struct Queued {
    id: u64,
    frame: Vec<u8>,
    segs: Segments,
    target: Target,
    retries: u32,
}

/// Items of one `pool.stream()` call, between the socket and the Python iterator.
struct StreamBuf {
    items: VecDeque<PyObject>,
    waiter: Option<PyObject>,
    /// None while the worker is still producing; Some(Err(exception)) if it failed.
    outcome: Option<Result<(), PyObject>>,
    cancelled: bool,
    /// Items consumed since the last CREDIT.
    taken: u32,
    /// Items handed to the consumer by the last `stream_take`, credited at the next one.
    handed_out: u32,
    /// The worker running it, once sent.
    worker: Option<u32>,
}

impl StreamBuf {
    fn new() -> Self {
        StreamBuf {
            items: VecDeque::new(),
            waiter: None,
            outcome: None,
            cancelled: false,
            taken: 0,
            handed_out: 0,
            worker: None,
        }
    }

    fn wake(&mut self, py: Python<'_>) {
        if let Some(w) = self.waiter.take() {
            let w = w.bind(py);
            if !is_done(py, w) {
                set_result(py, w, &py.None().into_bound(py));
            }
        }
    }

    fn finish(&mut self, py: Python<'_>, outcome: Result<(), PyObject>) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
        self.wake(py);
    }
}

/// Work to do once the core is no longer borrowed.
#[derive(Default)]
struct Effects {
    /// (worker id, event name, payload) for the pool's event callback.
    events: Vec<(u32, &'static str, PyObject)>,
    arm_writers: Vec<(u32, i32)>,
    disarm_writers: Vec<i32>,
    /// Sockets of links that closed: the loop stops watching them at once (the pool also does
    /// when it gets the event, but a level-triggered reader left behind would spin).
    disarm_readers: Vec<i32>,
    schedule_flush: bool,
}

/// How much work (by its recent answers) a busy worker is sent ahead: enough that it never
/// waits for the parent between short requests, little enough that nothing waits long behind
/// a request that turns out long while another worker could take it.
const PREFETCH_BUDGET_NS: u64 = 1_000_000;

#[pyclass(module = "kameo._native")]
pub struct PoolCore {
    links: Vec<Link>,
    queue: VecDeque<Queued>,
    streams: HashMap<u64, StreamBuf>,
    next_id: u64,
    max_frame: usize,
    /// Requests a worker runs at once (max_concurrency).
    concurrency: usize,
    /// This many more are sent ahead to a busy worker; with `adaptive_prefetch` at most this
    /// many, by how long its requests take (see [`Link::ahead`]).
    prefetch: usize,
    adaptive_prefetch: bool,
    stream_window: u32,
    max_tasks: u64,
    /// `max_memory_per_worker` in bytes: checked after answers (see `finish_slot`).
    max_memory: Option<u64>,
    stats: Stats,
    secret: Vec<u8>,
    welcome: Vec<u8>,
    flush_scheduled: bool,
    /// Codec options of every connection (pickle, shared-memory threshold).
    opts: Options,
    loop_: PyObject,
    on_event: PyObject,
    asks: u64,
}

/// After a write attempt: arm the loop's writer if output is left over, report a broken socket.
fn settle_write(py: Python<'_>, link: &mut Link, result: io::Result<()>, fx: &mut Effects) {
    match result {
        Ok(()) if link.pending_out() && !link.writer_armed => {
            link.writer_armed = true;
            fx.arm_writers.push((link.id, link.sock.as_raw_fd()));
        }
        Ok(()) => {}
        Err(e) => fx
            .events
            .push((link.id, events::IO_ERROR, pystr(py, &e.to_string()))),
    }
}

fn pystr(py: Python<'_>, s: &str) -> PyObject {
    PyString::new(py, s).into_any().unbind()
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

impl PoolCore {
    /// The link that has request `id` in flight.
    fn link_running(&self, id: u64) -> Option<&Link> {
        self.links.iter().find(|l| l.slots.contains_key(&id))
    }

    fn link_index(&self, worker_id: u32) -> Option<usize> {
        self.links.iter().position(|l| l.id == worker_id)
    }

    /// Least-loaded ready worker with room in its window: what it runs at once, plus the
    /// requests sent ahead (`prefetch`, or with `adaptive_prefetch` about PREFETCH_BUDGET_NS
    /// of its work, at most `prefetch`).
    fn pick(&self) -> Option<usize> {
        let now = Instant::now();
        let mut best: Option<(usize, usize)> = None;
        for (i, l) in self.links.iter().enumerate() {
            if l.state == LinkState::Ready {
                let n = l.in_flight();
                let ahead = if self.adaptive_prefetch {
                    l.ahead(now, self.prefetch, PREFETCH_BUDGET_NS)
                } else {
                    self.prefetch
                };
                if best.is_none_or(|(_, b)| n < b) && n < self.concurrency + ahead {
                    best = Some((i, n));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// The request's waiter is gone (cancelled future, cancelled stream): do not send it.
    fn abandoned(&self, py: Python<'_>, id: u64, target: &Target) -> bool {
        match target {
            Target::Ask(fut, _) => is_done(py, fut.bind(py)),
            Target::Stream => self.streams.get(&id).is_none_or(|s| s.cancelled),
        }
    }

    /// Register the slot, then write (or coalesce) the frame.
    fn send_to(&mut self, py: Python<'_>, idx: usize, q: Queued, fx: &mut Effects) {
        let Queued {
            id,
            frame,
            segs,
            target,
            retries,
        } = q;
        let link = &mut self.links[idx];
        if let Target::Stream = target {
            if let Some(s) = self.streams.get_mut(&id) {
                s.worker = Some(link.id);
            }
        }
        // An idle worker gets the frame now; a busy one gets it with the other frames of this
        // loop iteration, in one write by `flush`.
        let busy = link.in_flight() > 0;
        let now = Instant::now();
        if !busy {
            link.busy_since = Some(now);
        }
        let result = if busy {
            link.buffer(&frame, &segs);
            if !self.flush_scheduled {
                self.flush_scheduled = true;
                fx.schedule_flush = true;
            }
            None
        } else {
            Some(link.send_now(&frame, &segs))
        };
        let seq = link.next_seq;
        link.next_seq += 1;
        link.slots.insert(
            id,
            Slot {
                target,
                frame,
                segs,
                seq,
                retries,
                sent: now,
            },
        );
        if let Some(result) = result {
            settle_write(py, link, result, fx);
        }
    }

    /// Move queued requests to workers with room.
    fn dispatch(&mut self, py: Python<'_>, fx: &mut Effects) {
        while !self.queue.is_empty() {
            let Some(idx) = self.pick() else { break };
            let q = self.queue.pop_front().expect("not empty");
            if self.abandoned(py, q.id, &q.target) {
                self.streams.remove(&q.id);
                continue;
            }
            self.send_to(py, idx, q, fx);
        }
    }

    fn flush_links(&mut self, py: Python<'_>, fx: &mut Effects) {
        for link in &mut self.links {
            if link.pending_out() && !link.writer_armed {
                let result = link.write_out();
                settle_write(py, link, result, fx);
            }
        }
    }

    /// Queue a small control frame (CREDIT, CANCEL, ...) to a worker and write it now.
    fn control(
        &mut self,
        py: Python<'_>,
        worker_id: u32,
        kind: Kind,
        id: u64,
        body: &[u8],
        fx: &mut Effects,
    ) {
        if let Some(idx) = self.link_index(worker_id) {
            let link = &mut self.links[idx];
            let f = frames::raw_frame(kind as u8, id, body);
            let result = link.send_now(&f, &Vec::new());
            settle_write(py, link, result, fx);
        }
    }

    /// A request finished on a worker (REPLY, ITEM+final, END or ERROR): free its slot, and
    /// retire the worker when it reached `max_tasks`.
    fn finish_slot(
        &mut self,
        py: Python<'_>,
        idx: usize,
        id: u64,
        fx: &mut Effects,
    ) -> Option<Slot> {
        let link = &mut self.links[idx];
        let slot = link.slots.remove(&id)?;
        link.completed += 1;
        let now = Instant::now();
        link.answered(now);
        if self.max_tasks > 0 && link.completed >= self.max_tasks && link.state == LinkState::Ready
        {
            link.state = LinkState::Draining;
            fx.events
                .push((link.id, events::RETIRE, pystr(py, "max_tasks_per_worker")));
        }
        if let Some(limit) = self.max_memory {
            // Checked here, after the answer, so a worker that grows fast is retired after the
            // request that crossed the limit (the pool's tick also checks idle workers).
            if link.state == LinkState::Ready && link.rss_due(now) {
                if let Some(rss) = link::rss(link.pid).filter(|&r| r > limit) {
                    link.state = LinkState::Draining;
                    let why = format!("max_memory_per_worker ({rss} > {limit} bytes)");
                    fx.events.push((link.id, events::RETIRE, pystr(py, &why)));
                }
            }
        }
        if link.state == LinkState::Draining && link.slots.is_empty() {
            fx.events.push((link.id, events::DRAINED, py.None()));
        }
        Some(slot)
    }

    /// Resolve a request a worker answered and count it: in `completed` (and `errors` for an
    /// error answer) if its caller still waited, else in `abandoned`.
    fn answer(
        &mut self,
        py: Python<'_>,
        id: u64,
        slot: Slot,
        outcome: Result<Bound<'_, PyAny>, PyErr>,
        error: bool,
    ) {
        let latency = slot.sent.elapsed();
        if self.resolve(py, id, slot.target, outcome) {
            self.stats.record(latency);
            self.stats.errors += u64::from(error);
        } else {
            self.stats.abandoned += 1;
        }
    }

    /// Resolve a finished request with a value (`Ok`) or an exception (`Err`). False if its
    /// caller no longer waited (a future already done, a cancelled stream).
    fn resolve(
        &mut self,
        py: Python<'_>,
        id: u64,
        target: Target,
        outcome: Result<Bound<'_, PyAny>, PyErr>,
    ) -> bool {
        match target {
            Target::Ask(fut, timed) => {
                let fut = fut.bind(py);
                if timed {
                    // Its timer goes now: left to expire it would stay in the loop's heap for
                    // the whole timeout (a done callback would keep the future, and its reply,
                    // alive until the next loop iteration).
                    if let Ok(timer) = fut.getattr(intern!(py, "_kameo_timer")) {
                        if !timer.is_none() {
                            let _ = timer.call_method0(intern!(py, "cancel"));
                        }
                    }
                }
                // No done() check first: a future the caller already gave up on (cancelled,
                // timed out) refuses the result with InvalidStateError, which is ignored.
                let r = match outcome {
                    Ok(v) => fut.call_method1(intern!(py, "set_result"), (v,)),
                    Err(e) => fut.call_method1(intern!(py, "set_exception"), (e.into_value(py),)),
                };
                match r {
                    Ok(_) => true,
                    Err(e) => {
                        if !e.is_instance_of::<pyo3::exceptions::asyncio::InvalidStateError>(py) {
                            e.write_unraisable(py, Some(fut));
                            return true;
                        }
                        false
                    }
                }
            }
            Target::Stream => match self.streams.get_mut(&id) {
                Some(s) if s.cancelled => {
                    self.streams.remove(&id);
                    false
                }
                Some(s) => {
                    s.finish(
                        py,
                        outcome.map(|_| ()).map_err(|e| e.into_value(py).into_any()),
                    );
                    true
                }
                None => false,
            },
        }
    }

    fn handle_frame(
        &mut self,
        py: Python<'_>,
        idx: usize,
        env: &frame::Envelope<'_>,
        segs: &Segments,
        fx: &mut Effects,
    ) {
        let opts = self.opts.clone();
        let (wid, pid, state) = (
            self.links[idx].id,
            self.links[idx].pid,
            self.links[idx].state,
        );
        let serving = matches!(state, LinkState::Ready | LinkState::Draining);
        match env.kind() {
            Some(Kind::Reply) if serving => {
                if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                    let v = codec::decode(py, env.body, &opts, segs).map_err(|e| {
                        errors::serialization(
                            py,
                            format!(
                                "reply from worker {wid} (pid {pid}) could not be decoded: {e}"
                            ),
                        )
                    });
                    self.answer(py, env.id, slot, v, false);
                }
            }
            Some(Kind::Error) if serving => {
                if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                    let exc = match codec::decode(py, env.body, &opts, segs) {
                        Ok(info) => errors::make(py, "_from_worker", (info, wid, pid)),
                        Err(e) => errors::protocol(
                            py,
                            format!("error reply from worker {wid} (pid {pid}) could not be decoded: {e}"),
                        ),
                    };
                    self.answer(py, env.id, slot, Err(exc), true);
                }
            }
            Some(Kind::Item) if serving => {
                let decoded = codec::decode(py, env.body, &opts, segs);
                let Some(s) = self.streams.get_mut(&env.id) else {
                    return;
                };
                if !s.cancelled {
                    match decoded {
                        Ok(v) => {
                            s.items.push_back(v.unbind());
                            s.wake(py);
                        }
                        Err(e) => {
                            let exc = errors::serialization(
                                py,
                                format!("stream item from worker {wid} (pid {pid}) could not be decoded: {e}"),
                            );
                            s.finish(py, Err(exc.into_value(py).into_any()));
                        }
                    }
                }
                if env.is_final() {
                    if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                        self.answer(py, env.id, slot, Ok(py.None().into_bound(py)), false);
                    }
                }
            }
            Some(Kind::End) if serving => {
                if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                    self.answer(py, env.id, slot, Ok(py.None().into_bound(py)), false);
                }
            }
            Some(Kind::Heartbeat) => {} // last_seen is updated for every read
            Some(Kind::Callback) if serving => {
                let trace = env.trace.map(|t| String::from_utf8_lossy(t).into_owned());
                let payload = match codec::decode(py, env.body, &opts, segs) {
                    Ok(body) => (env.id, body, trace)
                        .into_pyobject(py)
                        .map(|t| t.into_any().unbind()),
                    Err(e) => (
                        env.id,
                        format!("callback request could not be decoded: {e}"),
                        trace,
                    )
                        .into_pyobject(py)
                        .map(|t| t.into_any().unbind()),
                };
                if let Ok(p) = payload {
                    fx.events.push((wid, events::CALLBACK, p));
                }
            }
            Some(Kind::Credit) if serving => {
                let n = frame::credit_count(env.body);
                if let Ok(p) = (env.id, n).into_pyobject(py) {
                    fx.events
                        .push((wid, events::CALLBACK_CREDIT, p.into_any().unbind()));
                }
            }
            Some(Kind::Cancel) if serving => {
                let p = env.id.into_pyobject(py).expect("int");
                fx.events
                    .push((wid, events::CALLBACK_CANCEL, p.into_any().unbind()));
            }
            Some(Kind::Hello) if state == LinkState::Connecting => {
                self.handle_hello(py, idx, env.body, fx)
            }
            Some(Kind::Ready) if state == LinkState::Loading => {
                self.links[idx].state = LinkState::Ready;
                let info = codec::decode(py, env.body, &opts, segs)
                    .map(|v| v.unbind())
                    .unwrap_or_else(|_| py.None());
                fx.events.push((wid, events::READY, info));
            }
            Some(Kind::StartupFailed) if state == LinkState::Loading => {
                let info = codec::decode(py, env.body, &opts, segs)
                    .map(|v| v.unbind())
                    .unwrap_or_else(|_| py.None());
                self.links[idx].state = LinkState::Draining;
                fx.events.push((wid, events::STARTUP_FAILED, info));
            }
            kind => {
                let what = match kind {
                    Some(k) => format!(
                        "unexpected {} frame while the worker is {state:?}",
                        k.name()
                    ),
                    None => format!("unknown frame kind {}", env.kind),
                };
                let message = format!("worker {wid} (pid {pid}) sent {what} (id {})", env.id);
                if serving {
                    if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                        let exc = errors::protocol(py, message.clone());
                        self.answer(py, env.id, slot, Err(exc), false);
                    }
                }
                let name = if serving {
                    events::PROTOCOL_WARNING
                } else {
                    self.links[idx].closed = true;
                    fx.disarm_readers.push(self.links[idx].sock.as_raw_fd());
                    events::PROTOCOL_ERROR
                };
                fx.events.push((wid, name, pystr(py, &message)));
            }
        }
    }

    fn handle_hello(&mut self, py: Python<'_>, idx: usize, body: &[u8], fx: &mut Effects) {
        let link = &mut self.links[idx];
        let wid = link.id;
        let verdict = match Hello::decode(body, PROTOCOL_VERSION) {
            Err(e) => Err(e.to_string()),
            Ok(h) if !secrets_equal(&h.secret, &self.secret) => {
                Err("the peer did not present this pool's secret".into())
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
                let f = frames::raw_frame(Kind::Welcome as u8, 0, &self.welcome);
                link.state = LinkState::Loading;
                if let Err(e) = link.send_now(&f, &Vec::new()) {
                    fx.events
                        .push((wid, events::IO_ERROR, pystr(py, &e.to_string())));
                }
            }
            Err(reason) => {
                let f = frames::raw_frame(Kind::Reject as u8, 0, reason.as_bytes());
                let _ = link.send_now(&f, &Vec::new());
                fx.events.push((wid, events::REJECTED, pystr(py, &reason)));
            }
        }
    }

    fn encode_request(
        &self,
        py: Python<'_>,
        kind: Kind,
        id: u64,
        msg: &Bound<'_, PyAny>,
        trace: Option<&str>,
    ) -> PyResult<(Vec<u8>, Segments)> {
        let head = Head::new(kind as u8, id).trace(trace);
        frames::encode_frame(head, Body::Value(msg), &self.opts, self.max_frame)
            .map_err(|e| e.into_pyerr(py, "message", "request"))
    }

    fn enqueue(&mut self, py: Python<'_>, q: Queued, fx: &mut Effects) {
        self.asks += 1;
        if self.queue.is_empty() {
            if let Some(idx) = self.pick() {
                self.send_to(py, idx, q, fx);
                return;
            }
        }
        self.queue.push_back(q);
    }

    fn run_effects(slf: &Bound<'_, Self>, fx: Effects) -> PyResult<()> {
        let py = slf.py();
        if fx.schedule_flush
            || !fx.arm_writers.is_empty()
            || !fx.disarm_writers.is_empty()
            || !fx.disarm_readers.is_empty()
        {
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
            for fd in fx.disarm_readers {
                loop_.call_method1(intern!(py, "remove_reader"), (fd,))?;
            }
            if !fx.arm_writers.is_empty() {
                let cb = slf.getattr(intern!(py, "on_writable"))?;
                for (wid, fd) in fx.arm_writers {
                    loop_.call_method1(intern!(py, "add_writer"), (fd, &cb, wid))?;
                }
            }
        }
        if !fx.events.is_empty() {
            // Every event is delivered, even after one fails: a lost "eof" would leave its
            // worker unreplaced and its requests waiting. The first error is raised after.
            let cb = slf.borrow().on_event.clone_ref(py);
            let mut first = None;
            for (wid, name, payload) in fx.events {
                if let Err(e) = cb.call1(py, (wid, name, payload)) {
                    first.get_or_insert(e);
                }
            }
            if let Some(e) = first {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Run `f` on the borrowed core, then its effects.
    fn with<'py, R>(
        slf: &Bound<'py, Self>,
        f: impl FnOnce(&mut Self, Python<'py>, &mut Effects) -> PyResult<R>,
    ) -> PyResult<R> {
        let py = slf.py();
        let mut fx = Effects::default();
        let r = {
            let mut core = slf.borrow_mut();
            f(&mut core, py, &mut fx)
        };
        Self::run_effects(slf, fx)?;
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
        Ok(PoolCore {
            links: Vec::new(),
            queue: VecDeque::new(),
            streams: HashMap::new(),
            next_id: 1,
            max_frame: max_frame_bytes,
            concurrency: concurrency.max(1),
            prefetch,
            adaptive_prefetch,
            stream_window: stream_window.max(1),
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
            },
            loop_,
            on_event,
            asks: 0,
        })
    }

    /// Take ownership of a spawned worker's socket (non-blocking) and progress page, both
    /// from `spawn_worker`.
    fn add_worker(&mut self, worker_id: u32, pid: u32, fd: i32, progress_fd: i32) -> PyResult<()> {
        // SAFETY: the caller hands over ownership of fd, a connected Unix stream socket.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        let progress = Progress::open(progress_fd)?;
        self.links
            .push(Link::new(worker_id, pid, sock, progress, self.max_frame));
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
            let id = core.next_id;
            let (frame, segs) = core.encode_request(py, Kind::Request, id, msg, trace)?;
            core.next_id += 1;
            core.enqueue(
                py,
                Queued {
                    id,
                    frame,
                    segs,
                    target: Target::Ask(fut, timed),
                    retries,
                },
                fx,
            );
            Ok(id)
        })
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
            let id = core.next_id;
            let (frame, segs) = core.encode_request(py, Kind::RequestStream, id, msg, trace)?;
            core.next_id += 1;
            core.streams.insert(id, StreamBuf::new());
            core.enqueue(
                py,
                Queued {
                    id,
                    frame,
                    segs,
                    target: Target::Stream,
                    retries: 0,
                },
                fx,
            );
            Ok(id)
        })
    }

    /// Take every buffered item of stream `id`. Returns `(items, finished)`; raises the
    /// stream's exception once its items are exhausted. Taking items grants the worker credit.
    fn stream_take<'py>(slf: &Bound<'py, Self>, id: u64) -> PyResult<(Bound<'py, PyList>, bool)> {
        Self::with(slf, |core, py, fx| {
            let Some(s) = core.streams.get_mut(&id) else {
                return Err(PyKeyError::new_err(format!("no stream {id}")));
            };
            // The consumer takes again only once it has used every item handed out before:
            // credit that batch now, so the worker never runs more than the window ahead.
            let n = s.items.len() as u32;
            s.taken += std::mem::replace(&mut s.handed_out, n);
            let mut grant = None;
            if s.outcome.is_none() && s.taken >= (core.stream_window / 4).max(1) {
                grant = s.worker.map(|wid| (wid, std::mem::take(&mut s.taken)));
            }
            let result = if n > 0 {
                PyList::new(py, s.items.drain(..)).map(|items| (items, false))
            } else {
                match s.outcome.take() {
                    None => Ok((PyList::empty(py), false)),
                    Some(outcome) => {
                        core.streams.remove(&id);
                        match outcome {
                            Ok(()) => Ok((PyList::empty(py), true)),
                            Err(exc) => Err(PyErr::from_value(exc.into_bound(py))),
                        }
                    }
                }
            };
            if let Some((wid, credit)) = grant {
                core.control(py, wid, Kind::Credit, id, &frame::credit_body(credit), fx);
            }
            result
        })
    }

    /// Resolve `fut` (with None) when stream `id` has items or has finished.
    fn stream_wait(&mut self, py: Python<'_>, id: u64, fut: PyObject) -> PyResult<()> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Err(PyKeyError::new_err(format!("no stream {id}")));
        };
        s.waiter = Some(fut);
        if !s.items.is_empty() || s.outcome.is_some() {
            s.wake(py);
        }
        Ok(())
    }

    /// Stop stream `id`: a queued request is dropped, a running one is cancelled in the worker
    /// (its generator's `finally` runs); items still arriving are discarded.
    fn stream_cancel(slf: &Bound<'_, Self>, id: u64) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            let Some(s) = core.streams.get_mut(&id) else {
                return Ok(());
            };
            s.items.clear();
            if s.outcome.is_some() || s.worker.is_none() {
                core.streams.remove(&id); // finished, or still queued (dispatch skips it)
                return Ok(());
            }
            s.cancelled = true;
            let wid = s.worker.expect("checked");
            core.control(py, wid, Kind::Cancel, id, b"", fx);
            Ok(())
        })
    }

    /// Cancel request `id` in the worker running it (an `ask` whose caller gave up).
    fn cancel(slf: &Bound<'_, Self>, id: u64) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            if let Some(wid) = core.running_on(id) {
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
            let Some(idx) = core.link_index(worker_id) else {
                return Ok(false);
            };
            let body = if kind == Kind::End as u8 {
                Body::Empty
            } else {
                Body::Value(value)
            };
            let head = Head::new(kind, id).is_final(is_final);
            let (buf, segs) = frames::encode_frame(head, body, &core.opts, core.max_frame)
                .map_err(|e| e.into_pyerr(py, "item", "callback item"))?;
            let link = &mut core.links[idx];
            let result = link.send_now(&buf, &segs);
            settle_write(py, link, result, fx);
            Ok(true)
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
            let Some(link) = core.link_running(id) else {
                return Ok(false);
            };
            if link.closed || link.pending_out() || core.flush_scheduled {
                return Ok(false);
            }
            (link.id, link.sock.as_raw_fd())
        };
        let timeout = timeout.clamp(0.0, 1.0);
        let ts = libc::timespec {
            tv_sec: timeout.trunc() as libc::time_t,
            tv_nsec: (timeout.fract() * 1e9) as libc::c_long,
        };
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
            let Some(idx) = core.link_index(worker_id) else {
                return Ok(());
            };
            if core.links[idx].closed {
                return Ok(());
            }
            let mut inbox = core.links[idx].inbox.take().expect("inbox present");
            let (wid, pid) = (core.links[idx].id, core.links[idx].pid);
            loop {
                let sock = core.links[idx].sock.as_raw_fd();
                let n = match inbox.read(sock, 0) {
                    Ok(0) => {
                        fx.events.push((wid, events::EOF, py.None()));
                        core.links[idx].closed = true;
                        fx.disarm_readers.push(sock);
                        break;
                    }
                    Ok(n) => {
                        core.links[idx].last_seen = Instant::now();
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        fx.events
                            .push((wid, events::IO_ERROR, pystr(py, &e.to_string())));
                        core.links[idx].closed = true;
                        fx.disarm_readers.push(sock);
                        break;
                    }
                };
                let mut broken = None;
                loop {
                    match inbox.next() {
                        Ok(None) => break,
                        Ok(Some(Incoming::Frame(env, segs))) => {
                            core.handle_frame(py, idx, &env, &segs, fx);
                            if core.links[idx].closed {
                                break; // it broke the protocol: read no further
                            }
                        }
                        Ok(Some(Incoming::Oversize {
                            kind,
                            id,
                            size,
                            limit,
                        })) => {
                            // A kameo worker checks sizes before sending, so this peer is
                            // broken: fail that request, and replace the worker rather than
                            // trust the rest of its stream.
                            let message = format!(
                                "worker {wid} (pid {pid}) sent a {} frame of {size} bytes, over max_frame_bytes={limit}",
                                Kind::from_u8(kind).map_or("unknown", |k| k.name())
                            );
                            let serving = matches!(
                                core.links[idx].state,
                                LinkState::Ready | LinkState::Draining
                            );
                            if serving {
                                if let Some(slot) = core.finish_slot(py, idx, id, fx) {
                                    let exc = errors::protocol(py, message.clone());
                                    core.answer(py, id, slot, Err(exc), false);
                                }
                                broken = Some(message);
                            } else {
                                broken = Some(format!(
                                    "{message} during the handshake: not a kameo worker"
                                ));
                            }
                            break;
                        }
                        Err(e) => {
                            broken = Some(format!("worker {wid} (pid {pid}): {e}"));
                            break;
                        }
                    }
                }
                if let Some(msg) = broken {
                    fx.events
                        .push((wid, events::PROTOCOL_ERROR, pystr(py, &msg)));
                    core.links[idx].closed = true;
                    fx.disarm_readers.push(sock);
                    break;
                }
                if core.links[idx].closed {
                    break;
                }
                if n < 16 * 1024 {
                    break; // drained what was there; the loop calls again when more arrives
                }
            }
            core.links[idx].inbox = Some(inbox);
            core.dispatch(py, fx);
            core.flush_links(py, fx);
            Ok(())
        })
    }

    /// Called by the loop when a worker socket with buffered output is writable.
    fn on_writable(slf: &Bound<'_, Self>, worker_id: u32) -> PyResult<()> {
        Self::with(slf, |core, py, fx| {
            if let Some(idx) = core.link_index(worker_id) {
                let link = &mut core.links[idx];
                let result = link.write_out();
                if result.is_err() || !link.pending_out() {
                    link.writer_armed = false;
                    fx.disarm_writers.push(link.sock.as_raw_fd());
                }
                if let Err(e) = result {
                    fx.events
                        .push((worker_id, events::IO_ERROR, pystr(py, &e.to_string())));
                }
            }
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
            let Some(idx) = core.link_index(worker_id) else {
                return Ok((0, 0));
            };
            let link = core.links.remove(idx);
            if core.links.is_empty() {
                // The pool is shutting down (or its last worker died): let the segments kept
                // for reuse go (requests held for a resend keep their own descriptors).
                if let Some(r) = &core.opts.recycler {
                    r.clear();
                }
            }
            if link.writer_armed {
                fx.disarm_writers.push(link.sock.as_raw_fd());
            }
            // The worker recorded how many requests it took up (see `progress`): those below
            // may have run; the rest never started.
            let taken = link.progress.taken();
            let mut slots: Vec<(u64, Slot)> = link.slots.into_iter().collect();
            slots.sort_by_key(|(_, s)| s.seq);
            let mut again = Vec::new();
            let mut failed = 0;
            for (id, slot) in slots {
                let maybe_started = slot.seq < taken;
                if !maybe_started {
                    again.push(Queued {
                        id,
                        frame: slot.frame,
                        segs: slot.segs,
                        target: slot.target,
                        retries: slot.retries,
                    });
                } else if slot.retries > 0 {
                    core.stats.retries += 1;
                    again.push(Queued {
                        id,
                        frame: slot.frame,
                        segs: slot.segs,
                        target: slot.target,
                        retries: slot.retries - 1,
                    });
                } else {
                    failed += 1;
                    core.resolve(py, id, slot.target, Err(PyErr::from_value(exc.clone())));
                }
            }
            let requeued = again.len();
            for q in again.into_iter().rev() {
                if let Some(s) = core.streams.get_mut(&q.id) {
                    s.worker = None;
                }
                core.queue.push_front(q);
            }
            core.dispatch(py, fx);
            core.flush_links(py, fx);
            Ok((failed, requeued))
        })
    }

    /// Fail every queued request with `exc` (no worker can take them). Returns the count.
    fn fail_queued(&mut self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> usize {
        let queued: Vec<Queued> = self.queue.drain(..).collect();
        let n = queued.len();
        for q in queued {
            self.resolve(py, q.id, q.target, Err(PyErr::from_value(exc.clone())));
        }
        n
    }

    /// Requests not finished yet: queued in the parent or in flight on a worker.
    fn outstanding(&self) -> usize {
        self.queue.len() + self.links.iter().map(Link::in_flight).sum::<usize>()
    }

    /// Workers (by id) from which nothing arrived for `timeout` seconds.
    fn silent_workers(&self, timeout: f64) -> Vec<u32> {
        let limit = Duration::from_secs_f64(timeout.max(0.0));
        self.links
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
            if let Some(idx) = core.link_index(worker_id) {
                let link = &mut core.links[idx];
                if link.state == LinkState::Ready {
                    link.state = LinkState::Draining;
                }
                if link.slots.is_empty() {
                    fx.events.push((worker_id, events::DRAINED, py.None()));
                }
            }
            Ok(())
        })
    }

    /// Whether request `id` is still in flight on some worker (returns its worker id).
    fn running_on(&self, id: u64) -> Option<u32> {
        self.link_running(id).map(|l| l.id)
    }

    /// (completed, errors, retries, p50 seconds, p99 seconds) since the pool started.
    fn stats(&self) -> (u64, u64, u64, Option<f64>, Option<f64>) {
        let s = &self.stats;
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
        self.links
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

    /// Answers that arrived for requests whose caller had given up (not in `stats()`).
    #[getter]
    fn abandoned_answers(&self) -> u64 {
        self.stats.abandoned
    }

    /// Open stream buffers (for tests of flow control).
    #[getter]
    fn open_streams(&self) -> usize {
        self.streams.len()
    }

    #[getter]
    fn max_frame_bytes(&self) -> usize {
        self.max_frame
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;
    use std::time::Duration;

    #[test]
    fn quantiles_of_an_empty_histogram_are_none() {
        assert_eq!(Stats::new().quantile(0.5), None);
    }

    #[test]
    fn quantiles_fall_within_a_bucket_of_the_truth() {
        let mut s = Stats::new();
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(s.completed, 100);
        let p50 = s.quantile(0.5).expect("some");
        let p99 = s.quantile(0.99).expect("some");
        // Buckets are ~9% wide and report their upper bound.
        assert!((50e-6..=50e-6 * 1.1).contains(&p50), "{p50}");
        assert!((99e-6..=99e-6 * 1.1).contains(&p99), "{p99}");
        assert!(s.quantile(0.0).expect("some") <= 1.1e-6);
    }
}
