"""`AskFuture`: what ``Pool.ask`` returns.

An ask is a plain asyncio future resolved by the Rust core, not a coroutine: awaiting it, or
gathering thousands of them, costs no task per request. Cancelling it (directly, through the
awaiting task, ``asyncio.wait_for`` or ``gather``) cancels the request in the worker. It also
speaks the coroutine protocol, so ``asyncio.create_task(pool.ask(...))`` and
``TaskGroup.create_task`` accept it like the coroutine an ``async def ask`` would return.
"""

from __future__ import annotations

import asyncio
import collections.abc
from collections.abc import Callable, Generator
from typing import Any

from kameo._aio import wait_on

__all__ = ["AskFuture"]


class AskFuture(asyncio.Future[Any]):
    """The pending reply of one ``Pool.ask``."""

    # No __dict__ per ask. Pool.ask sets both once the request is submitted; a future that
    # failed before that is already done, so cancel() never reaches them unset.
    __slots__ = (
        "_kameo_abandon",
        "_kameo_keep",
        "_kameo_rid",
        "_kameo_span",
        "_kameo_timer",
        "_kameo_wait",
    )
    _kameo_abandon: Callable[[int], None] | None
    _kameo_rid: int
    # Pool.ask sets it on a submitted future: waits for the answer directly when the loop has
    # nothing else to do (see Pool._wait_answer).
    _kameo_wait: Callable[[AskFuture], bool] | None
    # The timeout's timer (Pool.ask with a timeout): the core cancels it with the answer.
    _kameo_timer: asyncio.TimerHandle | None
    # A call's arguments (pool.call and Ref methods): the Refs in them stay alive, so their
    # objects are not released in the worker before the call has run.
    _kameo_keep: Any
    # The OpenTelemetry client span of the request (set only when the pool traces: _otel).
    _kameo_span: Any

    def __await__(self) -> Generator[Any, None, Any]:
        if not self.done():
            # An ask awaited as soon as it is made usually finds the loop idle: wait for the
            # answer as the loop would, and resume without going round the loop.
            wait = self._kameo_wait
            # Again after each read that did not finish it: the worker's callbacks into the
            # parent are served here too, as long as nothing else needs the loop.
            while wait is not None and wait(self) and not self.done():
                pass
            if not self.done():
                return (yield from _future_await(self))  # wait through the loop
        return self.result()

    __iter__ = __await__

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        timer = getattr(self, "_kameo_timer", None)
        if timer is not None:
            timer.cancel()
        abandon = getattr(self, "_kameo_abandon", None)
        if abandon is not None:
            self._kameo_abandon = None
            abandon(self._kameo_rid)
        return True

    # The coroutine protocol, driven by a Task: yield this future until it is done.
    def send(self, value: Any) -> Any:
        if not self.done():
            return wait_on(self)
        raise StopIteration(self.result())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if isinstance(typ, asyncio.CancelledError) or (
            isinstance(typ, type) and issubclass(typ, asyncio.CancelledError)
        ):
            self.cancel()  # the task was cancelled before it awaited us: cancel the request
        if val is None:
            val = typ() if isinstance(typ, type) else typ
        if tb is not None:
            val = val.with_traceback(tb)
        raise val

    def close(self) -> None:
        pass


_future_await = asyncio.Future.__await__

collections.abc.Coroutine.register(AskFuture)
