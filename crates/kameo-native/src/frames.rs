//! The extension's side of the frame path (`kameo_core::frames`, shared by every end): a
//! frame whose body is a Python value encoded by the codec, and the conversion of a frame that
//! cannot be built into the kameo exception for it.

use crate::codec::{self, EncodeError, Options, Segments};
use crate::errors;
use kameo_core::frames::{self as core_frames, DescribeError, Head};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// Why a frame with a Python body could not be built.
pub type EncodeFrameError = core_frames::EncodeFrameError<EncodeError>;

/// What a frame carries.
pub enum Body<'a, 'py> {
    /// Nothing (END).
    Empty,
    /// One encoded value.
    Value(&'a Bound<'py, PyAny>),
    /// A tuple encoded as a record (a CALLBACK's `(path, data, request_id)`).
    Record(&'a Bound<'py, PyTuple>),
}

impl DescribeError for EncodeError {
    #[inline]
    fn describe(&self, value: &str) -> String {
        EncodeError::describe(self, value)
    }
}

/// A frame that could not be built, as the exception the caller gets.
pub trait IntoPyErr {
    /// SerializationError (RefError for a remote reference) or ProtocolError (oversize); see
    /// [`core_frames::EncodeFrameError::message`] for `value` and `frame`.
    fn into_pyerr(self, py: Python<'_>, value: &str, frame: &str) -> PyErr;
}

impl IntoPyErr for EncodeFrameError {
    fn into_pyerr(self, py: Python<'_>, value: &str, frame: &str) -> PyErr {
        let message = self.message(value, frame);
        if self.is_oversize() {
            errors::protocol(py, message)
        } else if matches!(&self, EncodeFrameError::Encode(e) if e.is_ref_error()) {
            errors::err(py, "RefError", message)
        } else {
            errors::serialization(py, message)
        }
    }
}

/// One frame: `head`, then `body` encoded with `opts` (large buffers as shared-memory
/// segments, returned with it), no bigger than `max_frame` bytes after the length prefix.
#[inline]
pub fn encode_frame(
    head: Head<'_>,
    body: Body<'_, '_>,
    opts: &Options,
    max_frame: usize,
) -> Result<(Vec<u8>, Segments), EncodeFrameError> {
    encode_frame_refs(head, body, opts, max_frame).map(|(buf, segs, _)| (buf, segs))
}

/// As [`encode_frame`], also returning the worker of the remote references the body holds
/// (with `RefMode::Parent`; all of one worker, or an error).
#[inline]
pub fn encode_frame_refs(
    head: Head<'_>,
    body: Body<'_, '_>,
    opts: &Options,
    max_frame: usize,
) -> Result<(Vec<u8>, Segments, Option<u64>), EncodeFrameError> {
    core_frames::encode_frame_with(head, max_frame, |buf, segs| match body {
        Body::Empty => Ok(None),
        Body::Value(v) => {
            let mut enc = codec::Encoder::new(buf, opts, segs);
            enc.encode(v).map(|()| enc.ref_worker())
        }
        Body::Record(t) => codec::Encoder::new(buf, opts, segs)
            .encode_record(t)
            .map(|()| None),
    })
}
