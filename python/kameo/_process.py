"""The parent's view of one worker process: descriptors, stderr capture, exit status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import time
from collections import deque
from typing import Any

__all__ = [
    "STDERR_TAIL_LINES",
    "WORKER_CODE",
    "ZYGOTE_CODE",
    "ForkedProcess",
    "StderrPipe",
    "WorkerProcess",
    "exit_text",
]

#: How a pool runs a worker (``python -c WORKER_CODE <pool> w<id>``) and its zygote
#: (``python -c ZYGOTE_CODE <pool>``). Not ``-m kameo._worker``: runpy imports importlib.util
#: and with it contextlib, collections and functools, ~3 ms of every start (``-m`` still works,
#: and the Rust host uses it).
WORKER_CODE = "import kameo._worker as w; w.run()"
ZYGOTE_CODE = "import kameo._zygote as z; z.run()"

STDERR_TAIL_LINES = 20
worker_log = logging.getLogger("kameo.worker")


def exit_text(status: int) -> tuple[str, int | None, int | None]:
    """("exited with code 3", 3, None) or ("was killed by SIGKILL (9)", None, 9)."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} ({-code})", None, -code
    return f"exited with code {code}", code, None


class StderrPipe:
    """A child's stderr pipe on the loop: each line logged at WARNING on ``logger`` after
    ``prefix`` (with ``extra``), the last STDERR_TAIL_LINES kept for error messages."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        logger: logging.Logger,
        prefix: str,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.loop = loop
        self.fd: int | None = fd
        self.logger = logger
        self.prefix = prefix
        self.extra = extra
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.partial = b""

    def watch(self) -> None:
        assert self.fd is not None
        self.loop.add_reader(self.fd, self.read)

    def text(self) -> str:
        return "\n".join(self.tail)

    def read(self) -> None:
        """What is there now (without waiting); at EOF the last partial line, then close."""
        fd = self.fd
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
            data = self.partial + b"".join(chunks)
            *lines, self.partial = data.split(b"\n")
            for raw in lines:
                self._line(raw)
        if eof:
            if self.partial:
                self._line(self.partial)
                self.partial = b""
            self.close()

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(line)
        self.logger.warning("%s %s", self.prefix, line, extra=self.extra)

    def close(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None


class WorkerProcess:
    """One spawned worker: its socket (owned by the Rust core), stderr pipe and pidfd."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        worker_id: int,
        slot: int,
        pid: int,
        sock_fd: int,
        stderr_fd: int,
        pool: str = "kameo",
    ) -> None:
        self.loop = loop
        self.id = worker_id
        self.slot = slot
        self.pid = pid
        self.sock_fd = sock_fd
        self.pidfd: int | None = None
        self.ready: asyncio.Future[Any] = loop.create_future()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.lost = False
        #: Its loss was counted against its slot's crash loop, and its replacement started,
        #: when it was lost (Supervisor._replace_at_once).
        self.replaced = False
        self.retiring = False
        self.hung = False
        self.stopping = False  # the pool is stopping it (close): what it had fails as PoolClosed
        self.killed = False  # the pool killed it (heartbeats, cancel_grace, broken protocol)
        self.exit_reason: str | None = None  # WorkerExited.reason, set when it is lost
        self.exit_reported = False
        self.pool = pool
        self.stderr = StderrPipe(
            loop,
            stderr_fd,
            worker_log,
            f"[{pool} worker {worker_id} pid {pid}]",
            {"worker_id": worker_id, "pid": pid, "pool": pool},
        )
        self.started_at = time.monotonic()

    def describe(self) -> str:
        return f"worker {self.id} (pid {self.pid})"

    def tail(self) -> str:
        return self.stderr.text()

    def watch(self, on_exit: Any) -> None:
        """Watch stderr, and the process exit through a pidfd."""
        self.stderr.watch()
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self.loop.add_reader(self.pidfd, on_exit, self)
        except OSError:  # no pidfd (old kernel): exits are found through EOF and waitpid
            self.pidfd = None

    # -- stderr --------------------------------------------------------------------------

    def read_stderr(self) -> None:
        self.stderr.read()

    def close_stderr(self) -> None:
        self.stderr.close()

    # -- exit ----------------------------------------------------------------------------

    def reap(self) -> bool:
        """Collect the exit status if the process has exited. Anything left in its process
        group (the worker's own children) is killed first, while the pid cannot be reused."""
        if self.exited.done():
            return True
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped by someone else (a foreign SIGCHLD handler)
            self._finish(-1)
            return True
        if res is None:
            return False
        self.kill_group(signal.SIGKILL)
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = -1
        self._finish(status)
        return True

    def _finish(self, status: int) -> None:
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None
        self.exited.set_result(status)

    async def wait_exit(self, timeout: float) -> bool:
        if self.reap():
            return True
        if self.pidfd is None:  # poll
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                if self.reap():
                    return True
            return False
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            return self.reap()
        return True

    def kill_group(self, sig: int) -> None:
        # The worker leads its own process group: signal it and whatever it started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def kill(self, sig: int) -> None:
        if self.exited.done():
            return
        self.kill_group(sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill_now(self) -> None:
        """Last resort at interpreter exit: SIGKILL and reap."""
        if not self.exited.done():
            self.kill(signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


class ForkedProcess(WorkerProcess):
    """A worker a zygote forked (``Pool(start="zygote")``): the zygote is its parent, so the
    exit status comes from the zygote (:meth:`exited_with`), and the exit itself is seen on a
    pidfd the zygote opened and sent. Signals go through that pidfd (never to a pid that may
    have been reused); its process group is signalled only while it is alive."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        worker_id: int,
        slot: int,
        pid: int,
        sock_fd: int,
        stderr_fd: int,
        pool: str,
        pidfd: int,
    ) -> None:
        super().__init__(loop, worker_id, slot, pid, sock_fd, stderr_fd, pool)
        self.pidfd = pidfd
        self._watching = False
        #: Why its status will never come (its zygote died), once known.
        self.orphaned: str | None = None

    def watch(self, on_exit: Any) -> None:
        assert self.pidfd is not None
        self.stderr.watch()
        self._watching = True

        def exited() -> None:
            self._unwatch()  # readable for good: once is enough
            on_exit(self)

        self.loop.add_reader(self.pidfd, exited)

    def _unwatch(self) -> None:
        if self._watching and self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
        self._watching = False

    def alive(self) -> bool:
        if self.exited.done() or self.pidfd is None:
            return False
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)

    def exited_with(self, status: int) -> None:
        """The zygote reaped it (-1: nobody will, its zygote is gone)."""
        self._finish(status)

    def orphan(self, why: str) -> None:
        """Its zygote died: it dies too (PDEATHSIG); its status is lost."""
        self.orphaned = why
        if not self.alive():
            self.exited_with(-1)

    def reap(self) -> bool:
        if self.exited.done():
            return True
        if self.orphaned is not None and not self.alive():
            self.exited_with(-1)
            return True
        return False

    def _finish(self, status: int) -> None:
        self._unwatch()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if not self.exited.done():
            self.exited.set_result(status)

    async def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.reap():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # The status comes from the zygote; an orphan is polled.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), min(left, 0.05))
        return True

    def kill_group(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def kill(self, sig: int) -> None:
        if self.exited.done() or self.pidfd is None:
            return
        self.kill_group(sig)
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def kill_now(self) -> None:
        """At interpreter exit: SIGKILL (its zygote, killed next, reaps it)."""
        self.kill(signal.SIGKILL)
