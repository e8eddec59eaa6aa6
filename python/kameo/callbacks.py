"""Parent-side handlers that workers can call: ``kameo.Callbacks``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kameo._eager import EagerStarter
from kameo._runtime import error_info, traceparent
from kameo.errors import CallbackNotFound

__all__ = ["Callbacks"]

F = TypeVar("F", bound=Callable[..., Any])

# Names a callback module may not take: `kameo.<module>` must not shadow kameo's own API.
_RESERVED = frozenset(
    {"errors", "pool", "callbacks", "callback_handle", "current_traceparent", "encode", "decode"}
)


def handler_kind(fn: Callable[..., Any]) -> str:
    """'asyncgen', 'async', 'gen' or 'sync' (callable objects are judged by ``__call__``)."""
    call = fn if inspect.isroutine(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    if inspect.isasyncgenfunction(call):
        return "asyncgen"
    if inspect.iscoroutinefunction(call):
        return "async"
    if inspect.isgeneratorfunction(call):
        return "gen"
    return "sync"


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
    handlers run in a thread so they do not block the event loop.
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


class _Flow:
    """Credit for one callback stream; the event exists only once a handler has to wait."""

    __slots__ = ("credit", "event", "task")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.event: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None

    def grant(self, n: int) -> None:
        self.credit += n
        if self.event is not None:
            self.event.set()

    async def take(self) -> None:
        while self.credit <= 0:
            if self.event is None:
                self.event = asyncio.Event()
            self.event.clear()
            await self.event.wait()
        self.credit -= 1


class CallbackRunner:
    """Runs parent handlers for one pool's workers, streams their items back with flow control,
    and cancels them when the worker asks, when the request that made them ends, or when the
    worker dies."""

    def __init__(self, callbacks: Callbacks, core: Any, loop: Any, window: int, kinds: Any) -> None:
        self.callbacks = callbacks
        self.core = core
        self.loop = loop
        self.window = window
        self.item, self.end, self.error = kinds.ITEM, kinds.END, kinds.ERROR
        # Handlers that did not finish in their first step, and streams (for their credit).
        self.running: dict[tuple[int, int], _Flow] = {}
        self.handlers = callbacks._handlers  # the registry's own dict: later entries count
        self.eager = EagerStarter(loop)
        # Each handler runs in a copy of this (the pool's context when it started), not in
        # the context of whatever code happened to read the request.
        self.context = contextvars.copy_context()

    def start(self, worker_id: int, payload: Any) -> None:
        cid, body, trace = payload
        # Eager: a handler that answers without waiting replies from this very callback, and
        # leaves nothing behind. One that waits is registered (for cancellation) here.
        coro = self._run(worker_id, cid, body, trace)
        task = self.eager.start(coro, self.context.copy())
        if task is not None:
            key = (worker_id, cid)
            flow = self.running.get(key)  # a stream handler made it in its first step
            if flow is None:
                flow = self.running[key] = _Flow(self.window)
            flow.task = task

    def credit(self, worker_id: int, payload: Any) -> None:
        cid, n = payload
        flow = self.running.get((worker_id, cid))
        if flow is not None:
            flow.grant(n)

    def cancel(self, worker_id: int, cid: int) -> None:
        flow = self.running.get((worker_id, cid))
        if flow is not None and flow.task is not None:
            flow.task.cancel()

    def worker_gone(self, worker_id: int) -> None:
        for (wid, _), flow in list(self.running.items()):
            if wid == worker_id and flow.task is not None:
                flow.task.cancel()

    def cancel_all(self) -> None:
        for flow in list(self.running.values()):
            if flow.task is not None:
                flow.task.cancel()

    def _flow(self, worker_id: int, cid: int) -> _Flow:
        """The credit of a stream handler, registered in its first step (before it sends)."""
        key = (worker_id, cid)
        flow = self.running.get(key)  # start() made it if the first step was not eager
        if flow is None:
            flow = self.running[key] = _Flow(self.window)
        return flow

    async def _run(self, worker_id: int, cid: int, body: Any, trace: str | None) -> None:
        send = self.core.send
        if trace is not None:
            traceparent.set(trace)
        try:
            if type(body) is not tuple or len(body) != 3:
                raise CallbackNotFound(f"malformed callback request: {body!r}")
            path, data, _request_id = body
            entry = self.handlers.get(path)
            if entry is None:
                known = ", ".join(self.callbacks.paths) or "none"
                raise CallbackNotFound(f"no parent handler registered for {path!r} ({known})")
            fn, kind = entry
            if kind == "async":
                send(worker_id, self.item, cid, await fn(data), True)
            elif kind == "sync":
                ctx = contextvars.copy_context()
                result = await self.loop.run_in_executor(None, ctx.run, fn, data)
                send(worker_id, self.item, cid, result, True)
            elif kind == "asyncgen":
                flow = self._flow(worker_id, cid)
                agen = fn(data)
                async with contextlib.aclosing(agen):
                    async for item in agen:
                        await flow.take()
                        send(worker_id, self.item, cid, item)
                send(worker_id, self.end, cid, None)
            else:  # a plain generator: each step in a thread
                flow = self._flow(worker_id, cid)
                ctx = contextvars.copy_context()
                gen = fn(data)
                done = object()
                step = functools.partial(ctx.run, next, gen, done)
                try:
                    while True:
                        item = await self.loop.run_in_executor(None, step)
                        if item is done:
                            break
                        await flow.take()
                        send(worker_id, self.item, cid, item)
                finally:
                    gen.close()
                send(worker_id, self.end, cid, None)
        except asyncio.CancelledError:
            pass  # the worker stopped listening, or is gone: nothing to send
        except BaseException as exc:
            with contextlib.suppress(Exception):
                send(worker_id, self.error, cid, error_info(exc))
        finally:
            if self.running:  # empty: nothing to forget (eager handlers are never registered)
                self.running.pop((worker_id, cid), None)
