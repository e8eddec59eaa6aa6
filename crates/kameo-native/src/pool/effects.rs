//! Work the core collects while it is borrowed and does once the borrow ended, so Python code
//! (the loop's methods, the pool's event callback) never re-enters a borrowed core.

use crate::link::Link;
use kameo_core::events;
use pyo3::intern;
use pyo3::prelude::*;
use std::io;
use std::os::fd::AsRawFd;

use super::py::pystr;

type PyObject = Py<PyAny>;

/// Work to do once the core is no longer borrowed.
#[derive(Default)]
pub struct Effects {
    /// (worker id, event name, payload) for the pool's event callback.
    pub events: Vec<(u32, &'static str, PyObject)>,
    pub arm_writers: Vec<(u32, i32)>,
    pub disarm_writers: Vec<i32>,
    /// Sockets of links that closed: the loop stops watching them at once (the pool also does
    /// when it gets the event, but a level-triggered reader left behind would spin).
    pub disarm_readers: Vec<i32>,
    pub schedule_flush: bool,
}

impl Effects {
    pub fn event(&mut self, worker_id: u32, name: &'static str, payload: PyObject) {
        self.events.push((worker_id, name, payload));
    }

    /// After a write attempt: arm the loop's writer if output is left over, report a broken
    /// socket.
    #[inline]
    pub fn settle_write(&mut self, py: Python<'_>, link: &mut Link, result: io::Result<()>) {
        match result {
            Ok(()) if link.pending_out() && !link.writer_armed => {
                link.writer_armed = true;
                self.arm_writers.push((link.id, link.sock.as_raw_fd()));
            }
            Ok(()) => {}
            Err(e) => self.event(link.id, events::IO_ERROR, pystr(py, &e.to_string())),
        }
    }

    /// Do it: `core` is the (no longer borrowed) core, whose `flush` and `on_writable` the
    /// loop is to call; `loop_` and `on_event` give the loop and the pool's event callback.
    /// Every event is delivered, even after one fails: a lost "eof" would leave its worker
    /// unreplaced and its requests waiting. The first error is raised after.
    #[inline]
    pub fn run(
        self,
        core: &Bound<'_, PyAny>,
        loop_: impl FnOnce() -> PyObject,
        on_event: impl FnOnce() -> PyObject,
    ) -> PyResult<()> {
        let py = core.py();
        if self.schedule_flush
            || !self.arm_writers.is_empty()
            || !self.disarm_writers.is_empty()
            || !self.disarm_readers.is_empty()
        {
            let loop_ = loop_();
            let loop_ = loop_.bind(py);
            if self.schedule_flush {
                loop_.call_method1(
                    intern!(py, "call_soon"),
                    (core.getattr(intern!(py, "flush"))?,),
                )?;
            }
            for fd in self.disarm_writers {
                loop_.call_method1(intern!(py, "remove_writer"), (fd,))?;
            }
            for fd in self.disarm_readers {
                loop_.call_method1(intern!(py, "remove_reader"), (fd,))?;
            }
            if !self.arm_writers.is_empty() {
                let cb = core.getattr(intern!(py, "on_writable"))?;
                for (wid, fd) in self.arm_writers {
                    loop_.call_method1(intern!(py, "add_writer"), (fd, &cb, wid))?;
                }
            }
        }
        if !self.events.is_empty() {
            let cb = on_event();
            let mut first = None;
            for (wid, name, payload) in self.events {
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
}
