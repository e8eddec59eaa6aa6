//! The one frame path of every end (the Python parent, the worker, the Rust host):
//! [`encode_frame_with`] builds a frame around a body the host encodes (Python values through
//! the extension's codec, serde values in the Rust host) and checks it against
//! `max_frame_bytes`; [`Inbox`] reads what a socket has (descriptors included) and splits it
//! into complete frames. Every end goes through here, so a limit or an error is worded the same
//! way on all sides; turning an [`EncodeFrameError`] into the host's own error (a Python
//! exception, a Rust error variant) is the host's part.

use crate::fdio;
use crate::sys::Segments;
use kameo_proto::frame::{self, Envelope, Event, FrameReader};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{OwnedFd, RawFd};

/// The header of a frame to encode.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    /// The frame kind (`kameo_proto::frame::Kind`).
    pub kind: u8,
    /// The correlation id.
    pub id: u64,
    /// The traceparent; one over [`frame::MAX_TRACE_LEN`] bytes is left out.
    pub trace: Option<&'a [u8]>,
    /// The last frame of its request (a final ITEM).
    pub is_final: bool,
}

impl<'a> Head<'a> {
    /// A header of `kind` for request `id`, no trace, not final.
    #[inline]
    pub fn new(kind: u8, id: u64) -> Self {
        Head {
            kind,
            id,
            trace: None,
            is_final: false,
        }
    }

    /// With the traceparent `trace` (left out if over [`frame::MAX_TRACE_LEN`] bytes).
    #[inline]
    pub fn trace(mut self, trace: Option<&'a str>) -> Self {
        self.trace = trace
            .map(str::as_bytes)
            .filter(|t| t.len() <= frame::MAX_TRACE_LEN);
        self
    }

    /// Marked final (or not).
    #[inline]
    pub fn is_final(mut self, is_final: bool) -> Self {
        self.is_final = is_final;
        self
    }
}

/// A body encoding error that can say what failed, naming the value (`message["a"][1]:
/// ...`); the Python codec's `EncodeError` and the Rust host's serde errors implement it.
pub trait DescribeError {
    /// The error's message, the value at its root named `value`.
    fn describe(&self, value: &str) -> String;
}

/// Why a frame could not be built.
#[derive(Debug)]
pub enum EncodeFrameError<E> {
    /// The value cannot be encoded (SerializationError): the host's body encoder failed.
    Encode(E),
    /// The frame would be over `max_frame_bytes` (ProtocolError).
    Oversize {
        /// The frame's size after the length prefix.
        size: usize,
        /// `max_frame_bytes`.
        limit: usize,
    },
}

impl<E> EncodeFrameError<E> {
    /// The frame was too large (rather than its body unencodable).
    pub fn is_oversize(&self) -> bool {
        matches!(self, EncodeFrameError::Oversize { .. })
    }
}

impl<E: DescribeError> EncodeFrameError<E> {
    /// `value` names the value in an encoding error's path (`message["a"][1]: ...`), `frame`
    /// the frame in an oversize error (`the request frame is ...`).
    pub fn message(&self, value: &str, frame: &str) -> String {
        match self {
            EncodeFrameError::Encode(e) => e.describe(value),
            EncodeFrameError::Oversize { size, limit } => format!(
                "the {frame} frame is {size} bytes, over max_frame_bytes={limit}; raise the pool's max_frame_bytes (Pool(max_frame_bytes=...) in Python, PoolBuilder::max_frame_bytes in Rust) or send less"
            ),
        }
    }
}

/// One frame: `head`, then the body `encode` writes into the buffer (adding the
/// shared-memory segments it refers to, returned with the frame), no bigger than `max_frame`
/// bytes after the length prefix. `encode`'s own result (say, what the body holds) is returned
/// too. Generic, so each host's encoder is called directly (no dynamic dispatch).
#[inline]
pub fn encode_frame_with<R, E>(
    head: Head<'_>,
    max_frame: usize,
    encode: impl FnOnce(&mut Vec<u8>, &mut Segments) -> Result<R, E>,
) -> Result<(Vec<u8>, Segments, R), EncodeFrameError<E>> {
    let mut buf = Vec::with_capacity(128);
    let start = frame::begin_frame(&mut buf, head.kind, head.id, head.trace);
    if head.is_final {
        frame::mark_final(&mut buf, start);
    }
    let mut segs = Segments::new();
    let extra = encode(&mut buf, &mut segs).map_err(EncodeFrameError::Encode)?;
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
    Ok((buf, segs, extra))
}

/// A small frame with a raw body (control frames, HELLO, CREDIT, REJECT).
#[inline]
pub fn raw_frame(kind: u8, id: u64, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(16 + body.len());
    frame::write_frame(&mut f, kind, id, None, body);
    f
}

/// What [`Inbox::next_frame`] found.
pub enum Incoming<'a> {
    /// A complete frame and the descriptors that came with it.
    Frame(Envelope<'a>, Segments),
    /// A frame over the limit, skipped (its descriptors closed); the stream is still in sync.
    Oversize {
        /// Its kind.
        kind: u8,
        /// Its correlation id.
        id: u64,
        /// Its size after the length prefix.
        size: usize,
        /// The reader's limit.
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
    /// An empty inbox taking frames of at most `max_frame` bytes.
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

    /// The next complete frame, or None when more bytes are needed. Always inlined: it runs
    /// once per frame in each host's read loop (and was inlined there before it moved here).
    #[inline(always)]
    pub fn next_frame(&mut self) -> Result<Option<Incoming<'_>>, ReadError> {
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
        while let Some(ev) = inbox.next_frame().expect("well formed") {
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
        assert!(matches!(inbox.next_frame(), Err(ReadError::Malformed(_))));

        let mut inbox = Inbox::new(1024);
        let mut f = Vec::new();
        let start = frame::begin_frame(&mut f, Kind::Item as u8, 5, None);
        frame::set_fds(&mut f, start, 2);
        frame::finish_frame(&mut f, start).expect("small");
        inbox.frames.feed(&f);
        match inbox.next_frame() {
            Err(e @ ReadError::Fds(_)) => assert!(e.to_string().contains("2 file descriptors")),
            _ => panic!("expected a descriptor error"),
        }
    }

    #[test]
    fn encode_frame_with_frames_the_body_and_checks_the_limit() {
        let body = |n: usize| {
            move |buf: &mut Vec<u8>, _: &mut Segments| -> Result<usize, ()> {
                buf.extend(std::iter::repeat_n(9u8, n));
                Ok(n)
            }
        };
        let head = Head::new(Kind::Item as u8, 7).is_final(true);
        let (buf, segs, n) = encode_frame_with(head, 1024, body(100)).expect("fits");
        assert_eq!((segs.len(), n), (0, 100));
        let mut inbox = Inbox::new(1024);
        inbox.frames.feed(&buf);
        match inbox.next_frame() {
            Ok(Some(Incoming::Frame(env, _))) => {
                assert_eq!(
                    (env.kind, env.id, env.body.len()),
                    (Kind::Item as u8, 7, 100)
                );
            }
            _ => panic!("expected the frame back"),
        }
        assert!(matches!(
            encode_frame_with(head, 64, body(100)),
            Err(EncodeFrameError::Oversize { limit: 64, .. })
        ));
        let failing = |_: &mut Vec<u8>, _: &mut Segments| Err::<(), _>("no");
        assert!(matches!(
            encode_frame_with(head, 1024, failing),
            Err(EncodeFrameError::Encode("no"))
        ));
    }

    #[test]
    fn oversize_message_names_size_and_limit() {
        struct NoValue;
        impl DescribeError for NoValue {
            fn describe(&self, value: &str) -> String {
                format!("{value}: no value")
            }
        }
        let e = EncodeFrameError::<NoValue>::Oversize {
            size: 2000,
            limit: 1024,
        };
        assert!(e.is_oversize());
        assert_eq!(
            e.message("message", "request"),
            "the request frame is 2000 bytes, over max_frame_bytes=1024; raise the pool's max_frame_bytes (Pool(max_frame_bytes=...) in Python, PoolBuilder::max_frame_bytes in Rust) or send less"
        );
        let e = EncodeFrameError::Encode(NoValue);
        assert!(!e.is_oversize());
        assert_eq!(e.message("reply", "reply"), "reply: no value");
    }
}
