"""Handlers run inside kameo worker processes.

The test process may also import this module (for ``MyError``), so it must have
no side effects at import time.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import os
import sys
import time
from typing import Any

NOT_CALLABLE = 42

_SEQ = itertools.count()
_running = 0
_max_running = 0


class MyError(Exception):
    """A custom exception type raised by a handler."""


def echo(msg: Any) -> Any:
    return msg


async def aecho(msg: Any) -> Any:
    await asyncio.sleep(0)
    return msg


def whoami(msg: Any) -> dict:
    return {"pid": os.getpid(), "msg": msg}


def seq(msg: Any) -> list:
    """Return a worker-side sequence number along with the message."""
    return [next(_SEQ), msg]


def raise_value_error(msg: Any) -> Any:
    raise ValueError(f"bad value {msg!r}")


def raise_key_error(msg: Any) -> Any:
    return {}[msg]


def raise_custom(msg: Any) -> Any:
    raise MyError(f"custom failure {msg}")


def cmd(msg: dict) -> Any:
    """Synchronous multi-purpose handler: ``msg["op"]`` selects the behaviour."""
    op = msg["op"]
    if op == "echo":
        return msg.get("value")
    if op == "pid":
        return os.getpid()
    if op == "sleep":
        if msg.get("started"):  # a file the test waits for: the handler is running
            with open(msg["started"], "w") as f:
                f.write(str(os.getpid()))
        time.sleep(msg["seconds"])
        return msg.get("value", os.getpid())
    if op == "env":
        return os.environ.get(msg["name"])
    if op == "cwd":
        return os.getcwd()
    if op == "read_file":
        with open(msg["path"], "rb") as f:
            return f.read()
    if op == "stderr":
        print(msg["text"], file=sys.stderr, flush=True)
        return "printed"
    if op == "big":
        return b"x" * msg["n"]
    if op == "unserializable":
        return {"ok": [1, object()]}
    if op == "exit":
        print(msg.get("text", ""), file=sys.stderr, flush=True)
        os._exit(msg["code"])
    raise ValueError(f"unknown op {op!r}")


async def track(msg: dict) -> dict:
    """Async handler recording how many invocations run concurrently in this worker."""
    global _running, _max_running
    _running += 1
    _max_running = max(_max_running, _running)
    try:
        await asyncio.sleep(msg.get("seconds", 0.2))
        return {"pid": os.getpid(), "max_running": _max_running, "value": msg.get("value")}
    finally:
        _running -= 1


_mark: contextvars.ContextVar[int | None] = contextvars.ContextVar("mark", default=None)


async def task_probe(msg: dict) -> dict:
    """What an async handler sees from its first line on (handlers start eagerly): its own task,
    a context of its own, and asyncio.timeout()/TaskGroup working; odd ``i`` wait a little."""
    before = _mark.get()
    _mark.set(msg["i"])
    task = asyncio.current_task()
    async with asyncio.timeout(10):
        if msg["i"] % 2:
            async with asyncio.TaskGroup() as group:
                group.create_task(asyncio.sleep(0.001))
    return {
        "before": before,
        "in_task": task is not None,
        "same_task": asyncio.current_task() is task,
        "mark": _mark.get() == msg["i"],
    }
