"""Targets of the dynamic-call tests (tests/test_remote.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

FINALLY_FILE = os.environ.get("KAMEO_TEST_FINALLY", "")


def pid() -> int:
    return os.getpid()


def pid_of(_obj: Any) -> int:
    """The pid of the worker the call ran on (its argument is a Ref's live object)."""
    return os.getpid()


def echo(x: Any) -> Any:
    return x


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0)
    return a + b


def gen(n: int) -> Iterator[int]:
    try:
        yield from range(n)
    finally:
        if FINALLY_FILE:
            with open(FINALLY_FILE, "a") as f:
                f.write("closed\n")


async def agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


async def agen_forever() -> AsyncIterator[int]:
    """Counts until closed; its finally writes to FINALLY_FILE."""
    try:
        i = 0
        while True:
            await asyncio.sleep(0)
            yield i
            i += 1
    finally:
        if FINALLY_FILE:
            with open(FINALLY_FILE, "a") as f:
                f.write("aclosed\n")


def async_iterable_of(n: int) -> AsyncIterator[int]:
    """A plain function that returns an async iterable."""
    return agen(n)


def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


def crash_once(path: str) -> int:
    """Dies (SIGKILL) the first time, answers its pid the second."""
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write("x")
        os.kill(os.getpid(), 9)
    return os.getpid()


def die() -> None:
    os._exit(7)


def lock() -> Any:
    return threading.Lock()  # cannot be encoded: comes back as a Ref


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class Box:
    def __init__(self, value: Any) -> None:
        self.value = value
        self.payload = bytearray(4096)

    def get(self) -> Any:
        return self.value

    async def aget(self) -> Any:
        await asyncio.sleep(0)
        return self.value


class Adapter:
    """An adapter class target: one instance per worker."""

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, x: int) -> int:
        self.calls += 1
        return x * 2

    def count(self) -> int:
        return self.calls

    def stream(self, n: int) -> Iterator[int]:
        yield from range(n)

    def __call__(self, msg: Any) -> Any:
        return ("called", msg)


class PlainAdapter:
    def predict(self, x: int) -> int:
        return x + 1


def session_info() -> tuple[Any, int]:
    """The session id the worker sees, and its pid."""
    import kameo

    return kameo.current_session(), os.getpid()


def remember(key: str, value: Any) -> None:
    import kameo

    kameo.session_state()[key] = value


def recall(key: str) -> Any:
    import kameo

    return kameo.session_state().get(key)


def handler(msg: Any) -> Any:
    """A handler for session asks: the session id with the message."""
    import kameo

    return (kameo.current_session(), msg)
