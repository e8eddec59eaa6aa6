"""`Pool`: a pool of Python worker processes driven from asyncio."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
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
from typing import Any

from kameo import _native
from kameo._runtime import traceparent as _traceparent
from kameo.callbacks import CallbackRunner, Callbacks
from kameo.errors import (
    CallTimeout,
    HandlerTypeError,
    PoolClosed,
    WorkerCrashed,
    WorkerStartupError,
)
from kameo.stream import Stream

__all__ = ["Pool", "WorkerInfo"]

log = logging.getLogger("kameo")
worker_log = logging.getLogger("kameo.worker")

MiB = 1024 * 1024
STDERR_TAIL_LINES = 20
DEFAULT_PREFETCH = 16
DEFAULT_STREAM_WINDOW = 64
# Bounds on waiting for a worker to go once it has been told to (each step of close()).
EXIT_WAIT = 1.0
KILL_WAIT = 5.0


@dataclass(frozen=True)
class WorkerInfo:
    """A snapshot of one worker, from :attr:`Pool.workers`."""

    id: int
    pid: int
    state: str
    in_flight: int
    completed: int


class _Worker:
    """The parent's bookkeeping for one worker process."""

    def __init__(self, worker_id: int, pid: int, sock_fd: int, stderr_fd: int) -> None:
        self.id = worker_id
        self.pid = pid
        self.sock_fd = sock_fd
        self.stderr_fd: int | None = stderr_fd
        self.pidfd: int | None = None
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.stderr_partial = b""
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.started_at = time.monotonic()

    def describe(self) -> str:
        return f"worker {self.id} (pid {self.pid})"

    def tail(self) -> str:
        return "\n".join(self.stderr_tail)


def _status_text(status: int) -> tuple[str, int | None, int | None]:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} ({-code})", None, -code
    return f"exited with code {code}", code, None


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
        prefetch: int = DEFAULT_PREFETCH,
        callbacks: Callbacks | None = None,
        stream_window: int = DEFAULT_STREAM_WINDOW,
    ) -> None:
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"target must be 'module:function', got {target!r}")
        size = os.cpu_count() or 1 if size is None else size
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if stream_window < 1:
            raise ValueError(f"stream_window must be at least 1, got {stream_window}")
        if callbacks is not None and not isinstance(callbacks, Callbacks):
            raise TypeError("callbacks must be a kameo.Callbacks registry")
        if not 1024 <= max_frame_bytes <= 0xFFFF_FFFF:
            raise ValueError("max_frame_bytes must be between 1 KiB and 4 GiB")
        self.target = target
        self._size = size
        self._python = python or sys.executable
        self._env = dict(env or {})
        self._cwd = os.fspath(cwd) if cwd is not None else None
        self._startup_timeout = startup_timeout
        self._max_concurrency = max_concurrency
        self._max_frame_bytes = max_frame_bytes
        self._window = max_concurrency + prefetch
        self._stream_window = stream_window
        self._callbacks = callbacks or Callbacks()
        self._runner: CallbackRunner | None = None
        self._handler_kind = ""
        self._secret = secrets.token_bytes(32)
        self._workers: dict[int, _Worker] = {}
        self._next_worker_id = 0
        self._core: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state = "new"  # new -> starting -> running -> closing -> closed
        self._closed_event: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._recent_crashes: deque[float] = deque(maxlen=8)
        self._respawn_failures = 0

    # ----------------------------------------------------------------- public API

    @property
    def size(self) -> int:
        """The number of workers the pool keeps running."""
        return self._size

    @property
    def workers(self) -> list[WorkerInfo]:
        """A snapshot of each worker: id, pid, state, in_flight, completed."""
        if self._core is None:
            return []
        return [WorkerInfo(*row) for row in self._core.worker_stats()]

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
        self._core = _native.PoolCore(
            loop,
            self._on_event,
            self._secret,
            self._welcome(),
            self._max_frame_bytes,
            self._window,
            self._stream_window,
        )
        self._runner = CallbackRunner(
            self._callbacks, self._core, loop, self._stream_window, _native.Channel
        )
        _live_pools.add(self)
        try:
            workers = [self._spawn() for _ in range(self._size)]
            await self._await_ready(workers)
        except BaseException:
            await self.close(grace=0)
            raise
        self._state = "running"

    async def ask(
        self, msg: Any, *, timeout: float | None = None, traceparent: str | None = None
    ) -> Any:
        """Run the handler on ``msg`` in a worker and return its result.

        Raises :class:`RemoteError` (also an instance of the built-in type when the handler
        raised a built-in exception), :class:`CallTimeout`, :class:`WorkerCrashed`,
        :class:`SerializationError`, :class:`ProtocolError` or :class:`PoolClosed`. Cancelling
        the awaiting task, or the timeout, cancels the request in the worker.
        """
        if self._state != "running":
            raise PoolClosed(self._not_running())
        if self._handler_kind in ("gen", "asyncgen"):
            raise HandlerTypeError(
                f"handler {self.target!r} is a generator: use pool.stream(), not pool.ask()"
            )
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        rid = self._core.submit(msg, fut, traceparent or _traceparent.get())
        if timeout is None:
            try:
                return await fut
            except asyncio.CancelledError:
                self._core.cancel(rid)
                raise
        handle = loop.call_later(timeout, _expire, fut, timeout)
        try:
            return await fut
        except (asyncio.CancelledError, CallTimeout):
            self._core.cancel(rid)
            raise
        finally:
            handle.cancel()

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

    def __repr__(self) -> str:
        return f"<kameo.Pool {self.target!r} size={self._size} {self._state}>"

    # ----------------------------------------------------------------- internals

    def _not_running(self) -> str:
        if self._state == "new":
            return "the pool is not started: use 'async with Pool(...)' or 'await pool.start()'"
        if self._state == "starting":
            return "the pool is still starting"
        return "the pool is closed"

    def _welcome(self) -> dict[str, Any]:
        same_interpreter = os.path.realpath(self._python) == os.path.realpath(sys.executable)
        sys_path = None
        if same_interpreter:
            cwd = os.getcwd()
            sys_path = [os.path.join(cwd, p) if not os.path.isabs(p) else p for p in sys.path]
        return {
            "target": self.target,
            "max_concurrency": self._max_concurrency,
            "max_frame_bytes": self._max_frame_bytes,
            "sys_path": sys_path,
            "callbacks": self._callbacks.paths,
            "stream_window": self._stream_window,
        }

    def _spawn(self) -> _Worker:
        loop = self._loop
        assert loop is not None
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        env = dict(os.environ)
        env.update(self._env)
        env["KAMEO_WORKER_ID"] = str(worker_id)
        env["KAMEO_SECRET"] = self._secret.hex()
        env["KAMEO_PARENT_PID"] = str(os.getpid())
        argv = [self._python, "-m", "kameo._worker"]
        try:
            pid, sock_fd, stderr_fd = _native.spawn_worker(argv, list(env.items()), self._cwd)
        except OSError as exc:
            raise WorkerStartupError(
                f"cannot start a worker for {self.target!r} with python {self._python!r}: {exc}"
            ) from exc
        w = _Worker(worker_id, pid, sock_fd, stderr_fd)
        self._workers[worker_id] = w
        self._core.add_worker(worker_id, pid, sock_fd)
        loop.add_reader(sock_fd, self._core.on_readable, worker_id)
        loop.add_reader(stderr_fd, self._on_stderr, w)
        try:
            w.pidfd = os.pidfd_open(pid)
            loop.add_reader(w.pidfd, self._on_exit, w)
        except OSError:  # no pidfd (old kernel): exits are found through EOF and waitpid
            w.pidfd = None
        return w

    async def _await_ready(self, workers: list[_Worker]) -> None:
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
            raise WorkerStartupError(
                f"{names} did not finish starting {self.target!r} within "
                f"startup_timeout={self._startup_timeout}s"
                + (f"; last stderr lines:\n{tail}" if tail else "")
            )

    def _on_event(self, worker_id: int, name: str, payload: Any) -> None:
        w = self._workers.get(worker_id)
        if w is None:
            return
        if name == "callback":
            assert self._runner is not None
            self._runner.start(worker_id, payload)
        elif name == "callback_credit":
            assert self._runner is not None
            self._runner.credit(worker_id, payload)
        elif name == "callback_cancel":
            assert self._runner is not None
            self._runner.cancel(worker_id, payload)
        elif name == "ready":
            if isinstance(payload, dict):
                self._handler_kind = str(payload.get("kind", ""))
            if not w.ready.done():
                w.ready.set_result(payload)
            self._respawn_failures = 0
            self._core.dispatch_queued()
        elif name == "startup_failed":
            info = payload if isinstance(payload, dict) else {}
            message = (
                f"{w.describe()} could not load target {self.target!r}: "
                f"{info.get('type', '?')}: {info.get('message', '')}"
            )
            tb = info.get("traceback")
            if tb:
                message += f"\n\nWorker traceback:\n{tb.rstrip()}"
            self._fail_startup(w, WorkerStartupError(message))
        elif name == "rejected":
            self._fail_startup(w, WorkerStartupError(f"{w.describe()} was refused: {payload}"))
            self._lose(w, f"handshake refused: {payload}")
        elif name in ("eof", "io_error", "protocol_error"):
            reason = {"eof": "closed its connection"}.get(name, f"{name}: {payload}")
            if name == "protocol_error":
                log.error("%s broke the protocol, replacing it: %s", w.describe(), payload)
            self._lose(w, reason)
        elif name == "protocol_warning":
            log.warning("%s", payload)

    def _fail_startup(self, w: _Worker, exc: BaseException) -> None:
        if not w.ready.done():
            w.ready.set_exception(exc)
            w.ready.exception()  # retrieved: the waiter may be gone already

    def _on_stderr(self, w: _Worker) -> None:
        fd = w.stderr_fd
        if fd is None:
            return
        chunks = []
        eof = False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                eof = True
                break
            chunks.append(data)
            if len(data) < 65536:
                break
        if chunks:
            data = w.stderr_partial + b"".join(chunks)
            *lines, w.stderr_partial = data.split(b"\n")
            for raw in lines:
                self._stderr_line(w, raw)
        if eof:
            if w.stderr_partial:
                self._stderr_line(w, w.stderr_partial)
                w.stderr_partial = b""
            self._close_stderr(w)

    def _stderr_line(self, w: _Worker, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        w.stderr_tail.append(line)
        worker_log.warning(
            "[worker %d pid %d] %s", w.id, w.pid, line, extra={"worker_id": w.id, "pid": w.pid}
        )

    def _close_stderr(self, w: _Worker) -> None:
        if w.stderr_fd is not None and self._loop is not None:
            self._loop.remove_reader(w.stderr_fd)
            os.close(w.stderr_fd)
            w.stderr_fd = None

    def _on_exit(self, w: _Worker) -> None:
        """The pidfd is readable: the process has exited. Reap it."""
        self._reap(w)
        if not w.lost:
            self._lose(w, "exited")

    def _reap(self, w: _Worker, block: bool = False) -> bool:
        if w.exited.done():
            return True
        try:
            pid, status = os.waitpid(w.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped by someone else (a foreign SIGCHLD handler)
            pid, status = w.pid, -1
        if pid == 0:
            return False
        if w.pidfd is not None and self._loop is not None:
            self._loop.remove_reader(w.pidfd)
            os.close(w.pidfd)
            w.pidfd = None
        w.exited.set_result(status)
        return True

    def _lose(self, w: _Worker, reason: str) -> None:
        """The worker is gone or unusable: reap it, fail what it had started, requeue the rest,
        and start a replacement."""
        if w.lost:
            return
        w.lost = True
        assert self._loop is not None
        self._loop.remove_reader(w.sock_fd)
        task = self._loop.create_task(self._finish_loss(w, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_loss(self, w: _Worker, reason: str) -> None:
        if not await self._wait_exit(w, 0.5 if self._state != "closing" else EXIT_WAIT):
            self._kill(w, signal.SIGKILL)
            await self._wait_exit(w, KILL_WAIT)
        self._on_stderr(w)  # collect the last lines
        what, exitcode, sig = self._exit_text(w, reason)
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
        self._core.remove_worker(w.id, exc)
        if self._runner is not None:
            self._runner.worker_gone(w.id)
        self._close_stderr(w)
        self._workers.pop(w.id, None)
        if self._state == "running":
            self._recent_crashes.append(time.monotonic())
            self._start_replacement()
        if not self._workers:
            self._core.fail_queued(exc)

    @staticmethod
    def _exit_text(w: _Worker, reason: str) -> tuple[str, int | None, int | None]:
        if w.exited.done() and w.exited.result() >= 0:
            return _status_text(w.exited.result())
        return reason, None, None

    async def _wait_exit(self, w: _Worker, timeout: float) -> bool:
        if self._reap(w):
            return True
        if w.pidfd is None:  # poll
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                if self._reap(w):
                    return True
            return False
        try:
            await asyncio.wait_for(asyncio.shield(w.exited), timeout)
        except TimeoutError:
            return self._reap(w)
        return True

    def _kill(self, w: _Worker, sig: int) -> None:
        if w.exited.done():
            return
        # The worker leads its own process group: signal it and whatever it started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.pid, sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, sig)

    def _start_replacement(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        recent = [t for t in self._recent_crashes if now - t < 10.0]
        delay = 0.0 if len(recent) < 3 else min(0.1 * 2 ** (len(recent) - 3), 5.0)
        if self._respawn_failures:
            delay = max(delay, min(0.1 * 2**self._respawn_failures, 5.0))
        task = self._loop.create_task(self._replace(delay))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _replace(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        if self._state != "running":
            return
        try:
            w = self._spawn()
            await self._await_ready([w])
        except WorkerStartupError as exc:
            self._respawn_failures += 1
            log.error("could not start a replacement worker: %s", exc)
            if not any(x.ready.done() and not x.lost for x in self._workers.values()):
                self._core.fail_queued(exc)
            if self._state == "running":
                self._start_replacement()

    async def _shutdown(self, grace: float) -> None:
        loop = self._loop
        assert loop is not None
        core = self._core
        for task in list(self._background):
            if task.get_coro().__name__ == "_replace":  # type: ignore[union-attr]
                task.cancel()
        if core is not None and grace > 0:
            deadline = loop.time() + grace
            while core.outstanding() and loop.time() < deadline:
                await asyncio.sleep(0.005)
        closed = PoolClosed("the pool was closed before the request completed")
        if core is not None:
            core.fail_queued(closed)
        workers = list(self._workers.values())
        for w in workers:
            if not w.lost:
                core.send_control(w.id, _native.Channel.SHUTDOWN)
        for step, sig in ((EXIT_WAIT, signal.SIGTERM), (EXIT_WAIT, signal.SIGKILL)):
            alive = [w for w in workers if not w.exited.done()]
            if not alive:
                break
            await asyncio.wait([asyncio.ensure_future(self._wait_exit(w, step)) for w in alive])
            for w in alive:
                if not w.exited.done():
                    self._kill(w, sig)
        for w in workers:
            if not w.exited.done() and not await self._wait_exit(w, KILL_WAIT):
                log.error("%s did not exit after SIGKILL", w.describe())
        for w in workers:
            if not w.lost:
                w.lost = True
                loop.remove_reader(w.sock_fd)
            self._fail_startup(w, closed)
            self._on_stderr(w)
            self._close_stderr(w)
            if core is not None:
                core.remove_worker(w.id, closed)
            self._workers.pop(w.id, None)
        if self._runner is not None:
            self._runner.cancel_all()
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.wait(list(self._background), timeout=KILL_WAIT)

    def _kill_now(self) -> None:
        """Last resort at interpreter exit: SIGKILL and reap every worker."""
        for w in list(self._workers.values()):
            if not w.exited.done():
                self._kill(w, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(w.pid, 0)


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(CallTimeout(f"no reply within timeout={timeout}s"))


_live_pools: weakref.WeakSet[Pool] = weakref.WeakSet()


@atexit.register
def _kill_leftover_workers() -> None:
    for pool in list(_live_pools):
        pool._kill_now()
