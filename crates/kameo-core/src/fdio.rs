//! Socket reads and writes that carry file descriptors (SCM_RIGHTS).
//!
//! Writes attach the descriptors of the frames they start; reads queue the descriptors they
//! receive, in arrival order, for the frames that declare them (see `kameo_proto::frame`).
//! Every connection of either host (the Python parent, the worker, the Rust host) goes through
//! these two calls.

use crate::sys::Segments;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// Descriptors one read may deliver: the kernel passes at most 253 per message.
const CMSG_FDS: usize = 253;
/// Descriptors a connection may hold for frames not yet taken out: one read can deliver
/// `CMSG_FDS` for frames it also completes, plus those of a frame still arriving. A peer
/// that sends more is broken or hostile.
pub const MAX_QUEUED_FDS: usize = 4 * CMSG_FDS;

#[repr(C, align(8))]
struct CmsgBuf([u8; 64 + CMSG_FDS * 4]);

/// Write (part of) `data`, attaching the `pending` descriptors to it; the descriptors that
/// went out are removed from `pending`. Every descriptor goes with a byte at or before the
/// first byte of its frame, as the protocol requires: when more are pending than one message
/// carries, each full batch goes with one byte of its own.
#[inline]
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
#[inline]
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
#[inline]
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
