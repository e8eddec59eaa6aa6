"""Worker process entry point: ``python -m kameo._worker``.

Started by the pool with the socket inherited as ``KAMEO_FD``. It shakes hands, imports the
target, then serves requests until the parent sends SHUTDOWN or goes away.

Two serving modes:

* sync handler (function or generator) and ``max_concurrency == 1``: a blocking loop on the
  main thread (the socket read releases the GIL), no event loop at all; the fastest path.
  Callbacks are iterated with ``for``; the loop reads frames while it waits for their items.
* otherwise: an asyncio loop driving the socket; async handlers run as tasks, sync handlers in
  a thread pool of ``max_concurrency`` threads.

Requests start in the order they arrive, at most ``max_concurrency`` at a time. Before one
starts, the worker records it in its progress page (shared memory with the parent, see
``docs/protocol.md``), so if this process dies the parent knows which unanswered requests may
have run; the others go to another worker.

Heartbeats tell the parent the worker is alive: from the event loop in async mode (a blocked
loop stops them), from a thread in sync mode (a long sync handler is not a hang).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import importlib
import inspect
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kameo import _native
from kameo._eager import EagerStarter
from kameo._runtime import (
    END,
    REQUEST,
    REQUEST_STREAM,
    Runtime,
    current_request,
    error_info,
    install,
    traceparent,
)
from kameo.callbacks import handler_kind

Channel = _native.Channel
HANDSHAKE_MAX_FRAME = 1 << 20
STREAM_POLL_EVERY = 16


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


def mismatch(kind: str, frame_kind: int, target: str) -> dict[str, str] | None:
    """The error for ask() on a generator or stream() on a plain function, if any."""
    is_gen = kind in ("gen", "asyncgen")
    if frame_kind == REQUEST and is_gen:
        message = f"handler {target!r} is a generator: use pool.stream(), not pool.ask()"
    elif frame_kind == REQUEST_STREAM and not is_gen:
        message = f"handler {target!r} is not a generator: use pool.ask(), not pool.stream()"
    else:
        return None
    return {"kind": "handler_type", "type": "", "message": message, "traceback": ""}


# ---------------------------------------------------------------------------------- sync mode


def serve_sync(rt: Runtime, handler: Callable[[Any], Any], kind: str, target: str) -> None:
    """One request at a time on this thread; reads block with the GIL released."""
    chan = rt.chan
    pending = rt.pending
    while not rt.eof:
        if not pending:
            if rt.shutdown:
                break
            chan.flush()
            rt.pump(block=True)
            continue
        # Earlier answers go out before the next request starts: the parent refills this
        # worker's prefetch window sooner (measured: faster than batching the replies).
        chan.flush()
        frame_kind, rid, body, trace = pending.popleft()
        chan.take(rid)  # recorded before it runs: the parent knows it may have run
        if rid in rt.cancelled:
            rt.cancelled.discard(rid)
            chan.error(rid, {"kind": "cancelled", "type": "", "message": "", "traceback": ""})
            continue
        wrong = mismatch(kind, frame_kind, target)
        current_request.set(rid)
        traceparent.set(trace)
        if wrong is not None:
            chan.error(rid, wrong)
        elif frame_kind == REQUEST:
            try:
                result = handler(body)
            except BaseException as exc:
                chan.error(rid, error_info(exc))
            else:
                chan.reply(rid, result)
        else:
            stream_sync(rt, rid, handler, body)
        rt.cancelled.discard(rid)
        rt.end_request(rid)
        # Drop the request and its result now, not when the next request arrives: they may
        # hold shared-memory mappings.
        body = result = None
    chan.flush()


def stream_sync(rt: Runtime, rid: int, handler: Callable[[Any], Any], body: Any) -> None:
    chan = rt.chan
    credit = rt.stream_window
    count = 0
    gen = None
    try:
        gen = handler(body)
        for item in gen:
            chan.item_paced(rid, item)  # written at once after a pause, else within 100 µs
            count += 1
            credit -= 1
            if count % STREAM_POLL_EVERY == 0 or credit <= 0:
                rt.pump(block=False)
            credit += rt.credits.pop(rid, 0)
            while credit <= 0 and rid not in rt.cancelled and not rt.eof:
                rt.pump(block=True)
                credit += rt.credits.pop(rid, 0)
            if rid in rt.cancelled or rt.eof:
                break
    except BaseException as exc:
        if gen is not None:
            with contextlib.suppress(BaseException):
                gen.close()
        chan.error(rid, error_info(exc))
        return
    if gen is not None:
        gen.close()  # runs the generator's finally when we stopped early
    rt.credits.pop(rid, None)
    chan.signal(END, rid)


# --------------------------------------------------------------------------------- async mode


async def serve_async(
    rt: Runtime,
    handler: Callable[[Any], Any],
    kind: str,
    target: str,
    max_concurrency: int,
    init: Callable[[], Any] | None,
) -> None:
    """Requests as tasks on an event loop, at most ``max_concurrency`` at once."""
    loop = asyncio.get_running_loop()
    chan = rt.chan
    chan.set_blocking(False)
    fd = chan.fileno()
    finished: asyncio.Future[None] = loop.create_future()
    waiting: deque[tuple[int, int, Any, str | None]] = deque()
    tasks: dict[int, asyncio.Task[None]] = {}
    credits: dict[int, list[Any]] = {}  # rid -> [credit, asyncio.Event]
    executor = (
        None if kind in ("async", "asyncgen") else ThreadPoolExecutor(max_concurrency, "kameo")
    )
    state = {"flush_scheduled": False, "writer": False, "pumping": False}
    eager = EagerStarter(loop)
    # Each request runs in a fresh copy of this, never in the context of the request whose
    # end started it.
    base_context = contextvars.copy_context()

    def stop() -> None:
        if not finished.done():
            finished.set_result(None)

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
            pump()

    def flush_soon(now: bool = False) -> None:
        if now:
            flush()
        elif not state["flush_scheduled"]:
            state["flush_scheduled"] = True
            loop.call_soon(flush)

    async def run(frame_kind: int, rid: int, body: Any, trace: str | None) -> None:
        current_request.set(rid)
        traceparent.set(trace)
        try:
            wrong = mismatch(kind, frame_kind, target)
            if wrong is not None:
                chan.error(rid, wrong)
            elif frame_kind == REQUEST:
                if executor is None:
                    result = await handler(body)
                else:
                    ctx = contextvars.copy_context()
                    result = await loop.run_in_executor(executor, ctx.run, handler, body)
                chan.reply(rid, result)
            else:
                await stream_async(rid, body)
        except asyncio.CancelledError:
            chan.error(rid, {"kind": "cancelled", "type": "", "message": "", "traceback": ""})
        except BaseException as exc:
            chan.error(rid, error_info(exc))
        finally:
            tasks.pop(rid, None)
            credits.pop(rid, None)
            rt.end_request(rid)
            if not state["pumping"]:  # else it finished in its first step: pump() flushes
                pump()
                flush_soon()

    async def stream_async(rid: int, body: Any) -> None:
        holder = credits[rid] = [rt.stream_window, asyncio.Event()]
        count = 0
        if executor is None:
            agen = handler(body)
            async with contextlib.aclosing(agen):
                async for item in agen:
                    chan.item(rid, item)
                    count += 1
                    holder[0] -= 1
                    await pace(holder, count)
        else:
            ctx = contextvars.copy_context()
            gen = await loop.run_in_executor(executor, ctx.run, handler, body)
            done = object()
            try:
                while True:
                    step = functools.partial(ctx.run, next, gen, done)
                    item = await loop.run_in_executor(executor, step)
                    if item is done:
                        break
                    chan.item(rid, item)
                    count += 1
                    holder[0] -= 1
                    await pace(holder, count)
            finally:
                await loop.run_in_executor(executor, gen.close)
        chan.signal(END, rid)

    async def pace(holder: list[Any], count: int) -> None:
        """Write items promptly but in batches, and wait for credit at the window's end."""
        if count % 64 == 0:
            flush()
            await asyncio.sleep(0)  # let the reader see CANCEL and CREDIT
        else:
            flush_soon()
        while holder[0] <= 0:
            flush()
            holder[1].clear()
            await holder[1].wait()

    def pump() -> None:
        if state["pumping"]:
            return  # a request that finished in its first step: the loop below goes on
        if waiting and len(tasks) < max_concurrency:
            flush()  # earlier answers first: the parent refills the window sooner
            if state["writer"]:
                return  # the parent is not reading: on_writable pumps again once it drained
            state["pumping"] = True
            try:
                while waiting and len(tasks) < max_concurrency:
                    frame_kind, rid, body, trace = waiting.popleft()
                    chan.take(rid)  # recorded before it runs: the parent knows it may have run
                    # Eager: a handler that does not wait answers within this call.
                    coro = run(frame_kind, rid, body, trace)
                    task = eager.start(coro, base_context.copy())
                    if task is not None:
                        tasks[rid] = task
            finally:
                state["pumping"] = False
            flush()  # the answers of requests that finished at once, in one write
        if rt.shutdown and not waiting and not tasks:
            stop()

    def on_request(frame_kind: int, rid: int, body: Any, trace: str | None) -> None:
        waiting.append((frame_kind, rid, body, trace))

    def on_cancel(rid: int) -> None:
        task = tasks.get(rid)
        if task is not None:
            task.cancel()
            return
        for i, entry in enumerate(waiting):
            if entry[1] == rid:
                del waiting[i]
                chan.take(rid, started=False)  # answered without running
                chan.error(rid, {"kind": "cancelled", "type": "", "message": "", "traceback": ""})
                flush_soon()
                return

    def on_credit(rid: int, n: int) -> None:
        holder = credits.get(rid)
        if holder is not None:
            holder[0] += n
            holder[1].set()

    def on_readable() -> None:
        try:
            frames = chan.recv(False)
        except OSError:
            frames = None
        if frames is None:
            rt.eof = True
            stop()
            return
        rt.route(frames)
        pump()
        flush()  # what this batch of frames produced, in one write

    def heartbeat() -> None:
        chan.signal(Channel.HEARTBEAT, 0)
        flush_soon()
        loop.call_later(interval, heartbeat)

    try:
        if init is not None:
            result = init()
            if inspect.isawaitable(result):
                await result
    except BaseException as exc:
        startup_failed(chan, exc, "run init hook", rt.init)
        return
    send_ready(chan, kind)
    interval = rt.heartbeat_interval
    if interval:
        loop.call_later(interval, heartbeat)
    rt.loop = loop
    rt.loop_thread = threading.get_ident()
    rt.on_request = on_request
    rt.on_cancel = on_cancel
    rt.on_credit = on_credit
    rt.flush_soon = flush_soon
    loop.add_reader(fd, on_readable)
    try:
        await finished
    finally:
        loop.remove_reader(fd)
        for task in list(tasks.values()):
            task.cancel()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(OSError):
            chan.set_blocking(True)
            chan.flush()


# ---------------------------------------------------------------------------------- start-up


def main() -> int:
    env = os.environ
    fd = int(env.pop("KAMEO_FD"))
    progress_fd = int(env.pop("KAMEO_PROGRESS_FD"))
    worker_id = int(env.pop("KAMEO_WORKER_ID"))
    secret = bytes.fromhex(env.pop("KAMEO_SECRET"))
    parent = int(env.pop("KAMEO_PARENT_PID", "0"))
    if parent and not _native.die_with_parent(parent):
        return 1  # the parent is already gone
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
    rt = Runtime(chan, config, worker_id)
    install(rt)

    target = str(config["target"])
    try:
        handler = load_target(target)
    except BaseException as exc:
        startup_failed(chan, exc, "load target", target)
        return 3
    init: Callable[[], Any] | None = None
    if rt.init:
        try:
            init = load_target(rt.init)  # type: ignore[assignment]
        except BaseException as exc:
            startup_failed(chan, exc, "load init hook", rt.init)
            return 3
    kind = handler_kind(handler)
    max_concurrency = int(config.get("max_concurrency", 1))

    try:
        if kind in ("sync", "gen") and max_concurrency == 1:
            try:
                if init is not None:
                    result = init()
                    if inspect.isawaitable(result):
                        asyncio.run(result)  # type: ignore[arg-type]
            except BaseException as exc:
                startup_failed(chan, exc, "run init hook", rt.init)
                return 3
            send_ready(chan, kind)
            if rt.heartbeat_interval:
                start_heartbeat_thread(chan, rt.heartbeat_interval)
            serve_sync(rt, handler, kind, target)
        else:
            asyncio.run(serve_async(rt, handler, kind, target, max_concurrency, init))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        rt.eof = True
    if rt.eof and not rt.shutdown:
        # The parent went away without SHUTDOWN: take the worker's own children with us.
        _native.kill_own_group()
    return 0


def startup_failed(chan: Any, exc: BaseException, stage: str, what: str | None) -> None:
    info = error_info(exc)
    info["stage"] = stage
    info["what"] = repr(what)
    chan.send(Channel.STARTUP_FAILED, 0, info)
    chan.flush()


def send_ready(chan: Any, kind: str) -> None:
    chan.send(Channel.READY, 0, {"kind": kind, "python": sys.version.split()[0]})
    chan.flush()


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

    threading.Thread(target=beat, name="kameo-heartbeat", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
