"""The zygote: ``python -m kameo._zygote <pool name>``, a template process that forks workers.

The pool (``Pool(start="zygote")``) execs it once, as it would exec a worker (its own process
group, killed when the pool dies, nothing of the pool's descriptors but its socket). It imports
``kameo._worker`` and the modules in ``KAMEO_PRELOAD`` (by default the handler's), and then,
single-threaded, forks a worker for each request of the pool:

* The pool sends a *fork* message over a SOCK_SEQPACKET control socket (handed over on the
  exec'd socket at start), with the new worker's descriptors attached (SCM_RIGHTS): its end of
  the socketpair, the write end of its stderr pipe, its progress page and the pipe holding the
  pool's secret. The pool keeps the other ends, exactly as for an exec'd worker.
* The zygote checks that it still runs no thread but its own (``/proc/self/task``): forking a
  threaded process is what kameo never does. A preload that started one (a thread pool made at
  import time) is refused, and the pool execs its workers instead.
* The child leaves the zygote's loop, puts its descriptors where the worker expects them
  (``KAMEO_FD``..., fd 2), joins a process group of its own, reseeds ``random`` and
  ``numpy.random``, and runs ``kameo._worker.main`` as an exec'd worker would (the handshake,
  the secret, the init hook, PDEATHSIG to the zygote, which dies with the pool); when it
  returns, the interpreter exits normally (atexit handlers, non-daemon threads).
* The zygote answers with the child's pid and a pidfd (the pool watches the exit on it), reaps
  the child when it exits (its process group first, as the pool does) and sends the status.

It never starts a thread, runs no event loop and holds no socket of any worker once it has
forked it. When the control socket closes (the pool closed it, or died), it kills and reaps
its children and exits.
"""

from __future__ import annotations

import _socket
import _thread
import importlib
import os
import select
import sys
import time

from kameo import _native
from kameo._lean import suppress

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The zygote imports neither json, socket, signal, array nor traceback (with what they pull
# in, ~8 ms before it is ready): messages are kameo's own encoding, descriptors go through
# _socket.
SIGKILL = 9  # Linux's (this module is Linux-only: pidfds)
#: Seconds without a fork request after which the zygote forks its spare.
SPARE_AFTER = 0.02
#: Bytes of a C int, as SCM_RIGHTS carries descriptors (array would import collections).
INT = 4

#: Largest control message (a fork request: a few variables).
MAX_MESSAGE = 1 << 16
#: Descriptors a fork request carries: socket, stderr, progress page, secret.
FORK_FDS = 4


def send(ctl: _socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = _native.encode(msg)
    if fds:
        send_raw(ctl, data, fds)
    else:
        ctl.send(data)


def send_raw(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    ints = b"".join(fd.to_bytes(INT, sys.byteorder, signed=True) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, ints)])


def receive(ctl: _socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it."""
    data, ancillary, _, _ = ctl.recvmsg(size, _socket.CMSG_LEN(max_fds * INT))
    fds = []
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            for i in range(0, len(payload) - INT + 1, INT):
                fds.append(int.from_bytes(payload[i : i + INT], sys.byteorder, signed=True))
    return data, fds


def env_list(name: str) -> list[str]:
    """A list the pool put in the environment (``_zygote_client.env_value``)."""
    value = os.environ.pop(name, "")
    return list(_native.decode(bytes.fromhex(value))) if value else []


def other_threads() -> list[str]:
    """Names of this process's threads other than the calling one (from /proc: threads a C
    library started count as much as Python's)."""
    me = str(_thread.get_native_id())
    threading = sys.modules.get("threading")  # not imported: no Python thread has a name
    python_names = {t.native_id: t.name for t in threading.enumerate()} if threading else {}
    names = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tids:
        if tid == me:
            continue
        name = python_names.get(int(tid))
        if name is None:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue  # it has just exited
        names.append(f"{name} (tid {tid})")
    return names


class Child:
    """What a forked child runs once it has left the zygote's loop."""

    def __init__(self, request: dict[str, Any], fds: list[int]) -> None:
        self.request = request
        self.fds = fds

    def run(self) -> int:
        req = self.request
        sock, stderr_write, progress, secret = self.fds
        os.setpgid(0, 0)
        os.dup2(stderr_write, 2)
        os.close(stderr_write)
        env = os.environ
        env["KAMEO_FD"] = str(sock)
        env["KAMEO_PROGRESS_FD"] = str(progress)
        env["KAMEO_SECRET_FD"] = str(secret)
        env["KAMEO_WORKER_ID"] = str(req["worker_id"])
        env["KAMEO_PARENT_PID"] = str(os.getppid())
        reseed()
        sys.argv[1:] = [req["pool"], f"w{req['worker_id']}"]
        from kameo import _worker

        return _worker.main()


def reseed() -> None:
    """A fresh seed for numpy's global generator, which a fork copies (``random`` reseeds
    itself in a forked child, and is not imported here for it)."""
    nprandom = sys.modules.get("numpy.random")
    if nprandom is not None:
        with suppress(Exception):  # an old or unusual numpy: leave it
            nprandom.seed()


def preload(modules: list[str]) -> dict[str, Any] | None:
    """Import kameo's worker and ``modules``; None if all went well and no thread runs, else
    why the zygote cannot fork workers."""
    current = "kameo._worker"
    try:
        importlib.import_module(current)
        for current in modules:
            importlib.import_module(current)
    except BaseException as exc:
        return {
            "why": "import",
            "module": current,
            "type": type(exc).__name__,
            "message": str(exc),
            "traceback": _traceback(exc),
        }
    threads = other_threads()
    if threads:
        return {"why": "threads", "module": current, "threads": threads}
    return None


def _traceback(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc))


def main() -> int | Child:
    env = os.environ
    boot_fd = int(env.pop("KAMEO_FD"))
    os.close(int(env.pop("KAMEO_PROGRESS_FD")))
    env.pop("KAMEO_SECRET_FD", None)
    parent = int(env.pop("KAMEO_PARENT_PID", "0"))
    modules = env_list("KAMEO_PRELOAD")
    for path in reversed(env_list("KAMEO_SYS_PATH")):
        if path not in sys.path:
            sys.path.insert(0, path)  # as the worker does with WELCOME's, before the imports
    pool = sys.argv[1] if len(sys.argv) >= 2 else "kameo"
    if parent and not _native.die_with_parent(parent):
        return 1
    boot = _socket.socket(fileno=boot_fd)
    boot.settimeout(30)
    _, fds = receive(boot, 16, 1)
    boot.close()
    if len(fds) != 1:
        return 2
    ctl = _socket.socket(fileno=fds[0])
    ctl.setblocking(True)
    started = time.monotonic()
    refused = preload(modules)
    if refused is not None:
        send(ctl, {"ready": False, **refused})
        return 3
    from kameo import _worker  # preloaded

    _worker.set_process_name(_worker.process_name(pool, "zygote"))
    send(ctl, {"ready": True, "pid": os.getpid(), "seconds": time.monotonic() - started})
    return serve(ctl)


def serve(ctl: _socket.socket) -> int | Child:
    """Fork on request, reap and report; until the control socket closes."""
    return Forker(ctl).serve()


class Forker:
    """The zygote's loop: forks on request and reaps. Between requests it keeps one *spare*
    forked ahead (made once no request has come for :data:`SPARE_AFTER` seconds), waiting on
    a socket of its own: a request it can take is handed to it (the fork and the child's
    first page faults are paid before the crash that needs a replacement); else, or if it is
    gone, the zygote forks."""

    def __init__(self, ctl: _socket.socket) -> None:
        self.ctl = ctl
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()
        self.poller.register(ctl.fileno(), select.POLLIN)
        self.spare: Spare | None = None

    def serve(self) -> int | Child:
        ctl = self.ctl
        while True:
            events = self.poller.poll(None if self.spare is not None else SPARE_AFTER * 1000)
            if not events:
                as_spare = self.make_spare()
                if as_spare is not None:  # this process is the spare, and its wait is over
                    return as_spare
                continue
            for fd, _ in events:
                if fd != ctl.fileno():
                    self.reap(fd)
                    continue
                try:
                    data, fds = receive(ctl, MAX_MESSAGE, FORK_FDS)
                except OSError:
                    data, fds = b"", []
                if not data:
                    self.stop()
                    return 0
                child = self.answer(_native.decode(data), data, fds)
                if child is not None:
                    return child

    def answer(self, req: dict[str, Any], data: bytes, fds: list[int]) -> Child | None:
        """A fork request: handed to the spare if there is one, else forked."""
        wid = req.get("worker_id")
        threads = other_threads()
        if len(fds) != FORK_FDS or threads:
            for fd in fds:
                os.close(fd)
            why = (
                f"the zygote runs other threads ({', '.join(threads)}): kameo never forks a "
                "threaded process"
                if threads
                else f"a fork request came with {len(fds)} descriptors, not {FORK_FDS}"
            )
            send(self.ctl, {"fork_failed": wid, "message": why})
            return None
        spare, self.spare = self.spare, None
        if spare is not None:
            try:
                send_raw(spare.sock, data, fds)
            except OSError:
                pass  # it has just died (reaped when its pidfd says so): fork instead
            else:
                spare.sock.close()
                for fd in fds:
                    os.close(fd)
                send(self.ctl, {"forked": wid, "pid": spare.pid}, [spare.pidfd])
                return None
            finally:
                if spare.sock.fileno() >= 0:
                    spare.sock.close()
        try:
            pid = self.fork()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            send(self.ctl, {"fork_failed": wid, "message": f"fork failed: {exc}"})
            return None
        if pid == 0:
            return Child(req, fds)
        for fd in fds:
            os.close(fd)
        send(self.ctl, {"forked": wid, "pid": pid}, [self.watch(pid)])
        return None

    def fork(self) -> int:
        """``os.fork()``; in the child, none of the zygote's own descriptors (the control
        socket, the pidfds of the other children, the spare's socket) stays open."""
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()  # or the child writes what is buffered again
        pid = os.fork()
        if pid == 0:
            self.ctl.close()
            for pidfd in self.children:
                os.close(pidfd)
            if self.spare is not None:
                self.spare.sock.close()
        return pid

    def watch(self, pid: int) -> int:
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        return pidfd

    def make_spare(self) -> Child | int | None:
        """Fork the spare (not while another thread runs): None in the zygote. In the spare,
        once its wait is over: the worker it is to be (a Child), or 0 (exit: the zygote went
        first)."""
        if other_threads():
            return None
        ours, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        try:
            pid = self.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            ours.close()
            return wait_as_spare(theirs)
        theirs.close()
        self.spare = Spare(pid, self.watch(pid), ours)
        return None

    def reap(self, pidfd: int) -> None:
        """A child exited: kill what is left in its process group (while its pid cannot be
        reused), collect its status and tell the pool (not for a spare: no worker yet)."""
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        spare = self.spare
        if spare is not None and spare.pid == pid:
            self.spare = None
            spare.sock.close()
        else:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, SIGKILL)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = -1
        os.close(pidfd)
        if spare is None or spare.pid != pid:
            with suppress(OSError):
                send(self.ctl, {"exited": pid, "status": status})

    def stop(self) -> None:
        """The pool has gone: kill and reap every child."""
        for pid in self.children.values():
            for kill in (os.killpg, os.kill):
                with suppress(ProcessLookupError, PermissionError):
                    kill(pid, SIGKILL)
        for pidfd, pid in self.children.items():
            with suppress(ChildProcessError):
                os.waitpid(pid, 0)
            os.close(pidfd)


class Spare:
    """The child forked ahead: its pid, the zygote's pidfd of it, and the socket it waits on."""

    __slots__ = ("pid", "pidfd", "sock")

    def __init__(self, pid: int, pidfd: int, sock: _socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock


def wait_as_spare(sock: _socket.socket) -> Child | int:
    """In the spare: the fork request the zygote hands over (then it is that worker), or
    0 when the zygote closes the socket (it is stopping, or has died)."""
    try:
        data, fds = receive(sock, MAX_MESSAGE, FORK_FDS)
    except OSError:
        data, fds = b"", []
    sock.close()
    if not data or len(fds) != FORK_FDS:
        for fd in fds:
            os.close(fd)
        return 0
    return Child(_native.decode(data), fds)


def run() -> None:
    """The zygote's entry point (``_process.ZYGOTE_CODE``), and each forked worker's way out
    of it."""
    if sys.path and sys.path[0] == "":
        sys.path[0] = os.getcwd()  # what ``-m`` would have put first
    outcome = main()
    sys.exit(outcome.run() if isinstance(outcome, Child) else outcome)


if __name__ == "__main__":
    run()
