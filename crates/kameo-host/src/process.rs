//! Worker processes as the host sees them: started from one thread of the pool's own, waited
//! for on a pidfd, signalled as a process group, reaped.
//!
//! Why a thread: a worker asks the kernel to kill it when the *thread* that forked it exits
//! (PDEATHSIG), so workers are never forked from a tokio worker or blocking-pool thread, which
//! the runtime may retire while the worker lives. The spawner thread lives as long as the pool
//! (it ends when the pool's last reference is gone, after every worker is reaped), and if the
//! host process dies, SIGKILL included, the kernel kills every worker.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use kameo_core::spawn::{spawn, SpawnError, Spawned};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

struct Job {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    secret: Vec<u8>,
    reply: oneshot::Sender<Result<Spawned, SpawnError>>,
}

/// The pool's spawner thread (see the module doc).
pub(crate) struct Spawner {
    jobs: mpsc::Sender<Job>,
}

impl Spawner {
    pub fn start(name: &str) -> io::Result<Spawner> {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name(format!("{name}-spawner"))
            .spawn(move || {
                // Ends when the pool is gone (its sender dropped).
                while let Ok(job) = rx.recv() {
                    let r = spawn(&job.argv, job.env, job.cwd.as_deref(), Some(&job.secret));
                    let _ = job.reply.send(r);
                }
            })?;
        Ok(Spawner { jobs })
    }

    /// Start a worker process (fork + exec on the spawner thread).
    pub async fn spawn(
        &self,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        secret: Vec<u8>,
    ) -> Result<Spawned, SpawnError> {
        let (reply, rx) = oneshot::channel();
        let gone = || SpawnError::Setup(io::Error::other("the pool's spawner thread is gone"));
        self.jobs
            .send(Job {
                argv,
                env,
                cwd,
                secret,
                reply,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// Register a descriptor-owning `inner` (an `OwnedFd`, a socket) with the runtime's reactor.
pub(crate) fn register<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor, which stays open and the same until the AsyncFd
    // (which owns `inner`) is dropped.
    unsafe { AsyncFd::register(inner) }.map_err(io::Error::from)
}

/// How a process ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// Reap `pid` if it has exited (`WNOHANG`): Some(how it ended), None while it runs. A pid
/// that is not our child any more (reaped elsewhere) counts as ended, status unknown.
pub(crate) fn try_reap(pid: u32) -> Option<Exit> {
    let mut status: libc::c_int = 0;
    // SAFETY: a plain syscall.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    if r == 0 {
        return None;
    }
    if r < 0 {
        return Some(Exit::default());
    }
    Some(if libc::WIFSIGNALED(status) {
        Exit {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        Exit {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    })
}

/// Signal the worker's process group (the worker and whatever it started).
pub(crate) fn kill_group(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscalls; the worker leads its own group (setpgid in spawn). Killing the
    // pid too covers the moment before setpgid ran.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// SIGKILL the worker's group and reap it, waiting at most `bound` (blocking; used where no
/// runtime may be left, when the pool is dropped).
pub(crate) fn kill_and_reap(pid: u32, bound: Duration) -> Option<Exit> {
    kill_group(pid, libc::SIGKILL);
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(e) = try_reap(pid) {
            return Some(e);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Something to wait on for a process's exit: its pidfd (readable once it exits), or a poll
/// of `waitpid` where pidfds are not available.
pub(crate) enum ExitWatch {
    Pidfd(AsyncFd<OwnedFd>),
    Poll,
}

impl ExitWatch {
    pub fn new(pid: u32) -> ExitWatch {
        // SAFETY: a plain syscall; the descriptor is ours if it succeeds.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd >= 0 {
            // SAFETY: pidfd_open returned a new descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            if let Ok(a) = register(fd) {
                return ExitWatch::Pidfd(a);
            }
        }
        ExitWatch::Poll
    }

    /// Returns once `pid` has exited, and reaps it.
    pub async fn exited(&self, pid: u32) -> Exit {
        loop {
            if let Some(e) = try_reap(pid) {
                return e;
            }
            match self {
                ExitWatch::Pidfd(fd) => match fd.readable().await {
                    Ok(mut g) => {
                        if let Some(e) = try_reap(pid) {
                            return e;
                        }
                        g.clear_ready();
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                },
                ExitWatch::Poll => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// A worker's stderr pipe: lines go to `tracing` as they come, and the last ones are kept for
/// error messages.
pub(crate) struct Stderr {
    fd: Option<AsyncFd<OwnedFd>>,
    partial: Vec<u8>,
}

/// Lines of stderr kept for errors.
pub(crate) const STDERR_TAIL: usize = 20;

impl Stderr {
    pub fn new(fd: OwnedFd) -> Stderr {
        Stderr {
            fd: register(fd).ok(),
            partial: Vec::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.fd.is_some()
    }

    /// Wait until there is something to read (never returns once closed).
    pub async fn readable(&self) {
        match &self.fd {
            Some(fd) => {
                if let Ok(mut g) = fd.readable().await {
                    g.clear_ready();
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Read what is there; complete lines are returned. At EOF the pipe is closed and the
    /// partial line returned too.
    pub fn read(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        let Some(fd) = &self.fd else {
            return lines;
        };
        let raw = fd.get_ref().as_raw_fd();
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            // SAFETY: reading into a buffer we own from a descriptor we own.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                self.partial.extend_from_slice(&buf[..n as usize]);
                continue;
            }
            if n == 0 {
                eof = true;
                break;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => {
                    eof = true;
                    break;
                }
            }
        }
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        if self.partial.len() > 64 * 1024 {
            // A very long line without a newline: pass it on in pieces.
            let line: Vec<u8> = std::mem::take(&mut self.partial);
            lines.push(String::from_utf8_lossy(&line).into_owned());
        }
        if eof {
            if !self.partial.is_empty() {
                let line = std::mem::take(&mut self.partial);
                lines.push(String::from_utf8_lossy(&line).into_owned());
            }
            self.fd = None;
        }
        lines
    }
}

/// 32 random bytes (the pool's secret), from the kernel.
pub(crate) fn random_secret() -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writing into a buffer we own.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(buf)
}
