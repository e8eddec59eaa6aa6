"""`Zygote`: the pool's side of its zygote (``kameo._zygote``), for ``Pool(start="zygote")``.

It execs the zygote as a worker is exec'd, waits for its preload, and then forks workers
through it: :meth:`Zygote.fork` makes the new worker's descriptors (``_native.worker_fds``,
the same as an exec'd worker's), sends the child's ends and waits (bounded) for the pid and a
pidfd; the statuses the zygote reports go to the :class:`~kameo._process.ForkedProcess` they
belong to. If the zygote dies, its workers die with it (their calls fail with
``WorkerCrashed`` and are retried as for any crash), the supervisor execs replacements, and
the zygote is started again after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import time
from typing import Any

from kameo import _native
from kameo._process import ZYGOTE_CODE, ForkedProcess, StderrPipe, exit_text
from kameo.errors import WorkerStartupError

__all__ = ["BLAS_THREAD_VARS", "Zygote", "ZygoteError"]

log = logging.getLogger("kameo")

#: How long a fork may take before the zygote counts as broken.
FORK_TIMEOUT = 5.0
MAX_MESSAGE = 1 << 16
#: Thread counts of the math libraries a preload may start thread pools in at import time
#: (numpy's OpenBLAS): the zygote sets them to cores // size unless they are set, as loky
#: does for its workers, so that a pool of one worker per core preloads numpy without a
#: thread (a zygote with threads cannot fork).
BLAS_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


#: A fork request's outcome: the worker and its progress page (or a ZygoteError).
Forking = asyncio.Future[tuple[ForkedProcess, int]]


class _Pending:
    """A fork request sent: the pool's ends of the worker's descriptors, until it is
    answered."""

    __slots__ = ("forking", "progress", "slot", "sock", "stderr")

    def __init__(self, slot: int, sock: int, stderr: int, progress: int, forking: Forking) -> None:
        self.slot = slot
        self.sock = sock
        self.stderr = stderr
        self.progress = progress
        self.forking = forking

    def fail(self, exc: ZygoteError) -> None:
        for fd in (self.sock, self.stderr, self.progress):
            os.close(fd)
        if not self.forking.done():
            self.forking.set_exception(exc)


def env_value(items: list[str]) -> str:
    """A list of strings as an environment variable (``_zygote.env_list`` reads it)."""
    return _native.encode(items).hex()


class ZygoteError(Exception):
    """The zygote cannot fork (the caller execs the worker instead)."""


class Zygote:
    """One pool's zygote process."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        pool: str,
        python: list[str],
        env: dict[str, str],
        cwd: str | None,
        preload: list[str],
        sys_path: list[str],
        size: int,
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.python = python
        self.env = dict(env)
        self.cwd = cwd
        self.preload = preload
        self.sys_path = sys_path
        threads = str(max(1, (os.cpu_count() or 1) // max(size, 1)))
        for var in BLAS_THREAD_VARS:
            self.env.setdefault(var, threads)
        self.pid = 0
        self.ctl: socket.socket | None = None
        self.stderr: StderrPipe | None = None
        self.pidfd: int | None = None
        self.ready = False
        self.workers: dict[int, ForkedProcess] = {}  # pid -> worker
        self._pending: dict[int, _Pending] = {}  # worker id -> its fork request
        self.died: asyncio.Future[str] = loop.create_future()

    def describe(self) -> str:
        return f"zygote (pid {self.pid})"

    # ----------------------------------------------------------------- start

    async def start(self, timeout: float, target: str) -> str | None:
        """Start it and wait for its preload: None when it is ready to fork, else why not
        (its workers are then exec'd). WorkerStartupError if the preload takes longer than
        ``timeout``."""
        env = dict(self.env)
        env["KAMEO_PRELOAD"] = env_value(self.preload)
        env["KAMEO_SYS_PATH"] = env_value(self.sys_path)
        env["KAMEO_PARENT_PID"] = str(os.getpid())
        argv = [*self.python, "-c", ZYGOTE_CODE, self.pool]
        try:
            pid, sock_fd, stderr_fd, progress_fd = _native.spawn_worker(
                argv, list(env.items()), self.cwd, None
            )
        except OSError as exc:
            return f"cannot start it: {exc}"
        os.close(progress_fd)
        self.pid = pid
        self.stderr = StderrPipe(self.loop, stderr_fd, log, f"[{self.pool} zygote pid {pid}]")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with socket.socket(fileno=sock_fd) as boot:
            boot.setblocking(True)
            socket.send_fds(boot, [b"c"], [theirs.fileno()])
        theirs.close()
        self.ctl = ours
        self.stderr.watch()
        self.pidfd = os.pidfd_open(pid)
        self.loop.add_reader(self.pidfd, self._on_exit)
        try:
            msg = await asyncio.wait_for(self._first_message(), timeout)
        except TimeoutError:
            # An exec'd worker would hang in the same import: fail now, not after a second
            # startup_timeout.
            self.kill()
            raise WorkerStartupError(
                f"the {self.describe()} did not finish importing {self.preload!r} within "
                f"startup_timeout={timeout}s (target {target!r}){self._tail()}"
            ) from None
        except ZygoteError as exc:
            return str(exc)
        if not msg.get("ready"):
            self.kill()
            return _refusal(msg, self.preload)
        self.ready = True
        ours.setblocking(False)
        self.loop.add_reader(ours.fileno(), self._on_messages)
        return None

    async def _first_message(self) -> dict[str, Any]:
        assert self.ctl is not None
        ready: asyncio.Future[None] = self.loop.create_future()
        fd = self.ctl.fileno()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        self.loop.add_reader(fd, readable)
        try:
            waits: list[asyncio.Future[Any]] = [ready, self.died]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.loop.remove_reader(fd)
        if not ready.done():
            raise ZygoteError(f"it {self.died.result()} during its preload{self._tail()}")
        data = self.ctl.recv(MAX_MESSAGE)
        if not data:
            raise ZygoteError(f"it closed its socket during its preload{self._tail()}")
        return _native.decode(data)  # type: ignore[no-any-return]

    # ----------------------------------------------------------------- fork

    def fork(self, worker_id: int, slot: int, secret: bytes) -> tuple[ForkedProcess, int]:
        """Fork a worker (blocks for the fork only, at most FORK_TIMEOUT): it, and its
        progress page for the core."""
        (forking,) = self.forks([(worker_id, slot)], secret)
        self._wait_sync(forking)
        return forking.result()

    def forks(self, workers: list[tuple[int, int]], secret: bytes) -> list[Forking]:
        """Ask for a worker for each (worker id, slot), every request sent at once: the
        zygote forks the next while the pool takes in the last. Each future is done when the
        zygote answers, by the loop's reader (an await) or :meth:`fork`'s wait: the worker
        and its progress page, or a ZygoteError saying why there is none."""
        out = []
        for worker_id, slot in workers:
            forking: Forking = self.loop.create_future()
            out.append(forking)
            if not self.ready or self.ctl is None:
                forking.set_exception(ZygoteError(f"the {self.describe()} is not running"))
                continue
            parent_sock, stderr_read, progress, child_sock, stderr_write, secret_fd = (
                _native.worker_fds(secret)
            )
            request = {"worker_id": worker_id, "pool": self.pool}
            try:
                socket.send_fds(
                    self.ctl,
                    [_native.encode(request)],
                    [child_sock, stderr_write, progress, secret_fd],
                )
            except OSError as exc:
                for fd in (parent_sock, stderr_read, progress):
                    os.close(fd)
                forking.set_exception(ZygoteError(f"cannot reach the {self.describe()}: {exc}"))
            else:
                self._pending[worker_id] = _Pending(
                    slot, parent_sock, stderr_read, progress, forking
                )
            finally:
                for fd in (child_sock, stderr_write, secret_fd):
                    os.close(fd)
        return out

    async def wait_forked(self, forking: Forking, deadline: float) -> tuple[ForkedProcess, int]:
        """The answer to one of :meth:`forks`' requests, by ``deadline`` (loop time); past
        it the zygote counts as broken."""
        try:
            return await asyncio.wait_for(asyncio.shield(forking), deadline - self.loop.time())
        except TimeoutError:
            self._broken(f"did not fork within {FORK_TIMEOUT}s")
            return forking.result()  # _broken failed it

    def _wait_sync(self, forking: Forking) -> None:
        """Read the zygote's messages here, not from the loop, until ``forking`` is done
        (other messages are handled on the way), at most FORK_TIMEOUT."""
        deadline = time.monotonic() + FORK_TIMEOUT
        while not forking.done():
            ctl = self.ctl
            assert ctl is not None  # while a request is pending; _broken fails them all
            left = deadline - time.monotonic()
            poller = select.poll()
            poller.register(ctl.fileno(), select.POLLIN)
            if left <= 0 or not poller.poll(left * 1000):
                self._broken(f"did not fork within {FORK_TIMEOUT}s")
                return
            self._read(ctl)

    # ----------------------------------------------------------------- messages

    def _on_messages(self) -> None:
        if self.ctl is not None:
            self._read(self.ctl)

    def _read(self, ctl: socket.socket) -> None:
        """Handle the messages waiting on the control socket."""
        while self.ctl is ctl:
            try:
                data, fds, _, _ = socket.recv_fds(ctl, MAX_MESSAGE, 1)
            except BlockingIOError:
                return
            except OSError as exc:
                data, fds = b"", []
                log.debug("zygote control socket: %s", exc)
            if not data:
                for fd in fds:
                    os.close(fd)
                self._closed()
                return
            self._deliver(_native.decode(data), fds)

    def _deliver(self, msg: dict[str, Any], fds: list[int]) -> None:
        """A message from the zygote: the answer to a fork request (with the worker's pidfd),
        or a report of a worker's exit."""
        answer = msg.get("forked", msg.get("fork_failed"))
        worker_id = answer if isinstance(answer, int) else -1
        pending = self._pending.pop(worker_id, None)
        if pending is None:
            for fd in fds:  # only answers to fork requests carry one
                os.close(fd)
            self._handle(msg)
            return
        if "forked" in msg and len(fds) == 1:
            pid = int(msg["pid"])
            w = ForkedProcess(
                self.loop,
                worker_id,
                pending.slot,
                pid,
                pending.sock,
                pending.stderr,
                self.pool,
                fds[0],
            )
            self.workers[pid] = w
            pending.forking.set_result((w, pending.progress))
            return
        for fd in fds:
            os.close(fd)
        why = msg.get("message") if "fork_failed" in msg else "no pidfd came"
        pending.fail(ZygoteError(f"the {self.describe()} could not fork: {why}"))

    def _handle(self, msg: dict[str, Any]) -> None:
        if "exited" in msg:
            w = self.workers.pop(int(msg["exited"]), None)
            if w is not None:
                w.exited_with(int(msg["status"]))

    # ----------------------------------------------------------------- its own end

    def _tail(self) -> str:
        if self.stderr is None:
            return ""
        self.stderr.read()
        tail = self.stderr.text()
        return f"; last stderr lines:\n{tail}" if tail else ""

    def _closed(self) -> None:
        """Its control socket closed: it is exiting (it closes it only when it goes). Its
        exit status says why, once it is there (bounded)."""
        if self.pidfd is not None:
            p = select.poll()
            p.register(self.pidfd, select.POLLIN)
            if p.poll(200):
                self._on_exit()
                return
        self._broken("closed its socket")

    def _on_exit(self) -> None:
        """Its pidfd is readable: reap it."""
        assert self.pidfd is not None
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = None
        try:
            _, status = os.waitpid(self.pid, 0)
            what = exit_text(status)[0]
        except ChildProcessError:
            what = "exited"
        self._broken(what)

    def _broken(self, why: str) -> None:
        """It cannot fork any more: its workers are orphans (they die with it)."""
        was_ready = self.ready
        self.ready = False
        if self.ctl is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.ctl.fileno())
            self.ctl.close()
            self.ctl = None
        if self.pidfd is not None:
            self.kill()
        if not self.died.done():
            self.died.set_result(why)
            if was_ready:
                log.warning(
                    "pool %s: the %s %s; workers are exec'd until it is started again",
                    self.pool,
                    self.describe(),
                    why,
                )
        for w in list(self.workers.values()):
            w.orphan(f"its {self.describe()} {why}")
        self.workers.clear()
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.fail(ZygoteError(f"the {self.describe()} {why}"))

    def kill(self) -> None:
        if self.pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def close(self, timeout: float) -> None:
        """Stop it (after its workers are gone): it exits when its socket closes."""
        if self.ctl is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.ctl.fileno())
            self.ctl.close()
            self.ctl = None
        self.ready = False
        if self.pidfd is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.died), timeout)
        if self.pidfd is not None:
            self.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.died), timeout)

    def kill_now(self) -> None:
        """At interpreter exit: SIGKILL and reap."""
        if self.pidfd is not None:
            self.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            os.close(self.pidfd)
            self.pidfd = None


def _refusal(msg: dict[str, Any], preload: list[str]) -> str:
    """Why the zygote refused its preload, for the log."""
    module = msg.get("module", "?")
    if msg.get("why") == "threads":
        threads = ", ".join(msg.get("threads") or [])
        return (
            f"importing {module!r} started threads ({threads}), and kameo never forks a "
            "threaded process; take it out of preload=, or start its threads lazily (for "
            "numpy: OPENBLAS_NUM_THREADS=1 / OMP_NUM_THREADS=1 in the pool's env)"
        )
    tb = (msg.get("traceback") or "").rstrip()
    return (
        f"preloading {module!r} failed: {msg.get('type')}: {msg.get('message')}"
        + (f"\n{tb}" if tb else "")
        + f" (preload={preload!r})"
    )
