//! The worker's outgoing frames: a queue that any thread may add to, written by whichever
//! thread flushes, and paced writes for stream items. Used by the worker's channel (Python
//! threads push, any of them flushes); nothing in it knows Python, so a Rust host may queue its
//! own outgoing frames (callback items) through it too.
//!
//! Two locks: `queue` is held only to add or take frames (never across I/O, so a thread that
//! holds the GIL never waits for a write), `wire` is held while writing, so bytes leave in the
//! order they were queued whoever writes them.
//!
//! Pacing: a sync generator yields items far faster than one `send` per item can carry
//! (W4). [`Outbox::push_paced`] writes an item at once when the previous write is older than
//! `LINGER` (a slow producer loses nothing), and otherwise leaves it queued, so a fast
//! producer writes about once per `LINGER` or per `PACED_FRAMES` items. A background
//! thread (started on first use, no GIL, no Python) writes what is still queued `LINGER`
//! after it was queued, so an item yielded just before the generator stalls is not held back
//! longer than that.

use crate::fdio;
use crate::sys::{lock, Segments};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, Once, TryLockError};
use std::time::{Duration, Instant};

/// How long a paced item may wait in the queue.
const LINGER: Duration = Duration::from_micros(100);
/// Queued bytes at which a paced push writes at once.
const PACED_BYTES: usize = 64 * 1024;
/// Paced frames at which a paced push writes at once: the consumer sees items (and returns
/// credit) in batches well inside the stream window, so the producer does not stall waiting
/// for credit (measured: 32 beats 16 and 64 with the default window of 256).
const PACED_FRAMES: usize = 32;

struct Queue {
    buf: Vec<u8>,
    /// Segments of queued frames, attached to the write that starts with them.
    fds: Segments,
    /// When the oldest paced frame still queued was added.
    paced_since: Option<Instant>,
    /// Paced frames queued since the queue was last taken.
    paced: usize,
    /// When a writer last took the queue.
    taken_at: Instant,
    /// The pacing thread waits with nothing to do (it needs a notify for new work).
    pacer_idle: bool,
    closed: bool,
}

struct Wire {
    out: Vec<u8>,
    pos: usize,
    fds: Segments,
}

/// A worker's outgoing frames over one socket (see the module doc).
pub struct Outbox {
    sock: Arc<UnixStream>,
    queue: Mutex<Queue>,
    wire: Mutex<Wire>,
    pacer_wake: Condvar,
    pacer: Once,
}

impl Outbox {
    /// An empty outbox writing to `sock` (the pacing thread starts on the first paced push).
    pub fn new(sock: Arc<UnixStream>) -> Arc<Self> {
        Arc::new(Outbox {
            sock,
            queue: Mutex::new(Queue {
                buf: Vec::new(),
                fds: Segments::new(),
                paced_since: None,
                paced: 0,
                taken_at: Instant::now(),
                pacer_idle: false,
                closed: false,
            }),
            wire: Mutex::new(Wire {
                out: Vec::new(),
                pos: 0,
                fds: Segments::new(),
            }),
            pacer_wake: Condvar::new(),
            pacer: Once::new(),
        })
    }

    fn append(q: &mut Queue, buf: Vec<u8>, segs: Segments) {
        if q.buf.is_empty() {
            q.buf = buf; // no copy for a lone (maybe large) frame
        } else {
            q.buf.extend_from_slice(&buf);
        }
        q.fds.extend(segs);
    }

    /// Queue an encoded frame; it is written by the next flush.
    #[inline]
    pub fn push(&self, buf: Vec<u8>, segs: Segments) {
        Self::append(&mut lock(&self.queue), buf, segs);
    }

    fn start_pacer(self: &Arc<Self>) {
        self.pacer.call_once(|| {
            let me = Arc::clone(self);
            // A detached thread: it ends when the channel is dropped (`close`).
            let spawned = std::thread::Builder::new()
                .name("kameo-pacer".into())
                .spawn(move || me.run_pacer());
            if spawned.is_err() {
                lock(&self.queue).closed = true; // no pacer: every item is flushed at once
            }
        });
    }

    /// Queue a stream item frame; returns true when the caller should flush now (see the
    /// module doc), else the pacing thread writes it within `LINGER`.
    #[inline]
    pub fn push_paced(self: &Arc<Self>, buf: Vec<u8>, segs: Segments) -> bool {
        self.start_pacer();
        let mut q = lock(&self.queue);
        let was_empty = q.buf.is_empty();
        Self::append(&mut q, buf, segs);
        q.paced += 1;
        let now = Instant::now();
        if q.closed
            || (was_empty && now.duration_since(q.taken_at) >= LINGER)
            || q.buf.len() >= PACED_BYTES
            || q.paced >= PACED_FRAMES
            || q.paced_since
                .is_some_and(|t| now.duration_since(t) >= LINGER)
        {
            return true;
        }
        if q.paced_since.is_none() {
            q.paced_since = Some(now);
        }
        if q.pacer_idle {
            q.pacer_idle = false;
            self.pacer_wake.notify_one();
        }
        false
    }

    /// Nothing is queued or half written (a flush would have nothing to do). Called with the
    /// GIL held, so it never waits for the wire: a thread writing to a full socket holds it
    /// (GIL released) and waiting for it here would stop every Python thread until the peer
    /// reads. A wire in use counts as not empty (the caller then writes, GIL released).
    #[inline]
    pub fn is_empty(&self) -> bool {
        let w = match self.wire.try_lock() {
            Ok(w) => w,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        w.pos == w.out.len() && lock(&self.queue).buf.is_empty()
    }

    /// Write queued frames. A blocking socket: until all are written. A non-blocking one: as
    /// much as it takes; Ok(true) when nothing is left.
    #[inline]
    pub fn write_out(&self) -> io::Result<bool> {
        let mut guard = lock(&self.wire);
        let w = &mut *guard;
        let fd: RawFd = self.sock.as_raw_fd();
        loop {
            if w.pos == w.out.len() {
                let mut q = lock(&self.queue);
                w.out.clear();
                w.pos = 0;
                if q.buf.is_empty() {
                    return Ok(true);
                }
                std::mem::swap(&mut w.out, &mut q.buf);
                w.fds.append(&mut q.fds);
                q.paced_since = None;
                q.paced = 0;
                q.taken_at = Instant::now();
            }
            match fdio::send(fd, &w.out[w.pos..], &mut w.fds, 0) {
                Ok(n) => w.pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// The pacing thread: write paced frames [`LINGER`] after they were queued.
    fn run_pacer(&self) {
        loop {
            let mut q = lock(&self.queue);
            loop {
                if q.closed {
                    return;
                }
                match q.paced_since {
                    None => {
                        q.pacer_idle = true;
                        q = self.pacer_wake.wait(q).unwrap_or_else(|p| p.into_inner());
                    }
                    Some(since) => {
                        let due = since + LINGER;
                        let now = Instant::now();
                        if now >= due {
                            break;
                        }
                        q = self
                            .pacer_wake
                            .wait_timeout(q, due - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
            drop(q);
            // A broken socket is reported to the thread that flushes next.
            if self.write_out().is_err() {
                lock(&self.queue).paced_since = None;
            }
        }
    }

    /// Stop the pacing thread (the channel is going away).
    pub fn close(&self) {
        lock(&self.queue).closed = true;
        self.pacer_wake.notify_all();
    }
}
