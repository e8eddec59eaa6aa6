"""Run a coroutine's first step at once, as the first step of its Task.

The parent runs callback handlers this way, so that a handler that does not wait for anything
(most one-item callbacks) answers the worker from the event-loop callback that read the request
instead of one loop iteration later (measured: about a quarter of a callback round trip).
During that first step ``asyncio.current_task()`` is the Task that runs the rest of the handler,
so ``asyncio.timeout()``, ``TaskGroup`` and cancellation behave as in any task, and the handler
runs in the context it is given (a fresh copy of a base context per call: not the context of
whatever code happens to start it, such as another handler finishing).

Python 3.12 has this built in (``Task(..., eager_start=True)``). On 3.11, an :class:`EagerStarter`
keeps one idle *spare* Task waiting on a future: the first step runs with the spare entered as the
current task; if the coroutine finishes there, the spare stays idle for the next one, else the
spare is handed the suspended coroutine and drives it on (and a new spare is made).
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any

from kameo import _aio

__all__ = ["EagerStarter"]


class _Stepping:
    """How many eager first steps are running now (they nest inside whatever started them:
    an ask awaited there must not wait for its answer outside the loop, see Pool._wait_answer)."""

    depth = 0


stepping = _Stepping()


if sys.version_info >= (3, 12):

    class EagerStarter:
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop = loop

        def start(
            self, coro: Coroutine[Any, Any, None], context: contextvars.Context
        ) -> asyncio.Task[None] | None:
            """Run ``coro``'s first step now, in ``context``; a Task carries it on if it waits
            (returned), else it is finished (None)."""
            if asyncio.current_task(self.loop) is not None:
                return self.loop.create_task(coro, context=context)  # eager steps do not nest
            stepping.depth += 1
            try:
                task = asyncio.Task(coro, loop=self.loop, context=context, eager_start=True)
            finally:
                stepping.depth -= 1
            return None if task.done() else task

else:
    # Private asyncio state, read in _aio; all three exist on 3.11.
    _enter_task: Any = _aio.enter_task
    _leave_task: Any = _aio.leave_task
    _current_task = _aio.current_task

    class _Resume:
        """Drives a coroutine, in its own context, from where its first step stopped
        (``pending``: what it waits on); awaited by the Task that took it over."""

        __slots__ = ("coro", "ctx", "pending", "throw_first")

        def __init__(
            self, coro: Coroutine[Any, Any, None], ctx: contextvars.Context, pending: Any
        ) -> None:
            self.coro, self.ctx, self.pending = coro, ctx, pending
            self.throw_first: BaseException | None = None

        def __await__(self) -> Generator[Any, Any, None]:
            coro, run = self.coro, self.ctx.run
            pending, exc = self.pending, self.throw_first
            self.pending = self.throw_first = None
            if exc is not None and isinstance(pending, asyncio.Future):
                pending.cancel()  # cancelled before taking over: what a Task does to its waiter
            while True:
                if exc is None:
                    try:
                        yield pending  # the Task waits on it, then steps us (send None)
                    except BaseException as thrown:  # cancellation, thrown in where it waits
                        exc = thrown
                try:
                    pending = run(coro.send, None) if exc is None else run(coro.throw, exc)
                except StopIteration:
                    return
                exc = None

    class _Driver(collections.abc.Coroutine):  # type: ignore[type-arg]
        """The spare Task's coroutine: waits to be handed a suspended coroutine, then drives it.
        A class rather than ``async def`` so that a cancellation arriving before the Task's
        first step still reaches the handed-over coroutine."""

        __slots__ = ("handoff", "inner")

        def __init__(self, handoff: asyncio.Future[_Resume] | None, resume: _Resume | None):
            self.handoff = handoff
            self.inner = None if resume is None else resume.__await__()

        def _take(self, exc: BaseException | None) -> bool:
            """Start driving the handed-over coroutine, if there is one yet."""
            handoff = self.handoff
            if handoff is None or not handoff.done() or handoff.cancelled():
                return False
            resume = handoff.result()
            resume.throw_first = exc
            self.inner, self.handoff = resume.__await__(), None
            return True

        def send(self, value: Any) -> Any:
            if self.inner is None and not self._take(None):
                assert self.handoff is not None
                return _aio.wait_on(self.handoff)  # wait for it, as `await` does
            assert self.inner is not None
            return self.inner.send(value)

        def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
            exc = typ if val is None else val
            if self.inner is None:
                if not self._take(exc):
                    raise exc  # cancelled while idle: nothing to drive
                assert self.inner is not None
                return self.inner.send(None)
            return self.inner.throw(exc)

        def close(self) -> None:
            if self.inner is not None:
                self.inner.close()

        def __await__(self) -> Generator[Any, Any, None]:
            raise TypeError("driven by its Task only")

    class EagerStarter:
        """Runs first steps with an idle spare Task as the current task (Python 3.11)."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop = loop
            self.spare: asyncio.Task[None] | None = None
            self.handoff: asyncio.Future[_Resume] | None = None

        def start(
            self, coro: Coroutine[Any, Any, None], context: contextvars.Context
        ) -> asyncio.Task[None] | None:
            """Run ``coro``'s first step now, in ``context``; a Task carries it on if it waits
            (returned), else it is finished (None)."""
            loop = self.loop
            if _current_task(loop) is not None:
                return loop.create_task(coro, context=context)  # eager steps do not nest
            spare, handoff = self.spare, self.handoff
            if spare is None or handoff is None or handoff.done():  # none yet, or cancelled
                handoff = self.handoff = loop.create_future()
                spare = self.spare = loop.create_task(_Driver(handoff, None))
            _enter_task(loop, spare)
            stepping.depth += 1
            try:
                pending = context.run(coro.send, None)
            except StopIteration:
                return None
            except BaseException:
                coro.close()
                raise
            finally:
                stepping.depth -= 1
                _leave_task(loop, spare)
            # It waits: the spare drives it on, and the next first step gets a new spare.
            self.spare = self.handoff = None
            resume = _Resume(coro, context, pending)
            if handoff.done():  # the first step cancelled its own task: deliver that
                resume.throw_first = asyncio.CancelledError()
                return loop.create_task(_Driver(None, resume))
            handoff.set_result(resume)
            return spare
