//! Shared-memory segments for large buffers: sealed memfds passed over the Unix socket with
//! SCM_RIGHTS.
//!
//! The sender copies the buffer into a new memfd (`pwrite`, no mapping), seals it against
//! writes and resizes, sends the descriptor with the frame and drops its own copy of it. The
//! receiver checks the seals, then either copies the bytes out (`bytes`, `bytearray`) or maps
//! the segment read-only and hands numpy a view on the mapping ([`ShmView`]); the mapping, and
//! with it the segment, lives exactly as long as the arrays that use it. Nothing has a name in
//! any file system, so a process that dies frees its segments with its descriptors: the kernel
//! counts the references, including those of descriptors still in flight in a socket.

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

/// The name segments carry in `/proc/<pid>/fd` and `/proc/<pid>/maps` (`memfd:kameo-shm`).
const NAME: &std::ffi::CStr = c"kameo-shm";
const SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;

pub(crate) fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A new sealed segment holding a copy of `data`.
pub fn create_sealed(data: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls on a descriptor we own; `data` is valid for its length.
    unsafe {
        let fd = check(libc::memfd_create(
            NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        ))?;
        let fd = OwnedFd::from_raw_fd(fd);
        check(libc::ftruncate(fd.as_raw_fd(), data.len() as libc::off_t))?;
        let mut done = 0usize;
        while done < data.len() {
            let n = libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                done as libc::off_t,
            );
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            done += n as usize;
        }
        check(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS))?;
        Ok(fd)
    }
}

/// Check that a received descriptor is a sealed segment holding `offset + len` bytes, so that
/// its sender can neither change nor shrink it under us (a shrunk mapping would SIGBUS).
pub fn verify(fd: &OwnedFd, offset: u64, len: u64) -> Result<u64, String> {
    // SAFETY: fcntl and fstat on a descriptor we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    let need = libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE;
    if seals < 0 || seals & need != need {
        return Err("shared memory descriptor is not a sealed memfd".into());
    }
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(format!("fstat: {}", io::Error::last_os_error()));
    }
    let size = st.st_size as u64;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!(
            "shared memory range {offset}+{len} is beyond the segment's {size} bytes"
        ));
    }
    Ok(size)
}

/// Copy `dst.len()` bytes at `offset` of the segment into `dst`. The segment must have been
/// checked by [`verify`] (sealed against shrinking, long enough), so the mapping cannot fault.
///
/// Through a read-only mapping rather than `pread`: for large segments the page-table setup
/// of one populated mapping costs less than the page cache walk of a read (about 1 ms less per
/// 16 MiB here).
pub fn read_into(fd: &OwnedFd, offset: u64, dst: &mut [u8]) -> io::Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // Mappings start on a page boundary.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let start = offset - offset % page;
    let skip = (offset - start) as usize;
    let len = skip + dst.len();
    // SAFETY: a read-only shared mapping of a descriptor we hold, checked for MAP_FAILED; the
    // range lies inside the segment (verified by the caller) and the segment cannot shrink.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            start as libc::off_t,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping((p as *const u8).add(skip), dst.as_mut_ptr(), dst.len());
        libc::munmap(p, len);
    }
    Ok(())
}

struct Mapping {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and never remapped while the owner lives.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// A read-only mapping of a whole segment, exporting the buffer protocol. numpy arrays decoded
/// from shared memory are views on one of these; the segment's descriptor is kept so that
/// sending such an array on passes the same segment instead of copying it.
#[pyclass(module = "kameo._native", frozen)]
pub struct ShmView {
    map: Mapping,
    fd: Arc<OwnedFd>,
}

impl ShmView {
    /// Map the whole segment (`size` bytes, as returned by [`verify`]).
    pub fn map(fd: Arc<OwnedFd>, size: u64) -> io::Result<ShmView> {
        let len = size as usize;
        let ptr = if len == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr().cast()
        } else {
            // Not populated: page tables are filled as the array is read, so an array that is
            // only passed on, or read in part, costs no page-table setup (populating costs
            // about 0.5 ms per 16 MiB here), and reading all of it once costs about that much
            // more in faults than reading a populated mapping.
            // SAFETY: mapping a descriptor we hold, read-only; checked for MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            p
        };
        Ok(ShmView {
            map: Mapping { ptr, len },
            fd,
        })
    }

    /// If `[ptr, ptr + len)` lies inside this mapping: the segment and the offset.
    pub fn locate(&self, ptr: usize, len: usize) -> Option<(Arc<OwnedFd>, u64)> {
        let base = self.map.ptr as usize;
        let end = base + self.map.len;
        (ptr >= base && ptr.checked_add(len)? <= end)
            .then(|| (self.fd.clone(), (ptr - base) as u64))
    }
}

impl Drop for ShmView {
    fn drop(&mut self) {
        if self.map.len > 0 {
            // SAFETY: unmapping our own mapping; no buffer export outlives `self` (each export
            // holds a reference to it).
            unsafe { libc::munmap(self.map.ptr, self.map.len) };
        }
    }
}

#[pymethods]
impl ShmView {
    fn __len__(&self) -> usize {
        self.map.len
    }

    /// Export the mapping read-only.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        if flags & ffi::PyBUF_WRITABLE != 0 {
            return Err(PyBufferError::new_err(
                "shared memory views are read-only; copy the array to modify it",
            ));
        }
        let me = slf.get();
        // SAFETY: PyBuffer_FillInfo fills `view` and takes a reference to the exporter.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                me.map.ptr,
                me.map.len as ffi::Py_ssize_t,
                1,
                flags,
            )
        };
        if rc < 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {}
}
