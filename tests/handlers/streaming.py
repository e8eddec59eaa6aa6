"""Generator handlers for the streaming tests (run inside kameo workers).

Every generator takes a dict message; the keys select its behaviour:

* ``n``: how many items to yield (``None``: forever); item ``i`` is the int ``i``, or
  ``{"i": i, "pid": pid}`` with ``"tagged": True``.
* ``progress``: a file path; before each yield the generator writes the number of items yielded
  so far (including the one about to be yielded) as 8 little-endian bytes at offset 0.
* ``finally``: a file path written (with the pid) when the generator's ``finally`` runs.
* ``done``: a file path written when the generator has yielded its last item and returns.
* ``release``: a file path; after the first item (``release_after`` items, if given) the
  generator waits (at most 20 s) until it exists.
* ``delay``: seconds to sleep after each item.
* ``raise_after`` + ``error``: after that many items, raise the built-in exception named
  ``error`` (or :class:`StreamError` for ``"StreamError"``) with ``"boom"`` as argument.

The test process imports this module too (for ``StreamError``): no side effects at import.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import os
import struct
import time
from typing import Any

RELEASE_WAIT = 20.0


class StreamError(Exception):
    """A custom exception type raised by a generator."""


def _error(name: str) -> BaseException:
    if name == "StreamError":
        return StreamError("boom")
    cls = getattr(builtins, name)
    return cls("boom")


def _mark(path: str | None, text: str = "") -> None:
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text or str(os.getpid()))
        os.replace(path + ".tmp", path)


class _Progress:
    def __init__(self, path: str | None) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600) if path else None

    def write(self, count: int) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, struct.pack("<q", count), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _item(msg: dict, i: int) -> Any:
    if msg.get("tagged"):
        return {"i": i, "pid": os.getpid()}
    return i


def _indices(msg: dict) -> Any:
    n = msg.get("n")
    return itertools.count() if n is None else range(n)


def count(msg: dict) -> Any:
    """A plain (sync) generator."""
    progress = _Progress(msg.get("progress"))
    raise_after = msg.get("raise_after")
    delay = msg.get("delay")
    try:
        for i in _indices(msg):
            if raise_after is not None and i == raise_after:
                raise _error(msg["error"])
            progress.write(i + 1)
            yield _item(msg, i)
            if i + 1 == msg.get("release_after", 1) and msg.get("release"):
                deadline = time.monotonic() + RELEASE_WAIT
                while not os.path.exists(msg["release"]) and time.monotonic() < deadline:
                    time.sleep(0.01)
            if delay:
                time.sleep(delay)
        if raise_after is not None and raise_after >= msg["n"]:
            raise _error(msg["error"])
        _mark(msg.get("done"))
    finally:
        progress.close()
        _mark(msg.get("finally"))


async def acount(msg: dict) -> Any:
    """An async generator with the same behaviour as :func:`count`."""
    progress = _Progress(msg.get("progress"))
    raise_after = msg.get("raise_after")
    delay = msg.get("delay")
    try:
        for i in _indices(msg):
            if raise_after is not None and i == raise_after:
                raise _error(msg["error"])
            progress.write(i + 1)
            yield _item(msg, i)
            if i + 1 == msg.get("release_after", 1) and msg.get("release"):
                deadline = time.monotonic() + RELEASE_WAIT
                while not os.path.exists(msg["release"]) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            if delay:
                await asyncio.sleep(delay)
        if raise_after is not None and raise_after >= msg["n"]:
            raise _error(msg["error"])
        _mark(msg.get("done"))
    finally:
        progress.close()
        _mark(msg.get("finally"))


def plain(msg: Any) -> Any:
    """Not a generator: for the HandlerTypeError test."""
    return msg


async def aplain(msg: Any) -> Any:
    """Not a generator (a coroutine function): for the HandlerTypeError test."""
    await asyncio.sleep(0)
    return msg


def nones(msg: Any) -> Any:
    """Yields None items (None is an ordinary value)."""
    yield None
    yield 1
    yield None


async def anones(msg: Any) -> Any:
    yield None
    yield 1
    yield None
