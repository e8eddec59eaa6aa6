"""Protocol v3 pieces of remote objects, through ``kameo._native`` directly.

A worker-side ``Channel`` reads frames written by hand on the other end of a socketpair (the
parent's side of the wire is ``PoolCore``, exercised with real workers elsewhere).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import kameo
import pytest
from conftest import async_wait_until
from kameo import _native
from kameo._native import Channel

MAX_FRAME = 1 << 20
REPLY = 18  # (Channel has no constant: workers only send it)


def frame(kind: int, rid: int, body: bytes) -> bytes:
    """One frame as the protocol lays it out: len:u32, kind, flags, id:u64, body."""
    env = struct.pack("<BBQ", kind, 0, rid) + body
    return struct.pack("<I", len(env)) + env


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Channel]]:
    a, b = socket.socketpair()
    chan = Channel(b.detach(), MAX_FRAME)
    a.settimeout(10.0)
    yield a, chan
    a.close()


def recv_all(chan: Channel, n: int) -> list[tuple[object, ...]]:
    got: list[tuple[object, ...]] = []
    while len(got) < n:
        frames = chan.recv(block=True)
        assert frames is not None, "the test's end closed early"
        got.extend(frames)
    return got


def test_protocol_version_and_kinds() -> None:
    assert kameo.PROTOCOL_VERSION == 4
    assert (Channel.CALL, Channel.CALL_STREAM, Channel.RELEASE, Channel.LOG) == (27, 28, 29, 30)


def test_call_frames_arrive_decoded(pair: tuple[socket.socket, Channel]) -> None:
    sock, chan = pair
    body = kameo.encode(("method", 1, {"x": [1, 2]}))
    sock.sendall(frame(Channel.CALL, 7, body) + frame(Channel.CALL_STREAM, 8, body))
    got = recv_all(chan, 2)
    assert got == [
        (Channel.CALL, 7, False, ("method", 1, {"x": [1, 2]}), None),
        (Channel.CALL_STREAM, 8, False, ("method", 1, {"x": [1, 2]}), None),
    ]


def test_release_frames_carry_object_numbers(pair: tuple[socket.socket, Channel]) -> None:
    sock, chan = pair
    nums = [1, 2**64 - 1, 42]
    body = struct.pack("<I", len(nums)) + b"".join(struct.pack("<Q", n) for n in nums)
    sock.sendall(frame(Channel.RELEASE, 0, body) + frame(Channel.RELEASE, 0, struct.pack("<I", 0)))
    assert recv_all(chan, 2) == [
        (Channel.RELEASE, 0, False, nums, None),
        (Channel.RELEASE, 0, False, [], None),
    ]


def test_a_malformed_release_is_undecodable_not_fatal(
    pair: tuple[socket.socket, Channel],
) -> None:
    sock, chan = pair
    bad = struct.pack("<I", 3) + struct.pack("<Q", 1)  # says 3 numbers, carries 1
    sock.sendall(frame(Channel.RELEASE, 0, bad) + frame(Channel.CALL, 9, kameo.encode(None)))
    (kind, rid, _, msg, _), after = recv_all(chan, 2)
    assert (kind, rid) == (Channel.UNDECODABLE, 0)
    assert isinstance(msg, str) and "release frame of 12 bytes is malformed" in msg
    assert after == (Channel.CALL, 9, False, None, None)


# -- remote object references (tag 0x1F) --------------------------------------------------------


class Ref:
    """Stands for kameo.Ref: the attributes the codec reads."""

    __slots__ = ("_key", "_num", "_type", "_wid")

    def __init__(self, wid: int, num: int, type_name: str = "Counter", key: int = 0) -> None:
        self._wid = wid
        self._num = num
        self._type = type_name
        self._key = key


class SubRef(Ref):
    __slots__ = ()


@pytest.fixture
def refs() -> Iterator[None]:
    _native.set_ref_type(Ref)
    yield
    _native.set_ref_type(kameo.Ref)  # what `import kameo` registered


def remote(wid: int, num: int, type_name: str) -> bytes:
    """A TAG_REMOTE value as the protocol lays it out (small numbers: one-byte varints)."""
    name = type_name.encode()
    return bytes([0x1F, wid, num, len(name)]) + name


def tuple_of(*encoded: bytes) -> bytes:
    return bytes([0x09, len(encoded)]) + b"".join(encoded)


def read_frames(sock: socket.socket, n: int) -> list[tuple[int, int, bytes]]:
    buf = b""
    out: list[tuple[int, int, bytes]] = []
    while len(out) < n:
        while len(buf) < 4 or len(buf) < 4 + struct.unpack_from("<I", buf)[0]:
            chunk = sock.recv(65536)
            assert chunk, "channel closed"
            buf += chunk
        (size,) = struct.unpack_from("<I", buf)
        kind, _flags, rid = struct.unpack_from("<BBQ", buf, 4)
        out.append((kind, rid, buf[14 : 4 + size]))
        buf = buf[4 + size :]
    return out


def test_refs_are_refused_outside_calls(refs: None) -> None:
    with pytest.raises(kameo.SerializationError) as e:
        kameo.encode({"a": [1, Ref(3, 5)]})
    assert str(e.value) == (
        "value['a'][1]: a kameo.Ref can only be sent to the workers of its pool "
        "(in a call's arguments)"
    )
    # Only exact instances are refs: a subclass is an ordinary (unknown) object.
    with pytest.raises(kameo.SerializationError, match="cannot encode object of type"):
        kameo.encode(SubRef(3, 5))


def test_a_ref_with_no_class_set_is_an_ordinary_object() -> None:
    with pytest.raises(kameo.SerializationError, match="cannot encode object of type"):
        kameo.encode(Ref(3, 5))


def test_decoding_a_ref_needs_a_hook() -> None:
    with pytest.raises(kameo.SerializationError, match="holds no remote objects"):
        kameo.decode(tuple_of(remote(3, 5, "Counter")))


def test_worker_channel_resolves_refs_in_calls_with_its_hook(
    pair: tuple[socket.socket, Channel],
) -> None:
    sock, chan = pair
    seen: list[tuple[int, int, str]] = []

    def hook(wid: int, num: int, type_name: str) -> object:
        seen.append((wid, num, type_name))
        if num == 9:
            raise kameo.errors.RefError(f"ref {wid}:{num} was released")
        return f"obj{num}"

    body = tuple_of(remote(3, 5, "Counter"), remote(3, 6, "Model"))
    sock.sendall(frame(Channel.CALL, 7, body))
    ((kind, rid, _, msg, _),) = recv_all(chan, 1)
    assert (kind, rid) == (Channel.UNDECODABLE, 7)
    assert isinstance(msg, str) and "this side holds no remote objects" in msg
    chan.set_ref_hook(hook)
    with pytest.raises(RuntimeError, match="already set"):
        chan.set_ref_hook(hook)
    sock.sendall(
        frame(Channel.CALL, 8, body) + frame(Channel.CALL_STREAM, 9, tuple_of(remote(3, 9, "X")))
    )
    first, second = recv_all(chan, 2)
    assert first == (Channel.CALL, 8, False, ("obj5", "obj6"), None)
    assert seen == [(3, 5, "Counter"), (3, 6, "Model"), (3, 9, "X")]
    kind, rid, _, exc, _ = second
    assert (kind, rid) == (Channel.UNDECODABLE, 9)
    assert isinstance(exc, kameo.errors.RefError) and str(exc) == "ref 3:9 was released"


def test_try_reply_encodes_refs_and_never_pickles(
    pair: tuple[socket.socket, Channel], refs: None
) -> None:
    sock, chan = pair
    chan.set_codec(allow_pickle=True)
    assert chan.try_reply(1, (Ref(3, 5, "Counter"), 2)) is True
    assert chan.try_reply(2, object()) is False  # would need pickle: nothing queued
    chan.set_max_frame(64)
    assert chan.try_reply(3, "x" * 100) is True  # over the limit: the protocol error reply
    chan.flush()
    (k1, id1, body1), (k3, id3, body3) = read_frames(sock, 2)
    assert (k1, id1) == (REPLY, 1)
    assert body1 == tuple_of(remote(3, 5, "Counter"), kameo.encode(2))
    assert (k3, id3) == (Channel.ERROR, 3)
    info = kameo.decode(body3)
    assert info["kind"] == "protocol" and "max_frame_bytes=64" in info["message"]
    # reply still pickles what try_reply refuses.
    chan.set_max_frame(MAX_FRAME)
    chan.reply(4, object())
    chan.flush()
    ((k4, id4, body4),) = read_frames(sock, 1)
    assert (k4, id4, body4[0]) == (REPLY, 4, 0x1A)


# -- PoolCore: calls, pinning, release (no workers: what the parent decides on its own) ---------


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def core(loop: asyncio.AbstractEventLoop) -> _native.PoolCore:
    core = _native.PoolCore(
        loop,
        lambda *event: None,
        b"s" * 32,
        {},
        max_frame_bytes=MAX_FRAME,
        concurrency=1,
        prefetch=0,
        stream_window=4,
    )
    core.set_ref_key(77)
    return core


def test_calls_refuse_refs_of_another_pool_or_of_two_workers(
    core: _native.PoolCore, loop: asyncio.AbstractEventLoop, refs: None
) -> None:
    fut = loop.create_future()
    with pytest.raises(kameo.errors.RefError) as e:
        core.submit_call(("m", Ref(3, 5, key=76)), fut)
    assert str(e.value) == "op[1]: ref 3:5 (Counter) belongs to another pool"
    with pytest.raises(kameo.errors.RefError) as e:
        core.submit_call(("m", [Ref(3, 5, key=77)], {"b": Ref(5, 1, key=77)}), fut)
    assert str(e.value).startswith(
        "op[2]['b']: refs of two workers in one call: op[1][0] is a ref of worker 3, "
        "op[2]['b'] of worker 5"
    )
    with pytest.raises(kameo.errors.RefError, match=r"^op: holds refs of worker 3, but the call"):
        core.submit_call(("m", Ref(3, 5, key=77)), fut, worker=4)
    # A plain request never carries refs (it may run on any worker).
    with pytest.raises(kameo.SerializationError, match=r"message\[1\]: a kameo.Ref can only"):
        core.submit(("m", Ref(3, 5, key=77)), fut)
    assert core.queued == 0 and core.asks == 0


def test_calls_pinned_to_a_worker_that_is_not_there_fail_at_once(
    core: _native.PoolCore, loop: asyncio.AbstractEventLoop, refs: None
) -> None:
    fut = loop.create_future()
    with pytest.raises(kameo.errors.RefError, match=r"^worker 3 is gone$"):
        core.submit_call(("m", Ref(3, 5, key=77)), fut)
    with pytest.raises(kameo.errors.RefError, match=r"^worker 4 is gone$"):
        core.submit_call_stream(("m",), worker=4)
    # Unpinned calls wait for any worker, like requests.
    rid, pinned = core.submit_call(("m", 1), fut)
    assert pinned is None and core.queued == 1
    sid, pinned = core.submit_call_stream(("m", 2))
    assert pinned is None and sid == rid + 1 and core.queued == 2
    assert core.loads() == []
    assert core.release(3, [1, 2]) is False


async def test_calls_pinned_to_a_real_worker_reach_it_in_order_with_releases() -> None:
    """A pinned call goes to its worker and is answered there; a RELEASE before it is no
    answer of its own."""
    async with kameo.Pool("handlers.basic:whoami", size=2) as pool:
        await asyncio.wait_for(pool.ask("warm", timeout=10.0), 10.0)
        core = pool._core
        loads = sorted(core.loads())
        assert [(in_flight, retiring) for _, in_flight, retiring in loads] == [(0, False)] * 2
        wid = loads[1][0]
        fut = asyncio.get_running_loop().create_future()
        pid = next(w.pid for w in pool.workers if w.id == wid)
        assert core.release(wid, [1, 2, 3]) is True  # no answer: nothing to wait for
        rid, pinned = core.submit_call(("call", None, "os:getpid", (), {}, 0), fut, worker=wid)
        assert pinned == wid
        assert await asyncio.wait_for(fut, 10.0) == pid
        # The worker goes on serving requests.
        reply = await pool.ask("after", timeout=10.0)
        assert reply["msg"] == "after"
        assert core.running_on(rid) is None


async def test_the_parent_resolves_refs_in_replies_and_items_with_its_hook() -> None:
    seen: list[tuple[int, int, str]] = []

    def hook(wid: int, num: int, type_name: str) -> object:
        seen.append((wid, num, type_name))
        if num == 0:
            raise kameo.errors.RefError(f"ref {wid}:{num} is not ours")
        return ("resolved", wid, num, type_name)

    async with kameo.Pool("handlers.refs:make", size=1) as pool:
        pool._core.set_ref_hook(hook)  # in place of the pool's own (which makes kameo.Refs)
        reply = await pool.ask({"wid": 4, "nums": [1, 2**40], "type": "Counter"}, timeout=10.0)
        assert reply == [("resolved", 4, 1, "Counter"), ("resolved", 4, 2**40, "Counter")]
        # The hook's exception fails that request, as it is.
        with pytest.raises(kameo.errors.RefError, match=r"^ref 4:0 is not ours$"):
            await pool.ask({"wid": 4, "nums": [0], "type": "Counter"}, timeout=10.0)
        assert await pool.ask({"wid": 1, "nums": [], "type": "X"}, timeout=10.0) == []
    assert seen == [(4, 1, "Counter"), (4, 2**40, "Counter"), (4, 0, "Counter")]

    async with kameo.Pool("handlers.refs:stream", size=1) as pool:
        pool._core.set_ref_hook(hook)
        items = [item async for item in pool.stream({"wid": 2, "nums": [5, 6], "type": "M"})]
        assert items == [{"ref": ("resolved", 2, 5, "M")}, {"ref": ("resolved", 2, 6, "M")}]
        with pytest.raises(kameo.errors.RefError, match="is not ours"):
            async for _ in pool.stream({"wid": 2, "nums": [7, 0], "type": "M"}):
                pass


async def test_pinned_calls_wait_for_their_busy_worker_and_fail_with_it(tmp_path: Path) -> None:
    started = tmp_path / "started"
    async with kameo.Pool("handlers.basic:cmd", size=2, prefetch=0) as pool:
        ids = {w.pid: w.id for w in pool.workers}
        busy = asyncio.ensure_future(
            pool.ask({"op": "sleep", "seconds": 30, "started": str(started)}, timeout=40)
        )
        assert await async_wait_until(lambda: started.exists() and started.read_text() != "", 10)
        victim = int(started.read_text())
        wid = ids[victim]
        core = pool._core
        fut = asyncio.get_running_loop().create_future()
        _, pinned = core.submit_call(("op",), fut, worker=wid)
        assert pinned == wid
        assert core.queued == 1, "its worker is full: the call waits in the parent"
        # It holds up no one: a request goes to the other worker.
        assert await pool.ask({"op": "echo", "value": 1}, timeout=10) == 1
        assert core.queued == 1 and not fut.done()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(kameo.WorkerCrashed) as crashed:
            await asyncio.wait_for(busy, 10)
        # Never sent, yet it fails with its worker (it can run nowhere else).
        with pytest.raises(kameo.WorkerCrashed) as pinned_crashed:
            await asyncio.wait_for(fut, 10)
        assert pinned_crashed.value is crashed.value
        assert crashed.value.worker_id == wid
        assert core.queued == 0


@pytest.mark.parametrize("retire", [False, True])
async def test_a_waiting_pinned_call_goes_out_when_its_worker_has_room(
    tmp_path: Path, retire: bool
) -> None:
    """Also when the worker retires meanwhile: its pinned calls still go to it."""
    started = tmp_path / "started"
    async with kameo.Pool("handlers.basic:cmd", size=1, prefetch=0) as pool:
        busy = asyncio.ensure_future(
            pool.ask({"op": "sleep", "seconds": 0.5, "started": str(started)}, timeout=20)
        )
        assert await async_wait_until(lambda: started.exists() and started.read_text() != "", 10)
        core = pool._core
        ((wid, in_flight, retiring),) = core.loads()
        assert (in_flight, retiring) == (1, False)
        fut = asyncio.get_running_loop().create_future()
        assert core.submit_call(("op",), fut, worker=wid)[1] == wid
        assert core.queued == 1
        if retire:
            core.retire(wid)
            assert core.loads() == [(wid, 1, True)]
        await asyncio.wait_for(busy, 20)
        # Today's worker answers CALL as an unknown kind: it did reach the worker.
        with pytest.raises(ValueError, match="malformed call op"):  # and the worker goes on
            await asyncio.wait_for(fut, 10)
        assert core.queued == 0


def test_calls_are_numbered_as_requests_on_the_progress_page(
    pair: tuple[socket.socket, Channel],
) -> None:
    sock, chan = pair
    fd = os.memfd_create("test-progress")
    os.ftruncate(fd, 8)
    chan.set_progress(os.dup(fd))
    page = os.fdopen(fd, "rb", buffering=0)
    release = struct.pack("<IQ", 1, 5)
    none = kameo.encode(None)
    sock.sendall(
        frame(Channel.REQUEST, 1, none)
        + frame(Channel.RELEASE, 0, release)  # not numbered
        + frame(Channel.CALL, 2, none)
        + frame(Channel.CALL_STREAM, 3, none)
        + frame(Channel.REQUEST_STREAM, 4, none)
    )
    assert [f[:2] for f in recv_all(chan, 5)] == [
        (Channel.REQUEST, 1),
        (Channel.RELEASE, 0),
        (Channel.CALL, 2),
        (Channel.CALL_STREAM, 3),
        (Channel.REQUEST_STREAM, 4),
    ]

    def taken() -> int:
        page.seek(0)
        return int(struct.unpack("<Q", page.read(8))[0])

    chan.take(2)
    assert taken() == 2  # the CALL is arrival index 1
    chan.take(3)
    assert taken() == 3
    chan.take(4)
    assert taken() == 4
    page.close()
