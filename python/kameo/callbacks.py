"""Parent-side handlers that workers can call: ``kameo.Callbacks``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kameo import _error_info, _otel
from kameo._context import traceparent
from kameo._eager import EagerStarter
from kameo._handler import ASYNC, SYNC, Flow, Threads, default_threads, handler_kind, produce
from kameo.errors import CallbackNotFound

__all__ = ["Callbacks"]

F = TypeVar("F", bound=Callable[..., Any])

# Names a callback module may not take: `kameo.<module>` must not shadow kameo's own API.
_RESERVED = frozenset(
    {"errors", "pool", "callbacks", "callback_handle", "current_traceparent", "encode", "decode"}
)


def validate_path(path: str) -> None:
    parts = path.split(".")
    if len(parts) != 2 or not all(p.isidentifier() for p in parts):
        raise ValueError(f"callback path must be 'module.Type' (two identifiers), got {path!r}")
    if parts[0] in _RESERVED or parts[0].startswith("_"):
        raise ValueError(f"callback path {path!r}: module name {parts[0]!r} is reserved by kameo")


class Callbacks:
    """A registry of parent-side handlers, passed as ``Pool(..., callbacks=...)``.

    A handler takes the request data and is an async generator (a stream back to the worker),
    a coroutine function or a plain function (a one-item stream), or a plain generator. Sync
    handlers (and the steps of plain generators) run in threads of the pool's own, so they do
    not block the event loop.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[Callable[[Any], Any], str]] = {}

    def register(self, path: str, fn: Callable[[Any], Any]) -> None:
        """Register ``fn`` under ``path`` (``"module.Type"``); a path can be registered once."""
        validate_path(path)
        if not callable(fn):
            raise TypeError(f"callback handler for {path!r} is not callable")
        if path in self._handlers:
            raise ValueError(f"callback path {path!r} is already registered")
        self._handlers[path] = (fn, handler_kind(fn))

    def handler(self, path: str) -> Callable[[F], F]:
        """Decorator form of :meth:`register`."""

        def deco(fn: F) -> F:
            self.register(path, fn)
            return fn

        return deco

    def get(self, path: str) -> tuple[Callable[[Any], Any], str] | None:
        return self._handlers.get(path)

    @property
    def paths(self) -> list[str]:
        return sorted(self._handlers)

    def __contains__(self, path: object) -> bool:
        return path in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self._handlers)


class CallbackRunner:
    """Runs parent handlers for one pool's workers, streams their items back with flow control,
    and cancels them when the worker asks, when the request that made them ends, or when the
    worker dies.

    A sync handler goes straight to a handler thread and its answer is sent from the loop when
    it returns: no task, no future (``_answered``). Every other kind runs as a coroutine whose
    first step runs at once (``_eager``); one that waits is registered for cancellation."""

    def __init__(self, callbacks: Callbacks, core: Any, loop: Any, window: int, kinds: Any) -> None:
        self.callbacks = callbacks
        self.core = core
        self.loop = loop
        self.window = window
        self.item, self.end, self.error = kinds.ITEM, kinds.END, kinds.ERROR
        # Handlers that did not finish in their first step, and streams (for their credit).
        self.running: dict[tuple[int, int], Flow] = {}
        # Sync handlers running in a thread whose answer is still wanted.
        self.open: set[tuple[int, int]] = set()
        self.handlers = callbacks._handlers  # the registry's own dict: later entries count
        self.eager = EagerStarter(loop)
        self.threads = Threads(loop, default_threads(), "kameo-callback")
        # Each handler runs in a copy of this (the pool's context when it started), not in
        # the context of whatever code happened to read the request.
        self.context = contextvars.copy_context()
        # OpenTelemetry (``trace``): each call of a handler is a span, kept here until it ends.
        self.otel: Any = None
        self.pid_of: Callable[[int], int | None] = lambda _wid: None
        self.spans: dict[tuple[int, int], Any] = {}

    def trace(self, otel: Any, pid_of: Callable[[int], int | None]) -> None:
        """Make a span (``otel``: the pool's ``PoolTelemetry``) of each handler call."""
        self.otel = otel
        self.pid_of = pid_of

    def _span_start(self, worker_id: int, cid: int, path: str, trace: str | None) -> Any:
        """The call's span: (its traceparent, the OpenTelemetry context to run in)."""
        started = self.otel.callback_start(path, (worker_id, self.pid_of(worker_id)), trace)
        if started is None:
            return trace, None
        span, trace, ctx = started
        self.spans[(worker_id, cid)] = span
        return trace, ctx

    def _span_end(self, key: tuple[int, int], exc: BaseException | None) -> None:
        span = self.spans.pop(key, None)
        if span is not None:
            self.otel.callback_end(span, exc)

    def start(self, worker_id: int, payload: Any) -> None:
        cid, body, trace = payload
        entry = self.handlers.get(body[0]) if type(body) is tuple and len(body) == 3 else None
        if entry is None:
            self._refuse(worker_id, cid, body)
            return
        fn, kind = entry
        octx = None
        if self.otel is not None:
            trace, octx = self._span_start(worker_id, cid, body[0], trace)
        if kind == SYNC:
            key = (worker_id, cid)
            ctx = self.context.copy()
            if trace is not None:
                ctx.run(traceparent.set, trace)
            if octx is not None:
                ctx.run(_otel.attach, octx)
            self.open.add(key)
            self.threads.submit(ctx, fn, body[1], self._answered, key)
            return
        # Eager: a handler that answers without waiting replies from this very callback, and
        # leaves nothing behind. One that waits is registered (for cancellation) here.
        coro = self._run(worker_id, cid, fn, kind, body[1], trace, octx)
        task = self.eager.start(coro, self.context.copy())
        if task is not None:
            key = (worker_id, cid)
            flow = self.running.get(key)  # a stream handler made it in its first step
            if flow is None:
                flow = self.running[key] = self._new_flow(worker_id, cid)
            flow.task = task

    def credit(self, worker_id: int, payload: Any) -> None:
        cid, n = payload
        flow = self.running.get((worker_id, cid))
        if flow is not None:
            flow.grant(n)

    def cancel(self, worker_id: int, cid: int) -> None:
        key = (worker_id, cid)
        flow = self.running.get(key)
        if flow is not None and flow.task is not None:
            flow.task.cancel()
        self.open.discard(key)  # a sync handler runs on, but its answer is not sent
        if self.spans:
            self._span_end(key, asyncio.CancelledError("the worker cancelled the callback"))

    def worker_gone(self, worker_id: int) -> None:
        for (wid, _), flow in list(self.running.items()):
            if wid == worker_id and flow.task is not None:
                flow.task.cancel()
        if self.open:
            self.open = {key for key in self.open if key[0] != worker_id}
        for key in [key for key in self.spans if key[0] == worker_id]:
            self._span_end(key, asyncio.CancelledError(f"worker {worker_id} is gone"))

    def cancel_all(self) -> None:
        """The pool closes: cancel every handler, and let the handler threads go."""
        for flow in list(self.running.values()):
            if flow.task is not None:
                flow.task.cancel()
        self.open.clear()
        for key in list(self.spans):
            self._span_end(key, asyncio.CancelledError("the pool closed"))
        self.threads.close()
        self.threads = Threads(self.loop, default_threads(), "kameo-callback")

    def _answered(self, key: tuple[int, int], ok: bool, value: Any) -> None:
        """On the loop: a sync handler returned ``value`` (or raised it, without ``ok``)."""
        open_ = self.open
        if key not in open_:
            return  # cancelled meanwhile, or the worker is gone
        open_.discard(key)
        worker_id, cid = key
        send = self.core.send
        if self.spans:
            self._span_end(key, None if ok else value)
        try:
            if ok:
                send(worker_id, self.item, cid, value, True)
                return
        except BaseException as exc:  # the answer cannot be sent (not encodable, too large)
            value = exc
        with contextlib.suppress(Exception):
            send(worker_id, self.error, cid, _error_info.from_exception(value))

    def _refuse(self, worker_id: int, cid: int, body: Any) -> None:
        if type(body) is not tuple or len(body) != 3:
            exc = CallbackNotFound(f"malformed callback request: {body!r}")
        else:
            known = ", ".join(self.callbacks.paths) or "none"
            exc = CallbackNotFound(f"no parent handler registered for {body[0]!r} ({known})")
        with contextlib.suppress(Exception):
            self.core.send(worker_id, self.error, cid, _error_info.from_exception(exc))

    def _new_flow(self, worker_id: int, cid: int) -> Flow:
        return Flow(functools.partial(self.core.send, worker_id, self.item, cid), self.window)

    def _flow(self, worker_id: int, cid: int) -> Flow:
        """The credit of a stream handler, registered in its first step (before it sends)."""
        key = (worker_id, cid)
        flow = self.running.get(key)  # start() made it if the first step was not eager
        if flow is None:
            flow = self.running[key] = self._new_flow(worker_id, cid)
        return flow

    async def _run(
        self,
        worker_id: int,
        cid: int,
        fn: Callable[[Any], Any],
        kind: str,
        data: Any,
        trace: str | None,
        octx: Any = None,
    ) -> None:
        send = self.core.send
        if trace is not None:
            traceparent.set(trace)
        if octx is not None:
            _otel.attach(octx)
        failed: BaseException | None = None
        try:
            if kind == ASYNC:
                send(worker_id, self.item, cid, await fn(data), True)
            else:
                await produce(fn, kind, data, self._flow(worker_id, cid), self.threads)
                send(worker_id, self.end, cid, None)
        except asyncio.CancelledError as exc:
            failed = exc  # the worker stopped listening, or is gone: nothing to send
        except BaseException as exc:
            failed = exc
            with contextlib.suppress(Exception):
                send(worker_id, self.error, cid, _error_info.from_exception(exc))
        finally:
            if self.spans:
                self._span_end((worker_id, cid), failed)
            if self.running:  # empty: nothing to forget (eager handlers are never registered)
                self.running.pop((worker_id, cid), None)
