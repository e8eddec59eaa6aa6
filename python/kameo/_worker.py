"""Worker process entry point: ``python -m kameo._worker``.

Started by the pool with the socket inherited as ``KAMEO_FD``. It shakes hands, imports the
target, then serves requests until the parent sends SHUTDOWN or goes away.

Two serving modes:

* sync handler and ``max_concurrency == 1``: a blocking loop on the main thread (the socket
  read releases the GIL), no event loop at all; the fastest path.
* otherwise: an asyncio loop driving the socket; async handlers run as tasks, sync handlers in
  a thread pool of ``max_concurrency`` threads.

Before a request runs, its STARTED frame is on the wire, so the parent knows exactly which
prefetched requests never ran if this process dies.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kameo import _native

Channel = _native.Channel
REQUEST = Channel.REQUEST
CANCEL = Channel.CANCEL
SHUTDOWN = Channel.SHUTDOWN
HANDSHAKE_MAX_FRAME = 1 << 20


def _qualname(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def error_info(exc: BaseException) -> dict[str, str]:
    """What the parent needs to rebuild the exception."""
    return {
        "kind": "remote",
        "type": _qualname(type(exc)),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def load_target(target: str) -> Callable[[Any], Any]:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target {target!r} must be 'module:function'")
    if module_name == "__main__":
        raise ImportError(
            f"target {target!r}: a handler defined in __main__ cannot be imported by a worker; "
            "move it to a module"
        )
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"target {target!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise TypeError(f"target {target!r} is not callable (it is {type(obj).__name__})")
    return obj  # type: ignore[no-any-return]


def is_async_handler(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def serve_sync(chan: Any, handler: Callable[[Any], Any]) -> None:
    """One request at a time on this thread; the read blocks with the GIL released."""
    recv, started, flush, reply, error = chan.recv, chan.started, chan.flush, chan.reply, chan.error
    while True:
        frames = recv()
        if frames is None:
            return
        for kind, rid, body in frames:
            if kind == REQUEST:
                started(rid)
                flush()
                try:
                    result = handler(body)
                except BaseException as exc:
                    error(rid, error_info(exc))
                else:
                    reply(rid, result)
            elif kind == SHUTDOWN:
                flush()
                return
            elif kind == CANCEL:
                continue  # nothing runs concurrently in this mode
            else:
                unexpected(chan, kind, rid, body)
        flush()


def unexpected(chan: Any, kind: int, rid: int, body: Any) -> None:
    if kind in (Channel.OVERSIZE, Channel.UNDECODABLE):
        chan.error(rid, {"kind": "protocol", "type": "", "message": str(body), "traceback": ""})
    else:
        message = f"worker does not understand frame kind {kind}"
        chan.error(rid, {"kind": "protocol", "type": "", "message": message, "traceback": ""})


async def serve_async(
    chan: Any, handler: Callable[[Any], Any], is_async: bool, max_concurrency: int
) -> None:
    """Requests as tasks on an event loop, at most ``max_concurrency`` at once."""
    loop = asyncio.get_running_loop()
    chan.set_blocking(False)
    fd = chan.fileno()
    finished: asyncio.Future[None] = loop.create_future()
    waiting: deque[tuple[int, Any]] = deque()
    tasks: dict[int, asyncio.Task[None]] = {}
    executor = None if is_async else ThreadPoolExecutor(max_concurrency, "kameo-handler")
    state = {"shutdown": False, "flush_scheduled": False, "writer": False}

    def flush() -> None:
        state["flush_scheduled"] = False
        try:
            done = chan.flush()
        except OSError:
            stop()
            return
        if not done and not state["writer"]:
            state["writer"] = True
            loop.add_writer(fd, on_writable)

    def on_writable() -> None:
        try:
            done = chan.flush()
        except OSError:
            done = True
            stop()
        if done:
            state["writer"] = False
            loop.remove_writer(fd)

    def schedule_flush() -> None:
        if not state["flush_scheduled"]:
            state["flush_scheduled"] = True
            loop.call_soon(flush)

    def stop() -> None:
        if not finished.done():
            finished.set_result(None)

    async def run(rid: int, body: Any) -> None:
        try:
            if is_async:
                result = await handler(body)
            else:
                result = await loop.run_in_executor(executor, handler, body)
        except BaseException as exc:
            chan.error(rid, error_info(exc))
        else:
            chan.reply(rid, result)
        finally:
            tasks.pop(rid, None)
            pump()
            schedule_flush()

    def pump() -> None:
        started_any = False
        while waiting and len(tasks) < max_concurrency:
            rid, body = waiting.popleft()
            chan.started(rid)
            started_any = True
            tasks[rid] = loop.create_task(run(rid, body))
        if started_any:
            flush()  # STARTED is on the wire before any handler runs
        if state["shutdown"] and not waiting and not tasks:
            stop()

    def on_readable() -> None:
        try:
            frames = chan.recv()
        except OSError:
            frames = None
        if frames is None:
            stop()
            return
        for kind, rid, body in frames:
            if kind == REQUEST:
                waiting.append((rid, body))
            elif kind == SHUTDOWN:
                state["shutdown"] = True
            elif kind == CANCEL:
                task = tasks.get(rid)
                if task is not None:
                    task.cancel()
            else:
                unexpected(chan, kind, rid, body)
                schedule_flush()
        pump()

    loop.add_reader(fd, on_readable)
    try:
        await finished
    finally:
        loop.remove_reader(fd)
        for task in list(tasks.values()):
            task.cancel()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        try:
            chan.set_blocking(True)
            chan.flush()
        except OSError:
            pass


def main() -> int:
    env = os.environ
    fd = int(env.pop("KAMEO_FD"))
    worker_id = int(env.pop("KAMEO_WORKER_ID"))
    secret = bytes.fromhex(env.pop("KAMEO_SECRET"))
    parent = int(env.pop("KAMEO_PARENT_PID", "0"))
    if parent and not _native.die_with_parent(parent):
        return 1  # the parent is already gone
    os.set_inheritable(fd, False)  # the worker's own children do not get the pool socket

    chan = Channel(fd, HANDSHAKE_MAX_FRAME)
    chan.hello(worker_id, os.getpid(), secret)
    frames = chan.recv()
    if not frames:
        return 1
    kind, _, body = frames[0]
    if kind != Channel.WELCOME:
        reason = body if kind == Channel.REJECT else f"unexpected frame kind {kind}"
        print(f"kameo worker {worker_id}: handshake refused: {reason}", file=sys.stderr)
        return 2
    config: dict[str, Any] = body
    chan.set_max_frame(int(config["max_frame_bytes"]))
    for path in reversed(config.get("sys_path") or []):
        if path not in sys.path:
            sys.path.insert(0, path)

    target = str(config["target"])
    try:
        handler = load_target(target)
    except BaseException as exc:
        chan.send(Channel.STARTUP_FAILED, 0, error_info(exc))
        chan.flush()
        return 3
    is_async = is_async_handler(handler)
    max_concurrency = int(config.get("max_concurrency", 1))
    chan.send(Channel.READY, 0, {"async": is_async, "python": sys.version.split()[0]})
    chan.flush()

    if not is_async and max_concurrency == 1:
        serve_sync(chan, handler)
    else:
        asyncio.run(serve_async(chan, handler, is_async, max_concurrency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
