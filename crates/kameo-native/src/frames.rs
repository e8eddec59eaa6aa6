//! The one frame path of both ends: [`encode_frame`] builds a frame with a codec body and
//! checks it against `max_frame_bytes`; [`Inbox`] reads what a socket has (descriptors
//! included) and splits it into complete frames. The parent core (`pool::inbound`, `core`) and
//! the worker channel (`channel`) both go through here, so a limit or an error is worded and
//! typed the same way on both sides.

use crate::codec::{self, EncodeError, Options, Segments};
use crate::errors;
use kameo_core::fdio;
use kameo_proto::frame::{self, Envelope, Event, FrameReader};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{OwnedFd, RawFd};

/// The header of a frame to encode.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    pub kind: u8,
    pub id: u64,
    /// The traceparent; one over [`frame::MAX_TRACE_LEN`] bytes is left out.
    pub trace: Option<&'a [u8]>,
    pub is_final: bool,
}

impl<'a> Head<'a> {
    #[inline]
    pub fn new(kind: u8, id: u64) -> Self {
        Head {
            kind,
            id,
            trace: None,
            is_final: false,
        }
    }

    #[inline]
    pub fn trace(mut self, trace: Option<&'a str>) -> Self {
        self.trace = trace
            .map(str::as_bytes)
            .filter(|t| t.len() <= frame::MAX_TRACE_LEN);
        self
    }

    #[inline]
    pub fn is_final(mut self, is_final: bool) -> Self {
        self.is_final = is_final;
        self
    }
}

/// What a frame carries.
pub enum Body<'a, 'py> {
    /// Nothing (END).
    Empty,
    /// One encoded value.
    Value(&'a Bound<'py, PyAny>),
    /// A tuple encoded as a record (a CALLBACK's `(path, data, request_id)`).
    Record(&'a Bound<'py, PyTuple>),
}

/// Why a frame could not be built.
pub enum EncodeFrameError {
    /// The value cannot be encoded (SerializationError).
    Encode(EncodeError),
    /// The frame would be over `max_frame_bytes` (ProtocolError).
    Oversize { size: usize, limit: usize },
}

impl EncodeFrameError {
    pub fn is_oversize(&self) -> bool {
        matches!(self, EncodeFrameError::Oversize { .. })
    }

    /// `value` names the value in an encoding error's path (`message["a"][1]: ...`), `frame`
    /// the frame in an oversize error (`the request frame is ...`).
    pub fn message(&self, value: &str, frame: &str) -> String {
        match self {
            EncodeFrameError::Encode(e) => e.describe(value),
            EncodeFrameError::Oversize { size, limit } => format!(
                "the {frame} frame is {size} bytes, over max_frame_bytes={limit}; raise Pool(max_frame_bytes=...) or send less"
            ),
        }
    }

    /// SerializationError or ProtocolError; see [`Self::message`].
    pub fn into_pyerr(self, py: Python<'_>, value: &str, frame: &str) -> PyErr {
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
    let mut buf = Vec::with_capacity(128);
    let start = frame::begin_frame(&mut buf, head.kind, head.id, head.trace);
    if head.is_final {
        frame::mark_final(&mut buf, start);
    }
    let mut segs = Segments::new();
    let mut ref_worker = None;
    let encoded = match body {
        Body::Empty => Ok(()),
        Body::Value(v) => {
            let mut enc = codec::Encoder::new(&mut buf, opts, &mut segs);
            let r = enc.encode(v);
            ref_worker = enc.ref_worker();
            r
        }
        Body::Record(t) => codec::Encoder::new(&mut buf, opts, &mut segs).encode_record(t),
    };
    encoded.map_err(EncodeFrameError::Encode)?;
    if !segs.is_empty() {
        frame::set_fds(&mut buf, start, segs.len());
    }
    let size = buf.len() - frame::LEN_PREFIX;
    if size > max_frame || frame::finish_frame(&mut buf, start).is_none() {
        return Err(EncodeFrameError::Oversize {
            size,
            limit: max_frame,
        });
    }
    Ok((buf, segs, ref_worker))
}

/// A small frame with a raw body (control frames, HELLO, CREDIT, REJECT).
#[inline]
pub fn raw_frame(kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + body.len());
    frame::write_frame(&mut f, kind, id, None, body);
    f
}

/// What [`Inbox::next`] found.
pub enum Incoming<'a> {
    /// A complete frame and the descriptors that came with it.
    Frame(Envelope<'a>, Segments),
    /// A frame over the limit, skipped (its descriptors closed); the stream is still in sync.
    Oversize {
        kind: u8,
        id: u64,
        size: usize,
        limit: usize,
    },
}

/// The stream cannot be read any further: the connection must be dropped.
#[derive(Debug)]
pub enum ReadError {
    /// A malformed frame.
    Malformed(frame::FrameError),
    /// A frame declared descriptors that did not arrive with it.
    Fds(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Malformed(e) => e.fmt(f),
            ReadError::Fds(e) => f.write_str(e),
        }
    }
}

/// The reading side of a connection: bytes not yet split into frames, and the descriptors
/// received for frames not yet complete.
pub struct Inbox {
    frames: FrameReader,
    fds: VecDeque<OwnedFd>,
}

impl Inbox {
    pub fn new(max_frame: usize) -> Self {
        Inbox {
            frames: FrameReader::new(max_frame),
            fds: VecDeque::new(),
        }
    }

    /// Change the size limit for frames not yet started.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.frames.set_max_frame(max_frame);
    }

    /// One `recvmsg` on `sock` (with `flags`, e.g. MSG_DONTWAIT) into the buffer. Returns the
    /// byte count (0 = end of stream); errors (WouldBlock, Interrupted, ...) are returned as
    /// they are.
    #[inline]
    pub fn read(&mut self, sock: RawFd, flags: i32) -> io::Result<usize> {
        let fds = &mut self.fds;
        self.frames
            .read_with(|buf| fdio::recv(sock, buf, fds, flags))
    }

    /// The next complete frame, or None when more bytes are needed.
    #[inline]
    pub fn next(&mut self) -> Result<Option<Incoming<'_>>, ReadError> {
        match self.frames.next_event().map_err(ReadError::Malformed)? {
            None => Ok(None),
            Some(Event::Frame(env)) => {
                let segs = fdio::take(&mut self.fds, env.nfds).map_err(ReadError::Fds)?;
                Ok(Some(Incoming::Frame(env, segs)))
            }
            Some(Event::Oversize {
                kind,
                id,
                nfds,
                size,
                limit,
            }) => {
                drop(fdio::take(&mut self.fds, nfds));
                Ok(Some(Incoming::Oversize {
                    kind,
                    id,
                    size,
                    limit,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kameo_proto::frame::Kind;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn inbox_splits_frames_and_skips_oversize_ones() {
        let (mut a, b) = UnixStream::pair().expect("socketpair");
        let mut data = raw_frame(Kind::Heartbeat as u8, 1, b"");
        data.extend(raw_frame(Kind::Item as u8, 2, &[7; 100]));
        data.extend(raw_frame(Kind::End as u8, 3, b""));
        a.write_all(&data).expect("write");
        let mut inbox = Inbox::new(64);
        assert_eq!(inbox.read(b.as_raw_fd(), 0).expect("read"), data.len());
        let mut seen = Vec::new();
        while let Some(ev) = inbox.next().expect("well formed") {
            seen.push(match ev {
                Incoming::Frame(env, segs) => {
                    assert!(segs.is_empty());
                    (env.kind, env.id, None)
                }
                Incoming::Oversize {
                    kind,
                    id,
                    size,
                    limit,
                } => (kind, id, Some((size, limit))),
            });
        }
        assert_eq!(
            seen,
            [
                (Kind::Heartbeat as u8, 1, None),
                (Kind::Item as u8, 2, Some((110, 64))),
                (Kind::End as u8, 3, None),
            ]
        );
    }

    #[test]
    fn inbox_reports_malformed_frames_and_missing_descriptors() {
        let mut inbox = Inbox::new(1024);
        inbox.frames.feed(&[3, 0, 0, 0, 1, 0, 0]);
        assert!(matches!(inbox.next(), Err(ReadError::Malformed(_))));

        let mut inbox = Inbox::new(1024);
        let mut f = Vec::new();
        let start = frame::begin_frame(&mut f, Kind::Item as u8, 5, None);
        frame::set_fds(&mut f, start, 2);
        frame::finish_frame(&mut f, start).expect("small");
        inbox.frames.feed(&f);
        match inbox.next() {
            Err(e @ ReadError::Fds(_)) => assert!(e.to_string().contains("2 file descriptors")),
            _ => panic!("expected a descriptor error"),
        }
    }

    #[test]
    fn oversize_message_names_size_and_limit() {
        let e = EncodeFrameError::Oversize {
            size: 2000,
            limit: 1024,
        };
        assert!(e.is_oversize());
        assert_eq!(
            e.message("message", "request"),
            "the request frame is 2000 bytes, over max_frame_bytes=1024; raise Pool(max_frame_bytes=...) or send less"
        );
    }
}
