"""`Stream`: the async iterator returned by ``Pool.stream()``."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

from kameo.errors import CallTimeout

__all__ = ["Stream"]


def _expire(fut: asyncio.Future[None], timeout: float | None) -> None:
    if not fut.done():
        fut.set_exception(CallTimeout(f"stream did not finish within timeout={timeout}s"))


class Stream:
    """Items of one generator call, as the worker yields them.

    The request is sent on the first ``__anext__``. Leaving the loop early (``break``, an
    exception, task cancellation, ``aclose()``, or the timeout) cancels the generator in the
    worker, whose ``finally`` runs. Use ``async with pool.stream(msg) as s:`` to make the
    cancellation immediate even while other references to the stream exist.
    """

    __slots__ = (
        "_buf",
        "_core",
        "_deadline",
        "_done",
        "_loop",
        "_msg",
        "_on_abandon",
        "_on_end",
        "_rid",
        "_submit",
        "_timeout",
        "_trace",
    )

    def __init__(
        self,
        core: Any,
        loop: asyncio.AbstractEventLoop,
        on_abandon: Callable[[bool], None],
        msg: Any,
        timeout: float | None,
        trace: str | None,
        submit: Callable[[Any, str | None], int] | None = None,
        on_end: Callable[[int, BaseException | None], None] | None = None,
    ) -> None:
        """Made by ``Pool.stream``: ``core`` is the pool's ``PoolCore`` (which submits the
        request and buffers its items), ``on_abandon(timed_out)`` counts a stream the caller
        left before its end (cancelled, or timed out). ``submit(msg, trace)`` sends the request
        and returns its id (default: ``core.submit_stream``, the handler's stream; calls give
        their own). ``on_end(id, exc)`` (while someone listens to the pool's events) is called
        once when a submitted stream ends: ``exc`` None at its end, else what ended it."""
        self._core = core
        self._submit = submit if submit is not None else core.submit_stream
        self._on_abandon = on_abandon
        self._loop = loop
        self._msg = msg
        self._timeout = timeout
        self._trace = trace
        self._rid = 0
        self._buf: deque[Any] = deque()
        self._done = False
        self._deadline: float | None = None
        self._on_end = on_end

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        buf = self._buf
        if buf:
            if self._deadline is not None and self._loop.time() >= self._deadline:
                self._expired()
            return buf.popleft()
        if self._done:
            raise StopAsyncIteration
        core = self._core
        if not self._rid:
            self._rid = self._submit(self._msg, self._trace)
            self._msg = None
            if self._timeout is not None:
                self._deadline = self._loop.time() + self._timeout
        rid = self._rid
        while True:
            try:
                items, finished = core.stream_take(rid)
            except BaseException as exc:
                self._done = True
                if self._on_end is not None:
                    self._ended(exc)
                raise
            if items:
                if self._deadline is not None and self._loop.time() >= self._deadline:
                    self._expired()
                buf.extend(items)
                return buf.popleft()
            if finished:
                self._done = True
                if self._on_end is not None:
                    self._ended(None)
                raise StopAsyncIteration
            fut = self._loop.create_future()
            core.stream_wait(rid, fut)
            handle = None
            if self._deadline is not None:
                remaining = self._deadline - self._loop.time()
                handle = self._loop.call_later(max(remaining, 0), _expire, fut, self._timeout)
            try:
                await fut
            except BaseException as exc:  # cancellation or timeout: stop it in the worker
                self._cancel(timed_out=isinstance(exc, CallTimeout))
                raise
            finally:
                if handle is not None:
                    handle.cancel()

    def _expired(self) -> None:
        self._cancel(timed_out=True)
        raise CallTimeout(f"stream did not finish within timeout={self._timeout}s")

    def _cancel(self, timed_out: bool = False) -> None:
        if not self._done:
            self._done = True
            self._buf.clear()
            if self._rid:
                self._on_abandon(timed_out)
                self._core.stream_cancel(self._rid)
                if self._on_end is not None:
                    self._ended(
                        CallTimeout("the stream timed out")
                        if timed_out
                        else asyncio.CancelledError()
                    )

    def _ended(self, exc: BaseException | None) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self._rid, exc)

    async def aclose(self) -> None:
        """Stop the stream; the worker's generator is cancelled if it is still running."""
        self._cancel()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._cancel()

    def __del__(self) -> None:
        if not self._done and self._rid:
            with contextlib.suppress(Exception):  # the loop or pool is gone
                self._cancel()
