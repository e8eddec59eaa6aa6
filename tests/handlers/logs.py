"""Handlers that log (run inside kameo workers; tests/test_worker_logging.py)."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

app = logging.getLogger("kameo_test.app")
lib = logging.getLogger("kameo_test.lib.connectionpool")


def levels(msg: Any) -> dict[str, Any]:
    """Log at every level; say which levels this worker's loggers let through."""
    app.debug("debug %s", msg)
    app.info("info %s", msg)
    app.warning("warning %s", msg)
    lib.error("library error %s", msg)
    return {
        "app_debug": app.isEnabledFor(logging.DEBUG),
        "app_info": app.isEnabledFor(logging.INFO),
        "root": logging.getLogger().getEffectiveLevel(),
        "pid": os.getpid(),
    }


def failing(msg: Any) -> str:
    try:
        {}[msg]
    except KeyError:
        app.exception("lookup of %r failed", msg)
    app.warning("with a stack", stack_info=True)
    return "logged"


async def alog(msg: Any) -> str:
    """An async handler (the worker's event-loop mode) logging."""
    await asyncio.sleep(0)
    app.warning("async %s", msg)
    return "logged"


def burst(msg: dict[str, Any]) -> int:
    """Log ``n`` records as fast as possible, then create the file ``done`` (the test waits for
    it while its event loop reads nothing from this worker)."""
    for i in range(msg["n"]):
        app.warning("burst %d", i)
    if msg.get("done"):
        with open(msg["done"], "w") as f:
            f.write("done")
    return msg["n"]


def silent(msg: Any) -> Any:
    return msg
