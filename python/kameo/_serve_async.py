"""The worker's async server: async handlers, or sync ones with ``max_concurrency > 1``.

An asyncio loop drives the socket (``add_reader``), as the parent does. Requests start in the
order they arrive, at most ``max_concurrency`` at once: async handlers as tasks whose first step
runs at once (``_eager``: one that does not wait answers within the ``on_readable`` call that
read it, and the answers of a batch go out in one write), sync handlers in ``max_concurrency``
handler threads (``_handler.Threads``). Streams are produced and credited by ``_handler``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from kameo import _aio, _calls, _context, _eager, _error_info, _native
from kameo._eager import EagerStarter
from kameo._handler import ASYNC, ASYNCGEN, GEN, Flow, Threads, produce
from kameo._runtime import (
    CALL,
    CALL_STREAM,
    END,
    REQUEST,
    Channel,
    Request,
    Runtime,
    current_request,
    mismatch,
    no_handler,
    server_span,
    traceparent,
)

#: Longest wait for a callback's item outside the event loop (seconds); then the loop waits.
WAIT_HERE_MAX = 0.05


async def serve(
    rt: Runtime,
    handler: Callable[[Any], Any] | None,
    kind: str,
    target: str,
    max_concurrency: int,
    init: Callable[[], Any] | None,
    after_init: Callable[[], None],
) -> None:
    """Run the init hook (then ``after_init``), send READY and serve until SHUTDOWN or the
    parent goes away."""
    await AsyncServer(rt, handler, kind, target, max_concurrency).serve(init, after_init)


class AsyncServer:
    """The requests of one worker on the running event loop."""

    def __init__(
        self,
        rt: Runtime,
        handler: Callable[[Any], Any] | None,
        kind: str,
        target: str,
        max_concurrency: int,
    ) -> None:
        self.rt = rt
        self.chan = chan = rt.chan
        self.handler: Callable[[Any], Any] = handler if handler is not None else no_handler
        self.kind = kind
        self.target = target
        self.max_concurrency = max_concurrency
        self.loop = loop = asyncio.get_running_loop()
        self.thread: int | None = threading.get_ident()
        self.fd = chan.fileno()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.waiting: deque[Request] = deque()
        self.cancelled: set[int] = set()  # unused: a cancelled request's task is cancelled
        self.tasks: dict[int, asyncio.Task[None]] = {}  # requests that did not finish at once
        self.flows: dict[int, Flow] = {}  # streams, for their CREDIT
        self.threads: Threads | None = (
            None if kind in (ASYNC, ASYNCGEN) else Threads(loop, max_concurrency, "kameo")
        )
        self.write_scheduled = False  # a write() is queued with call_soon
        self.writer = False  # waiting for the socket to take more (add_writer)
        self.pumping = False  # pump() is starting requests
        self.eager = EagerStarter(loop)
        # A sync job (a pipeline in a handler thread) waits for an async step on the loop.
        rt.ops.wait = lambda aw: asyncio.run_coroutine_threadsafe(_awaited(aw), loop).result()
        self.direct = _aio.probe(loop)  # None: never wait outside the loop (wait_here)
        self.here_waits = 0  # waits done by wait_here (tests check that the fast path runs)
        # Each request runs in a fresh copy of this, never in the context of the request whose
        # end started it.
        self.base_context = contextvars.copy_context()

    # -- the runtime's interface -------------------------------------------------------

    def flush(self) -> None:
        """Write what is queued: at once on the loop's thread, else soon."""
        if threading.get_ident() == self.thread:
            self.write()
        else:
            self.loop.call_soon_threadsafe(self.write_soon)

    def cancel(self, rid: int) -> None:
        task = self.tasks.get(rid)
        if task is not None:
            task.cancel()
            return
        for i, entry in enumerate(self.waiting):
            if entry[1] == rid:
                del self.waiting[i]
                self.chan.take(rid, started=False)  # answered without running
                self.chan.error(rid, _error_info.cancelled())
                self.write_soon()
                return

    def credit(self, rid: int, n: int) -> None:
        flow = self.flows.get(rid)
        if flow is not None:
            flow.grant(n)

    def wait_here(self) -> bool:
        """A handler awaits a callback's next item and none is there: if the loop has nothing to
        run before it would block in its selector, wait for the socket here instead, in one
        ``ppoll`` on it and the selector (any other event, a due timer or a thread's
        ``call_soon_threadsafe`` ends the wait at once), and handle what arrived as the loop
        would, outside the waiting task. True if frames were read: the caller looks again
        without a loop iteration (about a third of a callback round trip)."""
        direct = self.direct
        if direct is None or self.writer or _eager.stepping.depth:
            return False
        if threading.get_ident() != self.thread:
            return False
        budget = direct.budget(WAIT_HERE_MAX)
        if budget is None:
            return False
        self.here_waits += 1
        loop = self.loop
        task = _aio.current_task(loop)
        if task is not None:
            _aio.leave_task(loop, task)  # type: ignore[misc]
        try:
            if not _native.wait_alone(self.fd, direct.fd, budget):
                return False
            self.on_readable()
            return True
        finally:
            if task is not None:
                _aio.enter_task(loop, task)  # type: ignore[misc]

    # -- serving -----------------------------------------------------------------------

    async def serve(self, init: Callable[[], Any] | None, after_init: Callable[[], None]) -> None:
        rt, chan, loop = self.rt, self.chan, self.loop
        chan.set_blocking(False)
        try:
            if init is not None:
                result = init()
                if inspect.isawaitable(result):
                    await result
        except BaseException as exc:
            rt.startup_failed(exc, "run init hook", rt.init)
            return
        try:
            after_init()
        except BaseException as exc:
            rt.startup_failed(exc, "make the adapter instance", self.target)
            return
        self.handler = rt.ops.handler if rt.ops.handler is not None else no_handler
        self.chan = rt.trace_requests()  # the init hook ran: OpenTelemetry is set up or not
        rt.ready(self.kind)
        if rt.heartbeat_interval:
            loop.call_later(rt.heartbeat_interval, self.heartbeat)
        rt.attach(self)
        loop.add_reader(self.fd, self.on_readable)
        try:
            await self.finished
        finally:
            loop.remove_reader(self.fd)
            for task in list(self.tasks.values()):
                task.cancel()
            if self.threads is not None:
                self.threads.close()
            with contextlib.suppress(OSError):
                chan.set_blocking(True)
                chan.flush()

    def stop(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def on_readable(self) -> None:
        try:
            frames = self.chan.recv(False)
        except OSError:
            frames = None
        if frames is None:
            self.rt.eof = True
            self.stop()
            return
        self.rt.route(frames)
        self.pump()
        self.write()  # what this batch of frames produced, in one write

    def pump(self) -> None:
        """Start waiting requests while there is room; stop once SHUTDOWN came and all is done."""
        if self.pumping:
            return  # a request that finished in its first step: the loop below goes on
        waiting, tasks, chan = self.waiting, self.tasks, self.chan
        limit = self.max_concurrency
        if waiting and len(tasks) < limit:
            self.write()  # earlier answers first: the parent refills the window sooner
            if self.writer:
                return  # the parent is not reading: on_writable pumps again once it drained
            self.pumping = True
            try:
                while waiting and len(tasks) < limit:
                    frame_kind, rid, body, trace = waiting.popleft()
                    chan.take(rid)  # recorded before it runs: the parent knows it may have run
                    # Eager: a handler that does not wait answers within this call.
                    coro = self.run(frame_kind, rid, body, trace)
                    task = self.eager.start(coro, self.base_context.copy())
                    if task is not None:
                        tasks[rid] = task
            finally:
                self.pumping = False
            self.write()  # the answers of requests that finished at once, in one write
        if self.rt.shutdown and not waiting and not tasks:
            self.stop()

    async def run(self, frame_kind: int, rid: int, body: Any, trace: str | None) -> None:
        current_request.set(rid)
        otel = self.rt.otel
        if otel is not None and (span := server_span(frame_kind, body, self.target)) is not None:
            trace = otel.start(rid, *span, trace)
        traceparent.set(trace)
        chan = self.chan
        try:
            wrong = mismatch(self.kind, frame_kind, self.target)
            if wrong is not None:
                chan.error(rid, wrong)
            elif frame_kind == CALL:
                ops = self.rt.ops
                job = ops.prepare(body)
                _context.session.set(job.session)
                _calls.refuse_generator(job)
                if job.kind == ASYNC:
                    result = await job.fn(*job.args, **job.kwargs)
                elif job.inline:
                    result = _calls.apply(job)
                else:
                    result = await self.call_threads().call(
                        contextvars.copy_context(), _calls.apply, job
                    )
                ops.answer(chan, rid, job, result)
            elif frame_kind == CALL_STREAM:
                ops = self.rt.ops
                job = ops.prepare(body)
                _context.session.set(job.session)
                fn, kind = _calls.as_stream(job, ops.wait)
                send = functools.partial(chan.item, rid)
                flow = self.flows[rid] = Flow(
                    send, self.rt.stream_window, self.write, self.write_soon
                )
                await produce(fn, kind, None, flow, self.call_threads() if kind == GEN else None)
                chan.signal(END, rid)
            elif frame_kind == REQUEST:
                threads = self.threads
                if threads is None:
                    result = await self.handler(body)
                else:
                    result = await threads.call(contextvars.copy_context(), self.handler, body)
                chan.reply(rid, result)
            else:
                send = functools.partial(chan.item, rid)
                flow = self.flows[rid] = Flow(
                    send, self.rt.stream_window, self.write, self.write_soon
                )
                await produce(self.handler, self.kind, body, flow, self.threads)
                chan.signal(END, rid)
        except asyncio.CancelledError:
            chan.error(rid, _error_info.cancelled())
        except BaseException as exc:
            chan.error(rid, _error_info.from_exception(exc))
        finally:
            self.tasks.pop(rid, None)
            self.flows.pop(rid, None)
            if otel is not None:
                otel.end(rid)
            self.rt.end_request(rid)
            if not self.pumping:  # else it finished in its first step: pump() writes
                self.pump()
                self.write_soon()

    def call_threads(self) -> Threads:
        """The handler threads, made on first use in a worker whose handler is async."""
        if self.threads is None:
            self.threads = Threads(self.loop, self.max_concurrency, "kameo")
        return self.threads

    # -- writing -----------------------------------------------------------------------

    def write(self) -> None:
        """Write what is queued now; what the socket does not take waits for ``on_writable``."""
        self.write_scheduled = False
        try:
            done = self.chan.flush()
        except OSError:
            self.stop()
            return
        if not done and not self.writer:
            self.writer = True
            self.loop.add_writer(self.fd, self.on_writable)

    def write_soon(self) -> None:
        if not self.write_scheduled:
            self.write_scheduled = True
            self.loop.call_soon(self.write)

    def on_writable(self) -> None:
        try:
            done = self.chan.flush()
        except OSError:
            done = True
            self.stop()
        if done:
            self.writer = False
            self.loop.remove_writer(self.fd)
            self.pump()

    def heartbeat(self) -> None:
        self.chan.signal(Channel.HEARTBEAT, 0)
        self.write_soon()
        self.loop.call_later(self.rt.heartbeat_interval, self.heartbeat)


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
