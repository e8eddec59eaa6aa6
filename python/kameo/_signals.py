"""SIGTERM to the parent closes every pool cleanly before the process goes.

While at least one pool runs on the main thread's event loop and SIGTERM still has its default
action, kameo installs a loop handler: it closes all live pools (bounded), then restores the
default action and re-raises SIGTERM, so the process ends exactly as it would have, minus the
orphaned work. SIGINT needs nothing: ``asyncio.run`` turns it into cancellation, and ``async
with Pool`` closes the pool on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from typing import Any

_installed: asyncio.AbstractEventLoop | None = None
_users = 0
CLOSE_BOUND = 5.0


def acquire(loop: asyncio.AbstractEventLoop, pools: Any) -> None:
    """A pool started on ``loop``; ``pools`` yields the live pools to close on SIGTERM."""
    global _installed, _users
    _users += 1
    if _installed is not None or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return  # the application handles SIGTERM itself
    try:
        loop.add_signal_handler(signal.SIGTERM, _on_sigterm, loop, pools)
    except (NotImplementedError, RuntimeError, ValueError):
        return
    _installed = loop


def release() -> None:
    global _installed, _users
    _users = max(0, _users - 1)
    if _users == 0 and _installed is not None:
        with contextlib.suppress(Exception):
            _installed.remove_signal_handler(signal.SIGTERM)
        _installed = None


def _on_sigterm(loop: asyncio.AbstractEventLoop, pools: Any) -> None:
    async def close_all() -> None:
        live = list(pools())
        if live:
            await asyncio.wait(
                [loop.create_task(p.close(grace=1.0)) for p in live], timeout=CLOSE_BOUND
            )
        release()
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    loop.create_task(close_all())
