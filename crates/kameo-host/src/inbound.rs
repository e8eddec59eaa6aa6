//! What the host does with each frame a worker sends, under the pool's lock: the handshake
//! (HELLO, READY, STARTUP_FAILED), answers (REPLY, ERROR, ITEM, END), callbacks (CALLBACK,
//! CREDIT, CANCEL) and LOG. Which frame is allowed when is [`Link::classify`]'s (the
//! protocol's parent half, shared with the Python parent); bodies are copied out and decoded by
//! whoever waits for them, after the lock is released.

use std::sync::Arc;
use std::time::Instant;

use kameo_core::frames::{encode_frame_with, raw_frame, Head, Incoming};
use kameo_core::link::{Inbound, LinkState};
use kameo_core::streams::Finished;
use kameo_proto::frame::{Envelope, Kind};

use crate::bodies::{ErrorInfo, LogBody, Welcome};
use crate::error::Error;
use crate::state::{Body, Effects, Entry, Shared, State, Waiter};

/// Handle one frame of link `idx`. Err: the worker broke the protocol (nothing more is read
/// from it; it is killed and replaced).
pub(crate) fn handle(
    shared: &Arc<Shared>,
    st: &mut State,
    idx: usize,
    incoming: Incoming<'_>,
    now: Instant,
    fx: &mut Effects,
) -> Result<(), String> {
    let (env, segs) = match incoming {
        Incoming::Frame(env, segs) => (env, segs),
        Incoming::Oversize {
            kind,
            id,
            size,
            limit,
        } => {
            let message = format!(
                "worker {} (pid {}) sent a {size}-byte frame (kind {kind}), over max_frame_bytes={limit}",
                st.links[idx].id, st.links[idx].pid
            );
            fail_call(
                st,
                idx,
                id,
                Error::Protocol {
                    message: message.clone(),
                },
                fx,
            );
            return Err(message);
        }
    };
    let id = env.id;
    match st.links[idx].classify(&env) {
        Inbound::Reply => {
            let link = &mut st.links[idx];
            if let Some(slot) = link.slots.remove(&id) {
                link.completed += 1;
                link.answered(now);
                st.counters.completed += 1;
                let body = Body {
                    bytes: env.body.to_vec(),
                    segs,
                };
                match slot.target {
                    Waiter::Ask(tx) => fx.answers.push((tx, Ok(body))),
                    Waiter::Stream => {
                        let message = format!("worker {} sent REPLY to stream {id}", link.id);
                        finish_stream(st, id, Err(Error::Protocol { message }), fx);
                    }
                }
            }
        }
        Inbound::Error => {
            let (wid, pid) = (st.links[idx].id, st.links[idx].pid);
            let err = crate::bodies::error_of(env.body, wid, pid);
            st.counters.completed += 1;
            st.counters.errors += 1;
            fail_call(st, idx, id, err, fx);
        }
        Inbound::Item { is_final } => {
            if st.links[idx].slots.contains_key(&id) {
                if let Some(buf) = st.streams.get_mut(id) {
                    if !buf.is_cancelled() {
                        let item = Entry::Item(Body {
                            bytes: env.body.to_vec(),
                            segs,
                        });
                        if let Some(Entry::Waker(w)) = buf.push(item) {
                            fx.wakers.push(w);
                        }
                    }
                }
                if is_final {
                    end_stream(st, idx, id, now, fx);
                }
            }
        }
        Inbound::End => end_stream(st, idx, id, now, fx),
        Inbound::Heartbeat => {}
        Inbound::Log => log_records(&env, st.links[idx].id, st.links[idx].pid),
        Inbound::Callback => {
            fx.callbacks.push((st.links[idx].id, id, env.body.to_vec()));
        }
        Inbound::Credit(n) => {
            if let Some(s) = st.serving.get(&(st.links[idx].id, id)) {
                s.credit.add_permits(n as usize);
            }
        }
        Inbound::Cancel => {
            let wid = st.links[idx].id;
            if let Some(s) = st.serving.remove(&(wid, id)) {
                if let Some(task) = s.task {
                    task.abort();
                }
                st.links[idx].buffer(&raw_frame(Kind::End as u8, id, b""), &Vec::new());
            }
        }
        Inbound::Hello => {
            let link = &mut st.links[idx];
            match link.check_hello(env.body, &shared.secret) {
                Ok(()) => {
                    let frame = welcome(shared)?;
                    link.buffer(&frame, &Vec::new());
                    link.state = LinkState::Loading;
                    if let Some(inbox) = link.inbox.as_mut() {
                        inbox.set_max_frame(shared.cfg.max_frame_bytes);
                    }
                }
                Err(reason) => {
                    link.buffer(
                        &raw_frame(Kind::Reject as u8, 0, reason.as_bytes()),
                        &Vec::new(),
                    );
                    let _ = link.write_out();
                    link.closed = true;
                    let message =
                        format!("the process is not a kameo worker of this pool: {reason}");
                    st.extras[idx].startup_error = Some(startup(st, idx, message, String::new()));
                }
            }
        }
        Inbound::Ready => {
            st.links[idx].state = LinkState::Ready;
            st.failed_starts = 0;
            if let Some(tx) = st.extras[idx].ready.take() {
                fx.ready.push((tx, Ok(())));
            }
            tracing::debug!(
                worker = st.links[idx].id,
                pid = st.links[idx].pid,
                "kameo worker ready"
            );
        }
        Inbound::StartupFailed => {
            let info: ErrorInfo = crate::serde_py::from_wire(env.body).unwrap_or_default();
            let message = format!(
                "{} {}: {}: {}",
                info.stage.as_deref().unwrap_or("start"),
                info.what.as_deref().unwrap_or("the target"),
                info.type_name.as_deref().unwrap_or("Exception"),
                info.message.as_deref().unwrap_or(""),
            );
            let tb = info.traceback.unwrap_or_default();
            st.extras[idx].startup_error = Some(startup(st, idx, message, tb));
            st.links[idx].closed = true; // it exits by itself
        }
        Inbound::Unexpected { message, serving } => {
            if !serving {
                return Err(message);
            }
            tracing::warn!("kameo: {message}");
            fail_call(st, idx, id, Error::Protocol { message }, fx);
        }
    }
    Ok(())
}

fn startup(st: &State, idx: usize, message: String, traceback: String) -> Error {
    Error::Startup {
        message,
        worker_id: Some(st.links[idx].id),
        pid: Some(st.links[idx].pid),
        traceback,
        stderr_tail: Vec::new(),
    }
}

/// Call `id` on link `idx` failed with `err`.
fn fail_call(st: &mut State, idx: usize, id: u64, err: Error, fx: &mut Effects) {
    let Some(slot) = st.links[idx].slots.remove(&id) else {
        return;
    };
    st.links[idx].answered(Instant::now());
    match slot.target {
        Waiter::Ask(tx) => fx.answers.push((tx, Err(err))),
        Waiter::Stream => finish_stream(st, id, Err(err), fx),
    }
}

fn end_stream(st: &mut State, idx: usize, id: u64, now: Instant, fx: &mut Effects) {
    let link = &mut st.links[idx];
    if link.slots.remove(&id).is_some() {
        link.completed += 1;
        link.answered(now);
        st.counters.completed += 1;
        finish_stream(st, id, Ok(()), fx);
    }
}

pub(crate) fn finish_stream(st: &mut State, id: u64, outcome: Result<(), Error>, fx: &mut Effects) {
    if let Finished::Open(Some(Entry::Waker(w))) =
        st.streams.finish(id, outcome.map_err(Entry::Failed))
    {
        fx.wakers.push(w);
    }
}

fn welcome(shared: &Shared) -> Result<Vec<u8>, String> {
    let cfg = &shared.cfg;
    let body = Welcome {
        target: &cfg.target,
        init: None,
        initargs: None,
        max_concurrency: cfg.max_concurrency,
        max_frame_bytes: cfg.max_frame_bytes as u64,
        sys_path: None,
        callbacks: shared.callbacks.paths(),
        stream_window: cfg.stream_window,
        heartbeat_interval: cfg.heartbeat_interval.as_secs_f64(),
        allow_pickle: false,
        shm_threshold: cfg.shm_threshold,
        log_levels: cfg
            .forward_logs
            .then(|| std::iter::once(("", 20u32)).collect()),
    };
    encode_frame_with(Head::new(Kind::Welcome as u8, 0), 1 << 20, |buf, _| {
        crate::serde_py::to_wire_into(buf, &body)
    })
    .map(|(frame, _, ())| frame)
    .map_err(|e| format!("cannot encode WELCOME: {e:?}"))
}

/// LOG records to `tracing` events (target `kameo::worker`), at their level.
fn log_records(env: &Envelope<'_>, wid: u32, pid: u32) {
    let Ok((dropped, records)) = crate::serde_py::from_wire::<LogBody>(env.body) else {
        return;
    };
    if dropped > 0 {
        tracing::warn!(target: "kameo::worker", worker = wid, pid, "kameo worker {wid} dropped {dropped} log records");
    }
    for (name, level, message, exc, _stack, _created, path, line, func, _thread) in records {
        let exc = exc.unwrap_or_default();
        macro_rules! emit {
            ($lvl:expr) => {
                tracing::event!(target: "kameo::worker", $lvl, worker = wid, pid, logger = %name, file = %path, line, function = %func, exc = %exc, "{message}")
            };
        }
        match level {
            l if l >= 40 => emit!(tracing::Level::ERROR),
            l if l >= 30 => emit!(tracing::Level::WARN),
            l if l >= 20 => emit!(tracing::Level::INFO),
            l if l >= 10 => emit!(tracing::Level::DEBUG),
            _ => emit!(tracing::Level::TRACE),
        }
    }
}
