//! One worker: starting its process, and its driver, the task that owns its I/O for its whole
//! life. The driver waits on four things at once: the socket readable (frames to handle, see
//! [`crate::inbound`]), its wake-up (output others buffered for it), the socket writable
//! (when the socket did not take everything), stderr (lines to `tracing` and the tail) and
//! the process's exit (its pidfd). A worker's life always ends with its process reaped by its
//! driver, which then hands its calls to the supervisor ([`crate::supervisor::worker_gone`]).

use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kameo_core::frames::ReadError;
use kameo_core::link::Link;
use kameo_core::progress::Progress;
use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, Notify};

use crate::error::Error;
use crate::process::{ExitWatch, Stderr, STDERR_TAIL};
use crate::state::{Effects, Extra, Shared};

/// How long a worker that closed its socket may take to exit before it is killed.
const EXIT_AFTER_EOF: Duration = Duration::from_secs(2);
/// Socket reads handled in one go before the driver lets other tasks run.
const READS_PER_TURN: usize = 16;

/// The worker's argv and environment, as the Python parent starts it.
fn command(shared: &Shared, worker_id: u32) -> (Vec<String>, Vec<(String, String)>) {
    let cfg = &shared.cfg;
    let argv = vec![
        cfg.python.clone(),
        "-m".into(),
        "kameo._worker".into(),
        cfg.name.clone(),
        format!("w{worker_id}"),
    ];
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| !k.starts_with("KAMEO_") || k == "KAMEO_LOG")
        .collect();
    for (k, v) in &cfg.env {
        env.retain(|(ek, _)| ek != k);
        if let Some(v) = v {
            env.push((k.clone(), v.clone()));
        }
    }
    env.push(("KAMEO_WORKER_ID".into(), worker_id.to_string()));
    env.push(("KAMEO_PARENT_PID".into(), std::process::id().to_string()));
    (argv, env)
}

/// Start a worker process and its driver. `ready` (at pool start) hears when it is ready or
/// why it could not start; a replacement's failure is logged and retried by the supervisor.
pub(crate) fn start(
    shared: Arc<Shared>,
    ready: Option<oneshot::Sender<Result<(), Error>>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(start_worker(shared, ready))
}

async fn start_worker(shared: Arc<Shared>, ready: Option<oneshot::Sender<Result<(), Error>>>) {
    let wid = {
        let mut st = shared.lock();
        st.next_worker += 1;
        st.next_worker
    };
    let (argv, env) = command(&shared, wid);
    let spawned = match shared
        .spawner
        .spawn(argv, env, shared.cfg.cwd.clone(), shared.secret.clone())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            let err = Error::Startup {
                message: format!(
                    "{e} (is {:?} a Python interpreter with kameo installed? set it with PoolBuilder::python)",
                    shared.cfg.python
                ),
                worker_id: Some(wid),
                pid: None,
                traceback: String::new(),
                stderr_tail: Vec::new(),
            };
            if crate::supervisor::start_failed(&shared, err, ready) {
                respawn(&shared);
            }
            return;
        }
    };
    let pid = spawned.pid;
    let fail = |why: String| Error::Startup {
        message: why,
        worker_id: Some(wid),
        pid: Some(pid),
        traceback: String::new(),
        stderr_tail: Vec::new(),
    };
    let progress = match Progress::open(spawned.progress.into_raw_fd()) {
        Ok(p) => p,
        Err(e) => {
            crate::process::kill_and_reap(pid, Duration::from_secs(1));
            if crate::supervisor::start_failed(&shared, fail(format!("progress page: {e}")), ready)
            {
                respawn(&shared);
            }
            return;
        }
    };
    let watch_sock = match spawned.sock.try_clone().and_then(crate::process::register) {
        Ok(s) => s,
        Err(e) => {
            crate::process::kill_and_reap(pid, Duration::from_secs(1));
            if crate::supervisor::start_failed(&shared, fail(format!("socket: {e}")), ready) {
                respawn(&shared);
            }
            return;
        }
    };
    let stderr = Stderr::new(spawned.stderr);
    let wake = Arc::new(Notify::new());
    {
        let mut st = shared.lock();
        if st.closed || st.closing {
            drop(st);
            crate::process::kill_and_reap(pid, Duration::from_secs(1));
            if let Some(tx) = ready {
                let _ = tx.send(Err(Error::Closed));
            }
            return;
        }
        let link = Link::new(wid, pid, spawned.sock, progress, shared.cfg.max_frame_bytes);
        st.links.push(link);
        st.extras.push(Extra {
            wake: wake.clone(),
            tail: Default::default(),
            ready,
            startup_error: None,
            killed_for: None,
            spawned: Instant::now(),
        });
    }
    tokio::spawn(drive(shared, wid, pid, watch_sock, stderr, wake));
}

/// What one turn of reading found.
pub(crate) enum Read {
    /// Everything available was read.
    Drained,
    /// More may be there (the turn's budget ran out).
    More,
    /// Nothing more is read from this worker (EOF, a broken socket, a protocol error).
    Done,
}

/// Read and handle what worker `wid` sent (its driver, or a caller that saw its answer
/// coming, see [`answer_soon`]).
pub(crate) fn on_readable(shared: &Arc<Shared>, wid: u32) -> Read {
    let mut effects = Effects::default();
    let outcome = {
        let mut st = shared.lock();
        let Some(idx) = st.index_of(wid) else {
            return Read::Done;
        };
        if st.links[idx].closed {
            return Read::Done;
        }
        let fd = st.links[idx].sock.as_raw_fd();
        let Some(mut inbox) = st.links[idx].inbox.take() else {
            return Read::Done;
        };
        let now = Instant::now();
        let mut outcome = Read::More;
        let mut fault: Option<String> = None;
        for _ in 0..READS_PER_TURN {
            match inbox.read(fd, 0) {
                Ok(0) => {
                    outcome = Read::Done;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    outcome = Read::Drained;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    fault = Some(format!("reading its socket failed: {e}"));
                    break;
                }
            }
            st.links[idx].last_seen = now;
            loop {
                match inbox.next_frame() {
                    Ok(None) => break,
                    Ok(Some(incoming)) => {
                        if let Err(why) = crate::inbound::handle(
                            shared,
                            &mut st,
                            idx,
                            incoming,
                            now,
                            &mut effects,
                        ) {
                            fault = Some(why);
                            break;
                        }
                    }
                    Err(e) => {
                        fault = Some(match e {
                            ReadError::Malformed(e) => format!("sent a malformed frame: {e}"),
                            ReadError::Fds(e) => {
                                format!("sent a frame without its descriptors: {e}")
                            }
                        });
                        break;
                    }
                }
            }
            if fault.is_some() || st.links[idx].closed {
                break;
            }
        }
        let link = &mut st.links[idx];
        link.inbox = Some(inbox);
        if let Some(why) = fault {
            let (id, pid) = (link.id, link.pid);
            link.closed = true;
            tracing::error!(
                worker = id,
                pid,
                "kameo worker {id} (pid {pid}) {why}; it is replaced"
            );
            st.extras[idx].killed_for = Some(why);
            crate::process::kill_group(pid, libc::SIGKILL);
            outcome = Read::Done;
        } else if st.links[idx].closed {
            outcome = Read::Done;
        }
        st.refill(now);
        st.flush_all();
        if st.closing && st.busy() == 0 {
            shared.idle.notify_waiters();
        }
        outcome
    };
    if !effects.is_empty() {
        for (wid, cid, body) in effects.run() {
            crate::serve::start(shared, wid, cid, body);
        }
    }
    outcome
}

/// After a read turn: whether the next turn follows at once (the budget ran out with more to
/// read), and whether the driver still reads this worker's socket.
fn read_on(turn: Read) -> (bool, bool) {
    match turn {
        Read::More => (true, true),
        Read::Drained => (false, true),
        Read::Done => (false, false),
    }
}

/// A caller whose request went to an idle worker, with nothing else in flight in the pool,
/// looks for the answer for a few microseconds (`KAMEO_SPIN_US`, as the Python parent and the
/// workers do) and reads it itself: an answer that comes that soon then needs no wake-up of
/// the driver and of the caller, which on a VM costs more than the round trip. Nothing else
/// of the pool waits meanwhile (it is the only call), and the spin yields the CPU between looks.
/// Returns the answer if it came (read here, or by the driver, which a multi-thread runtime
/// may run at once on another thread).
pub(crate) fn answer_soon(
    shared: &Arc<Shared>,
    wid: u32,
    fd: i32,
    rx: &mut tokio::sync::oneshot::Receiver<Result<crate::state::Body, Error>>,
) -> Option<Result<crate::state::Body, Error>> {
    let spin = kameo_core::wait::spin();
    if spin.is_zero() {
        return None;
    }
    enum Seen {
        Answer(Result<crate::state::Body, Error>),
        Readable,
        Gone,
    }
    use tokio::sync::oneshot::error::TryRecvError;
    // The fd may have been closed meanwhile: then poll only reports on whatever has that
    // number, and on_readable checks the link.
    let seen = kameo_core::wait::spin_on(spin, || match rx.try_recv() {
        Ok(answer) => Some(Seen::Answer(answer)),
        Err(TryRecvError::Closed) => Some(Seen::Gone),
        Err(TryRecvError::Empty) => kameo_core::wait::readable_now(fd).then_some(Seen::Readable),
    })?;
    match seen {
        Seen::Answer(answer) => Some(answer),
        Seen::Gone => None,
        Seen::Readable => {
            on_readable(shared, wid);
            rx.try_recv().ok()
        }
    }
}

/// Write what is buffered for worker `wid`: true while output remains (wait for writable).
fn flush_own(shared: &Shared, wid: u32) -> bool {
    let mut st = shared.lock();
    let Some(idx) = st.index_of(wid) else {
        return false;
    };
    st.links[idx].writer_armed = true; // nobody else wakes us while we write
    st.flush(idx);
    let link = &mut st.links[idx];
    let pending = link.pending_out() && !link.closed;
    if !pending {
        link.writer_armed = false;
    }
    pending
}

async fn drive(
    shared: Arc<Shared>,
    wid: u32,
    pid: u32,
    sock: AsyncFd<UnixStream>,
    mut stderr: Stderr,
    wake: Arc<Notify>,
) {
    let exit_watch = ExitWatch::new(pid);
    let mut reading = true;
    let mut want_write = false;
    let mut more = false;
    let mut eof_deadline: Option<tokio::time::Instant> = None;
    let exit = {
        let exited = exit_watch.exited(pid);
        tokio::pin!(exited);
        loop {
            if !reading && eof_deadline.is_none() {
                eof_deadline = Some(tokio::time::Instant::now() + EXIT_AFTER_EOF);
            }
            let eof_sleep = async {
                match eof_deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                e = &mut exited => break e,
                r = sock.readable(), if reading && !more => {
                    if let Ok(mut g) = r {
                        g.clear_ready();
                    }
                    (more, reading) = read_on(on_readable(&shared, wid));
                }
                _ = wake.notified() => {
                    want_write = flush_own(&shared, wid);
                }
                r = sock.writable(), if want_write => {
                    if let Ok(mut g) = r {
                        g.clear_ready();
                    }
                    want_write = flush_own(&shared, wid);
                }
                _ = stderr.readable(), if stderr.is_open() => {
                    let lines = stderr.read();
                    keep_stderr(&shared, wid, pid, lines);
                }
                // The last turn's budget ran out: read on once the other branches had their
                // turn (a flooding worker must not hold up our output, nor its exit).
                _ = tokio::task::yield_now(), if more => {
                    (more, reading) = read_on(on_readable(&shared, wid));
                }
                _ = eof_sleep => {
                    // It closed its socket but does not exit.
                    crate::process::kill_group(pid, libc::SIGKILL);
                    eof_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
                }
            }
        }
    };
    // What it wrote last (its traceback, say): what is there now, without waiting for EOF (a
    // process it started may hold the pipe open).
    let lines = stderr.read();
    keep_stderr(&shared, wid, pid, lines);
    if crate::supervisor::worker_gone(&shared, wid, exit) {
        respawn(&shared);
    }
}

/// Start a replacement worker (after the supervisor's back-off).
fn respawn(shared: &Arc<Shared>) {
    let delay = crate::supervisor::backoff(shared);
    let shared = shared.clone();
    tokio::spawn(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if shared.lock().closing {
            return;
        }
        start(shared, None).await;
    });
}

fn keep_stderr(shared: &Shared, wid: u32, pid: u32, lines: Vec<String>) {
    if lines.is_empty() {
        return;
    }
    for line in &lines {
        tracing::info!(target: "kameo::stderr", worker = wid, pid, "{line}");
    }
    let mut st = shared.lock();
    if let Some(idx) = st.index_of(wid) {
        let tail = &mut st.extras[idx].tail;
        for line in lines {
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}
