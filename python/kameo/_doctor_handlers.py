"""Worker side of ``kameo doctor`` (:mod:`kameo._doctor`): the tiny handlers its 1-worker pool
runs. Imported only in that pool's worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kameo

__all__ = ["PING", "call_parent", "count", "echo"]

#: The parent handler :func:`call_parent` calls (registered by the doctor's pool).
PING = "doctor.Ping"


def echo(msg: Any) -> Any:
    """The pool's handler: ``pool.ask(x)`` answers ``x``."""
    return msg


def count(n: int) -> Iterator[int]:
    """``0 .. n-1``, one item at a time (``pool.call_stream``)."""
    yield from range(n)


def call_parent(n: int) -> list[float]:
    """Call the parent's :data:`PING` handler ``n`` times with ``0 .. n-1``; the seconds each
    round trip took, measured here (worker to parent and back). Raises if an answer is not
    the value sent."""
    seconds = []
    for i in range(n):
        started = time.perf_counter()
        items = list(kameo.callback_handle(PING, i))
        seconds.append(time.perf_counter() - started)
        if items != [i]:
            raise ValueError(f"the parent's {PING} answered {items!r} to {i!r}, not [{i!r}]")
    return seconds
