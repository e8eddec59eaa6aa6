"""Functions for the Executor tests (tests/test_executor.py), sent by reference."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

MARKS = os.environ.get("KAMEO_TEST_MARKS", "")
_state: dict[str, Any] = {}


def add(a: int, b: int = 0) -> int:
    return a + b


def fail(msg: str) -> None:
    raise ValueError(msg)


def check(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative: {x}")
    return x


class Odd(Exception):
    """A custom exception the parent can import."""


def fail_odd(x: int) -> int:
    if x % 2:
        raise Odd(f"odd: {x}")
    return x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def mark(x: Any) -> Any:
    """Appends ``x`` to the MARKS file (which calls ran), after 50 ms."""
    time.sleep(0.05)
    with open(MARKS, "a") as f:
        f.write(f"{x}\n")
    return x


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def pid() -> int:
    return os.getpid()


def setup(value: Any, *more: Any) -> None:
    """An initializer with arguments."""
    _state["init"] = (value, *more)


def init_state() -> Any:
    return _state.get("init")


def die_on(x: int) -> int:
    """Kills its worker on 13."""
    if x == 13:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
