"""A handler whose worker keeps more memory with every call (for max_memory_per_worker)."""

from __future__ import annotations

import os

MiB = 1 << 20

# Kept for the life of the worker: every call adds to it.
_HOARD: list[bytearray] = []


def _rss() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def grow(msg: dict) -> dict:
    """Keep ``msg["mib"]`` MiB more, every page touched; report the pid and RSS after."""
    buf = bytearray(msg["mib"] * MiB)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    _HOARD.append(buf)
    return {"pid": os.getpid(), "rss": _rss()}
