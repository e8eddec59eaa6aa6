//! The crash barrier: what becomes of a worker's calls when it is gone, its replacement (with
//! a back-off while replacements keep failing), and the watch over live workers (heartbeats,
//! calls that do not stop when cancelled, workers that do not become ready in time).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kameo_core::link::LinkState;
use kameo_core::scheduler::requeue_after_loss;
use tokio::sync::oneshot;

use crate::error::{exit_reason, Error};
use crate::inbound::finish_stream;
use crate::process::Exit;
use crate::state::{Effects, Shared, State, Waiter};

/// The longest wait between two attempts to replace a worker that keeps failing to start.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A worker could not be started (spawn failed, or it died before READY). True if another
/// is to be started in its place (a replacement's failure; at pool start, `start()` fails).
#[must_use]
pub(crate) fn start_failed(
    shared: &Arc<Shared>,
    err: Error,
    ready: Option<oneshot::Sender<Result<(), Error>>>,
) -> bool {
    let mut fx = Effects::default();
    let replace = {
        let mut st = shared.lock();
        after_start_failure(&mut st, &err, &mut fx);
        !st.closing && !st.closed && ready.is_none()
    };
    match ready {
        Some(tx) => {
            let _ = tx.send(Err(err));
        }
        None => tracing::error!("kameo: a replacement worker failed to start: {err}"),
    }
    let _ = fx.run();
    replace
}

/// While no worker serves, the calls waiting would wait for ever for a pool that cannot start
/// workers: they fail with the start-up error.
fn after_start_failure(st: &mut State, err: &Error, fx: &mut Effects) {
    st.failed_starts += 1;
    if st.ready_count() == 0 && st.links.iter().all(|l| l.state != LinkState::Loading) {
        let queued: Vec<_> = st.sched.drain().collect();
        for q in queued {
            fail_waiter(st, q.id, q.target, err.clone(), fx);
        }
    }
}

/// Fail every call still waiting for a worker with `err`.
pub(crate) fn fail_queued(shared: &Arc<Shared>, err: Error) {
    let mut fx = Effects::default();
    {
        let mut st = shared.lock();
        let queued: Vec<_> = st.sched.drain().collect();
        for q in queued {
            fail_waiter(&mut st, q.id, q.target, err.clone(), &mut fx);
        }
    }
    let _ = fx.run();
}

fn fail_waiter(st: &mut State, id: u64, target: Waiter, err: Error, fx: &mut Effects) {
    match target {
        Waiter::Ask(tx) => fx.answers.push((tx, Err(err))),
        Waiter::Stream => finish_stream(st, id, Err(err), fx),
    }
}

/// How long to wait before starting a replacement: nothing, or a back-off doubling from
/// 100 ms (at most `MAX_BACKOFF`) while replacements keep failing.
pub(crate) fn backoff(shared: &Shared) -> Duration {
    let failed = shared.lock().failed_starts;
    if failed == 0 {
        Duration::ZERO
    } else {
        (Duration::from_millis(100) * 2u32.saturating_pow(failed.min(8) - 1)).min(MAX_BACKOFF)
    }
}

/// Worker `wid`'s process is gone (reaped, ended as `exit`): its calls are requeued or failed,
/// its callbacks stopped. True if a replacement is to be started (not while closing).
#[must_use]
pub(crate) fn worker_gone(shared: &Arc<Shared>, wid: u32, exit: Exit) -> bool {
    let mut fx = Effects::default();
    let mut ready_tx = None;
    let mut start_error = None;
    let replace = {
        let mut st = shared.lock();
        let Some(idx) = st.index_of(wid) else {
            return false;
        };
        let link = st.links.remove(idx);
        let mut extra = st.extras.remove(idx);
        let tail: Vec<String> = extra.tail.iter().cloned().collect();
        let was_serving = matches!(link.state, LinkState::Ready | LinkState::Draining);
        if let Some(why) = &extra.killed_for {
            tracing::warn!(
                worker = wid,
                pid = link.pid,
                "kameo worker {wid} (pid {}) was killed: {why}",
                link.pid
            );
        }
        if !was_serving {
            let mut err = extra
                .startup_error
                .take()
                .unwrap_or_else(|| Error::Startup {
                    message: format!(
                        "the worker exited before it was ready ({})",
                        exit_reason(exit.code, exit.signal)
                    ),
                    worker_id: Some(wid),
                    pid: Some(link.pid),
                    traceback: String::new(),
                    stderr_tail: Vec::new(),
                });
            if let Error::Startup { stderr_tail, .. } = &mut err {
                *stderr_tail = tail.clone();
            }
            if !st.closing && !st.closed {
                after_start_failure(&mut st, &err, &mut fx);
            }
            start_error = Some(err);
            ready_tx = extra.ready.take();
        } else if !st.closing && !st.closed {
            st.counters.crashes += 1;
            tracing::warn!(
                worker = wid,
                pid = link.pid,
                "kameo worker {wid} (pid {}) died: {}",
                link.pid,
                exit_reason(exit.code, exit.signal)
            );
        }
        let crashed = if st.closed {
            Error::Closed
        } else {
            Error::WorkerCrashed {
                worker_id: wid,
                pid: link.pid,
                exit_code: exit.code,
                signal: exit.signal,
                stderr_tail: tail,
            }
        };
        let taken = link.progress.taken();
        let loss = requeue_after_loss(link.slots, taken);
        st.counters.retries += loss.retried;
        for (id, target) in loss.failed {
            fail_waiter(&mut st, id, target, crashed.clone(), &mut fx);
        }
        for q in &loss.again {
            if matches!(q.target, Waiter::Stream) {
                st.streams.assign(q.id, None);
            }
        }
        st.sched.requeue_front(loss.again);
        st.serving.retain(|(w, _), s| {
            if *w == wid {
                if let Some(t) = &s.task {
                    t.abort();
                }
                false
            } else {
                true
            }
        });
        st.cancelling.retain(|(w, _, _)| *w != wid);
        if st.closed {
            let queued: Vec<_> = st.sched.drain().collect();
            for q in queued {
                fail_waiter(&mut st, q.id, q.target, Error::Closed, &mut fx);
            }
        }
        st.refill(Instant::now());
        st.flush_all();
        shared.gone.notify_waiters();
        if st.closing && st.busy() == 0 {
            shared.idle.notify_waiters();
        }
        // A worker that never got ready at pool start is not replaced: start() fails.
        !st.closing && !st.closed && (was_serving || ready_tx.is_none())
    };
    if let Some(tx) = ready_tx {
        let _ = tx.send(Err(start_error.clone().unwrap_or(Error::Closed)));
    } else if let Some(err) = &start_error {
        tracing::error!("kameo: a replacement worker failed to start: {err}");
    }
    let _ = fx.run();
    replace
}

/// Watch the pool's workers until the pool is gone: kill a worker that sent nothing for
/// `heartbeat_timeout`, one that did not stop a cancelled call within `cancel_grace`, and one
/// that did not become ready within `startup_timeout` (its driver then reports it).
pub(crate) async fn watch(shared: Weak<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let mut st = shared.lock();
        if st.closed && st.links.is_empty() {
            return;
        }
        let now = Instant::now();
        let cfg = &shared.cfg;
        let State {
            links,
            extras,
            cancelling,
            ..
        } = &mut *st;
        cancelling.retain(|&(wid, id, deadline)| {
            let Some(idx) = links.iter().position(|l| l.id == wid) else {
                return false;
            };
            if !links[idx].slots.contains_key(&id) {
                return false;
            }
            if now < deadline {
                return true;
            }
            kill(
                &mut links[idx],
                &mut extras[idx],
                format!(
                    "call {id} did not stop within cancel_grace={:?} of its cancellation",
                    cfg.cancel_grace
                ),
            );
            false
        });
        for (link, extra) in links.iter_mut().zip(extras.iter_mut()) {
            if link.closed {
                continue;
            }
            match link.state {
                LinkState::Ready | LinkState::Draining => {
                    let silent = now.saturating_duration_since(link.last_seen);
                    if silent > cfg.heartbeat_timeout {
                        kill(
                            link,
                            extra,
                            format!(
                                "no heartbeat for {silent:?} (heartbeat_timeout={:?})",
                                cfg.heartbeat_timeout
                            ),
                        );
                    }
                }
                LinkState::Connecting | LinkState::Loading => {
                    if now.saturating_duration_since(extra.spawned) > cfg.startup_timeout {
                        let message = format!(
                            "not ready within startup_timeout={:?} (a slow import? raise it with PoolBuilder::startup_timeout)",
                            cfg.startup_timeout
                        );
                        extra.startup_error = Some(Error::Startup {
                            message: message.clone(),
                            worker_id: Some(link.id),
                            pid: Some(link.pid),
                            traceback: String::new(),
                            stderr_tail: Vec::new(),
                        });
                        kill(link, extra, message);
                    }
                }
            }
        }
    }
}

fn kill(link: &mut kameo_core::link::Link<Waiter>, extra: &mut crate::state::Extra, why: String) {
    link.closed = true;
    extra.killed_for = Some(why);
    crate::process::kill_group(link.pid, libc::SIGKILL);
}
