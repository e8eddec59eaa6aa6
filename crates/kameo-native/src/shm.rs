//! The extension's side of shared memory (`kameo_core::shm`, shared with the Rust host): the
//! Python object numpy arrays decoded from a segment are views on.

use kameo_core::shm::View;
use pyo3::ffi;
use pyo3::prelude::*;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// A segment's private, copy-on-write mapping ([`View`]) exporting the buffer protocol,
/// writable: a write copies the page it touches into this process's own memory, so the
/// segment, its sender and every other view of it never see it.
#[pyclass(module = "kameo._native", frozen)]
pub struct ShmView(View);

impl ShmView {
    /// Map the whole segment (`size` bytes, as returned by `kameo_core::shm::verify`).
    pub fn map(fd: Arc<OwnedFd>, size: u64) -> io::Result<ShmView> {
        View::map(fd, size).map(ShmView)
    }

    /// See [`View::locate`].
    #[inline]
    pub fn locate(&self, ptr: usize, len: usize) -> Option<(Arc<OwnedFd>, u64)> {
        self.0.locate(ptr, len)
    }
}

#[pymethods]
impl ShmView {
    fn __len__(&self) -> usize {
        self.0.len()
    }

    /// Export the mapping, writable (writes stay in this process; see [`ShmView`]).
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: std::os::raw::c_int,
    ) -> PyResult<()> {
        let me = slf.get();
        // SAFETY: PyBuffer_FillInfo fills `view` and takes a reference to the exporter, which
        // keeps the mapping alive as long as the export.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                me.0.as_ptr(),
                me.0.len() as ffi::Py_ssize_t,
                0,
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
