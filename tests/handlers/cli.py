"""Targets of the command-line tests (tests/test_cli.py): ``kameo map handlers.cli:<name>``."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

NOT_CALLABLE = 3


def double(record: dict[str, Any]) -> dict[str, Any]:
    return {"i": record["i"], "y": record["i"] * 2}


def uneven(record: dict[str, Any]) -> dict[str, Any]:
    """Early lines take longer than later ones: answers finish out of input order."""
    i = record["i"]
    time.sleep(0.03 if i % 5 == 0 else 0.0)
    return {"i": i}


def fail_on(record: dict[str, Any]) -> dict[str, Any]:
    """Raises ValueError for a record with ``"fail": true``."""
    if record.get("fail"):
        raise ValueError(f"refused record {record['i']}")
    return {"i": record["i"]}


def unserializable(record: dict[str, Any]) -> Any:
    """A set (JSON cannot encode it) for ``"bad": true``."""
    if record.get("bad"):
        return {1, 2}
    return record


def slow(record: dict[str, Any]) -> dict[str, Any]:
    """Sleeps ``sleep`` seconds (default 0.05); says which worker ran it."""
    time.sleep(record.get("sleep", 0.05))
    return {"i": record["i"], "pid": os.getpid()}


def crash_on(record: dict[str, Any]) -> dict[str, Any]:
    """The worker dies on a record with ``"crash": true``."""
    if record.get("crash"):
        os._exit(7)
    return {"i": record["i"]}


def noisy(record: Any) -> Any:
    """Prints to its stdout and to fd 1 (the worker inherits the command's stdout)."""
    print("noise from print")
    sys.stdout.flush()
    os.write(1, b"noise on fd 1\n")
    return record


async def async_double(record: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"i": record["i"], "y": record["i"] * 2}


def generator(record: Any) -> Any:
    yield record


def same(record: Any) -> Any:
    return record
