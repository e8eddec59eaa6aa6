"""Protocol v3 pieces of remote objects, through ``kameo._native`` directly.

A worker-side ``Channel`` reads frames written by hand on the other end of a socketpair (the
parent's side of the wire is ``PoolCore``, exercised with real workers elsewhere).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import kameo
import pytest
from kameo._native import Channel

MAX_FRAME = 1 << 20


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
    assert kameo.PROTOCOL_VERSION == 3
    assert (Channel.CALL, Channel.CALL_STREAM, Channel.RELEASE) == (27, 28, 29)


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
