//! Frames and envelopes.
//!
//! ```text
//! frame    = len:u32le  envelope            (len = size of envelope in bytes)
//! envelope = kind:u8  flags:u8  id:u64le  [nfds:u8]  [trace_len:u8 trace:trace_len bytes]  body
//! ```
//! `nfds` is present when `flags & FLAG_FDS` is set: that many file descriptors (shared memory
//! segments, see `wire`) travel with the frame as SCM_RIGHTS ancillary data, attached to a
//! write that carries the frame's first byte or an earlier one, so a receiver that queues the
//! descriptors it gets in arrival order finds the frame's own at the head of its queue.
//! `trace` is present when `flags & FLAG_TRACE` is set (a W3C `traceparent` string).

use std::fmt;
use std::io::{self, Read};

/// Bytes before the envelope: the little-endian `u32` length.
pub const LEN_PREFIX: usize = 4;
/// Fixed envelope header: kind, flags, correlation id.
pub const ENVELOPE_HEADER: usize = 1 + 1 + 8;
/// Smallest possible frame on the wire.
pub const MIN_FRAME: usize = LEN_PREFIX + ENVELOPE_HEADER;
/// Flag bit: a trace context follows the header.
pub const FLAG_TRACE: u8 = 0x01;
/// Flag bit on ITEM: this is the last item of the stream (an END is implied).
pub const FLAG_FINAL: u8 = 0x02;
/// Flag bit: a descriptor count follows the id.
pub const FLAG_FDS: u8 = 0x04;
/// Every flag bit this version knows.
pub const KNOWN_FLAGS: u8 = FLAG_TRACE | FLAG_FINAL | FLAG_FDS;
/// Most descriptors one frame may carry (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 64;
/// Longest accepted trace context.
pub const MAX_TRACE_LEN: usize = 255;

/// Frame kinds. Numbers are part of the protocol and never reused.
///
/// A *call* is opened by REQUEST or REQUEST_STREAM (parent → worker, id chosen by the parent) or
/// by CALLBACK (worker → parent, id chosen by the worker). The answering side sends REPLY,
/// ITEM*/END or ERROR with the same id; the calling side sends CREDIT (stream flow control) and
/// CANCEL. The direction of a frame tells which id space its id belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// worker → parent: first frame, see [`crate::handshake::Hello`].
    Hello = 1,
    /// parent → worker: handshake accepted; body = encoded config dict.
    Welcome = 2,
    /// parent → worker: handshake refused; body = UTF-8 reason.
    Reject = 3,
    /// worker → parent: target imported, ready for requests; body = encoded info dict.
    Ready = 4,
    /// worker → parent: the target could not be loaded; body = encoded error dict.
    StartupFailed = 5,
    /// parent → worker: run the handler on the body (an encoded value).
    Request = 16,
    /// worker → parent: the handler returned; body = encoded value.
    Reply = 18,
    /// worker → parent: the request failed; body = encoded error dict.
    Error = 19,
    /// caller → callee: cancel the call with this id (empty body).
    Cancel = 20,
    /// parent → worker: run the handler as a generator and stream its items back.
    RequestStream = 21,
    /// callee → caller: one stream item (body = encoded value); FLAG_FINAL marks the last.
    Item = 22,
    /// callee → caller: the stream ended normally (empty body).
    End = 23,
    /// caller → callee: the caller consumed n more items (body = n as u32le).
    Credit = 24,
    /// worker → parent: call a parent handler; body = encoded (path, data, request id).
    Callback = 25,
    /// worker → parent: the worker is alive (empty body, id 0), sent every heartbeat interval.
    Heartbeat = 26,
    /// parent → worker: run an operation on the worker's remote objects; body = one encoded
    /// value (the op, opaque to this crate). Answered like REQUEST (REPLY or ERROR, CANCEL) and
    /// numbered as a request on the progress page.
    Call = 27,
    /// parent → worker: like CALL, answered like REQUEST_STREAM (ITEM*/END or ERROR, CREDIT).
    CallStream = 28,
    /// parent → worker: forget remote objects; body = n:u32le then n × u64le object numbers.
    /// No answer, not a request, id 0.
    Release = 29,
    /// worker → parent: a batch of `logging` records made in the worker; body = one encoded
    /// `(dropped, records)` (layout in `docs/protocol.md`). No answer, not a request, id 0.
    Log = 30,
    /// parent → worker: finish in-flight work, then exit (empty body).
    Shutdown = 32,
}

impl Kind {
    /// Decode a kind byte; `None` for a kind this version does not know.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Reject,
            4 => Kind::Ready,
            5 => Kind::StartupFailed,
            16 => Kind::Request,
            18 => Kind::Reply,
            19 => Kind::Error,
            20 => Kind::Cancel,
            21 => Kind::RequestStream,
            22 => Kind::Item,
            23 => Kind::End,
            24 => Kind::Credit,
            25 => Kind::Callback,
            26 => Kind::Heartbeat,
            27 => Kind::Call,
            28 => Kind::CallStream,
            29 => Kind::Release,
            30 => Kind::Log,
            32 => Kind::Shutdown,
            _ => return None,
        })
    }

    /// Lower-case name used in logs and error messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Reject => "reject",
            Kind::Ready => "ready",
            Kind::StartupFailed => "startup_failed",
            Kind::Request => "request",
            Kind::Reply => "reply",
            Kind::Error => "error",
            Kind::Cancel => "cancel",
            Kind::RequestStream => "request_stream",
            Kind::Item => "item",
            Kind::End => "end",
            Kind::Credit => "credit",
            Kind::Callback => "callback",
            Kind::Heartbeat => "heartbeat",
            Kind::Call => "call",
            Kind::CallStream => "call_stream",
            Kind::Release => "release",
            Kind::Log => "log",
            Kind::Shutdown => "shutdown",
        }
    }
}

impl Kind {
    /// Whether frames of this kind open a call the worker numbers in arrival order (REQUEST,
    /// REQUEST_STREAM, CALL, CALL_STREAM): the parent numbers its sends of them the same way.
    pub fn is_request(b: u8) -> bool {
        matches!(b, 16 | 21 | 27 | 28)
    }
}

/// Append one frame to `out`. Returns the size of the whole frame in bytes.
///
/// Panics only if the frame is larger than `u32::MAX` (callers check `max_frame_bytes`
/// first) or the trace context is longer than [`MAX_TRACE_LEN`].
pub fn write_frame(
    out: &mut Vec<u8>,
    kind: u8,
    id: u64,
    trace: Option<&[u8]>,
    body: &[u8],
) -> usize {
    let start = begin_frame(out, kind, id, trace);
    out.extend_from_slice(body);
    finish_frame(out, start).expect("frame larger than 4 GiB")
}

/// Start a frame whose body the caller appends directly to `out` (no intermediate copy).
/// Returns the offset to pass to [`finish_frame`].
pub fn begin_frame(out: &mut Vec<u8>, kind: u8, id: u64, trace: Option<&[u8]>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    match trace {
        Some(t) => {
            assert!(
                t.len() <= MAX_TRACE_LEN,
                "trace context longer than 255 bytes"
            );
            out.push(FLAG_TRACE);
            out.extend_from_slice(&id.to_le_bytes());
            out.push(t.len() as u8);
            out.extend_from_slice(t);
        }
        None => {
            out.push(0);
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    start
}

/// Set FLAG_FINAL on the frame started at `start`.
pub fn mark_final(out: &mut [u8], start: usize) {
    out[start + LEN_PREFIX + 1] |= FLAG_FINAL;
}

/// Declare that `n` (1..=[`MAX_FDS`]) descriptors travel with the frame started at `start`:
/// inserts the count after the id. Call before [`finish_frame`].
pub fn set_fds(out: &mut Vec<u8>, start: usize, n: usize) {
    assert!((1..=MAX_FDS).contains(&n), "descriptor count out of range");
    out[start + LEN_PREFIX + 1] |= FLAG_FDS;
    out.insert(start + LEN_PREFIX + ENVELOPE_HEADER, n as u8);
}

/// Patch the length prefix of the frame started at `start`. Returns the frame's total size,
/// or `None` if it does not fit the `u32` length (the caller must truncate `out` to `start`).
pub fn finish_frame(out: &mut [u8], start: usize) -> Option<usize> {
    let total = out.len() - start;
    let len = u32::try_from(total - LEN_PREFIX).ok()?;
    out[start..start + LEN_PREFIX].copy_from_slice(&len.to_le_bytes());
    Some(total)
}

/// A decoded envelope borrowing its body from the reader's buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// Raw kind byte (unknown kinds are delivered so the receiver can answer them).
    pub kind: u8,
    pub flags: u8,
    pub id: u64,
    /// Descriptors that travel with this frame.
    pub nfds: u8,
    pub trace: Option<&'a [u8]>,
    pub body: &'a [u8],
}

impl Envelope<'_> {
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_u8(self.kind)
    }

    pub fn is_final(&self) -> bool {
        self.flags & FLAG_FINAL != 0
    }
}

/// Something the reader found in the stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete frame.
    Frame(Envelope<'a>),
    /// A frame over the size limit. Its body is being discarded as it arrives, without
    /// buffering it, so the stream stays in sync and other requests are unaffected.
    Oversize {
        kind: u8,
        id: u64,
        /// Descriptors that travelled with the frame (the receiver must drop them).
        nfds: u8,
        size: usize,
        limit: usize,
    },
}

/// A stream that cannot be decoded any further: the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix is shorter than an envelope header.
    TooShort { len: usize },
    /// Flags name a trace context longer than the frame.
    BadTrace { id: u64 },
    /// Unknown flag bits.
    BadFlags { flags: u8 },
    /// A descriptor count of zero or over [`MAX_FDS`].
    BadFds { id: u64, nfds: u8 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort { len } => {
                write!(f, "malformed frame: length {len} is shorter than the {ENVELOPE_HEADER}-byte envelope header")
            }
            FrameError::BadTrace { id } => {
                write!(f, "malformed frame {id}: trace context overruns the frame")
            }
            FrameError::BadFlags { flags } => {
                write!(f, "malformed frame: unknown flag bits {flags:#04x}")
            }
            FrameError::BadFds { id, nfds } => {
                write!(
                    f,
                    "malformed frame {id}: {nfds} descriptors (at most {MAX_FDS})"
                )
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Initial buffer size and minimum free space offered to each `read`.
const READ_CHUNK: usize = 64 * 1024;

/// Incremental frame reader.
///
/// Bytes are appended by [`FrameReader::read_from`] (one `read` call) or [`FrameReader::feed`];
/// [`FrameReader::next_event`] yields only complete frames, so a read interrupted at any point
/// loses nothing: partial frames stay buffered until the rest arrives.
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Remaining bytes of an oversize frame to discard.
    skip: usize,
    max_frame: usize,
}

impl FrameReader {
    /// `max_frame` limits the envelope size (the length prefix value) accepted.
    pub fn new(max_frame: usize) -> Self {
        FrameReader {
            buf: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            skip: 0,
            max_frame,
        }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Change the size limit for frames not yet started.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Make room for at least `want` more bytes after `end`.
    fn reserve(&mut self, want: usize) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end >= want {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
    }

    /// How many bytes the next read should ask for: the rest of the current frame if known and
    /// large, else a chunk.
    fn wanted(&self) -> usize {
        let have = self.end - self.start;
        if self.skip == 0 && have >= LEN_PREFIX {
            let len = frame_len(&self.buf[self.start..]) as usize;
            if len <= self.max_frame {
                let need = (LEN_PREFIX + len).saturating_sub(have);
                return need.max(READ_CHUNK);
            }
        }
        READ_CHUNK
    }

    /// One `read` call into the buffer. Returns the byte count (0 = end of stream).
    /// `WouldBlock` and `Interrupted` are returned to the caller unchanged.
    pub fn read_from<R: Read>(&mut self, r: &mut R) -> io::Result<usize> {
        let want = self.wanted();
        self.reserve(want);
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// One read by `read` (e.g. a `recvmsg` that also collects descriptors) into the buffer.
    /// Returns the byte count (0 = end of stream); errors are returned unchanged.
    pub fn read_with<F: FnOnce(&mut [u8]) -> io::Result<usize>>(
        &mut self,
        read: F,
    ) -> io::Result<usize> {
        let want = self.wanted();
        self.reserve(want);
        let n = read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Append bytes received by other means.
    pub fn feed(&mut self, data: &[u8]) {
        self.reserve(data.len());
        self.buf[self.end..self.end + data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// The next complete event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<Event<'_>>, FrameError> {
        if self.skip > 0 {
            let n = self.skip.min(self.end - self.start);
            self.start += n;
            self.skip -= n;
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let avail = self.end - self.start;
        if avail < LEN_PREFIX {
            return Ok(None);
        }
        let b = &self.buf[self.start..self.end];
        let len = frame_len(b) as usize;
        if len < ENVELOPE_HEADER {
            return Err(FrameError::TooShort { len });
        }
        if len > self.max_frame {
            let has_fds = avail > 5 && b[5] & FLAG_FDS != 0;
            if avail < MIN_FRAME + usize::from(has_fds) {
                return Ok(None);
            }
            let kind = b[4];
            let id = u64::from_le_bytes(b[6..14].try_into().expect("8 bytes"));
            let nfds = if has_fds { b[MIN_FRAME] } else { 0 };
            if has_fds && (nfds == 0 || usize::from(nfds) > MAX_FDS) {
                return Err(FrameError::BadFds { id, nfds });
            }
            let total = LEN_PREFIX + len;
            let here = total.min(avail);
            self.start += here;
            self.skip = total - here;
            return Ok(Some(Event::Oversize {
                kind,
                id,
                nfds,
                size: len,
                limit: self.max_frame,
            }));
        }
        if avail < LEN_PREFIX + len {
            return Ok(None);
        }
        let frame_start = self.start;
        self.start += LEN_PREFIX + len;
        let env =
            parse_envelope(&self.buf[frame_start + LEN_PREFIX..frame_start + LEN_PREFIX + len])?;
        Ok(Some(Event::Frame(env)))
    }
}

fn frame_len(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

/// Parse one envelope (the bytes after the length prefix).
pub fn parse_envelope(e: &[u8]) -> Result<Envelope<'_>, FrameError> {
    if e.len() < ENVELOPE_HEADER {
        return Err(FrameError::TooShort { len: e.len() });
    }
    let kind = e[0];
    let flags = e[1];
    let id = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
    if flags & !KNOWN_FLAGS != 0 {
        return Err(FrameError::BadFlags { flags });
    }
    let mut pos = ENVELOPE_HEADER;
    let nfds = if flags & FLAG_FDS != 0 {
        let n = *e.get(pos).ok_or(FrameError::BadFds { id, nfds: 0 })?;
        if n == 0 || usize::from(n) > MAX_FDS {
            return Err(FrameError::BadFds { id, nfds: n });
        }
        pos += 1;
        n
    } else {
        0
    };
    let trace = if flags & FLAG_TRACE != 0 {
        let tl = *e.get(pos).ok_or(FrameError::BadTrace { id })? as usize;
        pos += 1;
        let t = e.get(pos..pos + tl).ok_or(FrameError::BadTrace { id })?;
        pos += tl;
        Some(t)
    } else {
        None
    };
    Ok(Envelope {
        kind,
        flags,
        id,
        nfds,
        trace,
        body: &e[pos..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = (u8, u64, Option<Vec<u8>>, Vec<u8>);

    fn frames(r: &mut FrameReader) -> Vec<Owned> {
        let mut out = Vec::new();
        while let Some(ev) = r.next_event().unwrap() {
            match ev {
                Event::Frame(e) => {
                    out.push((e.kind, e.id, e.trace.map(|t| t.to_vec()), e.body.to_vec()))
                }
                Event::Oversize { .. } => panic!("unexpected oversize"),
            }
        }
        out
    }

    #[test]
    fn round_trip_with_and_without_trace() {
        let mut w = Vec::new();
        write_frame(&mut w, Kind::Request as u8, 7, None, b"hello");
        write_frame(
            &mut w,
            Kind::Reply as u8,
            u64::MAX,
            Some(b"00-abc-def-01"),
            b"",
        );
        let mut r = FrameReader::new(1024);
        r.feed(&w);
        let got = frames(&mut r);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (16, 7, None, b"hello".to_vec()));
        assert_eq!(
            got[1],
            (18, u64::MAX, Some(b"00-abc-def-01".to_vec()), vec![])
        );
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn byte_at_a_time_delivery_loses_nothing() {
        let mut w = Vec::new();
        for i in 0..50u64 {
            write_frame(
                &mut w,
                Kind::Reply as u8,
                i,
                None,
                &vec![i as u8; i as usize * 3],
            );
        }
        let mut r = FrameReader::new(1 << 20);
        let mut got = Vec::new();
        for b in &w {
            r.feed(std::slice::from_ref(b));
            got.extend(frames(&mut r));
        }
        assert_eq!(got.len(), 50);
        for (i, f) in got.iter().enumerate() {
            assert_eq!(f.1, i as u64);
            assert_eq!(f.3, vec![i as u8; i * 3]);
        }
    }

    #[test]
    fn oversize_frame_is_skipped_without_buffering_and_stream_stays_in_sync() {
        let mut w = Vec::new();
        write_frame(&mut w, Kind::Reply as u8, 1, None, b"small");
        write_frame(&mut w, Kind::Reply as u8, 2, None, &vec![9u8; 10_000]);
        write_frame(&mut w, Kind::Reply as u8, 3, None, b"after");
        let mut r = FrameReader::new(100);
        let mut seen = Vec::new();
        for chunk in w.chunks(333) {
            r.feed(chunk);
            while let Some(ev) = r.next_event().unwrap() {
                match ev {
                    Event::Frame(e) => seen.push(format!("frame {} {}", e.id, e.body.len())),
                    Event::Oversize {
                        id, size, limit, ..
                    } => seen.push(format!("oversize {id} {size} {limit}")),
                }
            }
            assert!(
                r.buf.len() <= READ_CHUNK + 333,
                "oversize body must not be buffered"
            );
        }
        assert_eq!(seen, vec!["frame 1 5", "oversize 2 10010 100", "frame 3 5"]);
    }

    #[test]
    fn descriptor_counts_survive_traces_and_oversize_skips() {
        let mut w = Vec::new();
        let start = begin_frame(&mut w, Kind::Request as u8, 7, Some(b"00-trace"));
        w.extend_from_slice(b"body");
        set_fds(&mut w, start, 3);
        finish_frame(&mut w, start).unwrap();
        let start = begin_frame(&mut w, Kind::Reply as u8, 8, None);
        w.extend_from_slice(&[1u8; 500]);
        set_fds(&mut w, start, 2);
        finish_frame(&mut w, start).unwrap();
        let mut r = FrameReader::new(100);
        r.feed(&w);
        match r.next_event().unwrap() {
            Some(Event::Frame(e)) => {
                assert_eq!(
                    (e.id, e.nfds, e.trace, e.body),
                    (7, 3, Some(&b"00-trace"[..]), &b"body"[..])
                );
            }
            other => panic!("{other:?}"),
        }
        match r.next_event().unwrap() {
            Some(Event::Oversize { id, nfds, .. }) => assert_eq!((id, nfds), (8, 2)),
            other => panic!("{other:?}"),
        }
        // A zero or huge count is malformed.
        let mut bad = Vec::new();
        let start = begin_frame(&mut bad, Kind::Reply as u8, 9, None);
        bad[start + LEN_PREFIX + 1] |= FLAG_FDS;
        bad.push(0);
        finish_frame(&mut bad, start).unwrap();
        let mut r = FrameReader::new(100);
        r.feed(&bad);
        assert_eq!(r.next_event(), Err(FrameError::BadFds { id: 9, nfds: 0 }));
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let mut r = FrameReader::new(100);
        r.feed(&3u32.to_le_bytes());
        r.feed(&[1, 2, 3]);
        assert_eq!(r.next_event(), Err(FrameError::TooShort { len: 3 }));

        let mut w = Vec::new();
        let start = begin_frame(&mut w, 22, 5, None);
        mark_final(&mut w, start);
        finish_frame(&mut w, start).unwrap();
        let mut r = FrameReader::new(100);
        r.feed(&w);
        match r.next_event() {
            Ok(Some(Event::Frame(e))) => assert!(e.is_final()),
            other => panic!("{other:?}"),
        }

        let mut w = Vec::new();
        write_frame(&mut w, 16, 5, None, b"");
        w[5] = 0x80;
        let mut r = FrameReader::new(100);
        r.feed(&w);
        assert_eq!(r.next_event(), Err(FrameError::BadFlags { flags: 0x80 }));

        let mut w = Vec::new();
        write_frame(&mut w, 16, 5, Some(b"abc"), b"");
        w[14] = 200; // trace length past the end
        let mut r = FrameReader::new(100);
        r.feed(&w);
        assert_eq!(r.next_event(), Err(FrameError::BadTrace { id: 5 }));
    }

    #[test]
    fn unknown_kinds_are_delivered() {
        let mut w = Vec::new();
        write_frame(&mut w, 250, 9, None, b"x");
        let mut r = FrameReader::new(100);
        r.feed(&w);
        match r.next_event().unwrap() {
            Some(Event::Frame(e)) => {
                assert_eq!(e.kind, 250);
                assert_eq!(e.kind(), None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn read_from_reads_whole_large_frame() {
        let mut w = Vec::new();
        write_frame(&mut w, 18, 1, None, &vec![1u8; 300_000]);
        let mut src = &w[..];
        let mut r = FrameReader::new(1 << 20);
        let mut n = 0;
        loop {
            let k = r.read_from(&mut src).unwrap();
            if k == 0 {
                break;
            }
            n += 1;
        }
        assert!(n <= 3, "large frame read in few calls, got {n}");
        assert_eq!(frames(&mut r)[0].3.len(), 300_000);
    }

    #[test]
    fn kinds_round_trip() {
        for b in 0..=255u8 {
            if let Some(k) = Kind::from_u8(b) {
                assert_eq!(k as u8, b);
                assert!(!k.name().is_empty());
            }
        }
    }
}

/// The body of a CREDIT frame granting `n` more items: a little-endian `u32`.
pub fn credit_body(n: u32) -> [u8; 4] {
    n.to_le_bytes()
}

/// The count a CREDIT body grants (0 if the body is shorter than 4 bytes).
pub fn credit_count(body: &[u8]) -> u32 {
    body.get(..4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The body of a RELEASE frame: `n:u32le` then `n` object numbers as `u64le`.
pub fn release_body(numbers: &[u64]) -> Vec<u8> {
    let n = u32::try_from(numbers.len()).expect("fewer than 2^32 numbers");
    let mut out = Vec::with_capacity(4 + 8 * numbers.len());
    out.extend_from_slice(&n.to_le_bytes());
    for x in numbers {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The object numbers of a RELEASE body; `None` if the body is not exactly `4 + 8n` bytes.
pub fn release_numbers(body: &[u8]) -> Option<Vec<u64>> {
    let n = usize::try_from(credit_count(body.get(..4)?)).ok()?;
    let rest = &body[4..];
    if rest.len() != n.checked_mul(8)? {
        return None;
    }
    Some(
        rest.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    )
}

#[cfg(test)]
mod credit_tests {
    use super::*;

    #[test]
    fn release_body_round_trips_and_rejects_bad_lengths() {
        for nums in [vec![], vec![1], vec![0, u64::MAX, 42]] {
            assert_eq!(release_numbers(&release_body(&nums)), Some(nums));
        }
        let mut b = release_body(&[1, 2]);
        b.pop();
        assert_eq!(release_numbers(&b), None);
        assert_eq!(release_numbers(&[1, 0]), None);
        assert_eq!(release_numbers(&[0xff, 0xff, 0xff, 0xff]), None);
        let mut b = release_body(&[7]);
        b.push(0);
        assert_eq!(release_numbers(&b), None);
    }

    #[test]
    fn request_kinds_are_the_numbered_ones() {
        let numbered: Vec<u8> = (0..=255u8).filter(|&b| Kind::is_request(b)).collect();
        assert_eq!(
            numbered,
            [
                Kind::Request as u8,
                Kind::RequestStream as u8,
                Kind::Call as u8,
                Kind::CallStream as u8
            ]
        );
    }

    #[test]
    fn credit_body_round_trips() {
        for n in [0, 1, 63, 256, u32::MAX] {
            assert_eq!(credit_count(&credit_body(n)), n);
        }
        assert_eq!(credit_count(&[1, 2, 3]), 0);
        assert_eq!(credit_count(&[5, 0, 0, 0, 9]), 5);
    }
}
