//! Socket reads and writes that carry file descriptors (SCM_RIGHTS).
//!
//! Writes attach the descriptors of the frames they start; reads queue the descriptors they
//! receive, in arrival order, for the frames that declare them (see `kameo_proto::frame`).

use crate::codec::Segments;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Descriptors one read may deliver: the kernel passes at most 253 per message.
const CMSG_FDS: usize = 253;
/// Descriptors a connection may hold for frames not yet taken out: one read can deliver
/// [`CMSG_FDS`] for frames it also completes, plus those of a frame still arriving. A peer
/// that sends more is broken or hostile.
pub const MAX_QUEUED_FDS: usize = 4 * CMSG_FDS;

#[repr(C, align(8))]
struct CmsgBuf([u8; 64 + CMSG_FDS * 4]);

/// Write (part of) `data`, attaching the `pending` descriptors to it; the descriptors that
/// went out are removed from `pending`. Every descriptor goes with a byte at or before the
/// first byte of its frame, as the protocol requires: when more are pending than one message
/// carries, each full batch goes with one byte of its own.
pub fn send(sock: RawFd, data: &[u8], pending: &mut Segments, flags: i32) -> io::Result<usize> {
    let mut sent = 0;
    while pending.len() > CMSG_FDS && sent < data.len() {
        match send_one(sock, &data[sent..sent + 1], &pending[..CMSG_FDS], flags) {
            Ok(n) => {
                pending.drain(..CMSG_FDS);
                sent += n;
            }
            Err(e) if sent > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(sent),
            Err(e) => return Err(e),
        }
    }
    match send_one(sock, &data[sent..], pending, flags) {
        Ok(n) => {
            pending.clear();
            Ok(sent + n)
        }
        Err(e) if sent > 0 && e.kind() == io::ErrorKind::WouldBlock => Ok(sent),
        Err(e) => Err(e),
    }
}

/// One `send`/`sendmsg` of `data` with at most [`CMSG_FDS`] descriptors.
fn send_one(sock: RawFd, data: &[u8], segs: &[Arc<OwnedFd>], flags: i32) -> io::Result<usize> {
    let flags = flags | libc::MSG_NOSIGNAL;
    if segs.is_empty() {
        // SAFETY: data is valid for reads of its length.
        let n = unsafe { libc::send(sock, data.as_ptr().cast(), data.len(), flags) };
        return if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        };
    }
    let mut fds = [0 as RawFd; CMSG_FDS];
    for (slot, seg) in fds.iter_mut().zip(segs) {
        *slot = seg.as_raw_fd();
    }
    let fds = &fds[..segs.len()];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; 64 + CMSG_FDS * 4]);
    // SAFETY: msghdr and cmsg built per cmsg(3) in a buffer large and aligned enough.
    unsafe {
        let space = libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize;
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(cmsg),
            std::mem::size_of_val(fds),
        );
        let n = libc::sendmsg(sock, &msg, flags);
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// `recv` into `buf`, appending any descriptors that arrive to `fds` (close-on-exec).
/// Fails if the peer sent more descriptors than one read can take or than the queue holds.
pub fn recv(
    sock: RawFd,
    buf: &mut [u8],
    fds: &mut VecDeque<OwnedFd>,
    flags: i32,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 64 + CMSG_FDS * 4]);
    // SAFETY: msghdr over valid buffers; received descriptors are taken into OwnedFd at once.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        let n = libc::recvmsg(sock, &mut msg, flags | libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg);
                for i in 0..bytes / 4 {
                    let fd = std::ptr::read_unaligned(data.add(i * 4).cast::<RawFd>());
                    fds.push_back(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer sent more file descriptors than one read accepts",
            ));
        }
        if fds.len() > MAX_QUEUED_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the peer sent more than {MAX_QUEUED_FDS} file descriptors ahead of their frames"),
            ));
        }
        Ok(n as usize)
    }
}

/// The `n` descriptors of the frame just completed, from the head of the queue.
pub fn take(fds: &mut VecDeque<OwnedFd>, n: u8) -> Result<Segments, String> {
    let n = usize::from(n);
    if fds.len() < n {
        return Err(format!(
            "a frame declared {n} file descriptors but {} arrived with it",
            fds.len()
        ));
    }
    Ok(fds.drain(..n).map(Arc::new).collect())
}

/// How long a process about to wait for its peer looks for data first
/// ([`spin_until_readable`]): `KAMEO_SPIN_US` microseconds (default 30; 0 never spins), read once
/// per process (workers inherit the pool's environment).
pub fn spin() -> std::time::Duration {
    static SPIN: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("KAMEO_SPIN_US")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(30)
            .min(10_000);
        std::time::Duration::from_micros(us)
    })
}

/// Look for data on `fd` for up to `spin` before the caller blocks, yielding the CPU in between
/// (the peer may share it). Answers often come within microseconds: a process that has not gone
/// to sleep needs no wake-up, which on a virtual machine costs more than a round trip. True if
/// `fd` is readable (or closed).
pub fn spin_until_readable(fd: RawFd, spin: std::time::Duration) -> bool {
    if spin.is_zero() {
        return false;
    }
    spin_on(spin, || {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; zero timeout.
        (unsafe { libc::poll(&mut p, 1, 0) } > 0).then_some(())
    })
    .is_some()
}

/// Ask `probe` (at least once) until it answers or `spin` has passed, yielding the CPU in
/// between: the process we wait for may share it.
fn spin_on<T>(spin: std::time::Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let until = std::time::Instant::now() + spin;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if std::time::Instant::now() >= until {
            return None;
        }
        // SAFETY: no preconditions.
        unsafe { libc::sched_yield() };
    }
}

/// What the event loop's epoll set `epfd` has ready, as seen by [`wait_alone`].
enum Ready {
    Nothing,
    /// Only `fd`.
    Alone,
    /// Something else too (another socket, the loop's self-pipe for a signal or a thread).
    Others,
}

fn ready(epfd: RawFd, fd: RawFd) -> Ready {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
    // SAFETY: a buffer of 8 events; zero timeout. The loop is not waiting on `epfd` (we run on
    // its thread), and its registrations are level-triggered, so it sees these again.
    let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), 8, 0) };
    if n < 0 {
        return Ready::Others; // not an epoll set after all: let the loop decide
    }
    let n = n as usize;
    if n == 0 {
        Ready::Nothing
    } else if events[..n].iter().all(|e| e.u64 as u32 as i32 == fd) {
        Ready::Alone
    } else {
        Ready::Others
    }
}

/// Wait for `fd` (a worker socket registered in the event loop's epoll set `epfd`, which
/// registers each fd with its number as data) to be readable while nothing else of the loop's
/// is: look for up to `spin` first, then sleep in `ppoll` for at most `timeout`. True only if
/// `fd` is readable and nothing else the loop watches is ready, so that reading `fd` now
/// delays nobody; false when the time ran out or anything else is ready (then the loop runs).
pub fn wait_alone(
    fd: RawFd,
    epfd: RawFd,
    spin: std::time::Duration,
    timeout: &libc::timespec,
) -> bool {
    let seen = spin_on(spin, || match ready(epfd, fd) {
        Ready::Nothing => None,
        other => Some(other),
    });
    match seen {
        Some(Ready::Alone) => return true,
        Some(_) => return false,
        None => {}
    }
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: epfd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfd entries; no signal mask change.
    let n = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, timeout, std::ptr::null()) };
    n > 0 && matches!(ready(epfd, fd), Ready::Alone)
}
