//! The pool's shared state, under one lock: the worker links, the scheduler's FIFO, the open
//! streams, the callbacks being served, the calls being cancelled. Whoever holds the lock (a
//! caller submitting, a worker's driver handling what it read, the supervisor) changes it and
//! collects what to do once the lock is released ([`Effects`]: answers to hand over, tasks
//! to wake): nothing is woken, decoded or spawned under the lock.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;
use std::time::{Duration, Instant};

use kameo_core::link::{Link, LinkState, Slot};
use kameo_core::scheduler::{Queued, Scheduler};
use kameo_core::streams::Streams;
use kameo_core::sys::Segments;
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, Notify};

use crate::callbacks::Registry;
use crate::config::Config;
use crate::error::Error;
use crate::process::Spawner;

/// A frame body received, with the segments it refers to.
pub(crate) struct Body {
    pub bytes: Vec<u8>,
    pub segs: Segments,
}

impl Body {
    /// Decode into `T` (by the caller, not under the lock).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        if self.segs.is_empty() {
            return crate::serde_py::from_wire(&self.bytes).map_err(Error::from);
        }
        let views = self
            .segs
            .iter()
            .map(|fd| {
                // Sealed against shrinking (a shrunk mapping would SIGBUS), as the Python
                // parent checks; not frozen: the bytes are copied out before we let go.
                let size = kameo_core::shm::verify(fd, 0, 0, false)?;
                kameo_core::shm::View::map(fd.clone(), size).map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(|e| Error::Protocol {
                message: format!("cannot map a shared-memory segment of a reply: {e}"),
            })?;
        let slices: Vec<&[u8]> = views
            .iter()
            .map(|v| {
                // SAFETY: the view maps `len` bytes and lives until the end of this function;
                // the segment is sealed or recycled only once we let go of it.
                unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len()) }
            })
            .collect();
        crate::serde_py::from_wire_with_segments(&self.bytes, &slices).map_err(Error::from)
    }
}

/// Where an ask's answer goes.
pub(crate) type AnswerTx = oneshot::Sender<Result<Body, Error>>;
/// Where a worker's start-up outcome goes (`start()`).
pub(crate) type ReadyTx = oneshot::Sender<Result<(), Error>>;

/// Who waits for a request's answer.
pub(crate) enum Waiter {
    /// An ask's future.
    Ask(AnswerTx),
    /// A stream: its items go to `State::streams`.
    Stream,
}

/// What a stream's buffer holds: items, the consumer's waker, the error that ended it.
pub(crate) enum Entry {
    Item(Body),
    Waker(Waker),
    Failed(Error),
}

/// A callback being served.
pub(crate) struct Serving {
    pub credit: Arc<tokio::sync::Semaphore>,
    pub task: Option<tokio::task::AbortHandle>,
}

/// Per worker, beside its link: what the driver and error messages need.
pub(crate) struct Extra {
    /// Wakes its driver: output to flush, or it is to stop.
    pub wake: Arc<Notify>,
    /// Its last lines of stderr.
    pub tail: VecDeque<String>,
    /// Tells `start()` the worker is ready (or why not).
    pub ready: Option<ReadyTx>,
    /// Why it failed at start-up (STARTUP_FAILED, a refused handshake).
    pub startup_error: Option<Error>,
    /// Why the pool killed it (for the log).
    pub killed_for: Option<String>,
    /// When it was spawned.
    pub spawned: Instant,
}

/// The pool's counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub completed: u64,
    pub errors: u64,
    pub crashes: u64,
    pub retries: u64,
}

pub(crate) struct State {
    pub links: Vec<Link<Waiter>>,
    pub extras: Vec<Extra>,
    pub sched: Scheduler<Waiter>,
    pub streams: Streams<Entry>,
    /// Callbacks being served, by (worker id, callback id).
    pub serving: HashMap<(u32, u64), Serving>,
    /// Calls cancelled in a worker: (worker id, call id, when its worker is killed if the
    /// call is still running).
    pub cancelling: Vec<(u32, u64, Instant)>,
    /// No new calls (close started).
    pub closing: bool,
    /// Workers gone: every call fails with `Closed`.
    pub closed: bool,
    pub counters: Counters,
    /// Replacement starts in a row that failed (crash-loop backoff).
    pub failed_starts: u32,
    /// The last request submitted found the pool idle (see `pool::submit`).
    pub last_alone: bool,
    pub next_worker: u32,
}

/// What the pool is: configuration, the state, and the means to start workers.
pub(crate) struct Shared {
    pub cfg: Config,
    pub callbacks: Registry,
    pub state: Mutex<State>,
    pub next_id: AtomicU64,
    pub secret: Vec<u8>,
    pub spawner: Spawner,
    /// Signalled when the last call in flight finishes (close waits for it).
    pub idle: Notify,
    /// Signalled when a worker is gone (close waits for all).
    pub gone: Notify,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        kameo_core::sys::lock(&self.state)
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// What to do once the lock is released.
#[derive(Default)]
pub(crate) struct Effects {
    pub answers: Vec<(AnswerTx, Result<Body, Error>)>,
    pub wakers: Vec<Waker>,
    pub callbacks: Vec<CallbackCall>,
    pub ready: Vec<(ReadyTx, Result<(), Error>)>,
}

/// A CALLBACK to serve: (worker id, callback id, body).
pub(crate) type CallbackCall = (u32, u64, Vec<u8>);

impl Effects {
    /// Hand over the answers, wake the waiters; returns the callbacks to start (by the
    /// worker's driver, see `serve`).
    #[must_use]
    pub fn run(self) -> Vec<CallbackCall> {
        for (tx, r) in self.answers {
            let _ = tx.send(r);
        }
        for w in self.wakers {
            w.wake();
        }
        for (tx, r) in self.ready {
            let _ = tx.send(r);
        }
        self.callbacks
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
            && self.wakers.is_empty()
            && self.callbacks.is_empty()
            && self.ready.is_empty()
    }
}

impl State {
    pub fn new(cfg: &Config) -> State {
        State {
            links: Vec::new(),
            extras: Vec::new(),
            sched: Scheduler::new(cfg.max_concurrency as usize, cfg.prefetch, true),
            streams: Streams::new(cfg.stream_window),
            serving: HashMap::new(),
            cancelling: Vec::new(),
            closing: false,
            closed: false,
            counters: Counters::default(),
            failed_starts: 0,
            last_alone: false,
            next_worker: 0,
        }
    }

    pub fn index_of(&self, worker_id: u32) -> Option<usize> {
        self.links.iter().position(|l| l.id == worker_id)
    }

    /// Calls accepted and not yet answered (queued or in flight).
    pub fn busy(&self) -> usize {
        self.sched.len() + self.links.iter().map(|l| l.slots.len()).sum::<usize>()
    }

    /// Put `q` on link `idx`: recorded in its slots and appended to its output (written by
    /// [`State::flush`]). A request whose caller has left is dropped instead.
    pub fn place(&mut self, idx: usize, q: Queued<Waiter>, now: Instant) {
        match &q.target {
            Waiter::Ask(tx) if tx.is_closed() => return,
            Waiter::Stream if self.streams.abandoned(q.id) => {
                self.streams.remove(q.id);
                return;
            }
            Waiter::Stream => self.streams.assign(q.id, Some(self.links[idx].id)),
            Waiter::Ask(_) => {}
        }
        let link = &mut self.links[idx];
        if link.slots.is_empty() {
            link.busy_since = Some(now);
        }
        link.buffer(&q.frame, &q.segs);
        let seq = link.next_seq;
        link.next_seq += 1;
        link.slots.insert(
            q.id,
            Slot {
                target: q.target,
                frame: q.frame,
                segs: q.segs,
                seq,
                retries: q.retries,
                sent: now,
                pinned: false,
            },
        );
    }

    /// Send queued requests while a worker has room.
    pub fn refill(&mut self, now: Instant) {
        while let Some((idx, q)) = self.sched.next(&self.links) {
            self.place(idx, q, now);
        }
    }

    /// Write what link `idx` has buffered; what the socket does not take waits for its
    /// driver (woken to wait until the socket is writable). A broken socket: the worker is
    /// killed (its driver then handles the loss).
    pub fn flush(&mut self, idx: usize) {
        let link = &mut self.links[idx];
        if !link.pending_out() || link.closed {
            return;
        }
        match link.write_out() {
            Ok(()) if link.pending_out() => {
                if !link.writer_armed {
                    link.writer_armed = true;
                    self.extras[idx].wake.notify_one();
                }
            }
            Ok(()) => {}
            Err(e) => {
                let pid = link.pid;
                link.closed = true;
                self.extras[idx].killed_for = Some(format!("its socket broke: {e}"));
                crate::process::kill_group(pid, libc::SIGKILL);
            }
        }
    }

    /// Flush every link with output.
    pub fn flush_all(&mut self) {
        for idx in 0..self.links.len() {
            self.flush(idx);
        }
    }

    /// Queue a control frame (CANCEL, CREDIT, a callback's answer) to worker `wid` and write
    /// it. False if the worker is gone.
    pub fn send_control(&mut self, wid: u32, frame: &[u8]) -> bool {
        let Some(idx) = self.index_of(wid) else {
            return false;
        };
        if self.links[idx].closed {
            return false;
        }
        self.links[idx].buffer(frame, &Segments::new());
        self.flush(idx);
        true
    }

    /// Cancel call `id` on worker `wid` (its caller left): CANCEL it, and kill the worker if
    /// it has not answered within `grace`.
    pub fn cancel_call(&mut self, wid: u32, id: u64, grace: Duration) {
        let frame = kameo_core::frames::raw_frame(kameo_proto::frame::Kind::Cancel as u8, id, b"");
        if self.send_control(wid, &frame) {
            self.cancelling.push((wid, id, Instant::now() + grace));
        }
    }

    /// The worker whose slots hold call `id`.
    pub fn worker_of(&self, id: u64) -> Option<u32> {
        self.links
            .iter()
            .find(|l| l.slots.contains_key(&id))
            .map(|l| l.id)
    }

    /// Ready workers.
    pub fn ready_count(&self) -> usize {
        self.links
            .iter()
            .filter(|l| l.state == LinkState::Ready && !l.closed)
            .count()
    }
}
