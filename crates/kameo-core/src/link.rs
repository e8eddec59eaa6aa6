//! One worker connection as a parent sees it: socket, frame reader, output buffer and the
//! calls in flight on it, with the measures the scheduler feeds it by. Generic over `T`, who
//! waits for an answer: the Python parent's asyncio future (or its stream buffer), the Rust
//! host's own waiter; the link only keeps it with the request.

use crate::fdio;
use crate::frames::Inbox;
use crate::progress::Progress;
use crate::sys::Segments;
use kameo_proto::frame::{self, Envelope, Kind};
use kameo_proto::handshake::{secrets_equal, Hello};
use kameo_proto::PROTOCOL_VERSION;
use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// Answers after each of which a worker's RSS is always read (with a memory limit).
const RSS_ALWAYS: u64 = 16;
/// After those, its RSS is read at most this often.
const RSS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(1);

/// Resident set size of process `pid` in bytes (`/proc/<pid>/statm`), None if unreadable.
pub fn rss(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(1) as u64)
}

/// Where a worker connection is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum LinkState {
    /// Spawned, waiting for HELLO.
    Connecting,
    /// HELLO accepted, WELCOME sent, waiting for READY.
    Loading,
    /// Serving requests.
    Ready,
    /// No new requests (shutting down or retiring).
    Draining,
}

/// What a frame from a worker is to its parent, given where the link is in its life (see
/// [`Link::classify`]): which frames are accepted in which state is the parent's half of the
/// protocol, the same for both hosts. Decoding a body is the host's.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// REPLY of request `id` (serving).
    Reply,
    /// ERROR of request `id` (serving): the body is the error info.
    Error,
    /// ITEM of stream `id` (serving); the last one if `is_final`.
    Item {
        /// It ends the stream.
        is_final: bool,
    },
    /// END of stream `id` (serving).
    End,
    /// HEARTBEAT (any state; the read itself counts as a sign of life).
    Heartbeat,
    /// LOG records (any state after HELLO: records logged while the target loads come before
    /// READY).
    Log,
    /// CALLBACK: the worker calls a handler of the parent (serving).
    Callback,
    /// CREDIT for callback stream `id`: this many more items (serving).
    Credit(u32),
    /// CANCEL of callback `id` (serving).
    Cancel,
    /// HELLO (connecting): check it with [`Link::check_hello`].
    Hello,
    /// READY (loading): the link is serving now.
    Ready,
    /// STARTUP_FAILED (loading): the body is the error info.
    StartupFailed,
    /// A frame not allowed now, or of an unknown kind: the message says which. While serving
    /// (`serving`), the request concerned fails and the worker goes on (a protocol warning);
    /// otherwise nothing more is read from it (a protocol error).
    Unexpected {
        /// `worker <id> (pid <pid>) sent ... (id <id>)`.
        message: String,
        /// The link was ready or draining.
        serving: bool,
    },
}

/// A request in flight on a link.
pub struct Slot<T> {
    /// Who waits for the answer.
    pub target: T,
    /// The encoded frame, kept until the answer arrives so that a request the worker never
    /// started can be sent to another worker if this one dies.
    pub frame: Vec<u8>,
    /// The shared-memory segments the frame refers to (kept for a resend, like the frame).
    pub segs: Segments,
    /// Send order on this link (from 0): the worker's arrival index of the request.
    pub seq: u64,
    /// How many more times the request may run elsewhere if this worker dies (idempotent asks).
    pub retries: u32,
    /// When it was sent.
    pub sent: Instant,
    /// Pinned to this worker (a CALL on its remote objects): never sent to another one.
    pub pinned: bool,
}

/// One worker connection (see the module doc).
pub struct Link<T> {
    /// The worker's id in its pool.
    pub id: u32,
    /// Its process id.
    pub pid: u32,
    /// The parent's end of its socket (non-blocking).
    pub sock: UnixStream,
    /// Where it is in its life.
    pub state: LinkState,
    /// Bytes and descriptors read and not yet handled: taken out while its frames are
    /// handled, so the handler can borrow the link.
    pub inbox: Option<Inbox>,
    /// Bytes buffered for writing (what the socket did not take yet).
    pub out: Vec<u8>,
    /// How much of `out` is written.
    pub out_pos: usize,
    /// Segments of frames in `out` not yet sent: attached to the next write.
    pub out_fds: Segments,
    /// The host waits for the socket to take more (an event loop's writer is armed).
    pub writer_armed: bool,
    /// Requests in flight, by correlation id.
    pub slots: HashMap<u64, Slot<T>>,
    /// Answers received.
    pub completed: u64,
    /// The `seq` of the next request sent.
    pub next_seq: u64,
    /// How many of the requests sent (in `seq` order) the worker has taken up.
    pub progress: Progress,
    /// When a frame last arrived (heartbeats included).
    pub last_seen: Instant,
    /// How long a request keeps this worker busy: a moving average of the gaps between its
    /// answers while it had more to do (ns; 0 until measured). Sets how far ahead it is fed.
    pub busy_ns: u64,
    /// Since the last answer (or since it got work when idle), while requests are in flight.
    pub busy_since: Option<Instant>,
    /// Nothing more is read from it: it closed, failed or broke the protocol (the pool drops
    /// it; until then its answers, possibly after garbage, must not be trusted).
    pub closed: bool,
    /// When its RSS was last read after an answer (with `max_memory_per_worker`).
    pub rss_checked: Option<Instant>,
}

impl<T> Link<T> {
    /// A new connection to worker `id` (process `pid`), waiting for its HELLO.
    pub fn new(id: u32, pid: u32, sock: UnixStream, progress: Progress, max_frame: usize) -> Self {
        Link {
            id,
            pid,
            sock,
            state: LinkState::Connecting,
            inbox: Some(Inbox::new(max_frame)),
            out: Vec::new(),
            out_pos: 0,
            out_fds: Vec::new(),
            writer_armed: false,
            slots: HashMap::new(),
            completed: 0,
            next_seq: 0,
            progress,
            last_seen: Instant::now(),
            busy_ns: 0,
            busy_since: None,
            closed: false,
            rss_checked: None,
        }
    }

    /// An answer arrived at `now`: one more sample of how long a request keeps it busy.
    pub fn answered(&mut self, now: Instant) {
        if let Some(since) = self.busy_since {
            let gap = now.saturating_duration_since(since).as_nanos() as u64;
            self.busy_ns = if self.busy_ns == 0 {
                gap
            } else {
                self.busy_ns - self.busy_ns / 8 + gap / 8
            };
        }
        self.busy_since = (!self.slots.is_empty()).then_some(now);
    }

    /// Requests to send ahead beyond those it runs at once: about `budget_ns` of its work,
    /// at most `prefetch`. None while nothing is measured (its first request may be long, and
    /// whatever waits behind it would wait that long while another worker may be free), and
    /// none while it has been busy longer than the budget without answering.
    pub fn ahead(&self, now: Instant, prefetch: usize, budget_ns: u64) -> usize {
        if self.busy_ns == 0 {
            return 0;
        }
        let stuck = self
            .busy_since
            .map_or(0, |t| now.saturating_duration_since(t).as_nanos() as u64);
        let per_request = self.busy_ns.max(stuck);
        prefetch.min((budget_ns / per_request) as usize)
    }

    /// Whether to read its RSS after this answer: always for the first answers, then at most
    /// once per `RSS_CHECK_EVERY`, so a hot worker does not pay a read per request.
    pub fn rss_due(&mut self, now: Instant) -> bool {
        let due = self.completed <= RSS_ALWAYS
            || self
                .rss_checked
                .is_none_or(|t| now.saturating_duration_since(t) >= RSS_CHECK_EVERY);
        if due {
            self.rss_checked = Some(now);
        }
        due
    }

    /// Check a HELLO (its frame body) from this link's peer: our protocol version, the pool's
    /// `secret`, and this worker's id and pid (the process spawned for it). The reason to send
    /// in REJECT otherwise.
    pub fn check_hello(&self, body: &[u8], secret: &[u8]) -> Result<(), String> {
        let wid = self.id;
        match Hello::decode(body, PROTOCOL_VERSION) {
            Err(e) => Err(e.to_string()),
            Ok(h) if !secrets_equal(&h.secret, secret) => {
                Err("the peer did not present this pool's secret".into())
            }
            Ok(h) if h.worker_id != wid => Err(format!(
                "the peer claims worker id {}, expected {wid}",
                h.worker_id
            )),
            Ok(h) if h.pid != self.pid => Err(format!(
                "the peer claims pid {}, but worker {wid} is pid {}",
                h.pid, self.pid
            )),
            Ok(_) => Ok(()),
        }
    }

    /// Serving requests: ready, or draining what it has.
    #[inline]
    pub fn serving(&self) -> bool {
        matches!(self.state, LinkState::Ready | LinkState::Draining)
    }

    /// What frame `env` from this link's worker is, in the link's present state.
    #[inline]
    pub fn classify(&self, env: &Envelope<'_>) -> Inbound {
        let state = self.state;
        let serving = self.serving();
        match env.kind() {
            Some(Kind::Reply) if serving => Inbound::Reply,
            Some(Kind::Error) if serving => Inbound::Error,
            Some(Kind::Item) if serving => Inbound::Item {
                is_final: env.is_final(),
            },
            Some(Kind::End) if serving => Inbound::End,
            Some(Kind::Heartbeat) => Inbound::Heartbeat,
            Some(Kind::Log) if state != LinkState::Connecting => Inbound::Log,
            Some(Kind::Callback) if serving => Inbound::Callback,
            Some(Kind::Credit) if serving => Inbound::Credit(frame::credit_count(env.body)),
            Some(Kind::Cancel) if serving => Inbound::Cancel,
            Some(Kind::Hello) if state == LinkState::Connecting => Inbound::Hello,
            Some(Kind::Ready) if state == LinkState::Loading => Inbound::Ready,
            Some(Kind::StartupFailed) if state == LinkState::Loading => Inbound::StartupFailed,
            kind => self.unexpected(kind, env),
        }
    }

    #[cold]
    fn unexpected(&self, kind: Option<Kind>, env: &Envelope<'_>) -> Inbound {
        let what = match kind {
            Some(k) => format!(
                "unexpected {} frame while the worker is {:?}",
                k.name(),
                self.state
            ),
            None => format!("unknown frame kind {}", env.kind),
        };
        Inbound::Unexpected {
            message: format!(
                "worker {} (pid {}) sent {what} (id {})",
                self.id, self.pid, env.id
            ),
            serving: self.serving(),
        }
    }

    /// Requests in flight on it.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Output is buffered, not yet written.
    #[inline]
    pub fn pending_out(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// One write of `data`, carrying the pending descriptors.
    fn write_some(&mut self, data: &[u8]) -> io::Result<usize> {
        fdio::send(self.sock.as_raw_fd(), data, &mut self.out_fds, 0)
    }

    /// Write as much of `out` as the socket takes. Err only for a broken connection.
    pub fn write_out(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            let out = std::mem::take(&mut self.out);
            let r = self.write_some(&out[self.out_pos..]);
            self.out = out;
            match r {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        Ok(())
    }

    /// Queue `data` (and its segments) behind what is already buffered.
    pub fn buffer(&mut self, data: &[u8], segs: &Segments) {
        self.out.extend_from_slice(data);
        self.out_fds.extend(segs.iter().cloned());
    }

    /// Send `data` now if nothing is queued before it, buffering what the socket does not take.
    pub fn send_now(&mut self, data: &[u8], segs: &Segments) -> io::Result<()> {
        if self.pending_out() {
            self.buffer(data, segs);
            return self.write_out();
        }
        self.out_fds.extend(segs.iter().cloned());
        let mut pos = 0;
        while pos < data.len() {
            match self.write_some(&data[pos..]) {
                Ok(n) => pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.extend_from_slice(&data[pos..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn link() -> Link<()> {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let fd = Progress::create_fd().expect("memfd");
        let progress = Progress::open(std::os::fd::IntoRawFd::into_raw_fd(fd)).expect("map");
        Link::new(1, std::process::id(), a, progress, 1 << 20)
    }

    #[test]
    fn a_hello_must_carry_the_version_secret_id_and_pid_of_the_worker_spawned() {
        let l = link();
        let hello = |worker_id, pid, secret: &[u8]| {
            Hello {
                version: PROTOCOL_VERSION,
                worker_id,
                pid,
                secret: secret.to_vec(),
            }
            .encode()
        };
        let pid = std::process::id();
        assert_eq!(l.check_hello(&hello(1, pid, b"key"), b"key"), Ok(()));
        let refused = [
            (
                hello(1, pid, b"other"),
                "did not present this pool's secret",
            ),
            (hello(2, pid, b"key"), "claims worker id 2, expected 1"),
            (hello(1, pid + 1, b"key"), "but worker 1 is pid"),
            (b"GET / HTTP/1.1".to_vec(), ""),
        ];
        for (body, why) in refused {
            let reason = l.check_hello(&body, b"key").expect_err("refused");
            assert!(reason.contains(why), "{reason}");
        }
    }

    #[test]
    fn frames_are_accepted_only_in_the_states_the_protocol_allows() {
        let env = |kind: Kind, flags: u8, body: &'static [u8]| Envelope {
            kind: kind as u8,
            flags,
            id: 9,
            nfds: 0,
            trace: None,
            body,
        };
        let mut l = link();
        let hello = env(Kind::Hello, 0, b"");
        assert_eq!(l.classify(&hello), Inbound::Hello);
        assert_eq!(
            l.classify(&env(Kind::Heartbeat, 0, b"")),
            Inbound::Heartbeat
        );
        match l.classify(&env(Kind::Log, 0, b"")) {
            Inbound::Unexpected { message, serving } => {
                assert!(!serving);
                assert_eq!(
                    message,
                    format!(
                        "worker 1 (pid {}) sent unexpected log frame while the worker is Connecting (id 9)",
                        l.pid
                    )
                );
            }
            other => panic!("LOG before HELLO: {other:?}"),
        }
        l.state = LinkState::Loading;
        assert_eq!(l.classify(&env(Kind::Log, 0, b"")), Inbound::Log);
        assert_eq!(l.classify(&env(Kind::Ready, 0, b"")), Inbound::Ready);
        assert_eq!(
            l.classify(&env(Kind::StartupFailed, 0, b"")),
            Inbound::StartupFailed
        );
        assert!(matches!(
            l.classify(&env(Kind::Reply, 0, b"")),
            Inbound::Unexpected { serving: false, .. }
        ));
        for state in [LinkState::Ready, LinkState::Draining] {
            l.state = state;
            assert_eq!(l.classify(&env(Kind::Reply, 0, b"")), Inbound::Reply);
            assert_eq!(l.classify(&env(Kind::Error, 0, b"")), Inbound::Error);
            assert_eq!(
                l.classify(&env(Kind::Item, frame::FLAG_FINAL, b"")),
                Inbound::Item { is_final: true }
            );
            assert_eq!(l.classify(&env(Kind::End, 0, b"")), Inbound::End);
            assert_eq!(l.classify(&env(Kind::Callback, 0, b"")), Inbound::Callback);
            assert_eq!(
                l.classify(&env(Kind::Credit, 0, &[5, 0, 0, 0])),
                Inbound::Credit(5)
            );
            assert_eq!(l.classify(&env(Kind::Cancel, 0, b"")), Inbound::Cancel);
            assert!(matches!(
                l.classify(&hello),
                Inbound::Unexpected { serving: true, .. }
            ));
        }
        let unknown = Envelope {
            kind: 250,
            ..env(Kind::Item, 0, b"")
        };
        match l.classify(&unknown) {
            Inbound::Unexpected { message, serving } => {
                assert!(serving);
                assert!(
                    message.ends_with("sent unknown frame kind 250 (id 9)"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_ahead_until_measured() {
        let mut l = link();
        let now = Instant::now();
        assert_eq!(l.ahead(now, 8, 1_000_000), 0);
        // One answer after 100 µs of work: about 10 fit the 1 ms budget, at most 8.
        l.busy_since = Some(now);
        l.answered(now + Duration::from_micros(100));
        assert_eq!(l.busy_ns, 100_000);
        assert_eq!(l.ahead(now + Duration::from_micros(100), 8, 1_000_000), 8);
        assert_eq!(l.ahead(now + Duration::from_micros(100), 3, 1_000_000), 3);
    }

    #[test]
    fn nothing_ahead_while_stuck_on_a_long_request() {
        let mut l = link();
        let t0 = Instant::now();
        l.busy_since = Some(t0);
        l.answered(t0 + Duration::from_micros(250));
        l.busy_since = Some(t0);
        // Busy 2 ms without answering: more than the budget per request.
        assert_eq!(l.ahead(t0 + Duration::from_millis(2), 8, 1_000_000), 0);
    }

    #[test]
    fn busy_time_is_a_moving_average() {
        let mut l = link();
        let t0 = Instant::now();
        l.busy_since = Some(t0);
        l.answered(t0 + Duration::from_micros(800));
        l.busy_since = Some(t0);
        l.answered(t0); // a gap of 0: the average moves by 1/8
        assert_eq!(l.busy_ns, 700_000);
    }

    #[test]
    fn rss_is_read_for_the_first_answers_then_rate_limited() {
        let mut l = link();
        let t0 = Instant::now();
        assert!(l.rss_due(t0));
        assert!(l.rss_due(t0), "the first answers are always checked");
        l.completed = RSS_ALWAYS + 1;
        assert!(!l.rss_due(t0 + Duration::from_micros(10)));
        assert!(l.rss_due(t0 + RSS_CHECK_EVERY));
        assert!(rss(std::process::id()).is_some_and(|r| r > 0));
        assert!(rss(u32::MAX).is_none());
    }
}
