"""The worker's sync server: a sync handler (function or generator) with ``max_concurrency=1``.

One request at a time on the main thread, no event loop: reads block in ``Channel.recv`` with the
GIL released. The fastest path (W1, W2, W4): the loops below bind what they use to locals and
make no Python call per request beyond the handler's.
"""

from __future__ import annotations

import sys

from kameo import _calls, _context, _error_info
from kameo._handler import ASYNC, ASYNCGEN, SYNC
from kameo._lean import deque, suppress
from kameo._runtime import (
    CALL,
    END,
    REQUEST,
    REQUEST_STREAM,
    Request,
    Runtime,
    current_request,
    mismatch,
    no_handler,
    server_span,
    traceparent,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from typing import Any


def _is_cancellation(exc: BaseException) -> bool:
    """``exc`` is asyncio's CancelledError (asyncio is not imported unless a coroutine ran)."""
    aio = sys.modules.get("asyncio")
    return aio is not None and isinstance(exc, aio.CancelledError)


#: While a stream has credit, read the socket (for CANCEL and CREDIT) every this many items.
STREAM_POLL_EVERY = 16


class SyncServer:
    """Serves requests from :meth:`serve` until SHUTDOWN or the parent goes away."""

    loop = None
    thread = None

    def __init__(
        self, rt: Runtime, handler: Callable[[Any], Any] | None, kind: str, target: str
    ) -> None:
        self.rt = rt
        self.chan = rt.trace_requests()  # the init hook ran: OpenTelemetry is set up or not
        self.handler: Callable[[Any], Any] = handler if handler is not None else no_handler
        self.kind = kind
        self.target = target
        self.waiting: deque[Request] = deque()
        self.cancelled: set[int] = set()
        self.credits: dict[int, int] = {}  # stream request id -> CREDIT not yet counted
        self.flush: Callable[[], object] = self.chan.flush  # the caller's thread writes
        self._coroutine_loop: asyncio.AbstractEventLoop | None = None
        rt.ops.wait = self.run_coroutine
        rt.attach(self)

    def cancel(self, rid: int) -> None:
        self.cancelled.add(rid)  # seen before it starts, between stream items, or by callbacks

    def credit(self, rid: int, n: int) -> None:
        self.credits[rid] = self.credits.get(rid, 0) + n

    def wait_here(self) -> bool:
        return False  # no event loop: callbacks are iterated with a blocking read

    def serve(self) -> None:
        rt = self.rt
        chan = self.chan
        pending = self.waiting
        cancelled = self.cancelled
        handler, kind, target = self.handler, self.kind, self.target
        error_info = _error_info.from_exception
        otel = rt.otel
        while not rt.eof:
            if not pending:
                if rt.shutdown:
                    break
                chan.flush()
                rt.pump(block=True)
                continue
            # Earlier answers go out before the next request starts: the parent refills this
            # worker's prefetch window sooner (measured: faster than batching the replies).
            chan.flush()
            frame_kind, rid, body, trace = pending.popleft()
            chan.take(rid)  # recorded before it runs: the parent knows it may have run
            if rid in cancelled:
                cancelled.discard(rid)
                chan.error(rid, _error_info.cancelled())
                continue
            wrong = mismatch(kind, frame_kind, target)
            current_request.set(rid)
            if otel is not None and (span := server_span(frame_kind, body, target)) is not None:
                trace = otel.start(rid, *span, trace)
            traceparent.set(trace)
            if wrong is not None:
                chan.error(rid, wrong)
            elif frame_kind == REQUEST:
                try:
                    result = handler(body)
                except BaseException as exc:
                    chan.error(rid, error_info(exc))
                else:
                    chan.reply(rid, result)
            elif frame_kind == REQUEST_STREAM:
                self.stream(rid, handler, body)
            elif frame_kind == CALL:
                self.call(rid, body)
            else:
                self.call_stream(rid, body)
            cancelled.discard(rid)
            if otel is not None:
                otel.end(rid)
            rt.end_request(rid)
            # Drop the request and its result now, not when the next request arrives: they may
            # hold shared-memory mappings.
            body = result = None
        chan.flush()

    def call(self, rid: int, op: Any) -> None:
        """A CALL: a sync function runs here; a coroutine function on this worker's own event
        loop (made on first use; it has the loop to itself: a callback iterated there with
        ``async for`` waits for its items with a blocking read)."""
        ops = self.rt.ops
        # The usual call, of a function or method already known to be plain sync, outside a
        # session, for a value: run it at once (what prepare, apply and answer would do).
        if type(op) is tuple and len(op) in (6, 7) and op[1] is None:
            fn = None
            if op[0] == "call" and len(op) == 6 and not op[5]:
                fn = ops.sync_functions.get(op[2])
                args, kwargs = op[3], op[4]
            elif op[0] == "method" and len(op) == 7 and not op[6]:
                obj, name = op[2], op[3]
                if (type(obj), name) in ops.sync_methods and name not in getattr(
                    obj, "__dict__", ()
                ):
                    fn = getattr(obj, name)
                    args, kwargs = op[4], op[5]
            if fn is not None:
                try:
                    result = fn(*args, **kwargs) if kwargs else fn(*args)
                except BaseException as exc:
                    self.chan.error(rid, _error_info.from_exception(exc))
                    return
                if not self.chan.try_reply(rid, result):
                    ops.answer(self.chan, rid, _calls.Job(fn, (), {}, SYNC, None), result)
                return
        # A pipeline outside a session: its steps at once (run_pipeline catches their errors).
        if type(op) is tuple and len(op) == 3 and op[0] == "pipeline" and op[1] is None:
            steps = op[2]
            if type(steps) is list:
                try:
                    result = ops.run_pipeline(steps, None)
                except BaseException as exc:  # a cancellation, or a worker-level failure
                    self.call_failed(rid, exc)
                    return
                if not self.chan.try_reply(rid, result):
                    job = _calls.Job(ops.run_pipeline, (), {}, SYNC, None, entries=True)
                    ops.answer(self.chan, rid, job, result)
                return
        token = None
        try:
            job = ops.prepare(op)
            token = _context.session.set(job.session)
            _calls.refuse_generator(job)
            result = _calls.apply(job)
            if job.kind == ASYNC:
                result = self.run_coroutine(result)
        except BaseException as exc:
            self.call_failed(rid, exc)
            return
        finally:
            if token is not None:
                _context.session.reset(token)
        ops.answer(self.chan, rid, job, result)

    def call_failed(self, rid: int, exc: BaseException) -> None:
        """A CALL ended with ``exc``: cancelled by its CANCEL (``run_coroutine``), or an error
        (a CancelledError the function raised, too)."""
        cancelled = rid in self.cancelled and _is_cancellation(exc)
        self.chan.error(
            rid, _error_info.cancelled() if cancelled else _error_info.from_exception(exc)
        )

    def call_stream(self, rid: int, op: Any) -> None:
        token = None
        try:
            try:
                job = self.rt.ops.prepare(op)
                token = _context.session.set(job.session)
                fn, kind = _calls.as_stream(job, self.run_coroutine)
                if kind == ASYNCGEN:  # its steps run on this worker's own event loop
                    fn = self.synchronous(fn)
            except BaseException as exc:
                self.chan.error(rid, _error_info.from_exception(exc))
                return
            self.stream(rid, fn, None)
        finally:
            if token is not None:
                _context.session.reset(token)

    def synchronous(self, agen_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """An async generator function as a sync one, each step run on this worker's loop."""
        return lambda body: _calls.drive(agen_fn(body), self.run_coroutine)

    def run_coroutine(self, awaitable: Any) -> Any:
        """Run an async function's coroutine to its end, on this worker's own event loop (made
        on first use). While it waits, the socket is read from that loop: a CANCEL of the
        request (its caller's cancellation or timeout) cancels the coroutine, whose ``finally``
        runs, and the worker goes on."""
        import asyncio  # here: a sync worker that runs no coroutine never imports it

        loop = self._coroutine_loop
        if loop is None:
            loop = self._coroutine_loop = asyncio.new_event_loop()
        task = asyncio.ensure_future(awaitable, loop=loop)
        rid = current_request.get()
        rt, cancelled = self.rt, self.cancelled

        def readable() -> None:
            rt.pump(block=False)  # routes CANCEL (to self.cancel), CREDIT and callback items
            if rid in cancelled or rt.eof:
                task.cancel()

        fd = self.chan.fileno()
        loop.add_reader(fd, readable)
        try:
            return loop.run_until_complete(task)
        finally:
            loop.remove_reader(fd)

    def stream(self, rid: int, fn: Callable[[Any], Any], body: Any) -> None:
        rt = self.rt
        chan = self.chan
        cancelled = self.cancelled
        credits = self.credits
        credit = rt.stream_window
        count = 0
        gen = None
        try:
            gen = fn(body)
            for item in gen:
                chan.item_paced(rid, item)  # written at once after a pause, else within 100 µs
                count += 1
                credit -= 1
                if count % STREAM_POLL_EVERY == 0 or credit <= 0:
                    rt.pump(block=False)
                credit += credits.pop(rid, 0)
                while credit <= 0 and rid not in cancelled and not rt.eof:
                    rt.pump(block=True)
                    credit += credits.pop(rid, 0)
                if rid in cancelled or rt.eof:
                    break
        except BaseException as exc:
            if gen is not None:
                with suppress(BaseException):
                    gen.close()
            chan.error(rid, _error_info.from_exception(exc))
            return
        if gen is not None:
            gen.close()  # runs the generator's finally when we stopped early
        credits.pop(rid, None)
        chan.signal(END, rid)
