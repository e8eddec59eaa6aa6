//! One worker connection as the parent sees it: socket, frame reader, output buffer and the
//! calls in flight on it.

use kameo_proto::frame::FrameReader;
use pyo3::prelude::*;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

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

/// Who waits for the answer to a request.
pub enum Target {
    /// `ask`: an asyncio future resolved with the reply.
    Ask(Py<PyAny>),
    /// `stream`: items go to the core's stream buffer of the same id.
    Stream,
}

pub struct Slot {
    pub target: Target,
    /// The encoded frame, kept until the answer arrives so that a request the worker never
    /// started can be sent to another worker if this one dies.
    pub frame: Vec<u8>,
    /// Send order on this link: workers start requests in the order they receive them.
    pub seq: u64,
    /// How many more times the request may run elsewhere if this worker dies (idempotent asks).
    pub retries: u32,
    pub sent: Instant,
}

pub struct Link {
    pub id: u32,
    pub pid: u32,
    pub sock: UnixStream,
    pub state: LinkState,
    /// Taken out while its frames are handled, so the handler can borrow the link.
    pub reader: Option<FrameReader>,
    pub out: Vec<u8>,
    pub out_pos: usize,
    pub writer_armed: bool,
    pub slots: HashMap<u64, Slot>,
    pub completed: u64,
    pub next_seq: u64,
    /// When a frame last arrived (heartbeats included).
    pub last_seen: Instant,
}

impl Link {
    pub fn new(id: u32, pid: u32, sock: UnixStream, max_frame: usize) -> Self {
        Link {
            id,
            pid,
            sock,
            state: LinkState::Connecting,
            reader: Some(FrameReader::new(max_frame)),
            out: Vec::new(),
            out_pos: 0,
            writer_armed: false,
            slots: HashMap::new(),
            completed: 0,
            next_seq: 0,
            last_seen: Instant::now(),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    pub fn pending_out(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Write as much of `out` as the socket takes. Err only for a broken connection.
    pub fn write_out(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.sock.write(&self.out[self.out_pos..]) {
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

    /// Send `data` now if nothing is queued before it, buffering what the socket does not take.
    pub fn send_now(&mut self, data: &[u8]) -> io::Result<()> {
        if self.pending_out() {
            self.out.extend_from_slice(data);
            return self.write_out();
        }
        let mut pos = 0;
        while pos < data.len() {
            match self.sock.write(&data[pos..]) {
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
