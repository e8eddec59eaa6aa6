"""Targets of tests/test_calls_semantics.py: what a called function sees (traceparent, session),
callbacks into the parent from functions and methods, markers for cancellation and freeing.

The callbacks used here are registered by the tests: ``trading.DataFetch`` (a stream of
``{"price": ...}``), ``calc.Double`` (one item), ``feed.Endless`` (endless) and, for the
traceparent tests, ``fan.Calls`` and ``trace.Probe``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import kameo


def mark(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text + "\n")


# ----------------------------------------------------------------------------- traceparent


def trace() -> str | None:
    return kameo.current_traceparent()


async def atrace() -> str | None:
    await asyncio.sleep(0)
    return kameo.current_traceparent()


def trace_gen(n: int) -> Iterator[str | None]:
    for _ in range(n):
        yield kameo.current_traceparent()


async def atrace_gen(n: int) -> AsyncIterator[str | None]:
    for _ in range(n):
        await asyncio.sleep(0)
        yield kameo.current_traceparent()


def trace_of_callback() -> Any:
    """The traceparent the parent handler ``trace.Probe`` sees for this function's callback."""
    return list(kameo.trace.Probe(None))


def ask_parent(_msg: Any) -> Any:
    """A handler that runs the parent handler ``fan.Calls`` and answers with its items."""
    return list(kameo.fan.Calls(None))


class Tracer:
    def trace(self) -> str | None:
        return kameo.current_traceparent()

    async def atrace(self) -> str | None:
        await asyncio.sleep(0)
        return kameo.current_traceparent()


# ----------------------------------------------------------------------------- callbacks


def prices(symbol: str) -> list[float]:
    """A sync function iterating a streaming callback with ``for``."""
    return [t["price"] for t in kameo.trading.DataFetch({"symbol": symbol})]


async def aprices(symbol: str) -> list[float]:
    """An async function iterating a streaming callback with ``async for``."""
    return [t["price"] async for t in kameo.trading.DataFetch({"symbol": symbol})]


def double(x: int) -> Any:
    """A one-item callback, its result used."""
    (answer,) = kameo.calc.Double(x)
    return answer + 1


def price_stream(symbol: str) -> Iterator[float]:
    """A generator (call_stream) that makes a callback while it streams."""
    for t in kameo.trading.DataFetch({"symbol": symbol}):
        yield t["price"]


class Quoter:
    def __init__(self, symbol: str) -> None:
        self.symbol = symbol

    def prices(self) -> list[float]:
        return [t["price"] for t in kameo.trading.DataFetch({"symbol": self.symbol})]

    async def aprices(self) -> list[float]:
        return [t["price"] async for t in kameo.trading.DataFetch({"symbol": self.symbol})]


# ----------------------------------------------------------------------------- cancellation


async def await_forever(path: str) -> None:
    """Writes "started", then waits until cancelled; its finally writes "finally"."""
    mark(path, "started")
    try:
        await asyncio.sleep(3600)
    finally:
        mark(path, "finally")


def drain_feed(path: str) -> int:
    """A sync function waiting on the endless callback ``feed.Endless`` (where a sync function
    sees its cancellation); its finally writes "finally"."""
    mark(path, "started")
    n = 0
    try:
        for _ in kameo.feed.Endless(None):
            n += 1
    finally:
        mark(path, "finally")
    return n


class Waiter:
    async def wait(self, path: str) -> None:
        await await_forever(path)

    def drain(self, path: str) -> int:
        return drain_feed(path)


def sleep(seconds: float) -> str:
    """Cannot be interrupted."""
    time.sleep(seconds)
    return "slept"


# ----------------------------------------------------------------------------- objects


class Box:
    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value

    def pid(self) -> int:
        return os.getpid()


class Noisy:
    """Writes "freed" to ``path`` when the worker drops it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __del__(self) -> None:
        mark(self.path, "freed")


def crash_once_with(_obj: Any, path: str) -> int:
    """Dies (SIGKILL) the first time, answers its pid the second (its first argument: a Ref's
    live object, which pins the call to that Ref's worker)."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("x")
        os.kill(os.getpid(), 9)
    return os.getpid()


def crash_once(path: str) -> int:
    return crash_once_with(None, path)


# ----------------------------------------------------------------------------- start-up


SLOW_START = os.environ.get("KAMEO_TEST_SLOW_START", "")
INIT_SEEN: list[str] = []


def slow_start() -> None:
    """Init hook: takes 2 s once the file named by $KAMEO_TEST_SLOW_START exists (so that
    a replacement worker is still starting while the test looks)."""
    if SLOW_START and os.path.exists(SLOW_START):
        time.sleep(2.0)


def init_hook() -> None:
    INIT_SEEN.append("init")


class InitAdapter:
    """An adapter class target: built once per worker, after the init hook."""

    def __init__(self) -> None:
        self.seen_at_init = list(INIT_SEEN)

    def seen(self) -> list[str]:
        return self.seen_at_init

    async def apredict(self, x: int) -> int:
        await asyncio.sleep(0)
        return x * 3

    async def astream(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            await asyncio.sleep(0)
            yield i
