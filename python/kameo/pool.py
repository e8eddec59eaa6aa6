"""`Pool`: a pool of Python worker processes driven from asyncio."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import secrets
import signal
import sys
import time
import weakref
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from kameo import _aio, _eager, _native, _signals
from kameo._context import traceparent as _traceparent
from kameo._future import AskFuture
from kameo._native import (
    EVENT_CALLBACK,
    EVENT_CALLBACK_CANCEL,
    EVENT_CALLBACK_CREDIT,
    EVENT_DRAINED,
    EVENT_EOF,
    EVENT_IO_ERROR,
    EVENT_PROTOCOL_ERROR,
    EVENT_PROTOCOL_WARNING,
    EVENT_READY,
    EVENT_REJECTED,
    EVENT_RETIRE,
    EVENT_STARTUP_FAILED,
)
from kameo._process import WorkerProcess, exit_text
from kameo.callbacks import CallbackRunner, Callbacks
from kameo.errors import (
    CallTimeout,
    HandlerTypeError,
    PoolClosed,
    WorkerCrashed,
    WorkerStartupError,
)
from kameo.stream import Stream

__all__ = ["Pool", "PoolStats", "WorkerInfo"]

log = logging.getLogger("kameo")

MiB = 1024 * 1024
#: With ``prefetch="auto"``: at most this many requests sent ahead to a busy worker, fewer as
#: its requests take longer (about 1 ms of its work), none while it is stuck on a long one.
AUTO_PREFETCH_MAX = 64
#: Longest wait for an answer outside the event loop (seconds); then the loop waits.
WAIT_ANSWER_MAX = 0.05

_current_task = _aio.current_task
# Only called once _aio.probe() accepted the loop, which it does only where both exist.
_enter_task: Any = _aio.enter_task
_leave_task: Any = _aio.leave_task


#: Bytes-like values and numpy arrays from this size travel in shared memory.
DEFAULT_SHM_THRESHOLD = 1 * MiB
DEFAULT_STREAM_WINDOW = 256
# Bounds on waiting for a worker to go once it has been told to (each step of close()).
EXIT_WAIT = 1.0
KILL_WAIT = 5.0
# Crash-loop protection: this many crashes of one slot within the window back off.
CRASH_WINDOW = 10.0
CRASH_FREE_RESTARTS = 3
MAX_BACKOFF = 5.0
Channel = _native.Channel


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker, from :attr:`Pool.workers`.

    ``state`` is one of "starting", "ready", "busy", "retiring" or "dead" (a slot whose
    process died and whose replacement is not running yet; ``last_exit`` says why).
    """

    id: int
    pid: int
    state: str
    in_flight: int
    completed: int
    slot: int = 0
    restarts: int = 0
    last_exit: str | None = None


@dataclass(frozen=True)
class PoolStats:
    """Counters since the pool started, from :meth:`Pool.stats`.

    ``asks``: requests submitted (asks and streams); ``completed``: requests a worker answered,
    with a value or an error (``errors`` of them were errors raised by the handler);
    ``crashes``: workers that died while serving; ``retries``: idempotent requests run again
    after a crash; ``timeouts`` and ``cancelled``: requests the caller gave up on; ``p50`` and
    ``p99``: seconds from submission to answer (about 9% resolution).
    """

    asks: int
    completed: int
    errors: int
    crashes: int
    retries: int
    timeouts: int
    cancelled: int
    p50: float | None
    p99: float | None


class _Slot:
    """One of the ``size`` places in the pool; its process changes when it is replaced."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.worker: WorkerProcess | None = None
        self.restarts = 0
        self.crashes: deque[float] = deque(maxlen=CRASH_FREE_RESTARTS + 8)
        self.last_exit: str | None = None
        self.last_id = -1
        self.last_pid = 0
        self.failures = 0  # consecutive replacements that failed to start
        self.respawning = False


class Pool:
    """A pool of worker processes, each running ``handler(msg)`` from ``target``.

    Use as ``async with Pool("pkg.mod:handler", size=4) as pool: await pool.ask(msg)``.
    """

    def __init__(
        self,
        target: str,
        *,
        size: int | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        startup_timeout: float = 30.0,
        max_concurrency: int = 1,
        max_frame_bytes: int = 64 * MiB,
        prefetch: int | Literal["auto"] = "auto",
        callbacks: Callbacks | None = None,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        init: str | None = None,
        default_timeout: float | None = None,
        cancel_grace: float = 2.0,
        max_retries: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        allow_pickle: bool = False,
        shm_threshold: int | None = DEFAULT_SHM_THRESHOLD,
    ) -> None:
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        if init is not None and ":" not in init:
            raise ValueError(f"init must be 'module:function', got {init!r}")
        size = os.cpu_count() or 1 if size is None else size
        if prefetch == "auto":
            self._prefetch, self._prefetch_auto = AUTO_PREFETCH_MAX, True
        elif isinstance(prefetch, int) and not isinstance(prefetch, bool):
            self._prefetch, self._prefetch_auto = prefetch, False
        else:
            raise ValueError(f'prefetch must be an int or "auto", got {prefetch!r}')
        for name, value, low in (
            ("size", size, 1),
            ("max_concurrency", max_concurrency, 1),
            ("prefetch", self._prefetch, 0),
            ("stream_window", stream_window, 1),
            ("max_retries", max_retries, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not 1024 <= max_frame_bytes <= 0xFFFF_FFFF:
            raise ValueError("max_frame_bytes must be between 1 KiB and 4 GiB")
        if shm_threshold is not None and shm_threshold < 1:
            raise ValueError("shm_threshold must be at least 1 byte, or None to disable")
        if heartbeat_interval <= 0 or heartbeat_timeout <= heartbeat_interval:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        if callbacks is not None and not isinstance(callbacks, Callbacks):
            raise TypeError("callbacks must be a kameo.Callbacks registry")
        self.target = target
        self._size = size
        self._python = python or sys.executable
        self._env = dict(env or {})
        self._cwd = os.fspath(cwd) if cwd is not None else None
        self._startup_timeout = startup_timeout
        self._max_concurrency = max_concurrency
        self._max_frame_bytes = max_frame_bytes
        self._stream_window = stream_window
        self._callbacks = callbacks or Callbacks()
        self._init = init
        self._default_timeout = default_timeout
        self._cancel_grace = cancel_grace
        self._max_retries = max_retries
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._max_tasks = max_tasks_per_worker or 0
        self._max_memory = max_memory_per_worker
        self._allow_pickle = allow_pickle
        self._shm_threshold = shm_threshold
        self._secret = secrets.token_bytes(32)
        self._slots = [_Slot(i) for i in range(size)]
        self._workers: dict[int, WorkerProcess] = {}
        self._next_worker_id = 0
        self._core: Any = None
        self._runner: CallbackRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # new -> starting -> running -> closing -> closed
        self._closed_event: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._handler_kind = ""
        self._crashes = 0
        self._timeouts = 0
        self._cancelled = 0
        self._abandon_cb = self._abandon
        # The loop's state for direct waits (None: the loop is not one _aio knows, e.g. uvloop).
        self._direct: _aio.DirectWait | None = None
        self._answer_waits = 0  # waits made by _wait_answer (tests check it is used)

    # ----------------------------------------------------------------- public API

    @property
    def size(self) -> int:
        """The number of workers the pool keeps running."""
        return self._size

    @property
    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each worker process (and of each slot waiting for a replacement)."""
        if self._core is None:
            return []
        live = {row[0]: row for row in self._core.worker_stats()}
        out = []
        for slot in self._slots:
            procs = [w for w in self._workers.values() if w.slot == slot.index and not w.lost]
            for w in sorted(procs, key=lambda w: w.id):
                wid, pid, state, in_flight, completed = live.get(
                    w.id, (w.id, w.pid, "starting", 0, 0)
                )
                if w.retiring:
                    state = "retiring"
                out.append(
                    WorkerInfo(
                        wid,
                        pid,
                        state,
                        in_flight,
                        completed,
                        slot.index,
                        slot.restarts,
                        slot.last_exit,
                    )
                )
            if not procs and slot.last_id >= 0:
                out.append(
                    WorkerInfo(
                        slot.last_id,
                        slot.last_pid,
                        "dead",
                        0,
                        0,
                        slot.index,
                        slot.restarts,
                        slot.last_exit,
                    )
                )
        return out

    def stats(self) -> PoolStats:
        """Counters since the pool started, and request latency percentiles (seconds)."""
        if self._core is None:
            return PoolStats(0, 0, 0, 0, 0, 0, 0, None, None)
        completed, errors, retries, p50, p99 = self._core.stats()
        return PoolStats(
            self._core.asks,
            completed,
            errors,
            self._crashes,
            retries,
            self._timeouts,
            self._cancelled,
            p50,
            p99,
        )

    async def __aenter__(self) -> Pool:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start every worker concurrently and wait until all are ready.

        Raises :class:`WorkerStartupError` within ``startup_timeout`` if any cannot start.
        """
        if self._state != "new":
            if self._state in ("closing", "closed"):
                raise PoolClosed("the pool is closed")
            return
        self._state = "starting"
        loop = self._loop = asyncio.get_running_loop()
        self._direct = _aio.probe(loop)
        self._core = _native.PoolCore(
            loop,
            self._on_event,
            self._secret,
            self._welcome(),
            max_frame_bytes=self._max_frame_bytes,
            concurrency=self._max_concurrency,
            prefetch=self._prefetch,
            adaptive_prefetch=self._prefetch_auto,
            stream_window=self._stream_window,
            max_tasks=self._max_tasks,
            max_memory=self._max_memory,
            allow_pickle=self._allow_pickle,
            shm_threshold=self._shm_threshold,
        )
        self._runner = CallbackRunner(
            self._callbacks, self._core, loop, self._stream_window, Channel
        )
        _live_pools.add(self)
        _signals.acquire(loop, lambda: list(_live_pools))
        try:
            workers = [self._spawn(slot) for slot in self._slots]
            await self._await_ready(workers)
        except BaseException:
            await self.close(grace=0)
            raise
        self._state = "running"
        self._background_task(self._supervise())

    def ask(
        self,
        msg: Any,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        traceparent: str | None = None,
    ) -> AskFuture:
        """Run the handler on ``msg`` in a worker; await the result: ``await pool.ask(msg)``.

        The awaitable raises :class:`RemoteError` (also an instance of the built-in type when
        the handler raised a built-in exception), :class:`CallTimeout`, :class:`WorkerCrashed`,
        :class:`SerializationError`, :class:`ProtocolError` or :class:`PoolClosed`. Cancelling
        it (or the task awaiting it), and the timeout, cancel the request in the worker.
        ``idempotent=True`` lets the request run again on another worker (up to
        ``max_retries`` times) if its worker dies; other requests never run twice.
        """
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                # Not started, and no loop to make a future on: say so as a kameo error.
                raise PoolClosed(
                    f"{self._not_running()} (pool.ask() was called outside a running event loop)"
                ) from None
        fut = AskFuture(loop=loop)
        if self._state != "running":
            fut.set_exception(PoolClosed(self._not_running()))
            return fut
        if self._handler_kind in ("gen", "asyncgen"):
            fut.set_exception(
                HandlerTypeError(
                    f"handler {self.target!r} is a generator: use pool.stream(), not pool.ask()"
                )
            )
            return fut
        retries = self._max_retries if idempotent else 0
        if timeout is None:
            timeout = self._default_timeout
        timer = None
        if timeout is not None:
            # Holds the future weakly; the core cancels it when the request is resolved.
            timer = fut._kameo_timer = loop.call_later(
                timeout, self._expire, weakref.ref(fut), timeout
            )
        try:
            rid = self._core.submit(
                msg, fut, traceparent or _traceparent.get(), retries, timer is not None
            )
        except Exception as exc:
            if timer is not None:
                timer.cancel()
            fut.set_exception(exc)
            return fut
        fut._kameo_rid = rid
        fut._kameo_abandon = self._abandon_cb
        fut._kameo_wait = self._wait_answer if self._direct is not None else None
        return fut

    def stream(
        self, msg: Any, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Stream:
        """Run a generator handler on ``msg`` and iterate its items as the worker yields them:
        ``async for item in pool.stream(msg): ...``.

        ``timeout`` bounds the whole stream (:class:`CallTimeout`). Leaving the loop early,
        cancellation or the timeout cancel the generator in the worker.
        """
        if self._state != "running":
            raise PoolClosed(self._not_running())
        if self._handler_kind not in ("gen", "asyncgen"):
            raise HandlerTypeError(
                f"handler {self.target!r} is not a generator: use pool.ask(), not pool.stream()"
            )
        if timeout is None:
            timeout = self._default_timeout
        return Stream(self, msg, timeout, traceparent or _traceparent.get())

    async def close(self, grace: float = 5.0) -> None:
        """Stop the pool: refuse new asks, let in-flight ones finish within ``grace`` seconds,
        then ask workers to exit, SIGTERM, SIGKILL, and reap every process. Idempotent."""
        if self._state in ("closing", "closed"):
            if self._closed_event is not None:
                await self._closed_event.wait()
            return
        if self._state == "new":
            self._state = "closed"
            return
        self._state = "closing"
        self._closed_event = asyncio.Event()
        try:
            await self._shutdown(grace)
        finally:
            self._state = "closed"
            self._closed_event.set()
            _live_pools.discard(self)
            _signals.release()

    def __repr__(self) -> str:
        return f"<kameo.Pool {self.target!r} size={self._size} {self._state}>"

    # ----------------------------------------------------------------- requests

    def _expire(self, ref: weakref.ref[AskFuture], timeout: float) -> None:
        fut = ref()
        if fut is not None and not fut.done():
            fut.set_exception(CallTimeout(f"no reply within timeout={timeout}s"))
            self._abandon(fut._kameo_rid, timed_out=True)

    def _wait_answer(self, fut: AskFuture) -> bool:
        """Awaiting ``fut`` (see ``AskFuture.__await__``): if the loop has nothing to run
        before it would block in its selector, wait for the answer here instead, in one
        ``ppoll`` on the worker's socket and the selector (so any other event, a due timer, a
        signal or a thread's ``call_soon_threadsafe`` still ends the wait at once), and resume
        the awaiting task without a loop iteration."""
        direct = self._direct
        if direct is None or _eager.stepping.depth:  # an eager first step nests in another's
            return False
        timeout = direct.budget(WAIT_ANSWER_MAX)
        if timeout is None:
            return False
        self._answer_waits += 1
        loop = direct.loop
        # Whatever the answers bring (a worker's callback into this process) runs as it would
        # from the loop: outside the awaiting task, which is suspended meanwhile.
        task = _current_task(loop)
        if task is not None:
            _leave_task(loop, task)
        try:
            return bool(self._core.wait_answer(fut._kameo_rid, direct.fd, timeout))
        except Exception as exc:  # as the loop does with an error in a callback: report it
            loop.call_exception_handler(
                {"message": "kameo: error while reading a worker's answers", "exception": exc}
            )
            return False
        finally:
            if task is not None:
                _enter_task(loop, task)

    def _count_abandoned(self, timed_out: bool) -> None:
        """A caller gave up on a request: it counts as timed out or as cancelled, not both."""
        if timed_out:
            self._timeouts += 1
        else:
            self._cancelled += 1

    def _abandon(self, rid: int, timed_out: bool = False) -> None:
        """The caller gave up on request ``rid``: cancel it in its worker, and if the worker
        does not let go within ``cancel_grace`` (a sync handler cannot be interrupted),
        replace the worker."""
        core = self._core
        if core is None or self._loop is None:
            return
        self._count_abandoned(timed_out)
        wid = core.running_on(rid)
        if wid is None:
            return  # still queued (it will be skipped) or already answered
        core.cancel(rid)
        self._loop.call_later(self._cancel_grace, self._enforce_cancel, wid, rid)

    def _enforce_cancel(self, wid: int, rid: int) -> None:
        if self._core is None or self._core.running_on(rid) != wid:
            return
        w = self._workers.get(wid)
        if w is not None and not w.lost:
            log.warning(
                "%s did not stop a cancelled request within cancel_grace=%ss; replacing it",
                w.describe(),
                self._cancel_grace,
            )
            w.kill(signal.SIGKILL)

    # ----------------------------------------------------------------- internals

    def _not_running(self) -> str:
        if self._state == "new":
            return "the pool is not started: use 'async with Pool(...)' or 'await pool.start()'"
        if self._state == "starting":
            return "the pool is still starting"
        return "the pool is closed"

    def _background_task(self, coro: Any) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _welcome(self) -> dict[str, Any]:
        same_interpreter = os.path.realpath(self._python) == os.path.realpath(sys.executable)
        sys_path = None
        if same_interpreter:
            cwd = os.getcwd()
            sys_path = [os.path.join(cwd, p) if not os.path.isabs(p) else p for p in sys.path]
        return {
            "target": self.target,
            "init": self._init,
            "max_concurrency": self._max_concurrency,
            "max_frame_bytes": self._max_frame_bytes,
            "sys_path": sys_path,
            "callbacks": self._callbacks.paths,
            "stream_window": self._stream_window,
            "heartbeat_interval": self._heartbeat_interval,
            "allow_pickle": self._allow_pickle,
            "shm_threshold": self._shm_threshold,
        }

    def _spawn(self, slot: _Slot) -> WorkerProcess:
        loop = self._loop
        assert loop is not None
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        env = dict(os.environ)
        env.update(self._env)
        env["KAMEO_WORKER_ID"] = str(worker_id)
        env["KAMEO_PARENT_PID"] = str(os.getpid())
        argv = [self._python, "-m", "kameo._worker"]
        try:
            pid, sock_fd, stderr_fd, progress_fd = _native.spawn_worker(
                argv, list(env.items()), self._cwd, self._secret
            )
        except OSError as exc:
            raise WorkerStartupError(
                f"cannot start a worker for {self.target!r} with python {self._python!r}: {exc}"
            ) from exc
        w = WorkerProcess(loop, worker_id, slot.index, pid, sock_fd, stderr_fd)
        self._workers[worker_id] = w
        if not w.retiring:
            slot.worker = w
        self._core.add_worker(worker_id, pid, sock_fd, progress_fd)
        loop.add_reader(sock_fd, self._core.on_readable, worker_id)
        w.watch(self._on_exit)
        return w

    async def _await_ready(self, workers: list[WorkerProcess]) -> None:
        waits = [w.ready for w in workers]
        done, pending = await asyncio.wait(waits, timeout=self._startup_timeout)
        failures = [f.exception() for f in done if f.exception() is not None]
        if failures:
            first = failures[0]
            assert first is not None
            if len(failures) > 1:
                raise WorkerStartupError(f"{first} ({len(failures)} workers failed)") from None
            raise first
        if pending:
            late = [w for w in workers if not w.ready.done()]
            names = ", ".join(w.describe() for w in late)
            tail = late[0].tail()
            for w in late:
                w.kill(signal.SIGKILL)
            raise WorkerStartupError(
                f"{names} did not finish starting {self.target!r} within "
                f"startup_timeout={self._startup_timeout}s"
                + (f"; last stderr lines:\n{tail}" if tail else "")
            )

    def _on_event(self, worker_id: int, name: str, payload: Any) -> None:
        w = self._workers.get(worker_id)
        if w is None:
            return
        runner = self._runner
        assert runner is not None
        if name == EVENT_CALLBACK:
            runner.start(worker_id, payload)
        elif name == EVENT_CALLBACK_CREDIT:
            runner.credit(worker_id, payload)
        elif name == EVENT_CALLBACK_CANCEL:
            runner.cancel(worker_id, payload)
        elif name == EVENT_READY:
            if isinstance(payload, dict):
                self._handler_kind = str(payload.get("kind", ""))
            if not w.ready.done():
                w.ready.set_result(payload)
            self._slots[w.slot].failures = 0
            self._core.dispatch_queued()
        elif name == EVENT_STARTUP_FAILED:
            info = payload if isinstance(payload, dict) else {}
            message = (
                f"{w.describe()} could not {info.get('stage', 'load target')} "
                f"{info.get('what', repr(self.target))}: "
                f"{info.get('type', '?')}: {info.get('message', '')}"
            )
            tb = info.get("traceback")
            if tb:
                message += f"\n\nWorker traceback:\n{tb.rstrip()}"
            self._fail_startup(w, WorkerStartupError(message))
        elif name == EVENT_REJECTED:
            self._fail_startup(w, WorkerStartupError(f"{w.describe()} was refused: {payload}"))
            self._lose(w, f"handshake refused: {payload}")
        elif name in _LOST:
            reason = {EVENT_EOF: "closed its connection"}.get(name, f"{name}: {payload}")
            if name == EVENT_PROTOCOL_ERROR:
                log.error("%s broke the protocol, replacing it: %s", w.describe(), payload)
            self._lose(w, reason)
        elif name == EVENT_PROTOCOL_WARNING:
            log.warning("%s", payload)
        elif name == EVENT_RETIRE:
            self._retire(w, str(payload))
        elif name == EVENT_DRAINED and w.retiring:
            self._core.send_control(w.id, Channel.SHUTDOWN)

    def _fail_startup(self, w: WorkerProcess, exc: BaseException) -> None:
        if not w.ready.done():
            w.ready.set_exception(exc)
            w.ready.exception()  # retrieved: the waiter may be gone already

    # ----------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        """Heartbeats and memory limits, checked a few times per heartbeat timeout."""
        tick = min(self._heartbeat_timeout / 4, 0.5)
        while self._state == "running":
            await asyncio.sleep(tick)
            for wid in self._core.silent_workers(self._heartbeat_timeout):
                w = self._workers.get(wid)
                if w is not None and not w.lost:
                    log.error(
                        "%s sent nothing for heartbeat_timeout=%ss; killing it",
                        w.describe(),
                        self._heartbeat_timeout,
                    )
                    w.hung = True
                    w.kill(signal.SIGKILL)
            if self._max_memory is not None:
                for w in list(self._workers.values()):
                    if not w.lost and not w.retiring and w.ready.done():
                        rss = _rss(w.pid)
                        if rss is not None and rss > self._max_memory:
                            why = f"max_memory_per_worker ({rss} > {self._max_memory} bytes)"
                            self._retire(w, why)  # first: the core may report it drained at once
                            self._core.retire(w.id)

    def _retire(self, w: WorkerProcess, why: str) -> None:
        """Replace ``w`` gracefully: its successor starts now, it leaves once idle."""
        if w.retiring or w.lost or self._state != "running":
            return
        log.info("%s retires: %s", w.describe(), why)
        w.retiring = True
        slot = self._slots[w.slot]
        slot.last_exit = f"retired: {why}"
        self._schedule_replace(slot, 0.0)

    def _on_exit(self, w: WorkerProcess) -> None:
        """The pidfd is readable: the process has exited. Reap it."""
        w.reap()
        if not w.lost:
            self._lose(w, "exited")

    def _lose(self, w: WorkerProcess, reason: str) -> None:
        """The worker is gone or unusable: reap it, fail what it had started, requeue the rest,
        and start a replacement."""
        if w.lost:
            return
        w.lost = True
        assert self._loop is not None
        self._loop.remove_reader(w.sock_fd)
        self._background_task(self._finish_loss(w, reason))

    async def _finish_loss(self, w: WorkerProcess, reason: str) -> None:
        if not await w.wait_exit(0.5 if self._state != "closing" else EXIT_WAIT):
            w.kill(signal.SIGKILL)
            await w.wait_exit(KILL_WAIT)
        w.read_stderr()  # collect the last lines
        if w.exited.done() and w.exited.result() >= 0:
            what, exitcode, sig = exit_text(w.exited.result())
            if reason not in ("exited", "closed its connection"):
                what = f"was dropped ({reason}) and {what}"
        else:
            what, exitcode, sig = reason, None, None
        if w.hung:
            what = f"stopped sending heartbeats for {self._heartbeat_timeout}s and was killed"
        tail = w.tail()
        suffix = f"; last stderr lines:\n{tail}" if tail else ""
        self._fail_startup(
            w,
            WorkerStartupError(
                f"{w.describe()} {what} before it was ready (target {self.target!r}){suffix}"
            ),
        )
        exc = WorkerCrashed(
            f"{w.describe()} {what} while running the request{suffix}",
            worker_id=w.id,
            pid=w.pid,
            exitcode=exitcode,
            signal=sig,
            stderr_tail=tail,
        )
        completed = next((row[4] for row in self._core.worker_stats() if row[0] == w.id), 0)
        self._core.remove_worker(w.id, exc)
        if self._runner is not None:
            self._runner.worker_gone(w.id)
        w.close_stderr()
        self._workers.pop(w.id, None)
        slot = self._slots[w.slot]
        if slot.worker is w:
            slot.worker = None
        slot.last_id, slot.last_pid = w.id, w.pid
        if w.retiring:
            return  # its successor is already running
        crashed = self._state == "running" and w.ready.done() and not w.ready.exception()
        if crashed:
            self._crashes += 1
            slot.restarts += 1
            slot.last_exit = what
            if not completed:
                # A worker that dies before finishing a single request is what a crash loop
                # looks like (a broken handler or environment); one killed after doing work
                # (OOM, an operator, chaos) is replaced at once.
                slot.crashes.append(time.monotonic())
            log.warning("%s %s; starting a replacement", w.describe(), what)
        if self._state == "running" and not slot.respawning:
            self._schedule_replace(slot, self._backoff(slot))
        if not any(not x.lost for x in self._workers.values()) and not self._respawn_pending():
            self._core.fail_queued(exc)

    def _respawn_pending(self) -> bool:
        return self._state == "running" and any(s.respawning for s in self._slots)

    def _backoff(self, slot: _Slot) -> float:
        now = time.monotonic()
        recent = sum(1 for t in slot.crashes if now - t < CRASH_WINDOW)
        delay = 0.0
        if recent > CRASH_FREE_RESTARTS:
            delay = min(0.1 * 2 ** (recent - CRASH_FREE_RESTARTS), MAX_BACKOFF)
        if slot.failures:
            delay = max(delay, min(0.1 * 2**slot.failures, MAX_BACKOFF))
        if delay:
            slot.last_exit = (
                f"{slot.last_exit or 'crashed'}; crash loop: next start in {delay:.1f}s"
            )
            log.error(
                "worker slot %d crashed %d times in %ss; backing off %.1fs",
                slot.index,
                recent,
                CRASH_WINDOW,
                delay,
            )
        return delay

    def _schedule_replace(self, slot: _Slot, delay: float) -> None:
        """Start a replacement for ``slot`` after ``delay``; until it is ready or gives up, the
        slot counts as respawning (so queued requests wait for it rather than fail)."""
        slot.respawning = True
        self._background_task(self._replace(slot, delay))

    async def _replace(self, slot: _Slot, delay: float) -> None:
        again = False
        try:
            if delay:
                await asyncio.sleep(delay)
            if self._state != "running":
                return
            try:
                w = self._spawn(slot)
                await self._await_ready([w])
            except WorkerStartupError as exc:
                slot.failures += 1
                slot.last_exit = f"replacement failed to start: {exc}"
                log.error("could not start a replacement worker: %s", exc)
                if not any(not x.lost and x.ready.done() for x in self._workers.values()):
                    self._core.fail_queued(exc)
                if self._state == "running":
                    again = True
                    self._schedule_replace(slot, self._backoff(slot))
        finally:
            if not again:
                slot.respawning = False

    # ----------------------------------------------------------------- shutdown

    async def _shutdown(self, grace: float) -> None:
        loop = self._loop
        assert loop is not None
        core = self._core
        for task in list(self._background):
            task.cancel()
        if core is not None and grace > 0:
            deadline = loop.time() + grace
            while core.outstanding() and loop.time() < deadline:
                await asyncio.sleep(0.005)
        closed = PoolClosed("the pool was closed before the request completed")
        if core is not None:
            core.fail_queued(closed)
        if self._runner is not None:
            self._runner.cancel_all()
        workers = list(self._workers.values())
        for w in workers:
            if w.lost or core is None:
                continue
            if w.ready.done():
                core.send_control(w.id, Channel.SHUTDOWN)
            else:
                w.kill(signal.SIGKILL)  # still starting: nothing to finish
        for step, sig in ((EXIT_WAIT, signal.SIGTERM), (EXIT_WAIT, signal.SIGKILL)):
            alive = [w for w in workers if not w.exited.done()]
            if not alive:
                break
            await asyncio.wait([loop.create_task(w.wait_exit(step)) for w in alive])
            for w in alive:
                if not w.exited.done():
                    w.kill(sig)
        for w in workers:
            if not w.exited.done() and not await w.wait_exit(KILL_WAIT):
                log.error("%s did not exit after SIGKILL", w.describe())
        for w in workers:
            if not w.lost:
                w.lost = True
                loop.remove_reader(w.sock_fd)
            self._fail_startup(w, closed)
            w.read_stderr()
            w.close_stderr()
            if core is not None:
                core.remove_worker(w.id, closed)
            self._workers.pop(w.id, None)
        if self._background:
            await asyncio.wait(list(self._background), timeout=KILL_WAIT)

    def _kill_now(self) -> None:
        for w in list(self._workers.values()):
            w.kill_now()


def _rss(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


# Events after which a worker is lost (its connection is read no further).
_LOST = (EVENT_EOF, EVENT_IO_ERROR, EVENT_PROTOCOL_ERROR)

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    for pool in list(_live_pools):
        pool._kill_now()
