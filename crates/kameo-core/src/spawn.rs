//! Starting worker processes: socketpair, stderr pipe, fork + immediate exec ([`spawn`]), and
//! the descriptors of a worker a zygote forks ([`WorkerFds`]).
//!
//! The child end of the socketpair, the progress page and the read end of a pipe holding the
//! pool's secret are the only descriptors the worker inherits (their numbers are in `KAMEO_FD`,
//! `KAMEO_PROGRESS_FD` and `KAMEO_SECRET_FD`). The secret never sits in the worker's
//! environment, where `/proc/<pid>/environ` would show it for the life of the process. Between fork and exec
//! the child only makes async-signal-safe calls: it joins a new process group (so the pool can signal the worker and anything it starts),
//! asks the kernel for SIGKILL when the parent thread dies, and checks that the parent did not
//! die already.
//!
//! Both hosts start workers through [`spawn`] (the Python extension's `spawn_worker` with the GIL
//! released, the Rust host from its runtime), and a worker arms [`die_with_parent`] whichever
//! parent it has.

use crate::progress::Progress;
use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// A pipe whose read end holds `secret` (already written and the write end closed), for the
/// child to read once and close. Both ends are close-on-exec; the child clears it on its end.
fn secret_pipe(secret: &[u8]) -> std::io::Result<OwnedFd> {
    if secret.len() > libc::PIPE_BUF {
        return Err(std::io::Error::other("the secret is longer than PIPE_BUF"));
    }
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills two descriptors, which we take ownership of at once.
    let (read, write) = unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) == -1 {
            return Err(std::io::Error::last_os_error());
        }
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    // SAFETY: writing from a valid buffer; at most PIPE_BUF bytes to an empty pipe never blocks
    // and is never partial.
    let n = unsafe { libc::write(write.as_raw_fd(), secret.as_ptr().cast(), secret.len()) };
    if n != secret.len() as isize {
        return Err(std::io::Error::last_os_error());
    }
    Ok(read)
}

/// A started worker.
#[derive(Debug)]
pub struct Spawned {
    /// Its process id (the caller reaps it: dropping this neither kills nor waits).
    pub pid: u32,
    /// The parent's end of its socketpair, non-blocking.
    pub sock: UnixStream,
    /// The read end of its stderr pipe, non-blocking.
    pub stderr: OwnedFd,
    /// Its progress page (map it with [`Progress::open`]).
    pub progress: OwnedFd,
}

/// Why a worker could not be started.
#[derive(Debug)]
pub enum SpawnError {
    /// No program to run.
    EmptyArgv,
    /// A descriptor it needs could not be made (socketpair, pipe, memfd, fcntl).
    Setup(std::io::Error),
    /// The program could not be started (not found, not executable, ...).
    Exec {
        /// `argv[0]`.
        program: String,
        /// What fork/exec said.
        error: std::io::Error,
    },
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpawnError::EmptyArgv => f.write_str("empty argv"),
            SpawnError::Setup(e) => e.fmt(f),
            SpawnError::Exec { program, error } => {
                write!(f, "cannot start worker process {program:?}: {error}")
            }
        }
    }
}

impl std::error::Error for SpawnError {}

impl From<std::io::Error> for SpawnError {
    fn from(e: std::io::Error) -> Self {
        SpawnError::Setup(e)
    }
}

/// The descriptors of one worker, both ends: made by [`spawn`] for an exec'd worker, and by
/// the Python pool for a worker a zygote forks (it sends the child's ends to the zygote).
#[derive(Debug)]
pub struct WorkerFds {
    /// The parent's end of the socketpair, non-blocking.
    pub parent_sock: UnixStream,
    /// The read end of the worker's stderr pipe, non-blocking.
    pub stderr_read: OwnedFd,
    /// The progress page (both processes map it).
    pub progress: OwnedFd,
    /// The worker's end of the socketpair (its `KAMEO_FD`).
    pub child_sock: UnixStream,
    /// The write end of the stderr pipe (the worker's fd 2).
    pub stderr_write: OwnedFd,
    /// The read end of the pipe holding the pool's secret (its `KAMEO_SECRET_FD`).
    pub secret: Option<OwnedFd>,
}

impl WorkerFds {
    /// Make them; every descriptor is close-on-exec.
    pub fn new(secret: Option<&[u8]>) -> std::io::Result<WorkerFds> {
        let secret = secret.map(secret_pipe).transpose()?;
        let (parent_sock, child_sock) = UnixStream::pair()?;
        let progress = Progress::create_fd()?;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 fills two descriptors, which we take ownership of at once.
        let (stderr_read, stderr_write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        parent_sock.set_nonblocking(true)?;
        set_nonblocking(stderr_read.as_raw_fd())?;
        Ok(WorkerFds {
            parent_sock,
            stderr_read,
            progress,
            child_sock,
            stderr_write,
            secret,
        })
    }
}

/// Start a worker: `argv` with exactly `env` (nothing of this process's environment but what
/// the caller put there), in `cwd`, stdin from /dev/null, stdout inherited, stderr piped, in
/// a process group of its own and killed when the calling thread dies. With `secret`, the
/// worker finds it in a pipe named by `KAMEO_SECRET_FD`. Blocks for the fork and exec only.
pub fn spawn(
    argv: &[String],
    mut env: Vec<(String, String)>,
    cwd: Option<&str>,
    secret: Option<&[u8]>,
) -> Result<Spawned, SpawnError> {
    if argv.is_empty() {
        return Err(SpawnError::EmptyArgv);
    }
    let fds = WorkerFds::new(secret)?;
    let secret_raw = fds.secret.as_ref().map_or(-1, |fd| fd.as_raw_fd());
    if fds.secret.is_some() {
        env.push(("KAMEO_SECRET_FD".into(), secret_raw.to_string()));
    }
    let child_fd = fds.child_sock.as_raw_fd();
    env.push(("KAMEO_FD".into(), child_fd.to_string()));
    let progress_fd = fds.progress.as_raw_fd();
    env.push(("KAMEO_PROGRESS_FD".into(), progress_fd.to_string()));
    let parent_pid = std::process::id() as libc::pid_t;
    let death_signal = parent_death_signal();
    let WorkerFds {
        parent_sock,
        stderr_read,
        progress,
        child_sock,
        stderr_write,
        secret,
    } = fds;

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::from(stderr_write));
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (close_range, getrlimit, fcntl, setpgid, prctl, getppid,
    // _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Only the worker's own descriptors cross the exec: whatever else the parent holds
            // without close-on-exec (a file made inheritable, a C library's socket, another
            // worker's end) is marked close-on-exec here, then the three ends are unmarked.
            close_on_exec_from(3);
            if libc::fcntl(child_fd, libc::F_SETFD, 0) == -1
                || libc::fcntl(progress_fd, libc::F_SETFD, 0) == -1
                || (secret_raw >= 0 && libc::fcntl(secret_raw, libc::F_SETFD, 0) == -1)
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::setpgid(0, 0);
            #[cfg(target_os = "linux")]
            {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    death_signal as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() != parent_pid {
                    libc::_exit(1);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|error| SpawnError::Exec {
        program: argv[0].clone(),
        error,
    })?;
    // `cmd` holds the child's ends (stderr's write end): drop it so that the pipe closes
    // when the worker exits.
    drop(cmd);
    drop(child_sock);
    drop(secret);
    let pid = child.id();
    // The pool reaps the child itself (waitpid on its pidfd); dropping `Child` neither kills
    // nor waits.
    drop(child);
    Ok(Spawned {
        pid,
        sock: parent_sock,
        stderr: stderr_read,
        progress,
    })
}

fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fd is a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags == -1 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == -1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal the kernel sends a worker when its parent dies: a real-time signal no Python
/// code uses, whose default action (before the worker installs its handler) terminates.
fn parent_death_signal() -> libc::c_int {
    #[cfg(target_os = "linux")]
    {
        libc::SIGRTMIN() + 7
    }
    #[cfg(not(target_os = "linux"))]
    {
        libc::SIGKILL
    }
}

static GROUP_LEADER: AtomicBool = AtomicBool::new(false);

extern "C" fn on_parent_death(_: libc::c_int) {
    // Async-signal-safe only: kill(2) and _exit(2).
    // SAFETY: plain syscalls.
    unsafe {
        if GROUP_LEADER.load(Ordering::Relaxed) {
            libc::kill(0, libc::SIGKILL); // the worker and everything it started
        }
        libc::_exit(128 + libc::SIGKILL);
    }
}

/// Called by the worker at start-up: when the parent dies, kill this worker's whole process
/// group (the worker and any process it started), even if the parent died by SIGKILL.
/// Returns false if the parent is already gone.
pub fn die_with_parent(expected_parent: u32) -> bool {
    // SAFETY: installing a handler that only makes async-signal-safe calls; plain syscalls.
    unsafe {
        let leader = libc::getpgid(0) == libc::getpid();
        GROUP_LEADER.store(leader, Ordering::Relaxed);
        #[cfg(target_os = "linux")]
        {
            let sig = parent_death_signal();
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_parent_death as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0);
        }
        libc::getppid() as u32 == expected_parent
    }
}

/// Kill this worker's process group (after the parent went away), if it leads one.
pub fn kill_own_group() {
    if GROUP_LEADER.load(Ordering::Relaxed) {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(0, libc::SIGKILL);
        }
    }
}

/// Marks every descriptor from `first` up close-on-exec, in the child between fork and exec.
/// `close_range(CLOSE_RANGE_CLOEXEC)` (Linux 5.11) does it in one call; on older kernels each
/// descriptor below the soft `RLIMIT_NOFILE` (at most 2^16) gets its own `fcntl`.
///
/// # Safety
/// Async-signal-safe: only syscalls, no allocation.
unsafe fn close_on_exec_from(first: libc::c_int) {
    #[cfg(target_os = "linux")]
    {
        let from = first as libc::c_uint;
        if libc::syscall(
            libc::SYS_close_range,
            from,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let end = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
        limit.rlim_cur.min(1 << 16) as libc::c_int
    } else {
        1 << 10
    };
    for fd in first..end {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the worker writes to stderr until it closes it (each wait bounded).
    fn read_stderr(fd: &OwnedFd) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            assert!(unsafe { libc::poll(&mut p, 1, 10_000) } > 0, "no output");
            // SAFETY: reading into a valid buffer.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return String::from_utf8(out).expect("utf-8"),
                n if n > 0 => out.extend_from_slice(&buf[..n as usize]),
                _ => assert_eq!(
                    std::io::Error::last_os_error().kind(),
                    std::io::ErrorKind::WouldBlock
                ),
            }
        }
    }

    fn reap(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(
            unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) },
            pid as libc::pid_t
        );
        status
    }

    #[test]
    fn a_worker_gets_its_descriptors_the_secret_and_only_the_given_environment() {
        let script = r#"printf '%s|%s|%s|' "$KAMEO_FD" "$KAMEO_PROGRESS_FD" "${HOME:-unset}" >&2
            cat <&"$KAMEO_SECRET_FD" >&2"#;
        let argv = ["/bin/sh", "-c", script].map(String::from);
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let w = spawn(&argv, env, Some("/"), Some(b"s3cret")).expect("spawn");
        let text = read_stderr(&w.stderr);
        let parts: Vec<&str> = text.split('|').collect();
        assert_eq!(parts.len(), 4, "{text:?}");
        assert!(parts[0].parse::<i32>().is_ok() && parts[1].parse::<i32>().is_ok());
        assert_eq!(&parts[2..], ["unset", "s3cret"]);
        assert_eq!(reap(w.pid), 0);
        let progress = Progress::open(std::os::fd::IntoRawFd::into_raw_fd(w.progress));
        assert_eq!(progress.expect("a progress page").taken(), 0);
    }

    #[test]
    fn spawn_errors_say_what_could_not_start() {
        assert!(matches!(
            spawn(&[], Vec::new(), None, None),
            Err(SpawnError::EmptyArgv)
        ));
        let argv = ["/nonexistent/kameo-worker".to_string()];
        match spawn(&argv, Vec::new(), None, None) {
            Err(e @ SpawnError::Exec { .. }) => assert!(
                e.to_string()
                    .starts_with("cannot start worker process \"/nonexistent/kameo-worker\": "),
                "{e}"
            ),
            other => panic!("expected an exec error, got {other:?}"),
        }
    }
}
