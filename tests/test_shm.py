"""Large buffers travel as sealed memfds ("kameo-shm") passed with SCM_RIGHTS (issue 4).

Everything is observed from outside through /proc: the fds a process holds
(``readlink /proc/<pid>/fd/N`` = "/memfd:kameo-shm (deleted)") and its mappings
(``/proc/<pid>/maps`` lines containing "memfd:kameo-shm"). Workers are real subprocesses.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import mmap
import os
import signal
import time
from typing import Any

import kameo
import pytest
from conftest import async_wait_until

BASIC = "handlers.basic"
VALUES = "handlers.values"
MiB = 1 << 20
SHM_NAME = "kameo-shm"

# --------------------------------------------------------------------------- /proc probes


def shm_fds(pid: int | str = "self") -> list[str]:
    """The fds of ``pid`` that are kameo-shm memfds, as "N -> target"."""
    out = []
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if SHM_NAME in target:
            out.append(f"{entry} -> {target}")
    return out


def shm_maps(pid: int | str = "self") -> list[str]:
    """The lines of /proc/<pid>/maps that map a kameo-shm memfd."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [line.rstrip("\n") for line in f if f"memfd:{SHM_NAME}" in line]
    except (FileNotFoundError, ProcessLookupError):
        return []


CACHE_NAME = "kameo-shm-cache"
CACHE_MAX_SEGMENTS = 4  # shm::RECYCLE_MAX_SEGMENTS
CACHE_MAX_BYTES = 64 * MiB  # shm::RECYCLE_MAX_BYTES


def fd_writable(pid: int | str, fd: str) -> bool:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8) & os.O_ACCMODE == os.O_RDWR
    return False


def is_cached(pid: int | str, entry: str) -> bool:
    """An fd or mapping of a segment the process keeps to reuse for the bytes it sends: its own
    read-write fd, or its read-write mapping (receivers only ever get read-only ones)."""
    if CACHE_NAME not in entry:
        return False
    if " -> " in entry:
        try:
            return fd_writable(pid, entry.split(" -> ")[0])
        except OSError:
            return False
    return entry.split()[1].startswith("rw-s")


def shm_cached(pid: int | str = "self") -> list[str]:
    """The fds of segments ``pid`` keeps for reuse (see shm::Recycler)."""
    return [e for e in shm_fds(pid) if is_cached(pid, e)]


def shm_in_use(pid: int | str = "self") -> list[str]:
    """Segment fds and mappings ``pid`` holds other than those it keeps for reuse."""
    return [e for e in shm_fds(pid) + shm_maps(pid) if not is_cached(pid, e)]


def assert_cache_bounded(pid: int | str = "self") -> None:
    cached = shm_cached(pid)
    assert len(cached) <= CACHE_MAX_SEGMENTS, cached
    sizes = [os.stat(f"/proc/{pid}/fd/{e.split(' -> ')[0]}").st_size for e in cached]
    assert sum(sizes) <= CACHE_MAX_BYTES, sizes


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/self/status")


async def assert_released(pids: list[int | str], timeout: float = 5.0) -> None:
    """Every process in ``pids`` holds no kameo-shm fd or mapping within ``timeout``, except
    the few segments a sender keeps for reuse (bounded, its own read-write fd and mapping)."""
    gc.collect()
    for pid in pids:
        ok = await async_wait_until(lambda pid=pid: not shm_in_use(pid), timeout)
        assert ok, f"pid {pid} still holds kameo-shm: {shm_in_use(pid)}"
        assert_cache_bounded(pid)


def worker_pids(pool: kameo.Pool) -> list[int]:
    return [w.pid for w in pool.workers if w.state != "dead"]


def big_bytes(n: int) -> bytes:
    """n bytes with a non-trivial pattern (a repeated 251-byte prime cycle)."""
    unit = bytes(range(251))
    return (unit * (n // 251 + 1))[:n]


# --------------------------------------------------------------------------- echoes


async def test_big_bytes_and_bytearray_echo():
    blob = big_bytes(16 * MiB)
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        got = await pool.ask(blob, timeout=30.0)
        assert type(got) is bytes and got == blob
        got = await pool.ask(bytearray(blob), timeout=30.0)
        assert type(got) is bytearray and got == blob
        got = await pool.ask({"k": [blob, bytearray(b"small")], "n": 1}, timeout=30.0)
        assert got == {"k": [blob, bytearray(b"small")], "n": 1}
        assert type(got["k"][0]) is bytes and type(got["k"][1]) is bytearray
        del got
        await assert_released(["self", *worker_pids(pool)])


async def test_shm_payload_is_not_bounded_by_max_frame_bytes():
    """Above the threshold only a reference travels in the frame, so a 16 MiB buffer passes
    a 2 MiB frame limit (inline it would be a ProtocolError)."""
    blob = big_bytes(16 * MiB)
    async with kameo.Pool(f"{BASIC}:echo", size=1, max_frame_bytes=2 * MiB) as pool:
        got = await pool.ask([blob], timeout=30.0)
        assert got == [blob]
    async with kameo.Pool(
        f"{BASIC}:echo", size=1, max_frame_bytes=2 * MiB, shm_threshold=None
    ) as pool:
        with pytest.raises(kameo.ProtocolError):
            await pool.ask([blob], timeout=30.0)
        assert await pool.ask("still there", timeout=10.0) == "still there"


@pytest.mark.parametrize("order", ["C", "F"])
async def test_numpy_above_threshold_is_a_writable_private_view(order):
    np = pytest.importorskip("numpy")
    a = np.arange(512 * 1024, dtype=np.float64).reshape(512, 1024)  # 4 MiB
    if order == "F":
        a = np.asfortranarray(a)
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        got = await pool.ask(a, timeout=30.0)
        assert type(got) is np.ndarray
        assert got.dtype == a.dtype and got.shape == a.shape
        assert np.array_equal(got, a)
        if order == "F":
            assert got.flags.f_contiguous
        else:
            assert got.flags.c_contiguous
        assert got.flags.writeable is True
        assert got.base is not None
        maps = shm_maps()
        # A view: a private (copy-on-write) mapping of the segment.
        views = [line for line in maps if line.split()[1] == "rw-p"]
        assert views, f"a received array above the threshold should map a kameo-shm memfd: {maps}"
        # Shared and writable: only the pool's own recycled segments (what it sends arrays in).
        writable = [line for line in maps if line.split()[1] == "rw-s"]
        assert all(CACHE_NAME in line for line in writable), f"writable mapping: {maps}"
        got[0, 0] = -1.0
        assert got[0, 0] == -1.0 and a[0, 0] == 0.0
        assert np.array_equal(got.reshape(-1)[1:], a.reshape(-1)[1:])
        del got
        await assert_released(["self", *worker_pids(pool)])


def _cache_maps() -> dict[str, set[str]]:
    """inode -> permissions of this process's mappings of recycled segments."""
    out: dict[str, set[str]] = {}
    for line in shm_maps():
        fields = line.split()
        if CACHE_NAME in line:
            out.setdefault(fields[4], set()).add(fields[1])
    return out


def _storage(arr: Any) -> Any:
    """What an array's memory finally belongs to (a ShmView, a bytearray, ...)."""
    base = arr
    while getattr(base, "base", None) is not None and type(base).__name__ == "ndarray":
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


async def test_array_sent_back_is_a_view_on_the_pools_own_segment_until_it_is_dropped():
    """Arrays go out in the pool's recycled segments; one echoed back is a view on that very
    segment (no copy). Once the pool has dropped the segment from its cache, nothing says
    the worker cannot change it, so an array coming back in it is a copy (writable too)."""
    np = pytest.importorskip("numpy")
    a = np.arange(512 * 1024, dtype=np.float64)  # 4 MiB
    async with kameo.Pool(f"{VALUES}:keep", size=1) as pool:
        got = await pool.ask({"op": "echo", "data": a}, timeout=30.0)
        assert np.array_equal(got, a) and got.flags.writeable
        assert type(_storage(got)).__name__ == "ShmView"
        shared = [perms for perms in _cache_maps().values() if {"rw-p", "rw-s"} <= perms]
        assert shared, f"the echo should map the segment the pool sent: {shm_maps()}"
        del got

        assert await pool.ask({"op": "put", "data": a}, timeout=30.0) == a.nbytes
        # Arrays of other sizes, while the worker keeps `a`: new segments, until the cache
        # (4 segments) drops the oldest, `a`'s.
        for n in (600_000, 700_000, 800_000, 900_000, 1_000_000, 1_100_000):
            b = np.ones(n)
            assert await pool.ask({"op": "nbytes", "data": b}, timeout=30.0) == b.nbytes
        back = await pool.ask({"op": "get"}, timeout=30.0)
        assert np.array_equal(back, a) and back.flags.writeable
        assert type(_storage(back)) is bytearray, type(_storage(back))
        back[0] = -1.0
        assert back[0] == -1.0 and a[0] == 0.0


async def test_numpy_below_threshold_arrives_writable():
    np = pytest.importorskip("numpy")
    small = np.arange(1000, dtype=np.float64)  # 8 KB
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        got = await pool.ask(small, timeout=10.0)
        assert np.array_equal(got, small) and got.dtype == small.dtype
        assert got.flags.writeable
        got[0] = -1.0
        assert not shm_in_use()


async def test_custom_threshold():
    np = pytest.importorskip("numpy")
    above = np.ones(16 * 1024)  # 128 KiB
    below = np.ones(4 * 1024)  # 32 KiB
    async with kameo.Pool(f"{BASIC}:echo", size=1, shm_threshold=64 * 1024) as pool:
        got_above = await pool.ask(above, timeout=10.0)
        got_below = await pool.ask(below, timeout=10.0)
        assert np.array_equal(got_above, above) and np.array_equal(got_below, below)
        assert got_above.flags.writeable is True
        assert shm_maps(), "128 KiB is above a 64 KiB threshold"
        assert got_below.flags.writeable is True
        del got_above, got_below
        await assert_released(["self", *worker_pids(pool)])


async def test_received_memfd_is_sealed():
    np = pytest.importorskip("numpy")
    a = np.ones(MiB)  # 8 MiB
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        got = await pool.ask(a, timeout=30.0)
        maps = shm_maps()
        assert maps
        span = maps[0].split()[0]
        try:
            fd = os.open(f"/proc/self/map_files/{span}", os.O_RDONLY)
        except PermissionError:
            pytest.skip("opening /proc/self/map_files needs CAP_SYS_ADMIN")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        finally:
            os.close(fd)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW, hex(seals)
        assert seals & (fcntl.F_SEAL_WRITE | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)), hex(
            seals
        )
        del got


async def test_shm_disabled_goes_inline():
    np = pytest.importorskip("numpy")
    blob = big_bytes(16 * MiB)
    c = np.arange(512 * 1024, dtype=np.float64).reshape(512, 1024)
    f = np.asfortranarray(c)
    async with kameo.Pool(
        f"{BASIC}:echo", size=1, shm_threshold=None, max_frame_bytes=128 * MiB
    ) as pool:
        (wpid,) = worker_pids(pool)
        got = await pool.ask(blob, timeout=30.0)
        assert type(got) is bytes and got == blob
        got = await pool.ask(bytearray(blob), timeout=30.0)
        assert type(got) is bytearray and got == blob
        for a in (c, f):
            got = await pool.ask(a, timeout=30.0)
            assert np.array_equal(got, a) and got.dtype == a.dtype
            assert got.flags.f_contiguous if a is f else got.flags.c_contiguous
            assert got.flags.writeable, "an inline array is decoded into its own memory"
            assert not shm_in_use(), shm_in_use()
            assert not shm_in_use(wpid), shm_in_use(wpid)


async def test_repeated_transfers_do_not_leak():
    np = pytest.importorskip("numpy")
    a = np.arange(256 * 1024, dtype=np.float64)  # 2 MiB
    blob = big_bytes(2 * MiB)
    async with kameo.Pool(f"{BASIC}:aecho", size=2) as pool:
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(10):
            replies = await asyncio.gather(*(pool.ask([a, blob], timeout=30.0) for _ in range(4)))
            for r in replies:
                assert np.array_equal(r[0], a) and r[1] == blob
            del replies, r
        await assert_released(["self", *worker_pids(pool)])
        assert len(os.listdir("/proc/self/fd")) <= fds_before + len(shm_cached())
    # Closing the pool frees the segments kept for reuse.
    assert not shm_fds() and not shm_maps(), shm_fds() + shm_maps()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


async def test_more_segments_than_one_write_carries():
    """Coalesced requests may carry more segments than one sendmsg takes (253): they go in
    batches, each ahead of its frames, and every request gets its own buffers back."""
    msgs = [[bytes([i, j]) * 16 for j in range(60)] for i in range(8)]  # 60 segments each
    async with kameo.Pool(f"{BASIC}:echo", size=1, shm_threshold=16) as pool:
        replies = await asyncio.gather(*(pool.ask(m, timeout=30.0) for m in msgs))
        assert replies == msgs
        del replies
        await assert_released(["self", *worker_pids(pool)])
        assert await pool.ask("after", timeout=10.0) == "after"


async def test_worker_direction_new_array():
    """An array made in the worker (not an echo of ours) arrives through shm too."""
    np = pytest.importorskip("numpy")
    async with kameo.Pool(f"{VALUES}:make_array", size=1) as pool:
        got = await pool.ask({"n": MiB, "dtype": "int32"}, timeout=30.0)  # 4 MiB
        assert got.dtype == np.int32 and got.shape == (MiB,)
        assert int(got[-1]) == MiB - 1 and int(got[12345]) == 12345
        assert got.flags.writeable is True
        del got
        await assert_released(["self", *worker_pids(pool)])


async def test_worker_sees_a_writable_view():
    np = pytest.importorskip("numpy")
    async with kameo.Pool(f"{VALUES}:describe", size=1) as pool:
        info = await pool.ask(np.ones(MiB), timeout=30.0)
        assert info["type"] == "numpy.ndarray"
        assert info["writeable"] is True
        assert info["storage"] == "ShmView", "a view on the segment, not a copy"
        info = await pool.ask(np.ones(16), timeout=30.0)
        assert info["writeable"] is True
        assert info["storage"] != "ShmView"
        await assert_released(["self", *worker_pids(pool)])


# --------------------------------------------------------------------------- writable views
# A received array above the threshold is a private (copy-on-write) mapping of its segment:
# writable, no copy on receipt, and a write copies only the pages it touches, into the
# receiver's own memory; the segment, and everyone else's view of it, never changes.


def private_views(pid: int | str = "self") -> list[tuple[str, int, int]]:
    """This process's private mappings of kameo-shm segments, from /proc/<pid>/smaps:
    (name, size, anonymous) in bytes; "anonymous" counts the pages copied on write."""
    out: list[tuple[str, int, int]] = []
    current: list[Any] | None = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and ":" not in fields[0]:
                current = None
                if f"memfd:{SHM_NAME}" in line and fields[1].endswith("p"):
                    current = [fields[-2] if fields[-1] == "(deleted)" else fields[-1], 0, 0]
                    out.append(current)  # type: ignore[arg-type]
            elif current is not None and fields[0] in ("Size:", "Anonymous:"):
                current[1 if fields[0] == "Size:" else 2] = int(fields[1]) * 1024
    return [tuple(v) for v in out]  # type: ignore[misc]


async def test_worker_writes_a_received_array_in_place():
    """`a += 1` in a worker works on an array above the threshold, and what it sends back is
    what it wrote (the pages it changed are not passed on as the unchanged segment)."""
    np = pytest.importorskip("numpy")
    a = np.arange(512 * 1024, dtype=np.float64)  # 4 MiB
    original = a.copy()
    async with kameo.Pool(f"{VALUES}:keep", size=1) as pool:
        for _ in range(3):  # the same recycled segments, refilled
            got = await pool.ask({"op": "add_echo", "data": a}, timeout=30.0)
            assert np.array_equal(got, original + 1)
            assert np.array_equal(a, original), "the worker's write reached the sender's array"
            del got
        # One element, in the last page only.
        got = await pool.ask({"op": "set_echo", "data": a, "i": a.size - 1, "value": -5.0})
        expected = original.copy()
        expected[-1] = -5.0
        assert np.array_equal(got, expected)
        # Unchanged: passed on as it is, a view on the pool's own segment.
        got = await pool.ask({"op": "echo", "data": a}, timeout=30.0)
        assert np.array_equal(got, original) and type(_storage(got)).__name__ == "ShmView"
        del got
        await assert_released(["self", *worker_pids(pool)])


async def test_worker_writes_do_not_reach_the_segment_or_other_views():
    """The worker keeps an array that is a view on the pool's segment and writes to it; the
    pool's own view of the same segment (the echo) does not change, and neither does the
    worker's copy when the pool writes to its view."""
    np = pytest.importorskip("numpy")
    n = 512 * 1024
    a = np.arange(n, dtype=np.float64)  # 4 MiB
    total = float(a.sum())
    async with kameo.Pool(f"{VALUES}:keep", size=1) as pool:
        got = await pool.ask({"op": "echo_put", "data": a}, timeout=30.0)
        assert type(_storage(got)).__name__ == "ShmView" and np.array_equal(got, a)
        assert await pool.ask({"op": "add", "value": 1.0}, timeout=30.0) == total + n
        assert np.array_equal(got, a), "the worker's write reached the segment"
        got += 2.0
        assert float(got.sum()) == total + 2 * n
        assert await pool.ask({"op": "sum"}, timeout=30.0) == total + n
        assert np.array_equal(a, np.arange(n, dtype=np.float64))
        del got
        assert np.array_equal((await pool.ask({"op": "get"}, timeout=30.0)), a + 1.0)
        await assert_released(["self", *worker_pids(pool)])


async def test_parent_writes_a_received_array_without_a_copy():
    """An array from a worker is a writable view (no copy: its pages are the segment's until
    written), a write copies only the pages it touches, and the worker's array is unchanged."""
    np = pytest.importorskip("numpy")
    n = 512 * 1024  # 4 MiB
    expected = np.arange(n, dtype=np.float64)
    async with kameo.Pool(f"{VALUES}:keep", size=1) as pool:
        got = await pool.ask({"op": "make", "n": n}, timeout=30.0)
        assert got.flags.writeable and type(_storage(got)).__name__ == "ShmView"
        assert np.array_equal(got, expected)  # reads every page
        (view,) = [v for v in private_views() if v[1] >= got.nbytes]
        assert view[2] == 0, f"reading the array copied {view[2]} bytes: {view}"
        got[0] = -1.0
        (view,) = [v for v in private_views() if v[1] >= got.nbytes]
        assert 0 < view[2] <= 64 * 1024, f"one write should copy one page: {view}"
        got += 1.0
        (view,) = [v for v in private_views() if v[1] >= got.nbytes]
        assert view[2] >= got.nbytes, view
        want = expected + 1.0
        want[0] = 0.0
        assert np.array_equal(got, want)
        assert await pool.ask({"op": "sum"}, timeout=30.0) == float(expected.sum())
        # Sent on, changed: the worker gets what we wrote, not the segment it made.
        back = await pool.ask({"op": "echo", "data": got}, timeout=30.0)
        assert np.array_equal(back, want) and np.array_equal(got, want)
        del got, back
        await assert_released(["self", *worker_pids(pool)])


async def test_written_echo_of_the_pools_own_segment_is_never_refilled():
    """An echo is a view on a segment the pool recycles. The pool must not refill the segment
    while the view lives (its unwritten pages would show the new contents), nor after the
    segment left the cache; written, it is sent as what it holds."""
    np = pytest.importorskip("numpy")
    n = 512 * 1024  # 4 MiB
    a = np.arange(n, dtype=np.float64)
    async with kameo.Pool(f"{VALUES}:keep", size=1) as pool:
        got = await pool.ask({"op": "echo", "data": a}, timeout=30.0)
        assert type(_storage(got)).__name__ == "ShmView"
        got[0] = -1.0
        expected = a.copy()
        expected[0] = -1.0
        for k in range(6):  # same size class: a refill of got's segment would show here
            b = np.full(n, float(k + 7))
            assert (await pool.ask({"op": "echo", "data": b}, timeout=30.0))[-1] == k + 7
            assert np.array_equal(got, expected), f"the segment was refilled ({k})"
        back = await pool.ask({"op": "echo", "data": got}, timeout=30.0)
        assert np.array_equal(back, expected)
        del back
        # Other sizes, until the cache drops got's segment: got stays as it was, writable.
        for m in (600_000, 700_000, 800_000, 900_000, 1_000_000, 1_100_000):
            assert await pool.ask({"op": "nbytes", "data": np.ones(m)}, timeout=30.0) == 8 * m
        assert np.array_equal(got, expected)
        got[-1] = -2.0
        expected[-1] = -2.0
        back = await pool.ask({"op": "echo", "data": got}, timeout=30.0)
        assert np.array_equal(back, expected) and np.array_equal(got, expected)
        del got, back
        await assert_released(["self", *worker_pids(pool)])


def test_write_lease_sees_a_private_mapping():
    """What shm::Recycler relies on before it refills a segment: the kernel refuses the write
    lease while any other open file description of the segment exists, including one that
    only a (private, copy-on-write) mapping still holds after its fd was closed."""
    size = MiB
    memfd = os.memfd_create("kameo-lease-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    owner = os.open(f"/proc/self/fd/{memfd}", os.O_RDWR | os.O_CLOEXEC)
    os.close(memfd)

    def leased() -> bool:
        try:
            fcntl.fcntl(owner, fcntl.F_SETLEASE, fcntl.F_WRLCK)
        except BlockingIOError:
            return False
        fcntl.fcntl(owner, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return True

    try:
        os.ftruncate(owner, size)
        os.pwrite(owner, b"a" * size, 0)
        future_write = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
        seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | future_write | fcntl.F_SEAL_SEAL
        own_map = mmap.mmap(owner, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        fcntl.fcntl(owner, fcntl.F_ADD_SEALS, seals)
        try:
            leased()
        except OSError as e:
            pytest.skip(f"write leases are not available here: {e}")
        assert leased(), "nobody else holds the segment"
        reader = os.open(f"/proc/self/fd/{owner}", os.O_RDONLY | os.O_CLOEXEC)
        view = mmap.mmap(reader, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(reader)
        assert not leased(), "a private mapping alone must keep the segment from refills"
        view[0:1] = b"x"  # copy-on-write: only the view's page changes
        own_map[size - 1 : size] = b"y"
        assert os.pread(owner, 1, 0) == b"a" and view[size - 1 : size] == b"y"
        assert not leased()
        view.close()
        assert leased(), "the lease is granted again once the mapping is gone"
        own_map.close()
    finally:
        os.close(owner)


# --------------------------------------------------------------------------- recycled segments


def pattern(n: int, seed: int) -> bytes:
    unit = bytes((seed * 7 + i) % 256 for i in range(257))
    return (unit * (n // 257 + 1))[:n]


async def test_recycled_segments_carry_each_buffer_intact():
    """Bytes above the threshold reuse a few segments per side (shm::Recycler): every echo,
    of changing contents and sizes in the same size class, comes back exactly, and a shorter
    buffer after a longer one does not carry the longer one's tail."""
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        (wpid,) = worker_pids(pool)
        for i, n in enumerate([16 * MiB, 15 * MiB, 16 * MiB - 1, 2 * MiB, 15 * MiB + 3] * 2):
            blob = pattern(n, i)
            got = await pool.ask(blob, timeout=30.0)
            assert type(got) is bytes and len(got) == n and got == blob, (i, n)
            got = await pool.ask(bytearray(blob), timeout=30.0)
            assert type(got) is bytearray and got == blob, (i, n)
        del got
        assert shm_cached(), "the parent should keep a segment for reuse"
        assert shm_cached(wpid), "the worker should keep a segment for reuse"
        await assert_released(["self", wpid])
    assert not shm_fds() and not shm_maps()


async def test_recycled_segments_with_concurrent_requests():
    """Many large buffers in flight at once each travel in a segment nobody else holds."""
    async with kameo.Pool(f"{BASIC}:aecho", size=2) as pool:
        for r in range(4):
            blobs = [pattern(2 * MiB + 4096 * k, 10 * r + k) for k in range(8)]
            replies = await asyncio.gather(*(pool.ask(b, timeout=30.0) for b in blobs))
            assert replies == blobs
        del replies
        await assert_released(["self", *worker_pids(pool)])


async def test_recycled_segment_is_read_only_for_others():
    """A segment kept for reuse is sealed: nobody else can resize it, write to it or map it
    writable (only its owner's mapping, made before the seal, writes)."""
    async with kameo.Pool(f"{BASIC}:echo", size=1) as pool:
        (wpid,) = worker_pids(pool)
        await pool.ask(pattern(4 * MiB, 1), timeout=30.0)
        cached = shm_cached(wpid)
        assert cached
        fd = os.open(f"/proc/{wpid}/fd/{cached[0].split(' -> ')[0]}", os.O_RDWR)
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            future_write = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)
            for seal in (fcntl.F_SEAL_SHRINK, fcntl.F_SEAL_GROW, future_write, fcntl.F_SEAL_SEAL):
                assert seals & seal, hex(seals)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 0)
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                mmap.mmap(fd, MiB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        assert await pool.ask(pattern(4 * MiB, 2), timeout=30.0) == pattern(4 * MiB, 2)


# --------------------------------------------------------------------------- crashes


async def _wait_for_pidfile(path: str, ask: asyncio.Future[object], timeout: float) -> int:
    ok = await async_wait_until(lambda: os.path.exists(path) or ask.done(), timeout)
    if ask.done():
        ask.result()  # raises what went wrong
        raise AssertionError("the ask finished although the handler sleeps for 30 s")
    assert ok, "the handler never reported that it holds the buffer"
    with open(path) as f:
        return int(f.read())


async def test_worker_killed_while_holding_a_big_buffer(tmp_path):
    np = pytest.importorskip("numpy")
    pidfile = str(tmp_path / "holding")
    data = np.ones(4 * MiB)  # 32 MiB
    async with kameo.Pool(f"{VALUES}:hold", size=1) as pool:
        ask = asyncio.ensure_future(
            pool.ask({"data": data, "seconds": 30.0, "pidfile": pidfile}, timeout=20.0)
        )
        pid = await _wait_for_pidfile(pidfile, ask, 10.0)
        assert shm_maps(pid), "the worker should hold the buffer as a kameo-shm mapping"
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(kameo.WorkerCrashed):
            await asyncio.wait_for(ask, 15.0)
        await assert_released(["self"])
        assert await pool.ask({"data": b"abc", "seconds": 0}, timeout=20.0) == 3
        assert await pool.ask({"data": data, "seconds": 0}, timeout=20.0) == data.nbytes
        await assert_released(["self", *worker_pids(pool)])


async def test_worker_killed_while_receiving_a_big_buffer():
    np = pytest.importorskip("numpy")
    data = np.ones(16 * MiB)  # 128 MiB: the kill lands while it is sent or mapped
    async with kameo.Pool(f"{VALUES}:hold", size=1) as pool:
        (pid,) = worker_pids(pool)
        ask = asyncio.ensure_future(pool.ask({"data": data, "seconds": 1.0}, timeout=20.0))
        await asyncio.sleep(0)  # let the request go out
        os.kill(pid, signal.SIGKILL)
        # Normally the request was sent and may have started: WorkerCrashed. If the kill won
        # the race before the request was written, the pool runs it on the replacement.
        try:
            got = await asyncio.wait_for(ask, 15.0)
        except kameo.WorkerCrashed:
            pass
        else:
            assert got == data.nbytes
        await assert_released(["self"])
        assert await pool.ask({"data": data, "seconds": 0}, timeout=20.0) == data.nbytes
        await assert_released(["self", *worker_pids(pool)])


async def test_worker_killed_while_replying():
    """The parent holds a reply view when the worker that made it dies: the view stays valid
    (the memfd lives on while mapped) and is released when dropped."""
    pytest.importorskip("numpy")
    async with kameo.Pool(f"{VALUES}:make_array", size=1) as pool:
        got = await pool.ask({"n": 2 * MiB}, timeout=30.0)  # 16 MiB
        (pid,) = worker_pids(pool)
        os.kill(pid, signal.SIGKILL)
        ok = await async_wait_until(lambda: pid not in worker_pids(pool), 10.0)
        assert ok
        assert float(got[-1]) == 2 * MiB - 1 and float(got.sum()) == (2 * MiB) * (2 * MiB - 1) / 2
        del got
        await assert_released(["self"])
        assert (await pool.ask({"n": 3}, timeout=20.0)).tolist() == [0.0, 1.0, 2.0]


# --------------------------------------------------------------------------- memory


async def test_256_mib_array_echo_memory():
    """Parent memory for a 256 MiB echo stays under 2.5 copies of the array.

    What a good implementation costs the parent, counted in RSS (VmRSS counts anonymous,
    file-backed and shared pages, so mapped memfd pages count once touched):
      * the original array: 1 copy (np.ones touches every page);
      * the request: the parent fills a memfd and passes it; once sent it needs no mapping of
        its own (written with write(), or mapped, filled and unmapped), so at most transiently;
      * the reply: a copy-on-write view mapping the worker's memfd: 1 copy once we read it all.
    That is about 2 copies at the peak. A third full copy anywhere (an encode buffer, a
    bytes object read off the socket, a copy out of the reply memfd) would put the peak at
    3 copies, so the bound is 2.5 copies of the array, measured as the peak RSS (VmHWM, reset
    through /proc/self/clear_refs) over the RSS just before the array is created.
    """
    np = pytest.importorskip("numpy")
    n = 32 * 2**20
    nbytes = n * 8
    async with kameo.Pool(f"{BASIC}:echo", size=1, default_timeout=60.0) as pool:
        warm = await pool.ask(np.ones(MiB), timeout=30.0)  # lazy allocations out of the way
        del warm
        await assert_released(["self"])
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pytest.skip("cannot reset the peak RSS through /proc/self/clear_refs")
        baseline = status_kib("VmRSS") * 1024
        assert status_kib("VmHWM") * 1024 < baseline + 16 * MiB, "VmHWM was not reset"

        a = np.ones(n)
        start = time.monotonic()
        got = await pool.ask(a, timeout=60.0)
        elapsed = time.monotonic() - start
        assert got.shape == (n,) and got.dtype == np.float64
        assert got.min() == 1.0 and got.max() == 1.0  # reads every page, allocates nothing
        assert got.flags.writeable is True and got.base is not None
        peak = status_kib("VmHWM") * 1024
        growth = peak - baseline
        assert growth < 2.5 * nbytes, (
            f"peak RSS grew by {growth / MiB:.0f} MiB for a {nbytes / MiB:.0f} MiB echo "
            f"({growth / nbytes:.2f} copies, took {elapsed:.2f} s)"
        )
        del got, a
        await assert_released(["self", *worker_pids(pool)])
        after = status_kib("VmRSS") * 1024
        assert after - baseline < 0.5 * nbytes, f"{(after - baseline) / MiB:.0f} MiB not freed"
