//! [`Pool`]: the handle a program holds. Asks and streams are encoded by the caller, handed to
//! the scheduler under the pool's lock (written at once to an idle worker; to a busy one,
//! appended to its buffer and written by its driver, one write per batch), and their answers
//! decoded by the caller once the lock is released.

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kameo_core::frames::{encode_frame_with, raw_frame, EncodeFrameError, Head};
use kameo_core::link::LinkState;
use kameo_core::scheduler::Queued;
use kameo_core::sys::Segments;
use kameo_proto::frame::Kind;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, Notify};
use tracing::Instrument;

use crate::config::Config;
use crate::error::Error;
use crate::process::{random_secret, Spawner};
use crate::state::{Shared, State, Waiter};
use crate::stream::WorkerStream;
use crate::trace;

/// Options of one call: a timeout, a W3C traceparent to send to the worker.
#[derive(Clone, Debug, Default)]
pub struct CallOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) traceparent: Option<String>,
}

impl CallOptions {
    /// No timeout, a traceparent only when a `tracing` subscriber records the call's span.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fail with [`Error::Timeout`] (and cancel the call in the worker) after `d`; for a
    /// stream, the whole stream must end within `d`.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Send this W3C traceparent (`00-<trace id>-<span id>-<flags>`) with the call: the
    /// worker's `kameo.current_traceparent()` returns it, and its OpenTelemetry spans (with
    /// `kameo[otel]`) are children of it.
    pub fn traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }
}

/// A worker of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Its id in the pool (replacements get new ids).
    pub id: u32,
    /// Its process id.
    pub pid: u32,
    /// It serves calls (false while it starts).
    pub ready: bool,
}

/// The pool's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Answers from workers: replies, error answers, ends of streams (as the Python pool).
    pub completed: u64,
    /// Error answers among those (a call whose worker died is counted in `crashes`).
    pub errors: u64,
    /// Workers that died while serving (and were replaced).
    pub crashes: u64,
    /// Calls run again after their worker died (with `retries`).
    pub retries: u64,
    /// Calls waiting for a worker.
    pub queued: usize,
    /// Calls sent to a worker and not yet answered.
    pub in_flight: usize,
}

/// A pool of Python worker processes (see the crate doc). Cheap to clone: clones share the
/// pool. When the last clone is dropped without [`Pool::close`], the workers are killed and
/// reaped at once.
#[derive(Clone)]
pub struct Pool {
    handle: Arc<Handle>,
}

/// Owns the workers: dropping it kills and reaps them.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let pids: Vec<u32> = {
            let mut st = self.shared.lock();
            if st.closed && st.links.is_empty() {
                return;
            }
            st.closing = true;
            st.closed = true;
            st.links.iter().map(|l| l.pid).collect()
        };
        for pid in pids {
            // The driver, if its runtime still runs, sees the exit and fails its calls with
            // Closed.
            crate::process::kill_and_reap(pid, Duration::from_secs(2));
        }
    }
}

impl Pool {
    pub(crate) async fn start(cfg: Config) -> Result<Pool, Error> {
        let setup = |e: std::io::Error| Error::Startup {
            message: format!("cannot set up the pool: {e}"),
            worker_id: None,
            pid: None,
            traceback: String::new(),
            stderr_tail: Vec::new(),
        };
        let secret = random_secret().map_err(setup)?;
        let spawner = Spawner::start(&cfg.name).map_err(setup)?;
        let shared = Arc::new(Shared {
            callbacks: cfg.callbacks.clone(),
            state: Mutex::new(State::new(&cfg)),
            next_id: AtomicU64::new(1),
            secret,
            spawner,
            idle: Notify::new(),
            gone: Notify::new(),
            cfg,
        });
        let pool = Pool {
            handle: Arc::new(Handle {
                shared: shared.clone(),
            }),
        };
        let every = (shared.cfg.heartbeat_interval / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        tokio::spawn(crate::supervisor::watch(Arc::downgrade(&shared), every));
        let mut waits = Vec::with_capacity(shared.cfg.size);
        for _ in 0..shared.cfg.size {
            let (tx, rx) = oneshot::channel();
            waits.push(rx);
            crate::worker::start(shared.clone(), Some(tx)).await;
        }
        // The supervisor kills a worker not ready within startup_timeout; this bound is only a
        // safety net.
        let deadline =
            tokio::time::Instant::now() + shared.cfg.startup_timeout + Duration::from_secs(5);
        for rx in waits {
            match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(e), // dropping `pool` kills the others
                Ok(Err(_)) | Err(_) => {
                    return Err(Error::Startup {
                        message: format!(
                            "the workers did not become ready within startup_timeout={:?}",
                            shared.cfg.startup_timeout
                        ),
                        worker_id: None,
                        pid: None,
                        traceback: String::new(),
                        stderr_tail: Vec::new(),
                    })
                }
            }
        }
        Ok(pool)
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The handler the workers run (`"module:function"`).
    pub fn target(&self) -> &str {
        &self.shared().cfg.target
    }

    /// Call the handler with `msg` and decode its return value.
    pub async fn ask<M, R>(&self, msg: &M) -> Result<R, Error>
    where
        M: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        self.ask_opts(msg, CallOptions::new()).await
    }

    /// As [`Pool::ask`], failing with [`Error::Timeout`] after `timeout` (the call is then
    /// cancelled in the worker; a worker that does not stop within `cancel_grace` is killed
    /// and replaced).
    pub async fn ask_with<M, R>(&self, msg: &M, timeout: Option<Duration>) -> Result<R, Error>
    where
        M: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let opts = CallOptions {
            timeout,
            traceparent: None,
        };
        self.ask_opts(msg, opts).await
    }

    /// As [`Pool::ask`], with [`CallOptions`].
    pub async fn ask_opts<M, R>(&self, msg: &M, opts: CallOptions) -> Result<R, Error>
    where
        M: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let shared = self.shared();
        let id = shared.next_id();
        let span = tracing::debug_span!("kameo.ask", id, traceparent = tracing::field::Empty);
        let tp = trace::traceparent(opts.traceparent.as_deref(), &span);
        let (frame, segs) = encode(
            Kind::Request,
            id,
            tp.as_deref(),
            msg,
            shared.cfg.max_frame_bytes,
        )?;
        let (tx, mut rx) = oneshot::channel();
        let alone = submit(shared, id, frame, segs, Waiter::Ask(tx))?;
        let mut guard = CancelOnDrop {
            shared,
            id,
            armed: true,
        };
        let early =
            alone.and_then(|(wid, fd)| crate::worker::answer_soon(shared, wid, fd, &mut rx));
        let answer = async {
            if let Some(answer) = early {
                return Ok(answer);
            }
            match opts.timeout {
                None => rx.await.map_err(|_| Error::Closed),
                Some(after) => match tokio::time::timeout(after, rx).await {
                    Ok(r) => r.map_err(|_| Error::Closed),
                    Err(_) => Err(Error::Timeout { after }),
                },
            }
        }
        .instrument(span)
        .await;
        let body = match answer {
            Ok(r) => {
                guard.armed = false;
                r?
            }
            Err(e) => return Err(e), // a timeout: the guard cancels it
        };
        body.decode()
    }

    /// Iterate the handler's items (a generator handler) for `msg`; the items arrive as the
    /// stream is consumed (at most `stream_window` ahead). Dropping the stream before its end
    /// cancels it in the worker (its generator is closed: its `finally` runs).
    pub async fn stream<M, T>(&self, msg: &M) -> Result<WorkerStream<T>, Error>
    where
        M: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.stream_opts(msg, CallOptions::new()).await
    }

    /// As [`Pool::stream`], with [`CallOptions`].
    pub async fn stream_opts<M, T>(
        &self,
        msg: &M,
        opts: CallOptions,
    ) -> Result<WorkerStream<T>, Error>
    where
        M: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let shared = self.shared();
        let id = shared.next_id();
        let span = tracing::debug_span!("kameo.stream", id, traceparent = tracing::field::Empty);
        let tp = trace::traceparent(opts.traceparent.as_deref(), &span);
        let (frame, segs) = encode(
            Kind::RequestStream,
            id,
            tp.as_deref(),
            msg,
            shared.cfg.max_frame_bytes,
        )?;
        shared.lock().streams.open(id);
        if let Err(e) = submit(shared, id, frame, segs, Waiter::Stream) {
            shared.lock().streams.remove(id);
            return Err(e);
        }
        Ok(WorkerStream::new(shared.clone(), id, opts.timeout, span))
    }

    /// The workers, in start order.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let st = self.shared().lock();
        st.links
            .iter()
            .map(|l| WorkerInfo {
                id: l.id,
                pid: l.pid,
                ready: l.state == LinkState::Ready && !l.closed,
            })
            .collect()
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        let st = self.shared().lock();
        PoolStats {
            completed: st.counters.completed,
            errors: st.counters.errors,
            crashes: st.counters.crashes,
            retries: st.counters.retries,
            queued: st.sched.len(),
            in_flight: st.links.iter().map(|l| l.slots.len()).sum(),
        }
    }

    /// Close the pool: no new calls, the calls accepted finish (within `close_grace`), then
    /// every worker is shut down and reaped. Calls still unanswered fail with
    /// [`Error::Closed`].
    pub async fn close(&self) -> Result<(), Error> {
        self.close_with(self.shared().cfg.close_grace).await
    }

    /// As [`Pool::close`], waiting at most `grace` for the calls accepted.
    pub async fn close_with(&self, grace: Duration) -> Result<(), Error> {
        let shared = self.shared();
        {
            let mut st = shared.lock();
            if st.closed && st.links.is_empty() {
                return Ok(());
            }
            st.closing = true;
        }
        wait_until(&shared.idle, Instant::now() + grace, || {
            shared.lock().busy() == 0
        })
        .await;
        {
            let mut st = shared.lock();
            st.closed = true;
            let shutdown = raw_frame(Kind::Shutdown as u8, 0, b"");
            for idx in 0..st.links.len() {
                st.links[idx].state = LinkState::Draining;
                st.links[idx].buffer(&shutdown, &Segments::new());
                st.flush(idx);
            }
        }
        crate::supervisor::fail_queued(shared, Error::Closed);
        // SHUTDOWN, then SIGTERM, then SIGKILL; each worker's driver reaps it.
        for (wait, sig) in [
            (Duration::from_secs(2), Some(libc::SIGTERM)),
            (Duration::from_secs(1), Some(libc::SIGKILL)),
            (Duration::from_secs(2), None),
        ] {
            let gone = || shared.lock().links.is_empty();
            if wait_until(&shared.gone, Instant::now() + wait, gone).await {
                break;
            }
            match sig {
                Some(sig) => {
                    for pid in shared.lock().links.iter().map(|l| l.pid) {
                        crate::process::kill_group(pid, sig);
                    }
                }
                None => {
                    return Err(Error::Protocol {
                        message: "workers were still not reaped 5 s after SIGKILL".into(),
                    })
                }
            }
        }
        crate::supervisor::fail_queued(shared, Error::Closed);
        Ok(())
    }
}

/// Wait until `done()` holds or `deadline` passes, looking again whenever `notify` wakes us
/// and at least every 50 ms. True if `done()` held.
async fn wait_until(
    notify: &tokio::sync::Notify,
    deadline: Instant,
    done: impl Fn() -> bool,
) -> bool {
    loop {
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if done() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), woken).await;
    }
}

/// Cancels an ask in its worker if the caller stops waiting (a timeout, a dropped future).
struct CancelOnDrop<'a> {
    shared: &'a Shared,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            let grace = self.shared.cfg.cancel_grace;
            let mut st = self.shared.lock();
            if let Some(wid) = st.worker_of(self.id) {
                st.cancel_call(wid, self.id, grace);
            }
            // Still queued: its closed sender makes the scheduler skip it.
        }
    }
}

/// A request's frame.
fn encode<M: Serialize + ?Sized>(
    kind: Kind,
    id: u64,
    traceparent: Option<&str>,
    msg: &M,
    max: usize,
) -> Result<(Vec<u8>, Segments), Error> {
    let head = Head::new(kind as u8, id).trace(traceparent);
    match encode_frame_with(head, max, |buf, _| crate::serde_py::to_wire_into(buf, msg)) {
        Ok((frame, segs, ())) => Ok((frame, segs)),
        Err(EncodeFrameError::Encode(e)) => Err(e.into()),
        Err(EncodeFrameError::Oversize { size, limit }) => Err(Error::Protocol {
            message: format!(
                "the request frame is {size} bytes, over max_frame_bytes={limit}; raise PoolBuilder::max_frame_bytes or send less"
            ),
        }),
    }
}

/// Hand a request to the scheduler: written at once to an idle worker, buffered for a busy
/// one's driver, or queued. Some((worker, its socket)) when it was written to an idle worker
/// and is the only call in flight, as was the one before it (the caller may look for the
/// answer itself, see [`crate::worker::answer_soon`]).
fn submit(
    shared: &Shared,
    id: u64,
    frame: Vec<u8>,
    segs: Segments,
    target: Waiter,
) -> Result<Option<(u32, i32)>, Error> {
    let retries = match target {
        Waiter::Ask(_) => shared.cfg.retries,
        Waiter::Stream => 0, // items already delivered cannot be taken back
    };
    let q = Queued {
        id,
        frame,
        segs,
        target,
        retries,
        pin: None,
    };
    let mut st = shared.lock();
    if st.closing || st.closed {
        return Err(Error::Closed);
    }
    let State { sched, links, .. } = &mut *st;
    let mut alone = None;
    if let Some((idx, q)) = sched.admit(links, q) {
        let idle = st.links[idx].slots.is_empty() && !st.links[idx].pending_out();
        st.place(idx, q, Instant::now());
        if idle {
            st.flush(idx);
            let link = &st.links[idx];
            if !link.pending_out() && st.busy() == 1 {
                alone = Some((link.id, link.sock.as_raw_fd()));
            }
        } else if !st.links[idx].writer_armed {
            st.links[idx].writer_armed = true;
            st.extras[idx].wake.notify_one();
        }
    }
    // Only a caller that goes one call at a time looks for its answer: the previous call
    // found the pool idle too. A request that finds it idle in the middle of a burst (the
    // workers caught up with a join_all still submitting) must not hold up the rest.
    let spin = alone.filter(|_| st.last_alone);
    st.last_alone = alone.is_some();
    Ok(spin)
}
