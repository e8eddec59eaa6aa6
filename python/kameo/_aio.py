"""Every use of asyncio's private state in kameo, in one place.

kameo's fast paths need two things asyncio has no public API for:

* **Waiting outside the loop** (the parent's ``Pool._wait_answer``, the worker's
  ``AsyncServer.wait_here``): an awaited ask, or a worker handler's ``async for`` over a
  callback, may wait for its answer
  in one ``ppoll`` instead of a loop iteration, but only while the loop has nothing else to do.
  Whether it has is private state of a selector event loop: its ready queue (``_ready``), its
  timer heap (``_scheduled``) and ``_stopping``; the ``ppoll`` also watches the selector's own
  epoll fd (``_selector``), so that any event the loop would wake for ends the wait.
* **Running code outside the current task**: what a direct wait reads (a worker's callback into
  the parent) must run as if from the loop, and an eager first step (``_eager.py``, 3.11) runs
  inside a Task that is not stepping; both switch ``asyncio.current_task()`` with
  ``asyncio.tasks._enter_task`` / ``_leave_task``.

:func:`probe` checks, once per loop, that all of this exists with the shape this module
expects (a CPython 3.11-3.13 selector loop on epoll whose ``_run_once`` is asyncio's own);
for any other loop (uvloop, a custom loop, a subclass that changes how it runs, a CPython this
module does not know) it returns ``None`` and kameo awaits through the loop as any future
does. Futures are awaited through public API only (:func:`wait_on`).
"""

from __future__ import annotations

import asyncio
import collections
import selectors
import sys
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "KNOWN_VERSIONS",
    "DirectWait",
    "current_task",
    "direct_wait_budget",
    "enter_task",
    "leave_task",
    "probe",
    "selector_fd",
    "wait_on",
]

#: CPython versions whose selector loop has the shape :class:`DirectWait` reads (checked
#: against their asyncio sources); on any other version :func:`probe` says no.
KNOWN_VERSIONS = ((3, 11), (3, 12), (3, 13))

_tasks: Any = asyncio.tasks
#: ``asyncio.tasks._enter_task(loop, task)`` / ``_leave_task(loop, task)``: make ``task`` the
#: loop's current task, or stop it being so (raise RuntimeError if the state is not as
#: expected). None where asyncio has no such functions.
enter_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = getattr(
    _tasks, "_enter_task", None
)
leave_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = getattr(
    _tasks, "_leave_task", None
)

_current_tasks: Any = getattr(_tasks, "_current_tasks", None)
#: ``asyncio.current_task(loop)``; on 3.11, where that is a Python function, the registry
#: ``_enter_task`` fills, read without a Python frame.
current_task: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None] = (
    _current_tasks.get
    if sys.version_info < (3, 12) and isinstance(_current_tasks, dict)
    else asyncio.current_task
)

_future_await = asyncio.Future.__await__


def wait_on(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """What a coroutine yields to its Task to wait for the pending ``fut``: the first step of
    ``fut.__await__()`` (which marks it as waited on, as ``await fut`` does)."""
    it: Any = _future_await(fut)
    return it.send(None)  # type: ignore[no-any-return]


class DirectWait:
    """Private state of one selector event loop, read to decide whether the loop may be
    bypassed for a while (see :func:`probe`). ``fd``: the loop's epoll fd; :meth:`budget`: how
    long the loop would now block in its selector anyway."""

    __slots__ = ("fd", "loop", "ready", "task_factory")

    def __init__(self, loop: Any, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        # The ready queue: created with the loop and never rebound (3.11-3.13), unlike
        # `_scheduled`, which `_run_once` replaces when it drops cancelled timers.
        self.ready: collections.deque[Any] = loop._ready
        self.task_factory = loop.get_task_factory

    def budget(self, cap: float) -> float | None:
        """None if the loop has something to run before it would block in its selector (a
        ready callback, a due timer, a stop request) or runs tasks through a task factory
        (3.12's eager tasks step inside other steps); else the seconds until its next timer,
        at most ``cap``."""
        loop = self.loop
        if self.ready or loop._stopping or self.task_factory() is not None:
            return None
        scheduled = loop._scheduled
        if scheduled:
            left: float = scheduled[0].when() - loop.time()
            if left <= 0:
                return None
            if left < cap:
                return left
        return cap


_probed: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DirectWait | None] = (
    weakref.WeakKeyDictionary()
)


def probe(loop: asyncio.AbstractEventLoop) -> DirectWait | None:
    """A :class:`DirectWait` for ``loop`` if it is a selector loop with the private state it
    reads, of the expected types, and asyncio has ``_enter_task``/``_leave_task``; else None.
    Checked once per loop."""
    try:
        return _probed[loop]
    except KeyError:
        pass
    except TypeError:  # not weakly referenceable: check every time
        return _check(loop)
    found = _check(loop)
    _probed[loop] = found
    return found


def _check(given: asyncio.AbstractEventLoop) -> DirectWait | None:
    if sys.version_info[:2] not in KNOWN_VERSIONS or enter_task is None or leave_task is None:
        return None
    if not isinstance(given, asyncio.selector_events.BaseSelectorEventLoop):
        return None
    loop: Any = given
    # A loop that runs its iterations differently may keep its queues differently too.
    base: Any = asyncio.base_events.BaseEventLoop
    if getattr(type(loop), "_run_once", None) is not base._run_once:
        return None
    try:
        ready = loop._ready
        scheduled = loop._scheduled
        stopping = loop._stopping
        selector = loop._selector
        fd = selector.fileno() if isinstance(selector, selectors.EpollSelector) else -1
    except (AttributeError, OSError, ValueError):
        return None
    if not (
        type(ready) is collections.deque
        and type(scheduled) is list
        and type(stopping) is bool
        and callable(getattr(loop, "get_task_factory", None))
        and isinstance(fd, int)
        and fd >= 0
    ):
        return None
    return DirectWait(loop, fd)


def selector_fd(loop: asyncio.AbstractEventLoop) -> int | None:
    """The epoll fd of ``loop``'s selector if :func:`probe` accepts the loop, else None."""
    found = probe(loop)
    return None if found is None else found.fd


def direct_wait_budget(loop: asyncio.AbstractEventLoop, cap: float) -> float | None:
    """None if code running on ``loop`` must not block (the loop has work, or is not one
    :func:`probe` accepts); else the seconds it may block, at most ``cap``."""
    found = probe(loop)
    return None if found is None else found.budget(cap)
