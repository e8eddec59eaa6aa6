//! Starting worker processes: socketpair, stderr pipe, fork + immediate exec.
//!
//! The child end of the socketpair, the progress page and the read end of a pipe holding the
//! pool's secret are the only descriptors the worker inherits (their numbers are in `KAMEO_FD`,
//! `KAMEO_PROGRESS_FD` and `KAMEO_SECRET_FD`). The secret never sits in the worker's
//! environment, where `/proc/<pid>/environ` would show it for the life of the process. Between fork and exec
//! the child only makes async-signal-safe calls: it joins a new process group (so the pool can signal the worker and anything it starts),
//! asks the kernel for SIGKILL when the parent thread dies, and checks that the parent did not
//! die already.

use kameo_core::progress::Progress;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
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

/// A started worker: its pid, the parent's socket end, the read end of its stderr pipe and
/// its progress page (`progress`). The caller owns the three descriptors. With `secret`, the
/// worker finds it in a pipe named by `KAMEO_SECRET_FD`.
#[pyfunction]
#[pyo3(signature = (argv, env, cwd=None, secret=None))]
pub fn spawn_worker(
    py: Python<'_>,
    argv: Vec<String>,
    mut env: Vec<(String, String)>,
    cwd: Option<String>,
    secret: Option<Vec<u8>>,
) -> PyResult<(u32, i32, i32, i32)> {
    if argv.is_empty() {
        return Err(PyOSError::new_err("empty argv"));
    }
    let secret_fd = secret.as_deref().map(secret_pipe).transpose()?;
    let secret_raw = secret_fd.as_ref().map_or(-1, |fd| fd.as_raw_fd());
    if secret_fd.is_some() {
        env.push(("KAMEO_SECRET_FD".into(), secret_raw.to_string()));
    }
    let (parent_end, child_end) = UnixStream::pair()?; // both close-on-exec
    let child_fd = child_end.as_raw_fd();
    env.push(("KAMEO_FD".into(), child_fd.to_string()));
    let progress = Progress::create_fd()?; // close-on-exec; both processes map it
    let progress_fd = progress.as_raw_fd();
    env.push(("KAMEO_PROGRESS_FD".into(), progress_fd.to_string()));
    let parent_pid = std::process::id() as libc::pid_t;
    let death_signal = parent_death_signal();

    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (fcntl, setpgid, prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
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
    let mut child = py.detach(|| cmd.spawn()).map_err(|e| {
        PyOSError::new_err(format!("cannot start worker process {:?}: {e}", argv[0]))
    })?;
    drop(child_end);
    drop(secret_fd);
    let stderr: OwnedFd = child.stderr.take().expect("stderr is piped").into();
    let pid = child.id();
    // The pool reaps the child itself (waitpid on its pidfd); dropping `Child` neither kills
    // nor waits.
    drop(child);
    parent_end.set_nonblocking(true)?;
    set_nonblocking(stderr.as_raw_fd())?;
    Ok((
        pid,
        parent_end.into_raw_fd(),
        stderr.into_raw_fd(),
        progress.into_raw_fd(),
    ))
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
/// Returns False if the parent is already gone.
#[pyfunction]
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
#[pyfunction]
pub fn kill_own_group() {
    if GROUP_LEADER.load(Ordering::Relaxed) {
        // SAFETY: plain syscall.
        unsafe {
            libc::kill(0, libc::SIGKILL);
        }
    }
}
