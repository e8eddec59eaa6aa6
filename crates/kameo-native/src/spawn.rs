//! Starting worker processes from Python: the `_native` functions over `kameo_core::spawn`
//! (socketpair, stderr pipe, the secret, PDEATHSIG, process group; shared with the Rust host),
//! run with the GIL released, their errors as `OSError`.

use kameo_core::spawn::{self, SpawnError};
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use std::os::fd::IntoRawFd;

/// A started worker: its pid, the parent's socket end, the read end of its stderr pipe and
/// its progress page (`progress`). The caller owns the three descriptors. With `secret`, the
/// worker finds it in a pipe named by `KAMEO_SECRET_FD`.
#[pyfunction]
#[pyo3(signature = (argv, env, cwd=None, secret=None))]
pub fn spawn_worker(
    py: Python<'_>,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    secret: Option<Vec<u8>>,
) -> PyResult<(u32, i32, i32, i32)> {
    let started = py.detach(|| spawn::spawn(&argv, env, cwd.as_deref(), secret.as_deref()));
    match started {
        Ok(w) => Ok((
            w.pid,
            w.sock.into_raw_fd(),
            w.stderr.into_raw_fd(),
            w.progress.into_raw_fd(),
        )),
        Err(SpawnError::Setup(e)) => Err(e.into()),
        Err(e) => Err(PyOSError::new_err(e.to_string())),
    }
}

/// Called by the worker at start-up: when the parent dies, kill this worker's whole process
/// group (the worker and any process it started), even if the parent died by SIGKILL.
/// Returns False if the parent is already gone.
#[pyfunction]
pub fn die_with_parent(expected_parent: u32) -> bool {
    spawn::die_with_parent(expected_parent)
}

/// Kill this worker's process group (after the parent went away), if it leads one.
#[pyfunction]
pub fn kill_own_group() {
    spawn::kill_own_group()
}

/// The descriptors of a worker that a zygote forks (see `kameo._zygote`): the parent's ends
/// `(socket, stderr read end, progress page)` and the child's `(socket, stderr write end,
/// secret pipe)` to send to the zygote. The caller owns all six (close-on-exec; the parent's
/// socket and stderr end are non-blocking).
#[pyfunction]
pub fn worker_fds(secret: Vec<u8>) -> PyResult<(i32, i32, i32, i32, i32, i32)> {
    let fds = spawn::WorkerFds::new(Some(&secret))?;
    let secret_fd = fds.secret.expect("made with a secret");
    Ok((
        fds.parent_sock.into_raw_fd(),
        fds.stderr_read.into_raw_fd(),
        fds.progress.into_raw_fd(),
        fds.child_sock.into_raw_fd(),
        fds.stderr_write.into_raw_fd(),
        secret_fd.into_raw_fd(),
    ))
}
