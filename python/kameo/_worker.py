"""Worker process entry point: ``python -m kameo._worker``.

Started by the pool with the socket inherited as ``KAMEO_FD``. It shakes hands, imports the
target, runs the init hook, then hands the requests to one of two servers until the parent
sends SHUTDOWN or goes away:

* ``_serve_sync.SyncServer``: a sync handler (function or generator) and
  ``max_concurrency == 1``: a blocking loop on the main thread (the socket read releases the
  GIL), no event loop at all; the fastest path. Callbacks are iterated with ``for``; the loop
  reads frames while it waits for their items.
* ``_serve_async.AsyncServer``: otherwise: an asyncio loop driving the socket; async handlers
  run as tasks, sync handlers in ``max_concurrency`` handler threads.

Both are attached to the worker's ``_runtime.Runtime``, which routes the frames. Requests start
in the order they arrive, at most ``max_concurrency`` at a time. Before one starts, the worker
records it in its progress page (shared memory with the parent, see ``docs/protocol.md``), so if
this process dies the parent knows which unanswered requests may have run; the others go to
another worker.

Heartbeats tell the parent the worker is alive: from the event loop in async mode (a blocked
loop stops them), from a thread in sync mode (a long sync handler is not a hang).
"""

from __future__ import annotations

import os
import sys
import time

from kameo import _calls, _functions, _native, _worker_log
from kameo._handler import GEN, NONE, SYNC, handler_kind
from kameo._lean import start_thread, suppress
from kameo._runtime import Runtime, install
from kameo._serve_sync import SyncServer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

Channel = _native.Channel
HANDSHAKE_MAX_FRAME = 1 << 20
#: Longest process name (``/proc/<pid>/comm``) Linux keeps, in bytes.
COMM_MAX = 15


def load_target(target: str | bytes) -> Callable[[Any], Any]:
    """The callable a ``module:qualname`` target names (the handler, or the init hook), or a
    pickled one (bytes, from a pool with ``allow_pickle=True``)."""
    if isinstance(target, bytes):
        return _functions.load_pickled(target)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target {target!r} must be 'module:function'")
    obj = _calls.load(target)
    if not callable(obj):
        raise TypeError(f"target {target!r} is not callable (it is {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def read_secret(fd: int) -> bytes:
    """The pool's secret, from the pipe the pool wrote it to before exec (never from the
    environment, which /proc/<pid>/environ would show for the life of the process)."""
    try:
        chunks = []
        while chunk := os.read(fd, 256):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def process_name(pool: str, role: str) -> str:
    """A pool process's name: ``kameo <pool> <role>`` (role ``w<id>`` for a worker, ``zygote``)
    if it fits in the 15 bytes Linux keeps, else ``<pool> <role>`` with the pool's name cut
    to fit (``pricing w0``)."""
    suffix = f" {role}"
    full = f"{pool}{suffix}" if pool == "kameo" else f"kameo {pool}{suffix}"
    if len(full.encode()) <= COMM_MAX:
        return full
    room = max(COMM_MAX - len(suffix), 0)
    return pool.encode()[:room].decode("utf-8", "ignore") + suffix


def set_process_name(name: str) -> None:
    """Name this process (what ``ps``, ``top`` and ``/proc/<pid>/comm`` show; the main
    thread's name, which threads started later inherit)."""
    data = name.encode()[:COMM_MAX]
    try:
        with open("/proc/self/comm", "wb") as f:
            f.write(data)
        return
    except OSError:
        pass
    with suppress(Exception):  # no /proc: prctl(PR_SET_NAME) through libc
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(data), 0, 0, 0)  # PR_SET_NAME


def main() -> int:
    try:
        return serve()
    finally:
        _worker_log.close()  # records still buffered go to the parent first (bounded)


def serve() -> int:
    env = os.environ
    fd = int(env.pop("KAMEO_FD"))
    progress_fd = int(env.pop("KAMEO_PROGRESS_FD"))
    worker_id = int(env.pop("KAMEO_WORKER_ID"))
    secret = read_secret(int(env.pop("KAMEO_SECRET_FD")))
    parent = int(env.pop("KAMEO_PARENT_PID", "0"))
    if parent and not _native.die_with_parent(parent):
        return 1  # the parent is already gone
    # The pool put its name and our id after the module name (`ps -f` shows them); the
    # handler's code sees a plain sys.argv.
    pool_name = sys.argv[1] if len(sys.argv) >= 2 else "kameo"
    if len(sys.argv) >= 2:
        set_process_name(process_name(pool_name, f"w{worker_id}"))
    del sys.argv[1:]
    os.set_inheritable(fd, False)  # the worker's own children do not get the pool socket

    chan = Channel(fd, HANDSHAKE_MAX_FRAME)
    chan.set_progress(progress_fd)  # maps the page and closes the descriptor
    chan.hello(worker_id, os.getpid(), secret)
    frames = chan.recv()
    if not frames:
        return 1
    first, _, _, body, _ = frames[0]
    if first != Channel.WELCOME:
        reason = body if first == Channel.REJECT else f"unexpected frame kind {first}"
        print(f"kameo worker {worker_id}: handshake refused: {reason}", file=sys.stderr)
        return 2
    config: dict[str, Any] = body
    chan.set_max_frame(int(config["max_frame_bytes"]))
    chan.set_codec(bool(config.get("allow_pickle")), config.get("shm_threshold"))
    for path in reversed(config.get("sys_path") or []):
        if path not in sys.path:
            sys.path.insert(0, path)
    rt = Runtime(chan, config, worker_id, pool_name)
    install(rt)
    if config.get("log_levels") is not None:
        _worker_log.install(chan, config)

    target = config.get("target")
    handler: Callable[[Any], Any] | None = None
    if target is not None:
        try:
            handler = load_target(target if isinstance(target, bytes) else str(target))
        except BaseException as exc:
            rt.startup_failed(exc, "load target", target)
            return 3
    chan.set_ref_hook(rt.ops.objects.resolve)
    init: Callable[[], Any] | None = None
    if rt.init:
        try:
            init_fn: Callable[..., Any] = load_target(rt.init)
        except BaseException as exc:
            rt.startup_failed(exc, "load init hook", rt.init)
            return 3
        initargs: tuple[Any, ...] = ()
        if rt.initargs is not None:
            try:
                initargs = _native.decode(rt.initargs, allow_pickle=rt.ops.allow_pickle)
            except BaseException as exc:
                rt.startup_failed(exc, "decode the initargs of", rt.init)
                return 3
        init = (lambda: init_fn(*initargs)) if initargs else init_fn
    adapter_class = isinstance(handler, type)
    if handler is None:
        kind = NONE
    elif adapter_class:
        # Instances are called by pool.ask only if the class defines __call__.
        mro = type.mro(handler)  # type: ignore[arg-type]
        call = next((vars(c)["__call__"] for c in mro[:-1] if "__call__" in vars(c)), None)
        kind = handler_kind(call) if call is not None else NONE
    else:
        kind = handler_kind(handler)
    max_concurrency = int(config.get("max_concurrency", 1))
    target = _functions.describe(target) if target is not None else "(no target)"

    def load_adapter() -> None:
        """An adapter class target: one instance, made after the init hook."""
        nonlocal handler, kind
        if adapter_class:
            assert handler is not None
            instance = handler()  # type: ignore[call-arg]
            rt.ops.adapter = instance
            handler = instance if kind != NONE else None
        rt.ops.handler = handler

    try:
        if kind in (SYNC, GEN, NONE) and max_concurrency == 1:
            try:
                if init is not None:
                    result = init()
                    if result is not None and _is_awaitable(result):
                        import asyncio

                        asyncio.run(result)
            except BaseException as exc:
                rt.startup_failed(exc, "run init hook", rt.init)
                return 3
            try:
                load_adapter()
            except BaseException as exc:
                rt.startup_failed(exc, "make the adapter instance", target)
                return 3
            server = SyncServer(rt, handler, kind, target)
            rt.ready(kind)
            if rt.heartbeat_interval:
                start_heartbeat_thread(chan, rt.heartbeat_interval)
            server.serve()
        else:
            import asyncio

            from kameo import _serve_async

            asyncio.run(
                _serve_async.serve(rt, handler, kind, target, max_concurrency, init, load_adapter)
            )
    except (EOFError, BrokenPipeError, ConnectionResetError):
        rt.eof = True
    if rt.eof and not rt.shutdown:
        # The parent went away without SHUTDOWN: take the worker's own children with us.
        _native.kill_own_group()
    return 0


def start_heartbeat_thread(chan: Any, interval: float) -> None:
    """Sync mode: heartbeats from a daemon thread (a long handler is busy, not hung)."""

    def beat() -> None:
        while True:
            time.sleep(interval)
            try:
                chan.signal(Channel.HEARTBEAT, 0)
                chan.flush()
            except Exception:
                return

    start_thread(beat)


def run() -> None:
    """A worker's entry point (``_process.WORKER_CODE``; ``-m kameo._worker`` works too)."""
    if sys.path and sys.path[0] == "":
        sys.path[0] = os.getcwd()  # what ``-m`` would have put first
    sys.exit(main())


def _is_awaitable(value: object) -> bool:
    """``inspect.isawaitable`` (inspect imported only for an init hook that returned a value)."""
    import inspect

    return inspect.isawaitable(value)


if __name__ == "__main__":
    sys.exit(main())
