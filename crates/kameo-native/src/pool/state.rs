//! The pool core's state and its request path: encode, admit or queue, send (or coalesce),
//! free the slot of an answered request and resolve its waiter, requeue after a loss. The
//! `#[pymethods]` facade (`core::PoolCore`) borrows it once per call.

use super::effects::Effects;
use super::py::{is_done, pystr, wake};
use super::{Queued, Scheduler};
use crate::codec::{Options, RefMode, Segments};
use crate::errors;
use crate::frames::{self, Body, IntoPyErr};
use crate::link::{Link, Slot, Target};
use kameo_core::events;
use kameo_core::frames::{raw_frame, Head};
use kameo_core::link::{self, LinkState};
use kameo_core::scheduler;
use kameo_core::stats::Stats;
use kameo_core::streams::{Finished, Streams};
use kameo_proto::frame::Kind;
use pyo3::intern;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::Instant;

type PyObject = Py<PyAny>;

pub struct PoolState {
    pub links: Vec<Link>,
    pub sched: Scheduler,
    pub streams: Streams<PyObject>,
    pub next_id: u64,
    pub max_frame: usize,
    pub max_tasks: u64,
    /// `max_memory_per_worker` in bytes: checked after answers (see `finish_slot`).
    pub max_memory: Option<u64>,
    pub stats: Stats,
    pub secret: Vec<u8>,
    pub welcome: Vec<u8>,
    pub flush_scheduled: bool,
    /// Codec options of every connection (pickle, shared-memory threshold).
    pub opts: Options,
    /// The pool's key, which the remote object references of its CALLs carry.
    pub ref_key: u64,
    /// With event listeners (`PoolCore.set_observe`): the timing of each request not yet
    /// taken by `take_timing`. None otherwise, and then nothing is recorded.
    pub observed: Option<HashMap<u64, Timing>>,
}

/// When a request was submitted, sent (to which worker), and resolved, for `CallFinished`
/// events. A request run again after its worker died keeps its submission time and gets the
/// worker and send time of its last attempt.
pub struct Timing {
    pub submitted: Instant,
    pub worker: Option<u32>,
    pub sent: Option<Instant>,
    pub ended: Option<Instant>,
}

impl Timing {
    /// (worker, seconds from submission to send, seconds from send to the end), the end being
    /// the resolution, or now for a request its caller gave up on (never resolved here). A
    /// request never sent was queued until the end and ran for 0 s.
    pub fn split(&self, now: Instant) -> (Option<u32>, f64, f64) {
        let end = self.ended.unwrap_or(now);
        let sent = self.sent.unwrap_or(end);
        let queued = sent.saturating_duration_since(self.submitted);
        let run = end.saturating_duration_since(sent);
        (self.worker, queued.as_secs_f64(), run.as_secs_f64())
    }
}

impl PoolState {
    /// The link that has request `id` in flight.
    pub fn link_running(&self, id: u64) -> Option<&Link> {
        self.links.iter().find(|l| l.slots.contains_key(&id))
    }

    #[inline]
    pub fn link_index(&self, worker_id: u32) -> Option<usize> {
        self.links.iter().position(|l| l.id == worker_id)
    }

    /// The request's waiter is gone (cancelled future, cancelled stream): do not send it.
    fn abandoned(&self, py: Python<'_>, id: u64, target: &Target) -> bool {
        match target {
            Target::Ask(fut, _) => is_done(py, fut.bind(py)),
            Target::Stream => self.streams.abandoned(id),
        }
    }

    /// Encode a CALL or CALL_STREAM (remote object references allowed, all of one worker) and
    /// find the worker it is pinned to: `worker`, or that of its refs. RefError for refs of
    /// another pool, of two workers, of another worker than `worker`, or of a worker gone.
    pub fn encode_call(
        &self,
        py: Python<'_>,
        kind: Kind,
        id: u64,
        op: &Bound<'_, PyAny>,
        trace: Option<&str>,
        worker: Option<u32>,
    ) -> PyResult<(Vec<u8>, Segments, Option<u32>)> {
        let opts = Options {
            refs: RefMode::Parent { key: self.ref_key },
            ..self.opts.clone()
        };
        let head = Head::new(kind as u8, id).trace(trace);
        let (frame, segs, refs) =
            frames::encode_frame_refs(head, Body::Value(op), &opts, self.max_frame)
                .map_err(|e| e.into_pyerr(py, "op", "call"))?;
        let refs = refs.map(|w| u32::try_from(w).expect("checked by the encoder"));
        let pin = match (worker, refs) {
            (Some(w), Some(r)) if w != r => {
                return Err(errors::err(
                    py,
                    "RefError",
                    format!("op: holds refs of worker {r}, but the call is for worker {w}"),
                ))
            }
            (Some(w), _) | (None, Some(w)) => Some(w),
            (None, None) => None,
        };
        if let Some(w) = pin {
            if self.link_index(w).is_none() {
                return Err(errors::err(py, "RefError", format!("worker {w} is gone")));
            }
        }
        Ok((frame, segs, pin))
    }

    /// Encode a request; SerializationError or ProtocolError (oversize) sends nothing.
    pub fn encode_request(
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

    /// A new request: numbered, encoded by `encode` with that number (which is used up only if
    /// encoding succeeds), its stream buffer opened for a stream, then sent or queued. A
    /// request pinned to a worker never runs elsewhere, so it gets no retries. Returns the id
    /// and the worker it is pinned to.
    #[inline]
    pub fn submit(
        &mut self,
        py: Python<'_>,
        target: Target,
        retries: u32,
        fx: &mut Effects,
        encode: impl FnOnce(&Self, u64) -> PyResult<(Vec<u8>, Segments, Option<u32>)>,
    ) -> PyResult<(u64, Option<u32>)> {
        let id = self.next_id;
        let submitted = self.observed.is_some().then(Instant::now);
        let (frame, segs, pin) = encode(self, id)?;
        self.next_id += 1;
        if let (Some(observed), Some(submitted)) = (&mut self.observed, submitted) {
            let t = Timing {
                submitted,
                worker: None,
                sent: None,
                ended: None,
            };
            observed.insert(id, t);
        }
        if let Target::Stream = target {
            self.streams.open(id);
        }
        let retries = if pin.is_some() { 0 } else { retries };
        let q = Queued {
            id,
            frame,
            segs,
            target,
            retries,
            pin,
        };
        self.enqueue(py, q, fx);
        Ok((id, pin))
    }

    /// Send a new request to a worker with room, or queue it.
    #[inline]
    pub fn enqueue(&mut self, py: Python<'_>, q: Queued, fx: &mut Effects) {
        if let Some((idx, q)) = self.sched.admit(&self.links, q) {
            self.send_to(py, idx, q, fx);
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
            pin,
        } = q;
        let link = &mut self.links[idx];
        if let Target::Stream = target {
            self.streams.assign(id, Some(link.id));
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
        if let Some(t) = self.observed.as_mut().and_then(|o| o.get_mut(&id)) {
            t.worker = Some(link.id);
            t.sent = Some(now);
        }
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
                pinned: pin.is_some(),
            },
        );
        if let Some(result) = result {
            fx.settle_write(py, link, result);
        }
    }

    /// Move queued requests to workers with room.
    pub fn dispatch(&mut self, py: Python<'_>, fx: &mut Effects) {
        while let Some((idx, q)) = self.sched.next(&self.links) {
            if self.abandoned(py, q.id, &q.target) {
                self.streams.remove(q.id);
                continue;
            }
            self.send_to(py, idx, q, fx);
        }
    }

    pub fn flush_links(&mut self, py: Python<'_>, fx: &mut Effects) {
        for link in &mut self.links {
            if link.pending_out() && !link.writer_armed {
                let result = link.write_out();
                fx.settle_write(py, link, result);
            }
        }
    }

    /// Queue a small control frame (CREDIT, CANCEL, ...) to a worker and write it now.
    pub fn control(
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
            let f = raw_frame(kind as u8, id, body);
            let result = link.send_now(&f, &Vec::new());
            fx.settle_write(py, link, result);
        }
    }

    /// A request finished on a worker (REPLY, ITEM+final, END or ERROR): free its slot, and
    /// retire the worker when it reached `max_tasks`.
    pub fn finish_slot(
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
            fx.event(link.id, events::RETIRE, pystr(py, "max_tasks_per_worker"));
        }
        if let Some(limit) = self.max_memory {
            // Checked here, after the answer, so a worker that grows fast is retired after the
            // request that crossed the limit (the pool's tick also checks idle workers).
            if link.state == LinkState::Ready && link.rss_due(now) {
                if let Some(rss) = link::rss(link.pid).filter(|&r| r > limit) {
                    link.state = LinkState::Draining;
                    let why = format!("max_memory_per_worker ({rss} > {limit} bytes)");
                    fx.event(link.id, events::RETIRE, pystr(py, &why));
                }
            }
        }
        if link.state == LinkState::Draining
            && link.slots.is_empty()
            && self.sched.pinned_waiting(link.id) == 0
        {
            fx.event(link.id, events::DRAINED, py.None());
        }
        Some(slot)
    }

    /// Resolve a request a worker answered and count it: in `completed` (and `errors` for an
    /// error answer) if its caller still waited, else in `abandoned`.
    pub fn answer(
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
    pub fn resolve(
        &mut self,
        py: Python<'_>,
        id: u64,
        target: Target,
        outcome: Result<Bound<'_, PyAny>, PyErr>,
    ) -> bool {
        if let Some(t) = self.observed.as_mut().and_then(|o| o.get_mut(&id)) {
            t.ended = Some(Instant::now());
        }
        match target {
            Target::Ask(fut, timed) => resolve_ask(py, fut.bind(py), timed, outcome),
            Target::Stream => {
                let outcome = outcome.map(|_| ()).map_err(|e| e.into_value(py).into_any());
                match self.streams.finish(id, outcome) {
                    Finished::Open(waiter) => {
                        wake(py, waiter);
                        true
                    }
                    Finished::Cancelled | Finished::Gone => false,
                }
            }
        }
    }

    /// Send an answer frame for callback `id` to worker `worker_id`: ITEM (with `is_final`),
    /// END (no body) or ERROR. False if the worker is gone.
    #[allow(clippy::too_many_arguments)]
    pub fn send_answer(
        &mut self,
        py: Python<'_>,
        worker_id: u32,
        kind: u8,
        id: u64,
        value: &Bound<'_, PyAny>,
        is_final: bool,
        fx: &mut Effects,
    ) -> PyResult<bool> {
        let Some(idx) = self.link_index(worker_id) else {
            return Ok(false);
        };
        let body = if kind == Kind::End as u8 {
            Body::Empty
        } else {
            Body::Value(value)
        };
        let head = Head::new(kind, id).is_final(is_final);
        let (buf, segs) = frames::encode_frame(head, body, &self.opts, self.max_frame)
            .map_err(|e| e.into_pyerr(py, "item", "callback item"))?;
        let link = &mut self.links[idx];
        let result = link.send_now(&buf, &segs);
        fx.settle_write(py, link, result);
        Ok(true)
    }

    /// Worker `worker_id`'s socket, which has buffered output, is writable.
    pub fn on_writable(&mut self, py: Python<'_>, worker_id: u32, fx: &mut Effects) {
        if let Some(idx) = self.link_index(worker_id) {
            let link = &mut self.links[idx];
            let result = link.write_out();
            if result.is_err() || !link.pending_out() {
                link.writer_armed = false;
                fx.disarm_writers.push(link.sock.as_raw_fd());
            }
            if let Err(e) = result {
                fx.event(worker_id, events::IO_ERROR, pystr(py, &e.to_string()));
            }
        }
    }

    /// Stop giving worker `worker_id` new requests (`drained` fires once it has none).
    pub fn retire(&mut self, py: Python<'_>, worker_id: u32, fx: &mut Effects) {
        if let Some(idx) = self.link_index(worker_id) {
            let link = &mut self.links[idx];
            if link.state == LinkState::Ready {
                link.state = LinkState::Draining;
            }
            if link.slots.is_empty() && self.sched.pinned_waiting(worker_id) == 0 {
                fx.event(worker_id, events::DRAINED, py.None());
            }
        }
    }

    /// Forget worker `idx`, whose process is gone: requests it may have run fail with `exc`
    /// (or run again elsewhere with retries left); the rest go back to the front of the queue,
    /// in their order. Returns (failed, requeued) counts.
    pub fn remove_worker(
        &mut self,
        py: Python<'_>,
        idx: usize,
        exc: &Bound<'_, PyAny>,
        fx: &mut Effects,
    ) -> (usize, usize) {
        let link = self.links.remove(idx);
        if self.links.is_empty() {
            // The pool is shutting down (or its last worker died): let the segments kept
            // for reuse go (requests held for a resend keep their own descriptors).
            if let Some(r) = &self.opts.recycler {
                r.clear();
            }
        }
        if link.writer_armed {
            fx.disarm_writers.push(link.sock.as_raw_fd());
        }
        // The worker recorded how many requests it took up (see `progress`).
        let taken = link.progress.taken();
        let loss = scheduler::requeue_after_loss(link.slots, taken);
        self.stats.retries += loss.retried;
        // Pinned requests still waiting for it can run nowhere else either.
        let stranded = self.sched.take_pinned(link.id);
        let failed = loss.failed.len() + stranded.len();
        let stranded = stranded.into_iter().map(|q| (q.id, q.target));
        for (id, target) in loss.failed.into_iter().chain(stranded) {
            self.resolve(py, id, target, Err(PyErr::from_value(exc.clone())));
        }
        let requeued = loss.again.len();
        for q in &loss.again {
            self.streams.assign(q.id, None);
        }
        self.sched.requeue_front(loss.again);
        self.dispatch(py, fx);
        self.flush_links(py, fx);
        (failed, requeued)
    }

    /// Fail every queued request with `exc`. Returns the count.
    pub fn fail_queued(&mut self, py: Python<'_>, exc: &Bound<'_, PyAny>) -> usize {
        let queued: Vec<Queued> = self.sched.drain().collect();
        let n = queued.len();
        for q in queued {
            self.resolve(py, q.id, q.target, Err(PyErr::from_value(exc.clone())));
        }
        n
    }

    /// Requests not finished yet: queued in the parent or in flight on a worker.
    pub fn outstanding(&self) -> usize {
        self.sched.len() + self.links.iter().map(Link::in_flight).sum::<usize>()
    }
}

/// Resolve an `ask`'s future. False if its caller had given up (it refused the result).
#[inline]
fn resolve_ask(
    py: Python<'_>,
    fut: &Bound<'_, PyAny>,
    timed: bool,
    outcome: Result<Bound<'_, PyAny>, PyErr>,
) -> bool {
    if timed {
        // Its timer goes now: left to expire it would stay in the loop's heap for the whole
        // timeout (a done callback would keep the future, and its reply, alive until the next
        // loop iteration).
        if let Ok(timer) = fut.getattr(intern!(py, "_kameo_timer")) {
            if !timer.is_none() {
                let _ = timer.call_method0(intern!(py, "cancel"));
            }
        }
    }
    // No done() check first: a future the caller already gave up on (cancelled, timed out)
    // refuses the result with InvalidStateError, which is ignored.
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
