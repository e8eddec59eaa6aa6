"""Sync handlers run in a worker's handler threads (``max_concurrency > 1``)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

_meet = threading.Barrier(2)


def gil_enabled() -> bool:
    is_enabled = getattr(sys, "_is_gil_enabled", None)
    return True if is_enabled is None else bool(is_enabled())


def spin_and_meet(req: dict[str, Any]) -> dict[str, Any]:
    """CPU-bound work on both sides of a barrier that two requests must reach together (it
    breaks after ``wait`` seconds, so one request alone fails instead of hanging)."""
    n = req["n"]
    total = 0
    for i in range(n):
        total += i * i
    _meet.wait(timeout=req.get("wait", 20))
    for i in range(n):
        total -= i * i
    return {"thread": threading.get_ident(), "gil": gil_enabled(), "total": total}


def spin(n: int) -> int:
    """Pure-Python CPU work: ``n`` multiply-adds."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def where(_: Any) -> dict[str, Any]:
    return {
        "gil": gil_enabled(),
        "free_threaded_build": bool(_config("Py_GIL_DISABLED")),
        "time": time.monotonic(),
    }


def _config(name: str) -> Any:
    import sysconfig

    return sysconfig.get_config_var(name)
