"""Handlers for crates/kameo-host/tests/host.rs, run inside kameo workers started by the Rust
host (each pool's target is ``hostw:<function>``; the tests put this directory on PYTHONPATH).

``call([name, arg])`` and ``stream([name, arg])`` dispatch to the function ``name``, for a pool
that needs several behaviours behind one target.

The callbacks used here are served by the Rust test: ``trading.DataFetch`` answers
``{"symbol": s}`` with ticks ``{"symbol": s, "price": p}`` (or an error) chosen by the symbol.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import kameo


def echo(x: Any) -> Any:
    return x


def add(msg: dict) -> Any:
    return msg["a"] + msg["b"]


def fail(msg: Any) -> Any:
    raise ValueError(msg)


def sleep(s: float) -> float:
    time.sleep(s)
    return s


async def asleep(s: float) -> float:
    await asyncio.sleep(s)
    return s


def count(n: int) -> Iterator[int]:
    yield from range(n)


def endless(path: str) -> Iterator[int]:
    """Yields forever; its finally writes ``path`` (the cancel reached the worker)."""
    i = 0
    try:
        while True:
            yield i
            i += 1
    finally:
        with open(path, "w") as f:
            f.write(f"finally {os.getpid()}\n")


def sleep_marked(msg: list) -> float:
    """Writes ``path`` (the call started in this worker: its pid), then sleeps ``s``."""
    path, s = msg
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(s)
    return s


def whoami(x: Any) -> list:
    time.sleep(0.01)
    return [os.getpid(), x]


def count_then_fail(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError(f"failed after {n} items")


def trace_gen(n: int) -> Iterator[Any]:
    for _ in range(n):
        yield kameo.current_traceparent()


def die(code: int) -> None:
    os._exit(code)


def blobs(sizes: list) -> list:
    """One ``bytes`` of each size, byte ``i`` being ``i % 256``."""
    return [bytes(range(256)) * (n // 256) + bytes(range(n % 256)) for n in sizes]


def big_items(msg: list) -> Iterator[bytes]:
    """``n`` items of ``size`` bytes, item ``i`` all ``i % 256``."""
    n, size = msg
    for i in range(n):
        yield bytes([i % 256]) * size


def pid(_msg: Any) -> int:
    return os.getpid()


def fetch(sym: str) -> list:
    return [t["price"] for t in kameo.trading.DataFetch({"symbol": sym})]


async def afetch(sym: str) -> list:
    return [t["price"] async for t in kameo.trading.DataFetch({"symbol": sym})]


def fetch_first(sym: str) -> Any:
    """Stops iterating the callback after its first tick (the host's stream is dropped)."""
    first = None
    for t in kameo.trading.DataFetch({"symbol": sym}):
        first = t
        break
    return first


def fetch_error(sym: str) -> dict:
    """Calls a callback the host answers with an error: what the worker caught."""
    try:
        items = list(kameo.trading.DataFetch({"symbol": sym}))
    except Exception as e:
        return {
            "type": type(e).__name__,
            "is_value_error": isinstance(e, ValueError),
            "is_remote_error": isinstance(e, kameo.RemoteError),
            "mro": [c.__name__ for c in type(e).__mro__],
            "message": str(e),
        }
    return {"type": None, "items": items}


def traceparent(_msg: Any) -> Any:
    return kameo.current_traceparent()


def stderr_then_die(_msg: Any) -> None:
    for i in range(3):
        print(f"hostw stderr line {i}", file=sys.stderr, flush=True)
    print("hostw: about to exit with code 7", file=sys.stderr, flush=True)
    os._exit(7)


def spawn_child(path: str) -> None:
    """Starts a grandchild (``sleep 1000``), writes its pid to ``path``, then sleeps."""
    child = subprocess.Popen(["sleep", "1000"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(child.pid))
    os.replace(tmp, path)
    time.sleep(1000)


def call(msg: list) -> Any:
    name, arg = msg
    return globals()[name](arg)


def stream(msg: list) -> Iterator[Any]:
    name, arg = msg
    yield from globals()[name](arg)


async def acall(msg: list) -> Any:
    """``call`` for an async worker: coroutines are awaited (so a cancel reaches them), plain
    functions run in a thread (a sync callback iteration must not block the loop)."""
    name, arg = msg
    fn = globals()[name]
    if inspect.iscoroutinefunction(fn):
        return await fn(arg)
    return await asyncio.to_thread(fn, arg)
