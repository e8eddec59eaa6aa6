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
import contextlib
import importlib
import os
import select
import sys
import time
from array import array

from kameo import _native

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# The zygote imports neither json, socket, signal nor traceback (with what they pull in, ~8 ms
# before it is ready): messages are kameo's own encoding, descriptors go through _socket.
SIGKILL = 9  # Linux's (this module is Linux-only: pidfds)

#: Largest control message (a fork request: a few variables).
MAX_MESSAGE = 1 << 16
#: Descriptors a fork request carries: socket, stderr, progress page, secret.
FORK_FDS = 4


def send(ctl: _socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = _native.encode(msg)
    if fds:
        ctl.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array("i", fds))])
    else:
        ctl.send(data)


def receive(ctl: _socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it."""
    fds = array("i")
    data, ancillary, _, _ = ctl.recvmsg(size, _socket.CMSG_LEN(max_fds * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def env_list(name: str) -> list[str]:
    """A list the pool put in the environment (``_zygote_client.env_value``)."""
    value = os.environ.pop(name, "")
    return list(_native.decode(bytes.fromhex(value))) if value else []


def other_threads() -> list[str]:
    """Names of this process's threads other than the calling one (from /proc: threads a C
    library started count as much as Python's)."""
    import threading  # kameo._worker has imported it

    me = str(threading.get_native_id())
    names = []
    python_names = {t.native_id: t.name for t in threading.enumerate()}
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
        with contextlib.suppress(Exception):  # an old or unusual numpy: leave it
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
    children: dict[int, int] = {}  # pidfd -> pid
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll():
            if fd != ctl.fileno():
                reap(ctl, poller, children, fd)
                continue
            try:
                data, fds = receive(ctl, MAX_MESSAGE, FORK_FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                stop(children)
                return 0
            child = fork(ctl, poller, children, _native.decode(data), fds)
            if child is not None:
                return child


def fork(
    ctl: _socket.socket,
    poller: select.poll,
    children: dict[int, int],
    req: dict[str, Any],
    fds: list[int],
) -> Child | None:
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
        send(ctl, {"fork_failed": wid, "message": why})
        return None
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # or the child writes what is buffered again
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        send(ctl, {"fork_failed": wid, "message": f"fork failed: {exc}"})
        return None
    if pid == 0:
        # The child: none of the zygote's own descriptors (the control socket, the pidfds
        # of the other workers) stays open.
        ctl.close()
        for pidfd in children:
            os.close(pidfd)
        return Child(req, fds)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    children[pidfd] = pid
    poller.register(pidfd, select.POLLIN)
    send(ctl, {"forked": wid, "pid": pid}, [pidfd])
    return None


def reap(ctl: _socket.socket, poller: select.poll, children: dict[int, int], pidfd: int) -> None:
    """A child exited: kill what is left in its process group (while its pid cannot be
    reused), collect its status and tell the pool."""
    pid = children.pop(pidfd)
    poller.unregister(pidfd)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, SIGKILL)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        status = -1
    os.close(pidfd)
    with contextlib.suppress(OSError):
        send(ctl, {"exited": pid, "status": status})


def stop(children: dict[int, int]) -> None:
    """The pool has gone: kill and reap every child."""
    for pid in children.values():
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                kill(pid, SIGKILL)
    for pidfd, pid in children.items():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        os.close(pidfd)


if __name__ == "__main__":
    outcome = main()
    if isinstance(outcome, Child):
        sys.exit(outcome.run())
    sys.exit(outcome)
