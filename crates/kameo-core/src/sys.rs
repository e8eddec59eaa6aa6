//! The leaf of the crate: small system helpers every other module (and either host) may use,
//! depending on nothing in the crate (libc and std only).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shared-memory segments a frame refers to (by index), sent with it as SCM_RIGHTS.
pub type Segments = Vec<Arc<OwnedFd>>;

/// Lock, ignoring poisoning (a panicking holder leaves the data as consistent as any write).
#[inline]
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A libc return code as a result: negative is the thread's `errno`.
#[inline]
pub fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new, empty memfd named `name` (close-on-exec).
pub fn memfd(name: &std::ffi::CStr, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall; the descriptor it returns is owned at once.
    unsafe {
        let fd = check(libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}
