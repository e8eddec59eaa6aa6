//! The progress page: one shared 8-byte counter per worker, in a memfd the parent creates and
//! the worker inherits.
//!
//! Before a worker starts a request (or drops one it was told to cancel) it stores there how
//! many of the requests it received, in arrival order, it has taken up: the arrival index of
//! that request plus one (a maximum, so a request skipped from the middle of its queue counts
//! only when a later one starts). When the worker dies, the parent reads the counter: requests
//! sent to it below that count may have run; the others never started and go to another worker,
//! even those already in the dead worker's socket buffer. A store to shared memory costs no
//! system call and survives any death, SIGKILL included. Both hosts create the page when
//! they spawn a worker ([`crate::spawn`]) and read it when the worker is lost.

use crate::sys::{check, memfd};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

const NAME: &std::ffi::CStr = c"kameo-progress";
const SIZE: usize = std::mem::size_of::<AtomicU64>();

/// A mapped progress page (the parent's view of a worker's, or the worker's own).
pub struct Progress {
    map: *mut AtomicU64,
}

// SAFETY: the mapping is only accessed through the atomic, and lives as long as `self`.
unsafe impl Send for Progress {}
// SAFETY: as above.
unsafe impl Sync for Progress {}

impl Progress {
    /// A new page's descriptor, counter at zero (close-on-exec: the spawner makes it
    /// inheritable in the child only).
    pub fn create_fd() -> io::Result<OwnedFd> {
        let fd = memfd(NAME, 0)?;
        // SAFETY: a plain syscall on a descriptor we own.
        check(unsafe { libc::ftruncate(fd.as_raw_fd(), SIZE as libc::off_t) })?;
        Ok(fd)
    }

    /// Map a page; takes ownership of `fd` (the parent's from `create_fd`, or the one a worker
    /// inherited).
    pub fn open(fd: RawFd) -> io::Result<Self> {
        // SAFETY: the worker hands over the descriptor it inherited.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fstat on a descriptor we own.
        let size = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            check(libc::fstat(fd.as_raw_fd(), &mut st))?;
            st.st_size as usize
        };
        if size < SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the progress descriptor is not a progress page",
            ));
        }
        Self::map(fd)
    }

    fn map(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: a shared mapping of SIZE bytes of a memfd at least that large; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Progress { map: ptr.cast() }) // the mapping keeps the memfd alive; fd closes
    }

    #[inline]
    fn counter(&self) -> &AtomicU64 {
        // SAFETY: mapped, page-aligned (so aligned for u64), for the life of self.
        unsafe { &*self.map }
    }

    /// Requests taken up so far (parent side, read once the worker is gone).
    #[inline]
    pub fn taken(&self) -> u64 {
        self.counter().load(Ordering::Acquire)
    }

    /// Record that the request with arrival index `index` is taken up (worker side).
    #[inline]
    pub fn take(&self, index: u64) {
        self.counter().fetch_max(index + 1, Ordering::Release);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe {
            libc::munmap(self.map.cast(), SIZE);
        }
    }
}
