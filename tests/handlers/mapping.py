"""Targets of the map tests (tests/test_map.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

MARKS = os.environ.get("KAMEO_TEST_MARKS", "")


def square(x: int) -> int:
    return x * x


async def async_square(x: int) -> int:
    await asyncio.sleep(0)
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def check(x: int) -> int:
    """Raises ValueError for negative numbers."""
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


def slow_mark(x: int) -> int:
    """Sleeps 50 ms, then appends ``x`` to the MARKS file: which items ran."""
    time.sleep(0.05)
    with open(MARKS, "a") as f:
        f.write(f"{x}\n")
    return x


def die_on(x: int) -> int:
    """Kills its worker on 13 (SIGKILL), else returns ``x``."""
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid(_: Any) -> int:
    return os.getpid()


def handler(x: int) -> int:
    """A pool handler: the map over it needs no fn."""
    return x + 1000


def lock(_: Any) -> Any:
    """A result the codec cannot encode (it comes back as a Ref)."""
    import threading

    return threading.Lock()
