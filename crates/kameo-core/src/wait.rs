//! Waiting for a peer without a wake-up when it answers quickly: a short spin on the socket
//! before blocking (the worker's `recv`), and the parent's wait for one worker while nothing
//! else of the event loop is ready (`PoolCore.wait_answer`). Depends only on libc: the Python
//! extension calls it with the GIL released; a Rust host may spin the same way before parking.

use std::os::fd::RawFd;

/// How long a process about to wait for its peer looks for data first
/// ([`spin_until_readable`]): `KAMEO_SPIN_US` microseconds (default 30; 0 never spins), read once
/// per process (workers inherit the pool's environment).
#[inline]
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
#[inline]
pub fn spin_until_readable(fd: RawFd, spin: std::time::Duration) -> bool {
    if spin.is_zero() {
        return false;
    }
    spin_on(spin, || readable_now(fd).then_some(())).is_some()
}

/// Whether `fd` is readable (or closed) right now, without waiting.
#[inline]
pub fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Ask `probe` (at least once) until it answers or `spin` has passed, yielding the CPU in
/// between: the process we wait for may share it.
pub fn spin_on<T>(spin: std::time::Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
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

/// `seconds` as a `ppoll` timeout, clamped to 0..=1 s (a wait outside the event loop is short).
pub fn timeout(seconds: f64) -> libc::timespec {
    let t = seconds.clamp(0.0, 1.0);
    libc::timespec {
        tv_sec: t.trunc() as libc::time_t,
        tv_nsec: (t.fract() * 1e9) as libc::c_long,
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
