//! Shared-memory segments for large buffers: memfds passed over the Unix socket with
//! SCM_RIGHTS. Both hosts send and receive them the same way (a Rust host's `bytes` and arrays
//! as the Python parent's); the Python extension exports a [`View`] to numpy through the buffer
//! protocol (its `ShmView`).
//!
//! Two kinds of segment:
//!
//! * Sealed ([`create_sealed`]): the sender copies the buffer into a new memfd (`pwrite`, no
//!   mapping), seals it against writes and resizes, sends the descriptor with the frame and
//!   drops its own copy of it. Nobody can change it afterwards, so the receiver may keep a view
//!   on it: numpy arrays decoded from shared memory are views on a private, copy-on-write
//!   mapping ([`View`]): writable, but a write lands in the receiver's own copy of the page
//!   it touches, never in the segment. The mapping, and with it the segment, lives exactly as
//!   long as the arrays that use it.
//! * Recycled ([`Recycler`]): the sender keeps a few segments mapped writable and fills one
//!   again as soon as the kernel says nobody else holds it (no descriptor, no mapping): for
//!   `bytes`/`bytearray`, which the receiver copies out once at decode time, and for the pool's
//!   arrays, which its workers view; see [`Recycler`] for why that is safe.
//!
//! Nothing has a name in any file system, so a process that dies frees its segments with its
//! descriptors: the kernel counts the references, including those of descriptors still in
//! flight in a socket.

use crate::sys::{check, lock, memfd};
use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The name segments carry in `/proc/<pid>/fd` and `/proc/<pid>/maps` (`memfd:kameo-shm`).
const NAME: &std::ffi::CStr = c"kameo-shm";
const SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;

/// A new sealed segment holding a copy of `data`.
pub fn create_sealed(data: &[u8]) -> io::Result<OwnedFd> {
    let fd = memfd(NAME, libc::MFD_ALLOW_SEALING)?;
    // SAFETY: plain syscalls on a descriptor we own; `data` is valid for its length.
    unsafe {
        check(libc::ftruncate(fd.as_raw_fd(), data.len() as libc::off_t))?;
        pwrite_all(fd.as_raw_fd(), data)?;
        check(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS))?;
        Ok(fd)
    }
}

/// Recycled segments kept per process side (the pool, or one worker's channel): at most this
/// many...
const RECYCLE_MAX_SEGMENTS: usize = 4;
/// ...holding at most this many bytes together. A larger buffer gets a sealed segment.
const RECYCLE_MAX_BYTES: usize = 64 << 20;
/// The name recycled segments carry in `/proc/<pid>/fd` and `/proc/<pid>/maps`.
const RECYCLED_NAME: &std::ffi::CStr = c"kameo-shm-cache";
const RECYCLED_SEALS: i32 =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_FUTURE_WRITE | libc::F_SEAL_SEAL;
/// `fcntl(F_SETSIG)` (the libc crate does not export it for every target; 10 on Linux).
const F_SETSIG: libc::c_int = 10;

/// The segment size a buffer of `len` bytes is recycled in: `len` rounded up to one of eight
/// steps per power of two (at most 12.5% more), and to whole pages (at least one).
fn size_class(len: usize) -> usize {
    let floor_pow2 = 1usize << (usize::BITS - 1 - len.max(1).leading_zeros());
    let step = (floor_pow2 / 8).max(4096);
    len.div_ceil(step) * step
}

/// A recycled segment: our own read-write open file description of the memfd (the only one
/// while nobody else holds the segment) and its writable mapping.
struct Recyclable {
    fd: OwnedFd,
    /// The file's (device, inode): tells our segments when they come back.
    id: (u64, u64),
    map: *mut u8,
    size: usize,
    /// Bytes at the start that may hold data of an earlier buffer (the rest is zeros).
    dirty: usize,
}

// SAFETY: the mapping is written only by the thread that took the segment out of the
// recycler (see `Recycler::take`).
unsafe impl Send for Recyclable {}

impl Drop for Recyclable {
    fn drop(&mut self) {
        // SAFETY: our own mapping; no reference into it outlives the fill that used it.
        unsafe { libc::munmap(self.map.cast(), self.size) };
    }
}

impl Recyclable {
    /// Copy `data` to the start and zero what an earlier, longer buffer left after it.
    fn fill(&mut self, data: &[u8]) {
        // SAFETY: the mapping is `size` >= data.len() bytes, writable, and ours alone:
        // nobody else holds the segment, and it is out of the recycler while we write.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map, data.len());
            if self.dirty > data.len() {
                std::ptr::write_bytes(self.map.add(data.len()), 0, self.dirty - data.len());
            }
        }
        self.dirty = data.len();
    }

    /// Nobody but us holds the segment: no descriptor (in any process, or in flight in a
    /// socket) and no mapping of it but ours. Asked of the kernel with a write lease, which is
    /// granted only when our open file description is the file's only one; it is given back at
    /// once. Mappings hold their file, and every receiver got its own read-only description
    /// (see [`Recycler::send_copy`]), so this covers them all.
    ///
    /// Err: leases do not work here (disabled, refused), so nothing can be reused.
    fn unshared(&self) -> Result<bool, ()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            if libc::fcntl(fd, libc::F_SETLEASE, libc::F_WRLCK) != 0 {
                return match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => Ok(false),
                    _ => Err(()),
                };
            }
            libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK);
        }
        Ok(true)
    }

    /// A new segment of `size` bytes holding `data` at its start, mapped and sealed.
    fn create(data: &[u8], size: usize) -> io::Result<Recyclable> {
        // SAFETY: syscalls on descriptors we own, checked; the mapping is checked for
        // MAP_FAILED and unmapped by Drop (`map` is set only once it exists).
        unsafe {
            let memfd = memfd(RECYCLED_NAME, libc::MFD_ALLOW_SEALING)?;
            // The description memfd_create returns is not counted among the file's writers,
            // so the lease test could never pass on it: work on one opened through /proc.
            let fd = reopen(memfd.as_raw_fd(), libc::O_RDWR)?;
            drop(memfd);
            check(libc::ftruncate(fd.as_raw_fd(), size as libc::off_t))?;
            // First fill by pwrite: new pages are not zeroed first, as they would be when
            // faulted in through the mapping.
            pwrite_all(fd.as_raw_fd(), data)?;
            let p = libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let seg = Recyclable {
                id: file_id(&fd)?,
                fd,
                map: p.cast(),
                size,
                dirty: data.len(),
            };
            // A lease break (someone opening /proc/<pid>/fd/N in the microseconds we hold the
            // lease) signals the holder; SIGURG is ignored by default, SIGIO would kill us.
            libc::fcntl(seg.fd.as_raw_fd(), F_SETSIG, libc::SIGURG);
            // Receivers can neither resize it nor write to it, nor map it writable; our own
            // mapping (made before the seal) still writes.
            check(libc::fcntl(
                seg.fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                RECYCLED_SEALS,
            ))?;
            Ok(seg)
        }
    }
}

/// The (device, inode) of an open file.
fn file_id(fd: &OwnedFd) -> io::Result<(u64, u64)> {
    // SAFETY: fstat on a descriptor we own, into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok((st.st_dev, st.st_ino))
}

/// Whether a segment is sealed against all writes, including through mappings made before.
pub fn is_frozen(fd: &OwnedFd) -> bool {
    // SAFETY: fcntl on a descriptor we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_WRITE != 0
}

/// A new open file description of `fd` (through `/proc/self/fd`), close-on-exec.
fn reopen(fd: RawFd, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
    // SAFETY: open with a valid path; the result is checked and owned at once.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a descriptor we just opened.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pwrite_all(fd: RawFd, data: &[u8]) -> io::Result<()> {
    let mut done = 0usize;
    while done < data.len() {
        // SAFETY: `data[done..]` is valid for reads of its length.
        let n = unsafe {
            libc::pwrite(
                fd,
                data[done..].as_ptr().cast(),
                data.len() - done,
                done as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Segments a sender reuses for buffers its receiver copies out (`bytes`, `bytearray`), so a
/// large buffer costs one `memcpy` into pages that are already there, instead of a new memfd
/// whose pages the kernel allocates, fills and frees again for every message (most of the
/// cost of a 16 MiB transfer).
///
/// Why reuse is safe:
/// * A segment is filled again only when the kernel confirms that our own open file
///   description is its only one (`Recyclable::unshared`): every send passes a fresh
///   read-only description, which the receiver holds (as do its mappings, and the socket
///   while it is in flight) until it has copied the buffer out and closed it, and which the
///   pool holds as long as it may resend the request. So nobody can see a buffer change
///   while they still hold it, including a receiver that is slow, never reads it, or died.
/// * Receivers cannot write to it or resize it (`F_SEAL_FUTURE_WRITE`, `F_SEAL_SHRINK`,
///   `F_SEAL_GROW`, checked by [`verify`]), so a request kept for a resend stays intact and a
///   receiver's mapping cannot fault. An array viewed on it ([`View`], only where the
///   receiver trusts the sender (the extension's `codec::Arrays`): a worker viewing the pool's segments, the
///   pool its own echoed back) is a private mapping, which writes only copies of its pages,
///   and whose unwritten pages would show a refill: the mapping holds the segment's open file
///   description, so the lease test refuses the refill as long as the view lives.
/// * The bytes past a buffer's end are zeros, never what an earlier buffer left there.
/// * Bounded: at most `RECYCLE_MAX_SEGMENTS` segments and `RECYCLE_MAX_BYTES` bytes, all
///   freed by [`Recycler::clear`] (pool or channel closed) or at exit.
#[derive(Default)]
pub struct Recycler {
    segs: Mutex<Vec<Recyclable>>,
    /// Set when the kernel refuses leases: send new sealed segments, as for arrays.
    off: AtomicBool,
}

impl std::fmt::Debug for Recycler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let segs = lock(&self.segs);
        f.debug_struct("Recycler")
            .field("segments", &segs.len())
            .field("bytes", &segs.iter().map(|s| s.size).sum::<usize>())
            .finish()
    }
}

impl Recycler {
    /// A read-only descriptor of a segment holding a copy of `data` at offset 0: a recycled
    /// one when possible, else a new sealed one ([`create_sealed`]).
    pub fn send_copy(&self, data: &[u8]) -> io::Result<OwnedFd> {
        let size = size_class(data.len());
        if size > RECYCLE_MAX_BYTES || self.off.load(Ordering::Relaxed) {
            return create_sealed(data);
        }
        let seg = match self.take(size) {
            Some(mut seg) => {
                seg.fill(data);
                seg
            }
            // No /proc, no leases, no memory for the mapping: do without.
            None => match Recyclable::create(data, size) {
                Ok(seg) => seg,
                // A kernel without F_SEAL_FUTURE_WRITE, or no room for the mapping: stop
                // trying, rather than paying for a failed segment on every send.
                Err(_) => {
                    self.off.store(true, Ordering::Relaxed);
                    return create_sealed(data);
                }
            },
        };
        let shared = reopen(seg.fd.as_raw_fd(), libc::O_RDONLY);
        let mut segs = lock(&self.segs);
        // Most recently used last. Over the caps, drop the least recently used: receivers keep
        // their own references, so dropping ours only ends the reuse.
        segs.push(seg);
        while segs.len() > RECYCLE_MAX_SEGMENTS
            || segs.iter().map(|s| s.size).sum::<usize>() > RECYCLE_MAX_BYTES
        {
            segs.remove(0);
        }
        drop(segs);
        shared.or_else(|_| create_sealed(data))
    }

    /// Take out a segment of exactly `size` bytes that nobody else holds. While it is out (being
    /// filled, without the lock) no other thread can take it.
    fn take(&self, size: usize) -> Option<Recyclable> {
        let mut segs = lock(&self.segs);
        for i in 0..segs.len() {
            if segs[i].size != size {
                continue;
            }
            match segs[i].unshared() {
                Ok(true) => return Some(segs.remove(i)),
                Ok(false) => {}
                Err(()) => {
                    self.off.store(true, Ordering::Relaxed);
                    segs.clear();
                    return None;
                }
            }
        }
        None
    }

    /// Whether `fd` is one of the segments kept here (say, an array echoed back): only we
    /// can change it, and not while anyone else holds it.
    pub fn holds(&self, fd: &OwnedFd) -> bool {
        let Ok(id) = file_id(fd) else {
            return false;
        };
        lock(&self.segs).iter().any(|s| s.id == id)
    }

    /// Unmap and close every segment (receivers keep theirs until they close them).
    pub fn clear(&self) {
        lock(&self.segs).clear();
    }
}

/// Check that a received descriptor is a sealed segment holding `offset + len` bytes, so that
/// its sender cannot shrink it under us (a shrunk mapping would SIGBUS) and, with `frozen`,
/// cannot change it either (required for segments we keep a view on). Without `frozen` a
/// recycled segment (sealed with `F_SEAL_FUTURE_WRITE`: only its sender's existing mapping may
/// still write) passes too; the caller copies it out once.
pub fn verify(fd: &OwnedFd, offset: u64, len: u64, frozen: bool) -> Result<u64, String> {
    // SAFETY: fcntl and fstat on a descriptor we own.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    let write = if frozen {
        libc::F_SEAL_WRITE
    } else {
        libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE
    };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 || seals & write == 0 {
        return Err("shared memory descriptor is not a sealed memfd".into());
    }
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(format!("fstat: {}", io::Error::last_os_error()));
    }
    let size = st.st_size as u64;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(format!(
            "shared memory range {offset}+{len} is beyond the segment's {size} bytes"
        ));
    }
    Ok(size)
}

/// Copy `dst.len()` bytes at `offset` of the segment into `dst`. The segment must have been
/// checked by [`verify`] (sealed against shrinking, long enough), so the mapping cannot fault.
///
/// Through a read-only mapping rather than `pread`: for large segments the page-table setup
/// of one populated mapping costs less than the page cache walk of a read (about 1 ms less per
/// 16 MiB here).
pub fn read_into(fd: &OwnedFd, offset: u64, dst: &mut [u8]) -> io::Result<()> {
    if dst.is_empty() {
        return Ok(());
    }
    // Mappings start on a page boundary.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let start = offset - offset % page;
    let skip = (offset - start) as usize;
    let len = skip + dst.len();
    // SAFETY: a read-only shared mapping of a descriptor we hold, checked for MAP_FAILED; the
    // range lies inside the segment (verified by the caller) and the segment cannot shrink.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd.as_raw_fd(),
            start as libc::off_t,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping((p as *const u8).add(skip), dst.as_mut_ptr(), dst.len());
        libc::munmap(p, len);
    }
    Ok(())
}

/// Whether no page of `[ptr, ptr + len)`, part of a private file mapping, has been written in
/// this process: each is either not faulted in yet or still the file's own page (a written one
/// is an anonymous copy, present or swapped out). Asked of `/proc/self/pagemap`, 8 bytes per
/// page (about 30 us for 16 MiB), stopping at the first written page. False when it cannot be
/// told (no pagemap), so the caller copies.
fn unwritten(ptr: usize, len: usize) -> bool {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_PAGE: u64 = 1 << 61;
    if len == 0 {
        return true;
    }
    // Opened for each question: a descriptor kept open would still describe this process
    // after a fork.
    let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") else {
        return false;
    };
    let page = page_size();
    let (mut at, last) = (ptr / page, (ptr + len - 1) / page);
    let mut buf = [0u8; 4096];
    while at <= last {
        let want = ((last - at + 1) * 8).min(buf.len());
        let got = match pagemap.read_at(&mut buf[..want], at as u64 * 8) {
            Ok(n) if n >= 8 => n / 8,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            _ => return false,
        };
        for entry in buf[..got * 8].chunks_exact(8) {
            let e = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
            if e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_PAGE == 0) {
                return false;
            }
        }
        at += got;
    }
    true
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize
}

struct Mapping {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: the mapping is never remapped while the owner lives; what is written to it (by the
// buffers viewing it, e.g. numpy arrays under the GIL or numpy's own rules) is this process's
// business alone.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

/// A private, copy-on-write mapping of a whole segment (`MAP_PRIVATE`, readable and
/// writable). The extension exports it through the buffer protocol (`ShmView`): numpy arrays
/// decoded from shared memory are views on one of these: no copy when they arrive (the pages are the segment's until written), and
/// writable like any other array, but a write copies the page it touches into this process's
/// own memory, so the segment, its sender and every other view of it never see it.
///
/// Pages not yet written still show the segment's current contents, so a segment viewed here
/// must never change: it is sealed against writes, or it is a recycled one (see [`Recycler`]),
/// whose sender refills it only once nobody else holds it, and this mapping holds it (a
/// mapping keeps its open file description alive; so does `fd`, kept so that sending an array
/// on passes the same segment instead of copying it, when the array is unchanged).
pub struct View {
    map: Mapping,
    fd: Arc<OwnedFd>,
}

impl View {
    /// Map the whole segment (`size` bytes, as returned by [`verify`]).
    pub fn map(fd: Arc<OwnedFd>, size: u64) -> io::Result<View> {
        let len = size as usize;
        let ptr = if len == 0 {
            std::ptr::NonNull::<u8>::dangling().as_ptr().cast()
        } else {
            // Not populated: page tables are filled as the array is read, so an array that is
            // only passed on, or read in part, costs no page-table setup (populating costs
            // about 0.5 ms per 16 MiB here), and reading all of it once costs about that much
            // more in faults than reading a populated mapping.
            // Private: writes are copied on write into our own pages (a read-only descriptor,
            // and seals against writes, allow that; they forbid only shared writable maps).
            // SAFETY: mapping a descriptor we hold; checked for MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            p
        };
        Ok(View {
            map: Mapping { ptr, len },
            fd,
        })
    }

    /// If `[ptr, ptr + len)` lies inside this mapping and still holds what the segment holds
    /// there (none of its pages written here): the segment and the offset, to send instead of
    /// a copy.
    pub fn locate(&self, ptr: usize, len: usize) -> Option<(Arc<OwnedFd>, u64)> {
        let base = self.map.ptr as usize;
        let end = base + self.map.len;
        (ptr >= base && ptr.checked_add(len)? <= end && unwritten(ptr, len))
            .then(|| (self.fd.clone(), (ptr - base) as u64))
    }

    /// The start of the mapping (dangling, never read, when it is empty).
    #[inline]
    pub fn as_ptr(&self) -> *mut c_void {
        self.map.ptr
    }

    /// Its length in bytes: the segment's size.
    #[inline]
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// The segment is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if self.map.len > 0 {
            // SAFETY: unmapping our own mapping; no buffer export outlives `self` (each export
            // holds a reference to it).
            unsafe { libc::munmap(self.map.ptr, self.map.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(fd: &OwnedFd) -> (u64, u64) {
        file_id(fd).expect("fstat")
    }

    /// Leases may be disabled (e.g. `fs.leases-enable = 0`): then nothing is recycled at all.
    fn leases_work(seg: &Recyclable) -> bool {
        seg.unshared().is_ok()
    }

    #[test]
    fn a_private_mapping_alone_keeps_a_segment_from_refills() {
        let data = vec![7u8; 1 << 20];
        let seg = Recyclable::create(&data, size_class(data.len())).expect("segment");
        if !leases_work(&seg) {
            return;
        }
        assert_eq!(seg.unshared(), Ok(true));
        let reader = reopen(seg.fd.as_raw_fd(), libc::O_RDONLY).expect("reopen");
        assert_eq!(seg.unshared(), Ok(false), "an open read-only description");
        // SAFETY: a private mapping of a descriptor we hold, checked; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                seg.size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                reader.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        drop(reader);
        assert_eq!(seg.unshared(), Ok(false), "the mapping holds the segment");
        // SAFETY: both mappings are `size` bytes long and live.
        unsafe {
            *(p as *mut u8) = 1; // copied on write: the segment keeps its byte
            assert_eq!(*seg.map, 7);
            *seg.map.add(4096) = 2; // a page the view never wrote shows the file
            assert_eq!(*(p as *const u8).add(4096), 2);
            libc::munmap(p, seg.size);
        }
        assert_eq!(seg.unshared(), Ok(true), "nothing holds it any more");
    }

    #[test]
    fn a_view_keeps_its_recycled_segment_until_dropped() {
        let r = Recycler::default();
        let first = r.send_copy(&vec![1u8; 3 << 20]).expect("send");
        let first_id = id(&first);
        if !r.holds(&first) {
            return; // leases or F_SEAL_FUTURE_WRITE unavailable: sealed segments only
        }
        let size = verify(&first, 0, 3 << 20, false).expect("verify");
        let view = View::map(Arc::new(first), size).expect("map");
        for round in 0..3u8 {
            let other = r.send_copy(&vec![round + 2; 3 << 20]).expect("send");
            assert_ne!(id(&other), first_id, "refilled a segment a view still maps");
            // SAFETY: the view is `size` bytes long.
            assert_eq!(unsafe { *(view.map.ptr as *const u8).add(12345) }, 1);
        }
        drop(view);
        let again = r.send_copy(&vec![9u8; 3 << 20]).expect("send");
        assert_eq!(id(&again), first_id, "a segment nobody holds is reused");
    }

    #[test]
    fn locate_passes_on_only_unwritten_ranges() {
        let page = page_size();
        let fd = create_sealed(&vec![3u8; 16 * page]).expect("segment");
        let view = View::map(Arc::new(fd), 16 * page as u64).expect("map");
        let base = view.map.ptr as usize;
        assert!(view.locate(base, 16 * page).is_some(), "untouched");
        // SAFETY: reads and one write inside the 16-page mapping.
        let sum: u64 = (0..16 * page)
            .map(|i| unsafe { *(base as *const u8).add(i) } as u64)
            .sum();
        assert_eq!(sum, 3 * 16 * page as u64);
        assert!(view.locate(base, 16 * page).is_some(), "read, not written");
        unsafe { *(base as *mut u8).add(5 * page + 7) = 4 };
        assert!(view.locate(base, 16 * page).is_none(), "page 5 written");
        assert!(view.locate(base + 5 * page + 100, 8).is_none());
        assert_eq!(
            view.locate(base + 6 * page, 10 * page).map(|(_, off)| off),
            Some(6 * page as u64)
        );
        assert!(view.locate(base, 5 * page).is_some());
        assert!(
            view.locate(base + page, 16 * page).is_none(),
            "past the end"
        );
    }
}
