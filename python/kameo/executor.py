"""``kameo.Executor``: a :class:`concurrent.futures.Executor` on a kameo pool.

For synchronous code (scripts, notebooks, threads)::

    with kameo.Executor(max_workers=4) as ex:
        fut = ex.submit(pkg.mod.f, 1, y=2)        # a concurrent.futures.Future
        results = list(ex.map(pkg.mod.f, range(10_000)))

The executor runs its own :class:`~kameo.Pool` on a private event-loop thread, so it works from
any thread and from inside a running event loop (a Jupyter cell, or
``await loop.run_in_executor(ex, f, x)``) without deadlock. Functions travel by reference
(``module:qualname``, see ``kameo._functions``). Exceptions arrive as with
``ProcessPoolExecutor`` (a remote ``ValueError`` is a ``ValueError``); a worker's death fails
only the futures of the calls it was running (:class:`~kameo.WorkerCrashed`) and the executor
goes on serving (there is no broken state). ``cancel()`` succeeds until the result has arrived:
the call is cancelled in the worker (a sync function already running finishes there, its
result dropped). ``map`` pulls its input lazily, within a window, in batches that adapt to the
items' cost (``Pool.map``); unlike ``ProcessPoolExecutor.map`` it does not submit everything at
once, so work past the window waits for the results to be taken.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kameo import _functions
from kameo._mapping import MapResults
from kameo.pool import Pool

__all__ = ["Executor"]

#: Bound on waits for the executor's own loop thread (start, shutdown).
_LOOP_WAIT = 60.0


class Executor(cf.Executor):
    """A ``concurrent.futures.Executor`` whose workers are a kameo pool (``max_workers``
    processes; any other :class:`~kameo.Pool` option but the target, e.g. ``env=``,
    ``default_timeout=``, ``max_tasks_per_worker=``)."""

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        initializer: Callable[..., Any] | str | None = None,
        initargs: tuple[Any, ...] = (),
        **pool_options: Any,
    ) -> None:
        if "target" in pool_options:
            raise TypeError("Executor runs functions given to submit/map: it takes no target")
        if max_workers is not None and max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        self._allow_pickle = bool(pool_options.get("allow_pickle", False))
        self._pool = Pool(size=max_workers, init=initializer, initargs=initargs, **pool_options)
        self._shutdown = False
        self._lock = threading.Lock()
        self._futures: weakref.WeakSet[cf.Future[Any]] = weakref.WeakSet()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kameo-executor", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._pool.start(), None)
        except BaseException:
            self._stop_loop()
            raise
        _open_executors.add(self)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<kameo.Executor max_workers={self._pool.size} {state}>"

    @property
    def pool(self) -> Pool:
        """The executor's pool (its methods must run on the executor's loop)."""
        return self._pool

    # ------------------------------------------------------------------------- submit

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future[Any]:
        """Run ``fn(*args, **kwargs)`` in a worker; a :class:`concurrent.futures.Future`.
        Raises :class:`~kameo.SerializationError` at once when ``fn`` cannot be sent by
        reference (a lambda, a closure, ...), and ``RuntimeError`` after shutdown."""
        target = _functions.reference(fn, allow_pickle=self._allow_pickle)
        fut: cf.Future[Any] = cf.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._futures.add(fut)
            self._loop.call_soon_threadsafe(self._start_call, fut, target, args, kwargs)
        return fut

    def _start_call(self, fut: cf.Future[Any], target: str | bytes, args: Any, kwargs: Any) -> None:
        """On the loop: send the call; its answer settles ``fut`` (unless it was cancelled)."""
        if fut.cancelled():
            return
        ask = self._pool.call(target, *args, **kwargs)

        def settle(done: asyncio.Future[Any]) -> None:
            if not fut.set_running_or_notify_cancel():
                return  # cancelled while it ran
            if done.cancelled():
                fut.set_exception(cf.CancelledError())
            elif (exc := done.exception()) is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(done.result())

        def cancelled(f: cf.Future[Any]) -> None:
            if f.cancelled() and not ask.done():
                self._loop.call_soon_threadsafe(ask.cancel)

        ask.add_done_callback(settle)
        fut.add_done_callback(cancelled)

    # ---------------------------------------------------------------------------- map

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int | None = None,
    ) -> Iterator[Any]:
        """``fn`` over the items of ``iterables`` (zipped), results in input order, as
        :meth:`concurrent.futures.Executor.map`. ``TimeoutError`` when a result is not there
        ``timeout`` seconds after this call; ``chunksize`` fixes the batch size (default:
        adaptive). The first item's error is raised where its result would be."""
        target = _functions.reference(fn, allow_pickle=self._allow_pickle)
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        deadline = None if timeout is None else time.monotonic() + timeout
        # One iterable: its items are the arguments (no tuple each); else zipped, starred.
        star = len(iterables) != 1
        items = zip(*iterables, strict=False) if star else iterables[0]

        async def make() -> MapResults:
            results = MapResults(self._pool, items, target, chunksize=chunksize, star=star)
            await results._fill()  # the work starts now, as far as the window goes
            return results

        results = self._run(make(), deadline)
        return self._iterate(results, deadline)

    def _iterate(self, results: MapResults, deadline: float | None) -> Iterator[Any]:
        try:
            while True:
                values, errors = self._run(results.take(), deadline)
                if not values:
                    return
                if errors is None:
                    yield from values
                    continue
                for i, value in enumerate(values):
                    if i in errors:
                        raise errors[i]
                    yield value
        finally:
            if not self._loop.is_closed():
                self._loop.call_soon_threadsafe(results.close)

    # ----------------------------------------------------------------------- shutdown

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new work; ``cancel_futures`` cancels what has not finished; ``wait`` waits for
        the rest, then stops the workers. Idempotent."""
        with self._lock:
            already = self._shutdown
            self._shutdown = True
        if cancel_futures:
            with self._lock:
                futures = list(self._futures)
            for fut in futures:
                fut.cancel()
        if already:
            if wait:
                self._thread.join(_LOOP_WAIT)
            return
        if self._loop.is_closed():
            return
        closing = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        if wait:
            closing.result(_LOOP_WAIT)
            self._thread.join(_LOOP_WAIT)

    def _at_exit(self) -> None:
        """The interpreter exits with this executor open: stop the workers (SIGKILL at once,
        as for a pool left open) and the loop thread, which must not outlive the interpreter's
        finalisation (it would still log and spawn replacements)."""
        with self._lock:
            self._shutdown = True
        if self._loop.is_closed() or not self._thread.is_alive():
            return

        def kill_and_stop() -> None:
            self._pool._kill_now()
            self._loop.stop()

        self._loop.call_soon_threadsafe(kill_and_stop)
        self._thread.join(5.0)

    async def _close(self) -> None:
        try:
            with self._lock:
                pending = [f for f in self._futures if not f.done()]
            if pending:
                await asyncio.gather(
                    *(asyncio.wrap_future(f) for f in pending), return_exceptions=True
                )
            await self._pool.close()
        finally:
            _open_executors.discard(self)
            self._loop.call_soon(self._loop.stop)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(_LOOP_WAIT)

    # ------------------------------------------------------------------------ helpers

    def _run(self, coro: Any, deadline: float | None) -> Any:
        """Run ``coro`` on the executor's loop and wait for it (until ``deadline``)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a kameo.Executor cannot be waited on from its own loop thread")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return fut.result(wait)
        except cf.TimeoutError:
            fut.cancel()
            raise TimeoutError("no result within the timeout") from None


#: Executors not shut down (held: an open executor lives, as its workers do, until shutdown).
_open_executors: set[Executor] = set()


@atexit.register
def _stop_open_executors() -> None:
    # Registered after kameo.pool's own hook, so it runs first (atexit is last in, first out).
    for ex in list(_open_executors):
        ex._at_exit()
