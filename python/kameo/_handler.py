"""Running handlers by kind, and producer credit: shared by both sides.

Both the worker's async server (requests) and the parent's :class:`~kameo.callbacks.CallbackRunner`
(callback handlers) run user handlers of four kinds (:func:`handler_kind`):

* ``async``: awaited on the event loop, ``sync``: run in one of the :class:`Threads`, so that a
  handler blocking on I/O never stalls the loop. Their one answer is sent by the caller (each
  side has its own frame for it), awaited inline so that the fast path has no extra coroutine.
* ``asyncgen`` and ``gen``: a stream of items, driven by :func:`produce` (a ``gen``'s steps run
  in the :class:`Threads`), each item put through a :class:`Flow`: the producer's credit, which
  makes it wait once the consumer's window is full.
"""

from __future__ import annotations

import contextvars
import os
import types

from kameo._lean import suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Generator
    from typing import Any

__all__ = ["ASYNC", "ASYNCGEN", "GEN", "NONE", "SYNC", "Flow", "Threads", "handler_kind", "produce"]

SYNC = "sync"
ASYNC = "async"
GEN = "gen"
ASYNCGEN = "asyncgen"
#: A worker with no handler to ask (a pool without target, an adapter class without __call__).
NONE = "none"

#: A paced producer (:class:`Flow` with ``flush_soon``) writes at once and lets the loop run
#: every this many items; in between, its items go out within one loop iteration.
PACE_EVERY = 64


def handler_kind(fn: Callable[..., Any]) -> str:
    """'asyncgen', 'async', 'gen' or 'sync' (callable objects are judged by ``__call__``)."""
    flags = _plain_code_flags(fn)
    if flags is None:  # not a plain function, method or builtin: inspect knows the others
        import inspect

        call = fn if inspect.isroutine(fn) else getattr(fn, "__call__", fn)  # noqa: B004
        if inspect.isasyncgenfunction(call):
            return ASYNCGEN
        if inspect.iscoroutinefunction(call):
            return ASYNC
        return GEN if inspect.isgeneratorfunction(call) else SYNC
    if flags & CO_ASYNC_GENERATOR:
        return ASYNCGEN
    if flags & CO_COROUTINE:
        return ASYNC
    return GEN if flags & CO_GENERATOR else SYNC


#: Code flags (``inspect.CO_*``, the same on every CPython), read by :func:`handler_kind` so
#: that a worker need not import inspect (5 ms, with ast, dis and tokenize) for its handler.
CO_GENERATOR = 0x20
CO_COROUTINE = 0x80
CO_ASYNC_GENERATOR = 0x200


def _plain_code_flags(fn: object) -> int | None:
    """The code flags of a plain function or of a method of one, 0 for a builtin (what inspect
    would judge from them); None for anything else, and for a function marked by
    ``inspect.markcoroutinefunction``."""
    if type(fn) is types.MethodType:
        fn = fn.__func__
    if type(fn) is types.FunctionType:
        return None if hasattr(fn, "_is_coroutine_marker") else fn.__code__.co_flags
    if type(fn) is types.BuiltinFunctionType:
        return 0
    return None


# ------------------------------------------------------------------------------ threads

#: ``done(token, ok, value)``: called on the loop with the result of a job (``ok``) or the
#: exception it raised.
if TYPE_CHECKING:
    Done = Callable[[Any, bool, Any], object]
    _Job = tuple[contextvars.Context, Callable[[Any], Any], Any, Done, Any]


class Threads:
    """Threads that run sync handlers (and generator steps) off the event loop.

    Cheaper than ``loop.run_in_executor``: a job goes one way through a ``SimpleQueue`` and its
    result comes back with one ``call_soon_threadsafe``, with no ``concurrent.futures.Future``
    and no future chain (measured: about a third of the round trip of ``run_in_executor``).
    Threads start when a job finds none idle, up to ``max_threads``; they are daemon threads,
    and :meth:`close` lets them go once they are idle. One instance is not reused after
    :meth:`close`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int, name: str) -> None:
        self.loop = loop
        self.max_threads = max(1, max_threads)
        self.name = name
        import queue  # here: a sync worker runs no handler threads
        import threading

        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.thread = threading.Thread
        self.started = 0
        self.idle = 0  # threads waiting for a job that no submitted job has claimed yet

    def submit(
        self,
        ctx: contextvars.Context,
        fn: Callable[[Any], Any],
        arg: Any,
        done: Done,
        token: Any,
    ) -> None:
        """Run ``ctx.run(fn, arg)`` in a thread, then ``done(token, ok, value)`` on the loop."""
        self.jobs.put((ctx, fn, arg, done, token))
        with self.lock:
            if self.idle:
                self.idle -= 1  # that thread takes it
                return
            if self.started >= self.max_threads:
                return  # the next thread to finish takes it
            self.started = n = self.started + 1
        self.thread(target=self._work, name=f"{self.name}-{n}", daemon=True).start()

    def call(
        self, ctx: contextvars.Context, fn: Callable[[Any], Any], arg: Any
    ) -> asyncio.Future[Any]:
        """``ctx.run(fn, arg)`` in a thread, as a future of the loop."""
        fut = self.loop.create_future()
        self.submit(ctx, fn, arg, _settle, fut)
        return fut

    def close(self) -> None:
        """Let the threads go: idle ones at once, busy ones after their job."""
        with self.lock:
            n, self.started = self.started, self.max_threads  # nothing starts after this
        for _ in range(n):
            self.jobs.put(None)

    def _work(self) -> None:
        get = self.jobs.get
        call_soon = self.loop.call_soon_threadsafe
        lock = self.lock
        while True:
            job = get()
            if job is None:
                return
            ctx, fn, arg, done, token = job
            job = None
            try:
                value, ok = ctx.run(fn, arg), True
            except BaseException as exc:
                value, ok = exc, False
            try:
                call_soon(done, token, ok, value)
            except RuntimeError:  # the loop is closed: nobody waits for anything
                return
            # Hold nothing while idle: the job's data may hold shared-memory mappings.
            ctx = fn = arg = done = token = value = None  # type: ignore[assignment]
            with lock:
                self.idle += 1


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    elif isinstance(value, StopIteration):  # a future refuses it
        err = RuntimeError(f"the handler raised StopIteration: {value!r}")
        err.__cause__ = value
        fut.set_exception(err)
    else:
        fut.set_exception(value)


def default_threads() -> int:
    """As many threads as the default executor of asyncio would have."""
    return min(32, (os.cpu_count() or 1) + 4)


# ------------------------------------------------------------------------------ credit


class Flow:
    """A producer's credit for one stream: how many more items the consumer has room for.

    ``put`` sends an item and waits, once the window is used up, until :meth:`grant` (the
    consumer's CREDIT) gives more; the event it waits on is made only when it has to wait.
    With ``flush_soon`` (the worker, whose items are queued until a flush) the items are paced:
    flushed within one loop iteration, and every :data:`PACE_EVERY` items at once, with a turn
    of the loop so that CANCEL and CREDIT are read.
    """

    __slots__ = ("credit", "event", "flush", "flush_soon", "send", "sent", "task")

    def __init__(
        self,
        send: Callable[[Any], object],
        credit: int,
        flush: Callable[[], object] | None = None,
        flush_soon: Callable[[], object] | None = None,
    ) -> None:
        self.send = send
        self.credit = credit
        self.flush = flush
        self.flush_soon = flush_soon
        self.sent = 0
        self.event: asyncio.Event | None = None
        #: The Task that runs the producer, for its owner to cancel (parent callbacks).
        self.task: asyncio.Task[None] | None = None

    def grant(self, n: int) -> None:
        self.credit += n
        if self.event is not None:
            self.event.set()

    async def put(self, item: Any) -> None:
        self.send(item)
        self.credit -= 1
        flush_soon = self.flush_soon
        if flush_soon is not None:
            self.sent = sent = self.sent + 1
            if sent % PACE_EVERY == 0:
                import asyncio  # imported by then: a paced flow runs on a loop

                self.flush()  # type: ignore[misc]
                await asyncio.sleep(0)  # let the reader see CANCEL and CREDIT
            else:
                flush_soon()
        while self.credit <= 0:
            if self.flush is not None:
                self.flush()
            event = self.event
            if event is None:
                import asyncio  # imported by then: a flow waits on a loop

                event = self.event = asyncio.Event()
            event.clear()
            await event.wait()


_DONE: Any = object()


def _next(gen: Generator[Any, Any, Any]) -> Any:
    return next(gen, _DONE)


def _close(gen: Generator[Any, Any, Any]) -> None:
    gen.close()


async def produce(
    fn: Callable[[Any], Any], kind: str, data: Any, flow: Flow, threads: Threads | None
) -> None:
    """Run a generator handler (``asyncgen`` on the loop, a ``gen`` step by step in
    ``threads``), putting each item through ``flow``; the generator is closed (its ``finally``
    runs) however this ends. The caller sends END or the error."""
    if kind == ASYNCGEN:
        agen = fn(data)
        import contextlib  # the async server's loop has imported it

        async with contextlib.aclosing(agen):
            async for item in agen:
                await flow.put(item)
        return
    assert threads is not None, "a sync generator's steps need threads"
    ctx = contextvars.copy_context()
    gen = ctx.run(fn, data)  # a generator function: its body does not run yet
    try:
        while True:
            item = await threads.call(ctx, _next, gen)
            if item is _DONE:
                break
            await flow.put(item)
    finally:
        # In a thread: its finally may block. If a step still runs (cancelled while waiting
        # for it), the generator cannot be closed now; it is closed when collected.
        with suppress(ValueError):
            await threads.call(ctx, _close, gen)
