"""`Pool`: a pool of Python worker processes driven from asyncio."""

from __future__ import annotations

import asyncio
import atexit
import functools
import itertools
import logging
import os
import secrets
import sys
import weakref
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from kameo import (
    _aio,
    _calls,
    _eager,
    _functions,
    _native,
    _otel,
    _runtime,
    _signals,
    _worker_log,
    envs,
    events,
)
from kameo._context import traceparent as _traceparent
from kameo._future import AskFuture
from kameo._handler import NONE
from kameo._mapping import MapResults
from kameo._native import (
    EVENT_CALLBACK,
    EVENT_CALLBACK_CANCEL,
    EVENT_CALLBACK_CREDIT,
    EVENT_DRAINED,
    EVENT_EOF,
    EVENT_IO_ERROR,
    EVENT_LOG,
    EVENT_PROTOCOL_ERROR,
    EVENT_PROTOCOL_WARNING,
    EVENT_READY,
    EVENT_REJECTED,
    EVENT_RETIRE,
    EVENT_STARTUP_FAILED,
)
from kameo._process import WorkerProcess
from kameo._supervisor import Supervisor, SupervisorOptions
from kameo.callbacks import CallbackRunner, Callbacks
from kameo.errors import (
    CallTimeout,
    HandlerTypeError,
    KameoError,
    PoolClosed,
    RefError,
    SerializationError,
)
from kameo.events import CallFinished, Emitter, Listener
from kameo.pipeline import Pipeline
from kameo.remote import RefTable, RemoteFunction
from kameo.session import Session
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
#: Room for a pickled target and init hook and the encoded initargs in WELCOME, which a worker
#: reads with a 1 MiB frame limit (``kameo._worker.HANDSHAKE_MAX_FRAME``).
WELCOME_ROOM = 768 * 1024
Channel = _native.Channel

#: What names a function for the workers: ``"module:qualname"`` (or ``"module.name"``), the
#: function (or class) itself, or what ``kameo._functions.reference`` made of it.
Target = str | bytes | Callable[..., Any]


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


class Pool:
    """A pool of worker processes, each running ``handler(msg)`` from ``target``.

    Use as ``async with Pool("pkg.mod:handler", size=4) as pool: await pool.ask(msg)``.
    ``target`` (and ``init``) may also be the function or class itself, sent by its
    ``module:qualname`` (:func:`kameo._functions.reference`; with ``allow_pickle=True`` one
    that has no such name is pickled with cloudpickle); ``init(*initargs)`` runs once in each
    worker before it takes work.

    ``python``: the workers' interpreter (default: this one), or a :class:`~kameo.PythonEnv`,
    whose workers are hermetic (see :mod:`kameo.envs`). Workers in this process's environment
    (the same ``sys.prefix``) get its ``sys.path``; others keep their own. ``pythonpath``:
    directories put first on the workers' ``sys.path``.

    ``forward_logs``: ``logging`` records made in the workers reach this process's loggers
    (:mod:`kameo._worker_log`); with False, a worker's ``logging`` is left as Python sets it up
    (no handler: warnings and errors go to its stderr, whose lines the pool logs as
    ``kameo.worker``).

    ``start``: how workers start. ``"exec"``: each one execs a fresh interpreter.
    ``"zygote"``: the pool execs one template process that imports kameo and ``preload``
    (default: the modules of ``target`` and ``init``), and forks each worker from it, single-
    threaded (:mod:`kameo._zygote`): start-up and replacement after a crash cost a fork
    instead of an interpreter start and the imports. A preload that fails or starts a thread
    makes the pool exec its workers instead, with a warning saying why.
    """

    def __init__(
        self,
        target: Target | None = None,
        *,
        size: int | None = None,
        python: str | os.PathLike[str] | envs.PythonEnv | None = None,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        pythonpath: Iterable[str | os.PathLike[str]] = (),
        startup_timeout: float = 30.0,
        max_concurrency: int = 1,
        max_frame_bytes: int = 64 * MiB,
        prefetch: int | Literal["auto"] = "auto",
        callbacks: Callbacks | None = None,
        stream_window: int = DEFAULT_STREAM_WINDOW,
        init: Target | None = None,
        initargs: Iterable[Any] = (),
        default_timeout: float | None = None,
        cancel_grace: float = 2.0,
        max_retries: int = 2,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: int | None = None,
        allow_pickle: bool = False,
        shm_threshold: int | None = DEFAULT_SHM_THRESHOLD,
        name: str | None = None,
        on_event: Listener | None = None,
        forward_logs: bool = True,
        start: Literal["exec", "zygote"] = "exec",
        preload: Iterable[str] | None = None,
    ) -> None:
        pool_name = name
        wire_target = wire_init = None
        if target is not None:
            wire_target = _functions.as_target(target, allow_pickle=allow_pickle)
            if type(wire_target) is str:
                module, sep, attr = wire_target.partition(":")
                if not sep or not module or not attr:
                    raise ValueError(f"target must be 'module:function', got {target!r}")
        if init is not None:
            wire_init = _functions.as_target(init, allow_pickle=allow_pickle, what="init")
            if type(wire_init) is str and ":" not in wire_init:
                raise ValueError(f"init must be 'module:function', got {init!r}")
        initargs = tuple(initargs)
        wire_initargs = None
        if initargs:
            if init is None:
                raise ValueError("initargs given without init")
            try:
                wire_initargs = _native.encode(initargs, allow_pickle=allow_pickle)
            except SerializationError as exc:
                pickle = "" if allow_pickle else " (allow_pickle=True pickles other types)"
                raise SerializationError(f"initargs cannot be encoded{pickle}: {exc}") from None
        extra = sum(len(w) for w in (wire_target, wire_init, wire_initargs) if type(w) is bytes)
        if extra > WELCOME_ROOM:
            raise SerializationError(
                f"the pickled target, init and encoded initargs take {extra} bytes, over the "
                f"{WELCOME_ROOM} the workers' handshake has room for: pass large data in a call "
                "(or have init load it) instead"
            )
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
        if isinstance(pythonpath, (str, bytes, os.PathLike)):
            raise TypeError("pythonpath must be a list of directories, not a single path")
        #: The target as messages name it (a pickled one: "module:qualname (pickled)").
        self.target: str | None = _display(target, wire_target)
        default_name = self.target.removesuffix(" (pickled)") if self.target else "kameo"
        if pool_name is None:
            pool_name = default_name
        elif not isinstance(pool_name, str) or not pool_name.strip():
            raise ValueError(f"name must be a non-empty string, got {pool_name!r}")
        self._name = pool_name
        self._forward_logs = bool(forward_logs)
        if start not in ("exec", "zygote"):
            raise ValueError(f'start must be "exec" or "zygote", got {start!r}')
        self._start_mode = start
        if isinstance(preload, (str, bytes)):
            raise TypeError("preload must be a list of module names, not a single string")
        if preload is None:
            preload = [w.partition(":")[0] for w in (wire_target, wire_init) if type(w) is str]
        self._preload = tuple(dict.fromkeys(str(m) for m in preload))
        self._named = pool_name != default_name  # shown by repr()
        # The pool's listeners; with none, requests record nothing (_listeners_changed).
        self._events = Emitter(pool_name, on_event)
        # Added to each request's future while someone listens, else None (the hot path):
        # for asks, and for calls (their kind and target from their op).
        self._on_ask_done: Callable[[AskFuture], None] | None = None
        self._on_done: Callable[[AskFuture], None] | None = None
        # OpenTelemetry, if the application set it up when the pool started (kameo._otel);
        # the client spans of open streams, by request id.
        self._otel: _otel.PoolTelemetry | None = None
        self._otel_streams: dict[int, Any] = {}
        self._target_wire = wire_target
        self._size = size
        #: A PythonEnv, or the workers' interpreter (another one: its own sys.path).
        self._python: str | envs.PythonEnv = (
            python if isinstance(python, envs.PythonEnv) else os.fspath(python or sys.executable)
        )
        self._pythonpath = [os.path.abspath(os.fspath(p)) for p in pythonpath]
        self._env = dict(env or {})
        self._cwd = os.fspath(cwd) if cwd is not None else None
        self._startup_timeout = startup_timeout
        self._max_concurrency = max_concurrency
        self._max_frame_bytes = max_frame_bytes
        self._stream_window = stream_window
        self._callbacks = callbacks or Callbacks()
        self._init = wire_init
        self._initargs = wire_initargs
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
        self._core: Any = None
        self._supervisor: Supervisor | None = None
        self._workers: dict[int, WorkerProcess] = {}  # the supervisor's, once started
        self._runner: CallbackRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # new -> starting -> running -> closing -> closed
        self._closed_event: asyncio.Event | None = None
        self._handler_kind = ""
        self._timeouts = 0
        self._cancelled = 0
        self._abandon_cb = self._abandon
        # The loop's state for direct waits (None: the loop is not one _aio knows, e.g. uvloop).
        self._direct: _aio.DirectWait | None = None
        self._answer_waits = 0  # waits made by _wait_answer (tests check it is used)
        self._refs = RefTable(next(_pool_keys))
        self._sessions: dict[int, set[Session]] = {}  # worker id -> its open sessions

    # ----------------------------------------------------------------- public API

    @property
    def name(self) -> str:
        """The pool's name (``Pool(name=...)``; default: the target, or "kameo" without
        one): in its events, its workers' log lines and records, and their process names."""
        return self._name

    @property
    def size(self) -> int:
        """The number of workers the pool keeps running."""
        return self._size

    @property
    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each worker process (and of each slot waiting for a replacement)."""
        sup = self._supervisor
        if sup is None:
            return []
        live = {row[0]: row for row in self._core.worker_stats()}
        out = []
        for slot in sup.slots:
            procs = [w for w in sup.workers.values() if w.slot == slot.index and not w.lost]
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
        if self._core is None or self._supervisor is None:
            return PoolStats(0, 0, 0, 0, 0, 0, 0, None, None)
        completed, errors, retries, p50, p99 = self._core.stats()
        return PoolStats(
            self._core.asks,
            completed,
            errors,
            self._supervisor.crashes,
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
        A :class:`~kameo.PythonEnv` given as ``python`` is ensured first (bounded by its own
        timeout, not ``startup_timeout``): :class:`~kameo.EnvError` if that fails, and the pool can
        be started again.
        """
        if self._state != "new":
            if self._state in ("closing", "closed"):
                raise PoolClosed("the pool is closed")
            return
        if _calls.importing and _runtime.current() is not None:
            raise KameoError(
                f"a kameo.Pool was started in a worker while it imported {_calls.importing[-1]!r} "
                "(to find a function or class the parent named): the module starts pools at "
                "import. If it is the parent's script, put the code that starts pools under "
                "'if __name__ == \"__main__\":'"
            )
        # The workers' interpreter, path and environment: a PythonEnv is ensured here (in a
        # thread; its own timeout), another interpreter asked for its sys.prefix (once).
        launch = await envs.launch(self._python, self._pythonpath, self._env, self._startup_timeout)
        if self._state != "new":
            if self._state in ("closing", "closed"):
                raise PoolClosed("the pool was closed while it prepared its workers' environment")
            return  # another start() got there first
        self._state = "starting"
        loop = self._loop = asyncio.get_running_loop()
        self._direct = _aio.probe(loop)
        self._core = _native.PoolCore(
            loop,
            self._on_event,
            self._secret,
            self._welcome(launch.sys_path),
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
        events.watch(self)
        self._otel = _otel.for_pool(self._name, self)
        self._listeners_changed()
        runner = self._runner = CallbackRunner(
            self._callbacks, self._core, loop, self._stream_window, Channel
        )
        if self._otel is not None and self._otel.tracer is not None:
            runner.trace(self._otel, self._worker_pid)
        options = SupervisorOptions(
            name=self._name,
            target=self.target or "(no target)",
            python=launch.python,
            python_flags=launch.flags,
            env=launch.env,
            unset_env=launch.unset,
            cwd=self._cwd,
            secret=self._secret,
            startup_timeout=self._startup_timeout,
            heartbeat_timeout=self._heartbeat_timeout,
            max_memory=self._max_memory,
            cancel_grace=self._cancel_grace,
            start=self._start_mode,
            preload=self._preload,
            sys_path=tuple(launch.sys_path or ()),
        )
        refs = self._refs
        refs.attach(self._core, loop)
        self._core.set_ref_key(refs.key)
        self._core.set_ref_hook(functools.partial(refs.make, pool=self))

        def worker_gone(worker_id: int, why: str) -> None:
            runner.worker_gone(worker_id)
            refs.worker_lost(worker_id, why)
            for session in self._sessions.pop(worker_id, ()):
                session.worker_lost(why)

        sup = self._supervisor = Supervisor(
            loop,
            self._core,
            self._size,
            options,
            on_worker_gone=worker_gone,
            held=self._holds,
            events=self._events,
        )
        refs.on_empty = sup.unheld
        self._workers = sup.workers  # the same dict, read by _on_event
        _live_pools.add(self)
        _signals.acquire(loop, lambda: list(_live_pools))
        try:
            await sup.start()
        except BaseException:
            await self.close(grace=0)
            raise
        self._state = "running"

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
        if self._handler_kind == NONE:
            fut.set_exception(
                HandlerTypeError(
                    f"{self!r} has no handler to ask (no target, or an adapter class without "
                    "__call__): use pool.call()"
                )
            )
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
        trace = traceparent or _traceparent.get()
        otel = self._otel
        if otel is not None:
            span, trace = otel.start("ask", self.target, traceparent, trace)
            fut._kameo_span = span
        try:
            rid = self._core.submit(msg, fut, trace, retries, timer is not None)
        except Exception as exc:
            if timer is not None:
                timer.cancel()
            fut.set_exception(exc)
            if otel is not None:
                self._otel_failed(fut._kameo_span, "ask", self.target, exc)
            return fut
        fut._kameo_rid = rid
        fut._kameo_abandon = self._abandon_cb
        fut._kameo_wait = self._wait_answer if self._direct is not None else None
        if self._on_ask_done is not None:
            fut.add_done_callback(self._on_ask_done)
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
        assert self._loop is not None
        submit = None
        if self._otel is not None:
            submit = self._traced_submit(
                self._core.submit_stream, "stream", self.target, traceparent
            )
        return Stream(
            self._core,
            self._loop,
            self._count_abandoned,
            msg,
            timeout,
            traceparent or _traceparent.get(),
            submit=submit,
            on_end=None if self._on_done is None else self._stream_ender("stream", self.target),
        )

    # ------------------------------------------------------------ calls and objects

    def call(self, target: Target, /, *args: Any, **kwargs: Any) -> AskFuture:
        """Call ``target`` ("module:qualname", "module.name", a bare method name of the
        pool's adapter class, or the function itself: see :meth:`__init__`) in a worker with
        these arguments: ``await pool.call("math:hypot", 3, 4)``. A result the codec cannot
        encode comes back as a :class:`Ref`; a Ref among the arguments is the live object, and
        the call runs on its worker. A function that cannot be sent raises
        :class:`SerializationError` here."""
        if type(target) is not str:
            target = self._wire(target)
        return self._submit_op(("call", None, target, args, kwargs, 0))

    def function(
        self,
        target: Target,
        *,
        timeout: float | None = None,
        idempotent: bool = False,
        return_ref: bool = False,
    ) -> RemoteFunction:
        """``target`` as a callable with its options: ``f = pool.function("m:f", timeout=5)``,
        then ``await f(1, 2)``. ``idempotent=True`` lets a call run again on another worker
        if its worker dies; ``return_ref=True`` always gives a :class:`Ref` to the result."""
        if type(target) is not str:
            target = self._wire(target)
        return RemoteFunction(self, target, timeout, idempotent, return_ref)

    def new(self, target: Target, /, *args: Any, **kwargs: Any) -> AskFuture:
        """Make ``target(*args, **kwargs)`` (a class, or any callable) in a worker and return a
        :class:`Ref` to it: ``c = await pool.new("collections:Counter", "abc")``."""
        if type(target) is not str:
            target = self._wire(target)
        return self._submit_op(("new", None, target, args, kwargs, 0))

    def call_stream(self, target: Target, /, *args: Any, **kwargs: Any) -> Stream:
        """Iterate what ``target(*args, **kwargs)`` returns (a generator or any iterable, sync
        or async) as the worker produces it, with the backpressure and cancellation of
        :meth:`stream`."""
        if type(target) is not str:
            target = self._wire(target)
        return self._call_stream(("call", None, target, args, kwargs, 0), None)

    def map(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        /,
        fn: str | Callable[..., Any] | None = None,
        *,
        ordered: bool = True,
        progress: bool = False,
        return_exceptions: bool = False,
        window: int | None = None,
        chunksize: int | None = None,
        timeout: float | None = None,
    ) -> MapResults:
        """``fn`` (a target or a function, as for :meth:`call`; None: the pool's handler) on
        each item, as
        an async iterator: ``async for r in pool.map(items, fn="pkg.mod:f"): ...``.

        The input (sync or async iterable) is pulled lazily: at most ``window`` items are in
        flight (default: a few batches per worker). Small items travel in batches whose size
        adapts to how long items take (``chunksize`` fixes it). Results come in input order,
        or as they finish with ``ordered=False``. An item that raised is raised in its place
        (the rest is cancelled), or yielded in its place with ``return_exceptions=True``.
        ``timeout`` bounds each item (:class:`CallTimeout`). ``progress=True`` shows a tqdm
        bar (extra ``kameo[progress]``). Leaving the loop early cancels the work in flight.
        """
        if self._state != "running":
            raise PoolClosed(self._not_running())
        if fn is None and self._handler_kind in (NONE, "gen", "asyncgen"):
            raise HandlerTypeError(
                f"{self!r} has no handler to map over ("
                + ("a generator" if self._handler_kind != NONE else "no target")
                + "): pass fn='module:function'"
            )
        return MapResults(
            self,
            items,
            fn if fn is None or type(fn) is str else self._wire(fn),
            ordered=ordered,
            return_exceptions=return_exceptions,
            window=window,
            chunksize=chunksize,
            timeout=timeout if timeout is not None else self._default_timeout,
            progress=progress,
        )

    def _wire(self, target: Any) -> str | bytes:
        """A call's target as it travels (a function by name, or pickled if allowed)."""
        return _functions.as_target(target, allow_pickle=self._allow_pickle)

    def pipeline(self) -> Pipeline:
        """A :class:`~kameo.pipeline.Pipeline`: several steps in one round trip."""
        return Pipeline(self)

    def session(self, *, strict: bool = True) -> Session:
        """A :class:`Session`: ``async with pool.session() as s:`` runs every call of ``s``
        on one worker, with state of its own there (see :mod:`kameo.session`)."""
        if self._state != "running":
            raise PoolClosed(self._not_running())
        return Session(self, strict)

    def _call_stream(self, op: tuple[Any, ...], worker: int | None) -> Stream:
        if self._state != "running":
            raise PoolClosed(self._not_running())
        assert self._loop is not None
        on_end = None
        submit: Callable[[Any, str | None], int] = functools.partial(
            _submit_call_stream, self._core, worker=worker
        )
        if self._on_done is not None:
            kind, target = _calls.kind_of(op, self.target)
            kind = "stream" if kind == "ask" else "call_stream"
            on_end = self._stream_ender(kind, target)
            if self._otel is not None:
                submit = self._traced_submit(submit, kind, target, None)
        return Stream(
            self._core,
            self._loop,
            self._count_abandoned,
            op,
            self._default_timeout,
            _traceparent.get(),
            submit=submit,
            on_end=on_end,
        )

    def _bind_session(self, session: Session) -> int:
        """The worker for a new session: not retiring, fewest sessions, then least loaded.
        While none is ready (the successor of a retiring worker, or the replacement of a
        lost one, is still starting), a starting one: the session's calls wait for it, as
        any call pinned to a worker does."""
        loads = [(wid, n) for wid, n, retiring in self._core.loads() if not retiring]
        if not loads and self._supervisor is not None:
            workers = self._supervisor.workers.values()
            loads = [(w.id, 0) for w in workers if not (w.lost or w.retiring)]
        if not loads:
            raise PoolClosed(f"{self!r} has no ready worker for a session")
        wid: int = min(loads, key=lambda w: (len(self._sessions.get(w[0], ())), w[1]))[0]
        self._sessions.setdefault(wid, set()).add(session)
        return wid

    def _unbind_session(self, session: Session, wid: int) -> None:
        open_here = self._sessions.get(wid)
        if open_here is None:
            return
        open_here.discard(session)
        if not open_here:
            del self._sessions[wid]
            if not self._refs.held.get(wid) and self._supervisor is not None:
                self._supervisor.unheld(wid)

    def _lost(self, wid: int) -> bool:
        """Worker ``wid`` is lost (its loss may still be being handled)."""
        sup = self._supervisor
        w = None if sup is None else sup.workers.get(wid)
        return w is not None and w.lost

    def _holds(self, wid: int) -> bool:
        """Refs or open sessions on worker ``wid`` keep it while it retires."""
        return bool(self._refs.held.get(wid) or self._sessions.get(wid))

    def _refused(self, exc: BaseException) -> AskFuture:
        """A future that fails with ``exc`` (a request refused before it was sent)."""
        loop = self._loop
        if loop is None:
            loop = asyncio.get_running_loop()
        fut = AskFuture(loop=loop)
        fut.set_exception(exc)
        return fut

    def _submit_op(
        self,
        op: tuple[Any, ...],
        worker: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
    ) -> AskFuture:
        """Send a CALL (see ``kameo._calls``) and return its future. The op lives as long as
        the future: a Ref among its arguments is not freed before the call has run. The
        caller has checked the Refs it passes directly (released ones: :meth:`RefTable.check`)."""
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise PoolClosed(
                    f"{self._not_running()} (called outside a running event loop)"
                ) from None
        fut = AskFuture(loop=loop)
        if self._state != "running":
            fut.set_exception(PoolClosed(self._not_running()))
            return fut
        refs = self._refs
        if refs.drops:
            refs.flush()  # objects dropped before this call are freed before it runs
        if worker is not None and worker in refs.gone:
            fut.set_exception(RefError(f"worker {worker} is gone ({refs.gone[worker]})"))
            return fut
        if timeout is None:
            timeout = self._default_timeout
        timer = None
        if timeout is not None:
            timer = fut._kameo_timer = loop.call_later(
                timeout, self._expire, weakref.ref(fut), timeout
            )
        trace = _traceparent.get()
        otel = self._otel
        if otel is not None:
            kind, target = _calls.kind_of(op, self.target)
            span = None
            if kind is not None:  # not the pool's own housekeeping
                span, trace = otel.start(kind, target, None, trace)
            fut._kameo_span = span
        try:
            rid, pin = self._core.submit_call(op, fut, trace, retries, timer is not None, worker)
        except Exception as exc:
            if timer is not None:
                timer.cancel()
            fut.set_exception(exc)
            if otel is not None and kind is not None:
                self._otel_failed(fut._kameo_span, kind, target, exc)
            return fut
        fut._kameo_rid = rid
        on_done = self._on_done
        # The op lives with the future when it may hold Refs (the core pins a call to its
        # Refs' worker), and for the CallFinished event of a listener (its kind and target).
        if pin is not None or on_done is not None:
            fut._kameo_keep = op
        fut._kameo_abandon = self._abandon_cb
        fut._kameo_wait = self._wait_answer if self._direct is not None else None
        if on_done is not None:
            fut.add_done_callback(on_done)
        return fut

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
            events.unwatch(self)
            self._refs.closed = True  # the workers went, and every object with them
            self._closed_event.set()
            _live_pools.discard(self)
            _signals.release()

    def __repr__(self) -> str:
        named = f" name={self._name!r}" if self._named else ""
        return f"<kameo.Pool {self.target!r}{named} size={self._size} {self._state}>"

    # ----------------------------------------------------------------- events

    def _listeners_changed(self) -> None:
        """Someone started or stopped listening: record request timings (in the core) and
        report finished requests only while someone does."""
        active = self._events.active or self._otel is not None
        if self._core is not None:
            self._core.set_observe(active)
        self._on_ask_done = self._ask_finished if active else None
        self._on_done = self._call_finished if active else None

    def _ask_finished(self, fut: AskFuture) -> None:
        """An ask's future is done (a loop callback, while someone listens)."""
        self._finished(fut, "ask", self.target)

    def _call_finished(self, fut: AskFuture) -> None:
        """A CALL's future is done (a loop callback, while someone listens)."""
        kind, target = _calls.kind_of(fut._kameo_keep, self.target)
        if kind is None:  # the pool's own housekeeping (releasing objects, closing a session)
            self._core.take_timing(fut._kameo_rid)
            return
        self._finished(fut, kind, target)

    def _finished(self, fut: AskFuture, kind: str, target: str | None) -> None:
        timing = self._core.take_timing(fut._kameo_rid)
        otel = self._otel
        if timing is None and otel is None:
            return  # sent before anyone listened
        error: str | None
        exc: BaseException | None = None
        if fut.cancelled():
            ok, error = False, "CancelledError"
        else:
            exc = fut.exception()
            ok, error = exc is None, events.error_type(exc)
            if ok and kind in ("map", "pipeline"):
                error = _failed_entry(kind, fut.result())
                ok = error is None
        if otel is not None:
            self._otel_finish(fut._kameo_span, kind, target, timing, error, exc)
        if timing is not None and self._events.active:
            wid, queued, run = timing
            self._events.emit(CallFinished(self._name, kind, target, wid, queued, run, ok, error))

    # ----------------------------------------------------------------- OpenTelemetry

    def _worker_pid(self, wid: int) -> int | None:
        sup = self._supervisor
        w = None if sup is None else sup.workers.get(wid)
        return None if w is None else w.pid

    def _otel_finish(
        self,
        span: Any,
        kind: str,
        target: str | None,
        timing: tuple[int | None, float, float] | None,
        error: str | None,
        exc: BaseException | None,
    ) -> None:
        assert self._otel is not None
        worker, seconds = None, None
        if timing is not None:
            wid, queued, run = timing
            seconds = queued + run
            if wid is not None:
                worker = (wid, self._worker_pid(wid))
        self._otel.finish(span, kind, target, worker, seconds, error, exc)

    def _otel_failed(self, span: Any, kind: str, target: str | None, exc: BaseException) -> None:
        """A request failed before it was sent (it has no timing, and no done callback)."""
        self._otel_finish(span, kind, target, None, events.error_type(exc), exc)

    def _traced_submit(
        self,
        submit: Callable[[Any, str | None], int],
        kind: str,
        target: str | None,
        explicit: str | None,
    ) -> Callable[[Any, str | None], int]:
        """``submit`` (a stream's) under a client span, kept until the stream ends."""
        otel = self._otel
        assert otel is not None

        def traced(msg: Any, trace: str | None) -> int:
            span, trace = otel.start(kind, target, explicit, trace)
            try:
                rid = submit(msg, trace)
            except BaseException as exc:
                self._otel_failed(span, kind, target, exc)
                raise
            if span is not None:
                self._otel_streams[rid] = span
            return rid

        return traced

    def _stream_ender(self, kind: str, target: str | None) -> Callable[[int, Any], None]:
        return functools.partial(self._stream_finished, kind, target)

    def _stream_finished(
        self, kind: str, target: str | None, rid: int, exc: BaseException | None
    ) -> None:
        core = self._core
        timing = None if core is None else core.take_timing(rid)
        if self._otel is not None:
            span = self._otel_streams.pop(rid, None)
            self._otel_finish(span, kind, target, timing, events.error_type(exc), exc)
        if timing is None or not self._events.active:
            return
        wid, queued, run = timing
        event = CallFinished(
            self._name, kind, target, wid, queued, run, exc is None, events.error_type(exc)
        )
        self._events.emit(event)

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
        assert self._supervisor is not None
        self._loop.call_later(self._cancel_grace, self._supervisor.enforce_cancel, wid, rid)

    # ----------------------------------------------------------------- internals

    def _not_running(self) -> str:
        if self._state == "new":
            return "the pool is not started: use 'async with Pool(...)' or 'await pool.start()'"
        if self._state == "starting":
            return "the pool is still starting"
        return "the pool is closed"

    def _welcome(self, sys_path: list[str] | None) -> dict[str, Any]:
        """WELCOME's config; ``sys_path`` goes first on the worker's (``envs.launch``: the
        parent's for a worker in the parent's environment, after ``pythonpath``)."""
        return {
            "target": self._target_wire,
            "init": self._init,
            "initargs": self._initargs,
            "max_concurrency": self._max_concurrency,
            "max_frame_bytes": self._max_frame_bytes,
            "sys_path": sys_path,
            "callbacks": self._callbacks.paths,
            "stream_window": self._stream_window,
            "heartbeat_interval": self._heartbeat_interval,
            "allow_pickle": self._allow_pickle,
            "shm_threshold": self._shm_threshold,
            "log_levels": _worker_log.levels() if self._forward_logs else None,
        }

    def _on_event(self, worker_id: int, name: str, payload: Any) -> None:
        """An event from the core about one worker: callbacks go to the runner, lifecycle
        events to the supervisor."""
        w = self._workers.get(worker_id)
        if w is None:
            return
        runner = self._runner
        sup = self._supervisor
        assert runner is not None and sup is not None
        if name == EVENT_CALLBACK:
            runner.start(worker_id, payload)
        elif name == EVENT_CALLBACK_CREDIT:
            runner.credit(worker_id, payload)
        elif name == EVENT_CALLBACK_CANCEL:
            runner.cancel(worker_id, payload)
        elif name == EVENT_READY:
            if isinstance(payload, dict):
                self._handler_kind = str(payload.get("kind", ""))
            sup.ready(w, payload)
        elif name == EVENT_STARTUP_FAILED:
            sup.startup_failed(w, payload)
        elif name == EVENT_REJECTED:
            sup.rejected(w, payload)
        elif name in _LOST:
            reason = {EVENT_EOF: "closed its connection"}.get(name, f"{name}: {payload}")
            if name == EVENT_PROTOCOL_ERROR:
                log.error("%s broke the protocol, replacing it: %s", w.describe(), payload)
            sup.lose(w, reason, killed=name == EVENT_PROTOCOL_ERROR)
        elif name == EVENT_PROTOCOL_WARNING:
            log.warning("%s", payload)
        elif name == EVENT_RETIRE:
            sup.retire(w, str(payload))
        elif name == EVENT_DRAINED:
            sup.drained(w)
        elif name == EVENT_LOG:
            _worker_log.forward(payload, self._name, w.id, w.pid)

    # ----------------------------------------------------------------- shutdown

    async def _shutdown(self, grace: float) -> None:
        loop = self._loop
        assert loop is not None
        core, sup = self._core, self._supervisor
        # What a request still running fails with, and one still waiting for a worker.
        running = PoolClosed(
            f"the pool was closed with grace={grace}s before the request completed"
        )
        waiting = PoolClosed(
            f"the pool was closed with grace={grace}s while the request waited for a worker"
        )
        if sup is not None:
            sup.begin_close(running, waiting)
        if core is not None and grace > 0:
            deadline = loop.time() + grace
            while core.outstanding() and loop.time() < deadline:
                await asyncio.sleep(0.005)
        if core is not None:
            core.fail_queued(waiting)
        if self._runner is not None:
            self._runner.cancel_all()
        if sup is not None:
            await sup.shutdown()

    def _kill_now(self) -> None:
        if self._supervisor is not None:
            self._supervisor.kill_now()


def _display(target: Any, wire: str | bytes | None) -> str | None:
    """How messages name a target: its name, or for a pickled one, the name it would have."""
    if wire is None or type(wire) is str:
        return wire
    if isinstance(target, bytes):
        return _functions.describe(target)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}:{qualname} (pickled)"


def _failed_entry(kind: str, reply: Any) -> str | None:
    """The error type of the first failed item of a ``batch`` answer (``map``) or of the
    failed step of a ``pipeline`` answer, None if all went well."""
    if type(reply) is not tuple or not reply or reply[0] == "ok":
        return None
    try:
        info = reply[3] if kind == "pipeline" else reply[2][min(reply[2])]
    except (IndexError, KeyError, TypeError, ValueError):
        return "RemoteError"
    return events.info_type(info)


# Events after which a worker is lost (its connection is read no further).
_LOST = (EVENT_EOF, EVENT_IO_ERROR, EVENT_PROTOCOL_ERROR)

_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


def _submit_call_stream(core: Any, op: Any, trace: str | None, *, worker: int | None) -> int:
    rid: int = core.submit_call_stream(op, trace, worker)[0]
    return rid


_pool_keys = itertools.count(1)  # RefTable keys: a Ref names the pool it belongs to


@atexit.register
def _kill_leftover_workers() -> None:
    for pool in list(_live_pools):
        pool._kill_now()
