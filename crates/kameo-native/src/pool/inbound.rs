//! What arrives from workers: the read loop of a readable socket, the frames it splits off
//! (answers, stream items, callbacks, the handshake), and a worker that broke the protocol.

use super::effects::Effects;
use super::py::{pystr, wake};
use super::state::PoolState;
use crate::codec::{self, Segments};
use crate::errors;
use kameo_core::events;
use kameo_core::frames::{raw_frame, Incoming};
use kameo_core::link::{Inbound, LinkState};
use kameo_proto::frame::{self, Kind};
use pyo3::prelude::*;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Instant;

/// A read that returned less than this drained the socket: the loop calls again when more
/// arrives.
const DRAINED_BELOW: usize = 16 * 1024;

impl PoolState {
    /// Worker `worker_id`'s socket is readable: read what is there, handle every complete
    /// frame, then send what the answers made room for.
    pub fn on_readable(&mut self, py: Python<'_>, worker_id: u32, fx: &mut Effects) {
        let Some(idx) = self.link_index(worker_id) else {
            return;
        };
        if self.links[idx].closed {
            return;
        }
        let mut inbox = self.links[idx].inbox.take().expect("inbox present");
        let (wid, pid) = (self.links[idx].id, self.links[idx].pid);
        let sock = self.links[idx].sock.as_raw_fd();
        loop {
            let n = match inbox.read(sock, 0) {
                Ok(0) => {
                    fx.event(wid, events::EOF, py.None());
                    self.close(idx, fx);
                    break;
                }
                Ok(n) => {
                    self.links[idx].last_seen = Instant::now();
                    n
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    fx.event(wid, events::IO_ERROR, pystr(py, &e.to_string()));
                    self.close(idx, fx);
                    break;
                }
            };
            let mut broken = None;
            loop {
                match inbox.next_frame() {
                    Ok(None) => break,
                    Ok(Some(Incoming::Frame(env, segs))) => {
                        self.handle_frame(py, idx, &env, &segs, fx);
                        if self.links[idx].closed {
                            break; // it broke the protocol: read no further
                        }
                    }
                    Ok(Some(Incoming::Oversize {
                        kind,
                        id,
                        size,
                        limit,
                    })) => {
                        broken = Some(self.oversize(py, idx, kind, id, size, limit, fx));
                        break;
                    }
                    Err(e) => {
                        broken = Some(format!("worker {wid} (pid {pid}): {e}"));
                        break;
                    }
                }
            }
            if let Some(msg) = broken {
                fx.event(wid, events::PROTOCOL_ERROR, pystr(py, &msg));
                self.close(idx, fx);
                break;
            }
            if self.links[idx].closed || n < DRAINED_BELOW {
                break;
            }
        }
        self.links[idx].inbox = Some(inbox);
        self.dispatch(py, fx);
        self.flush_links(py, fx);
    }

    /// Read nothing more from link `idx`, and have the loop stop watching it.
    fn close(&mut self, idx: usize, fx: &mut Effects) {
        let link = &mut self.links[idx];
        link.closed = true;
        fx.disarm_readers.push(link.sock.as_raw_fd());
    }

    /// A frame over the limit arrived. A kameo worker checks sizes before sending, so this
    /// peer is broken: fail that request, and replace the worker rather than trust the rest
    /// of its stream. Returns the message for the protocol error.
    #[allow(clippy::too_many_arguments)]
    fn oversize(
        &mut self,
        py: Python<'_>,
        idx: usize,
        kind: u8,
        id: u64,
        size: usize,
        limit: usize,
        fx: &mut Effects,
    ) -> String {
        let (wid, pid, state) = (
            self.links[idx].id,
            self.links[idx].pid,
            self.links[idx].state,
        );
        let message = format!(
            "worker {wid} (pid {pid}) sent a {} frame of {size} bytes, over max_frame_bytes={limit}",
            Kind::from_u8(kind).map_or("unknown", |k| k.name())
        );
        if matches!(state, LinkState::Ready | LinkState::Draining) {
            if let Some(slot) = self.finish_slot(py, idx, id, fx) {
                let exc = errors::protocol(py, message.clone());
                self.answer(py, id, slot, Err(exc), false);
            }
            message
        } else {
            format!("{message} during the handshake: not a kameo worker")
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
        let (wid, pid) = (self.links[idx].id, self.links[idx].pid);
        match self.links[idx].classify(env) {
            Inbound::Reply => {
                if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                    let v = codec::decode_full(py, env.body, &opts, segs).map_err(|e| match e {
                        codec::DecodeFail::Hook(exc) => exc,
                        codec::DecodeFail::Codec(e) => errors::serialization(
                            py,
                            format!(
                                "reply from worker {wid} (pid {pid}) could not be decoded: {e}"
                            ),
                        ),
                    });
                    self.answer(py, env.id, slot, v, false);
                }
            }
            Inbound::Error => {
                if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                    let exc = match codec::decode(py, env.body, &opts, segs) {
                        Ok(info) => errors::from_worker(py, info, wid, pid),
                        Err(e) => errors::protocol(
                            py,
                            format!("error reply from worker {wid} (pid {pid}) could not be decoded: {e}"),
                        ),
                    };
                    self.answer(py, env.id, slot, Err(exc), true);
                }
            }
            Inbound::Item { is_final } => {
                let decoded = codec::decode_full(py, env.body, &opts, segs);
                let Some(s) = self.streams.get_mut(env.id) else {
                    return;
                };
                if !s.is_cancelled() {
                    let waiter = match decoded {
                        Ok(v) => s.push(v.unbind()),
                        Err(codec::DecodeFail::Hook(exc)) => {
                            s.finish(Err(exc.into_value(py).into_any()))
                        }
                        Err(e) => {
                            let exc = errors::serialization(
                                py,
                                format!("stream item from worker {wid} (pid {pid}) could not be decoded: {e}"),
                            );
                            s.finish(Err(exc.into_value(py).into_any()))
                        }
                    };
                    wake(py, waiter);
                }
                if is_final {
                    if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                        self.answer(py, env.id, slot, Ok(py.None().into_bound(py)), false);
                    }
                }
            }
            Inbound::End => {
                if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                    self.answer(py, env.id, slot, Ok(py.None().into_bound(py)), false);
                }
            }
            Inbound::Heartbeat => {} // last_seen is updated for every read
            Inbound::Log => {
                let payload = match codec::decode(py, env.body, &opts, segs) {
                    Ok(records) => records.unbind(),
                    Err(e) => pystr(
                        py,
                        &format!(
                            "log records from worker {wid} (pid {pid}) could not be decoded: {e}"
                        ),
                    ),
                };
                fx.event(wid, events::LOG, payload);
            }
            Inbound::Callback => {
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
                    fx.event(wid, events::CALLBACK, p);
                }
            }
            Inbound::Credit(n) => {
                if let Ok(p) = (env.id, n).into_pyobject(py) {
                    fx.event(wid, events::CALLBACK_CREDIT, p.into_any().unbind());
                }
            }
            Inbound::Cancel => {
                let p = env.id.into_pyobject(py).expect("int");
                fx.event(wid, events::CALLBACK_CANCEL, p.into_any().unbind());
            }
            Inbound::Hello => self.handle_hello(py, idx, env.body, fx),
            Inbound::Ready => {
                self.links[idx].state = LinkState::Ready;
                let info = codec::decode(py, env.body, &opts, segs)
                    .map(|v| v.unbind())
                    .unwrap_or_else(|_| py.None());
                fx.event(wid, events::READY, info);
            }
            Inbound::StartupFailed => {
                let info = codec::decode(py, env.body, &opts, segs)
                    .map(|v| v.unbind())
                    .unwrap_or_else(|_| py.None());
                self.links[idx].state = LinkState::Draining;
                fx.event(wid, events::STARTUP_FAILED, info);
            }
            Inbound::Unexpected { message, serving } => {
                if serving {
                    if let Some(slot) = self.finish_slot(py, idx, env.id, fx) {
                        let exc = errors::protocol(py, message.clone());
                        self.answer(py, env.id, slot, Err(exc), false);
                    }
                }
                let name = if serving {
                    events::PROTOCOL_WARNING
                } else {
                    self.close(idx, fx);
                    events::PROTOCOL_ERROR
                };
                fx.event(wid, name, pystr(py, &message));
            }
        }
    }

    /// HELLO: check the worker is the one spawned (version, secret, id, pid), then WELCOME it
    /// with the pool's config, or REJECT it.
    fn handle_hello(&mut self, py: Python<'_>, idx: usize, body: &[u8], fx: &mut Effects) {
        let link = &mut self.links[idx];
        let wid = link.id;
        match link.check_hello(body, &self.secret) {
            Ok(()) => {
                let f = raw_frame(Kind::Welcome as u8, 0, &self.welcome);
                link.state = LinkState::Loading;
                if let Err(e) = link.send_now(&f, &Vec::new()) {
                    fx.event(wid, events::IO_ERROR, pystr(py, &e.to_string()));
                }
            }
            Err(reason) => {
                let f = raw_frame(Kind::Reject as u8, 0, reason.as_bytes());
                let _ = link.send_now(&f, &Vec::new());
                fx.event(wid, events::REJECTED, pystr(py, &reason));
            }
        }
    }
}
