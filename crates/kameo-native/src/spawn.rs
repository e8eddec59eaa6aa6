//! Starting worker processes: socketpair, stderr pipe, fork + immediate exec.
//!
//! The child end of the socketpair and the progress page are the only descriptors the worker
//! inherits (their numbers are in `KAMEO_FD` and `KAMEO_PROGRESS_FD`). Between fork and exec
//! the child only makes async-signal-safe calls: it joins a new process group (so the pool can signal the worker and anything it starts),
//! asks the kernel for SIGKILL when the parent thread dies, and checks that the parent did not
//! die already.

use crate::progress::Progress;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// A started worker: its pid, the parent's socket end, the read end of its stderr pipe and
/// its progress page (`progress`). The caller owns the three descriptors.
#[pyfunction]
#[pyo3(signature = (argv, env, cwd=None))]
pub fn spawn_worker(
    py: Python<'_>,
    argv: Vec<String>,
    mut env: Vec<(String, String)>,
    cwd: Option<String>,
) -> PyResult<(u32, i32, i32, i32)> {
    if argv.is_empty() {
        return Err(PyOSError::new_err("empty argv"));
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
