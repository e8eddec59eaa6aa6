"""Events about workers and calls, for metrics and monitoring.

``kameo.add_listener(callback)`` registers ``callback(event)`` for every pool (those running
and those started later); ``Pool(..., on_event=callback)`` for one pool. A listener gets
frozen dataclasses:

* :class:`WorkerStarted`: a worker became ready (``startup_s``: from spawn to READY).
* :class:`WorkerExited`: a worker process is gone and reaped; ``reason`` is one of
  :data:`EXIT_REASONS`.
* :class:`CallFinished`: a request reached its end (answered, failed, timed out, cancelled).

Listeners are called synchronously on the thread of the pool's event loop (an
:class:`kameo.Executor`'s: its private loop thread), so they must be quick: hand slow work to a
queue. A listener that raises is logged (logger ``kameo``, with its traceback the first time,
then at most once per :data:`RAISE_LOG_INTERVAL` seconds with a count) and changes nothing for
the pool or the other listeners. With no listener registered for a pool, its requests record
nothing and no event is made.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "EXIT_REASONS",
    "CallFinished",
    "Event",
    "Listener",
    "WorkerExited",
    "WorkerStarted",
    "add_listener",
    "remove_listener",
]

log = logging.getLogger("kameo")

#: ``WorkerExited.reason``: ``closed`` (the pool stopped it while closing), ``retired``
#: (replaced gracefully: ``max_tasks_per_worker``, ``max_memory_per_worker``; its successor was
#: started first), ``crashed`` (it exited or was killed without the pool asking it to),
#: ``killed`` (the pool killed it: no heartbeat within ``heartbeat_timeout``, a cancelled
#: request kept past ``cancel_grace``, a broken protocol), ``startup_failed`` (it never became
#: ready: import or init hook failure, ``startup_timeout``, refused handshake).
EXIT_REASONS = ("closed", "retired", "crashed", "killed", "startup_failed")

#: A listener that keeps raising is logged at most this often (seconds), with a count.
RAISE_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class WorkerStarted:
    """A worker finished starting (handshake, target import, init hook) and takes requests."""

    pool: str
    worker_id: int
    pid: int
    #: Seconds from spawning the process to its READY.
    startup_s: float


@dataclass(frozen=True, slots=True)
class WorkerExited:
    """A worker process is gone and was reaped."""

    pool: str
    worker_id: int
    pid: int
    #: One of :data:`EXIT_REASONS`.
    reason: str
    #: The exit code if it exited, else None.
    exitcode: int | None
    #: The signal number if a signal killed it, else None.
    signal: int | None


@dataclass(frozen=True, slots=True)
class CallFinished:
    """A request reached its end.

    ``kind``: ``ask`` (``pool.ask``, a session's ``ask``), ``stream`` (``pool.stream``, a
    session's ``stream``), ``call`` (``pool.call``, ``pool.function``, a session's ``call``),
    ``call_stream``, ``new``, ``method``, ``getattr``, ``setattr`` (a :class:`~kameo.Ref`'s),
    ``map`` (one batch of ``pool.map`` or ``Executor.map``: one event per batch, not per item),
    ``pipeline`` (one ``Pipeline.run``). ``target``: the function called (``"module:qualname"``),
    the attribute name for a Ref's ``method``/``getattr``/``setattr``, the pool's target for
    ``ask``, ``stream`` and a ``map`` of the handler, None for a ``pipeline``.

    ``worker_id``: the worker it was sent to (the last one, for an idempotent request run again
    after a crash), None if it never left the parent. ``queued_s``: seconds from the call
    (``pool.ask(...)``, or a stream's first ``__anext__``) until the request was handed to a
    worker's connection (written at once, or with the other frames of that loop iteration):
    encoding, and waiting for a worker with room. ``run_s``: seconds from then until the answer
    was read (for a stream, its end); for a request that ended in the parent (timed out,
    cancelled), until then. A request never sent has ``run_s == 0``.

    ``ok``: it succeeded. ``error_type`` otherwise: the class of the exception raised in the
    worker as the worker named it (``ValueError``, ``mypkg.errors.MyError``), or kameo's
    (``CallTimeout``, ``WorkerCrashed``, ``PoolClosed``, ``SerializationError``...), or
    ``CancelledError``; for a ``map`` batch or a ``pipeline`` whose answer holds an error, that
    of its first failed item or step.
    """

    pool: str
    kind: str
    target: str | None
    worker_id: int | None
    queued_s: float
    run_s: float
    ok: bool
    error_type: str | None


Event = WorkerStarted | WorkerExited | CallFinished
Listener = Callable[[Event], object]


class _Watcher(Protocol):
    def _listeners_changed(self) -> None: ...


_listeners: list[Listener] = []
# The started pools, told when the global listeners change (they record timings only then).
_watchers: weakref.WeakSet[Any] = weakref.WeakSet()
# id(listener) -> (when its failure was last logged, failures not logged since).
_raised: dict[int, tuple[float, int]] = {}


def add_listener(callback: Listener) -> None:
    """Call ``callback(event)`` with the events of every pool (see :mod:`kameo.events`).
    Adding a listener already registered does nothing."""
    if not callable(callback):
        raise TypeError(f"a listener must be callable, got {callback!r}")
    if callback in _listeners:
        return
    _listeners.append(callback)
    _changed()


def remove_listener(callback: Listener) -> None:
    """Stop calling ``callback`` (registered with :func:`add_listener`); no error if it is
    not registered."""
    try:
        _listeners.remove(callback)
    except ValueError:
        return
    _raised.pop(id(callback), None)
    _changed()


def _changed() -> None:
    for watcher in list(_watchers):
        watcher._listeners_changed()


def watch(watcher: _Watcher) -> None:
    """``watcher._listeners_changed()`` is called whenever the global listeners change."""
    _watchers.add(watcher)


def unwatch(watcher: _Watcher) -> None:
    _watchers.discard(watcher)


class Emitter:
    """The listeners of one pool: its own ``on_event`` and the global ones."""

    __slots__ = ("own", "pool")

    def __init__(self, pool: str, own: Listener | None) -> None:
        if own is not None and not callable(own):
            raise TypeError(f"on_event must be callable, got {own!r}")
        self.pool = pool
        self.own = own

    @property
    def active(self) -> bool:
        """Someone listens: events are worth making."""
        return self.own is not None or bool(_listeners)

    def emit(self, event: Event) -> None:
        own = self.own
        if own is not None:
            _call(own, event)
        for listener in tuple(_listeners):
            _call(listener, event)


def _call(listener: Listener, event: Event) -> None:
    try:
        listener(event)
    except Exception:
        now = time.monotonic()
        key = id(listener)
        last, missed = _raised.get(key, (None, 0))
        if last is not None and now - last < RAISE_LOG_INTERVAL:
            _raised[key] = (last, missed + 1)
            return
        _raised[key] = (now, 0)
        more = f" (and {missed} more times since it was last logged)" if missed else ""
        log.error(
            "kameo event listener %r raised on %r%s; the pool goes on",
            listener,
            event,
            more,
            exc_info=last is None,
        )


def error_type(exc: BaseException | None) -> str | None:
    """``CallFinished.error_type`` of an exception (see there)."""
    if exc is None:
        return None
    remote = getattr(exc, "remote_type", None)
    if isinstance(remote, str) and remote:
        return remote.removeprefix("builtins.")
    return type(exc).__name__


def info_type(info: Any) -> str:
    """``error_type`` of an error-info dict (a failed item of a batch or step of a pipeline)."""
    name = info.get("type") if isinstance(info, dict) else None
    if isinstance(name, str) and name:
        return name.removeprefix("builtins.")
    kind = info.get("kind") if isinstance(info, dict) else None
    return "CancelledError" if kind == "cancelled" else "RemoteError"
