"""Worker-side runtime: routing of incoming frames, and callbacks into the parent.

One :class:`Runtime` exists per worker process. The server that runs requests (``_serve_sync``
or ``_serve_async``, chosen by ``kameo._worker``) attaches itself to it (:class:`Server`) and
feeds it frames; handlers reach it through ``kameo.<module>.<Type>(data)`` and
``kameo.callback_handle(path, data)``. Nothing here imports the parent side.
"""

from __future__ import annotations

import os
import sys
from _thread import get_ident
from _weakref import ref as weakref_ref

from kameo import _error_info, _functions, _native, _worker_log
from kameo._calls import Calls, kind_of
from kameo._context import current_request, traceparent
from kameo._handler import NONE
from kameo._lean import deque, suppress
from kameo.errors import CallbackNotFound, HandlerTypeError, KameoError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    import weakref
    from collections.abc import Callable, Generator, Iterator
    from typing import Any, Protocol

    from kameo import _otel

__all__ = ["CallbackCall", "Runtime", "current", "current_request", "traceparent"]

Channel = _native.Channel
REQUEST = Channel.REQUEST
REQUEST_STREAM = Channel.REQUEST_STREAM
CANCEL = Channel.CANCEL
SHUTDOWN = Channel.SHUTDOWN
ITEM = Channel.ITEM
END = Channel.END
ERROR = Channel.ERROR
CREDIT = Channel.CREDIT
CALL = Channel.CALL
CALL_STREAM = Channel.CALL_STREAM
RELEASE = Channel.RELEASE

#: A request waiting to start: (frame kind, request id, body, traceparent).
Request = tuple[int, int, "Any", "str | None"]

_runtime: Runtime | None = None


def current() -> Runtime | None:
    """The worker runtime, or None outside a kameo worker."""
    return _runtime


if TYPE_CHECKING:

    class Server(Protocol):
        """What the runtime needs from the server that runs the requests."""

        @property
        def loop(self) -> asyncio.AbstractEventLoop | None:
            """The event loop the requests run on; None for the sync server (a callback then reads
            the socket itself while it waits)."""

        @property
        def thread(self) -> int | None:
            """The loop's thread (None for the sync server)."""

        @property
        def waiting(self) -> deque[Request]:
            """Requests received and not started; the runtime appends to it."""

        @property
        def cancelled(self) -> set[int]:
            """Ids of running requests their caller cancelled (sync server: a callback waiting in
            one stops; the async server cancels the request's task instead)."""

        def cancel(self, rid: int) -> None:
            """CANCEL for request ``rid``."""

        def credit(self, rid: int, n: int) -> None:
            """CREDIT of ``n`` items for the stream of request ``rid``."""

        def wait_here(self) -> bool:
            """Wait for and handle frames in place of a loop iteration, when that delays nothing;
            True if frames were handled."""

        def flush(self) -> object:
            """Write what is queued, soon; callable from any thread."""


def mismatch(kind: str, frame_kind: int, target: str) -> dict[str, str] | None:
    """The error for ask() on a generator or stream() on a plain function, if any."""
    is_gen = kind in ("gen", "asyncgen")
    if kind == NONE and frame_kind in (REQUEST, REQUEST_STREAM):
        message = f"this pool has no handler to ask ({target}): use pool.call()"
    elif frame_kind == REQUEST and is_gen:
        message = f"handler {target!r} is a generator: use pool.stream(), not pool.ask()"
    elif frame_kind == REQUEST_STREAM and not is_gen:
        message = f"handler {target!r} is not a generator: use pool.ask(), not pool.stream()"
    else:
        return None
    return _error_info.handler_type(message)


def server_span(frame_kind: int, body: Any, target: str) -> tuple[str, str | None] | None:
    """The kind and target of a request's server span (``target``: the worker's handler);
    None for the pool's own housekeeping (closing a session...), which the parent does not
    trace either."""
    if frame_kind == REQUEST:
        return "ask", target
    if frame_kind == REQUEST_STREAM:
        return "stream", target
    if type(body) is not tuple or not body:
        return "call", None
    kind, name = kind_of(body, target)
    if kind is None:
        return None
    return ("call_stream" if frame_kind == CALL_STREAM and kind == "call" else kind), name


def no_handler(_msg: Any) -> Any:
    """The handler of a worker that has none (``mismatch`` answers asks before they get here)."""
    raise HandlerTypeError("this pool has no handler to ask: use pool.call()")


class Runtime:
    """Routes frames to requests and callbacks; owns the callback id space."""

    def __init__(
        self, chan: Any, config: dict[str, Any], worker_id: int, pool: str = "kameo"
    ) -> None:
        self.chan = chan
        self.worker_id = worker_id
        self.pool = pool
        #: OpenTelemetry server spans, if this worker set a tracer provider up by the time its
        #: init hook returned (``trace_requests``).
        self.otel: _otel.WorkerTelemetry | None = None
        self.paths = frozenset(config.get("callbacks") or ())
        self.modules: dict[str, frozenset[str]] = {}
        for path in self.paths:
            module, _, name = path.partition(".")
            self.modules[module] = self.modules.get(module, frozenset()) | {name}
        self.stream_window = max(1, int(config.get("stream_window", 256)))
        self.credit_every = max(1, self.stream_window // 4)  # items taken before CREDIT is sent
        self.heartbeat_interval = float(config.get("heartbeat_interval") or 0)
        #: The init hook: "module:qualname", or bytes (pickled); its arguments, encoded.
        self.init: str | bytes | None = config.get("init")
        self.initargs: bytes | None = config.get("initargs")
        #: Dynamic calls and the objects the parent holds Refs to (set by kameo._worker).
        self.ops: Calls = Calls(worker_id, allow_pickle=bool(config.get("allow_pickle")))
        # Open calls only, weakly: a call dropped by its handler (`break` out of the loop) is
        # collected at once, and the callback of its reference cancels the parent handler.
        self.calls: dict[int, weakref.ref[CallbackCall]] = {}
        self._on_drop = self._dropped
        self._next_cid = 0
        self.shutdown = False  # SHUTDOWN received
        self.eof = False  # the parent went away
        # The server's, bound once by attach() (read per frame and per callback).
        self.server: Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self.cancelled: set[int] = set()
        self.flush: Callable[[], object] = chan.flush
        self._enqueue: Callable[[Request], object] = self._no_server

    def attach(self, server: Server) -> None:
        """``server`` runs the requests from now on."""
        self.server = server
        self.loop = server.loop
        self.loop_thread = server.thread
        self.cancelled = server.cancelled
        self.flush = server.flush
        self._enqueue = server.waiting.append

    def _no_server(self, request: Request) -> None:
        raise KameoError(f"request {request[1]} arrived before the worker was serving")

    # -- start-up ----------------------------------------------------------------------

    def trace_requests(self) -> Any:
        """After the init hook: trace requests if OpenTelemetry is set up now; the channel
        the server answers on (one that marks a request's span failed on its error)."""
        from kameo import _otel

        self.otel = _otel.for_worker(self.pool, self.worker_id, os.getpid())
        return self.chan if self.otel is None else _otel.traced_channel(self.chan, self.otel)

    def ready(self, kind: str) -> None:
        """READY: the target is loaded and the init hook ran."""
        self.chan.send(Channel.READY, 0, {"kind": kind, "python": sys.version.split()[0]})
        self.chan.flush()

    def startup_failed(self, exc: BaseException, stage: str, what: str | bytes | None) -> None:
        _worker_log.drain()  # what the import or init hook logged comes first
        if isinstance(what, bytes):
            what = _functions.describe(what)
        self.chan.send(Channel.STARTUP_FAILED, 0, _error_info.startup_failed(exc, stage, what))
        self.chan.flush()

    # -- callbacks ---------------------------------------------------------------------

    def not_found(self, path: str) -> CallbackNotFound:
        known = ", ".join(sorted(self.paths)) or "none"
        return CallbackNotFound(f"no parent handler registered for {path!r} (registered: {known})")

    def new_call(self, path: str, data: Any) -> CallbackCall:
        if path not in self.paths:
            raise self.not_found(path)
        return CallbackCall(self, path, data)

    def open_call(self, call: CallbackCall, flush: bool = True) -> int:
        """Send CALLBACK for ``call``; without ``flush`` it goes with the caller's next blocking
        read (sync mode: ``recv`` writes everything queued before it waits)."""
        self._next_cid = cid = self._next_cid + 1
        self.chan.callback(cid, call.path, call.data, call.request_id, call.trace)
        self.calls[cid] = weakref_ref(call, self._on_drop)
        call.data = None  # sent: do not keep it alive for as long as the call
        if flush:
            self.flush()
        return cid

    def _dropped(self, ref: weakref.ref[CallbackCall]) -> None:
        """A call was collected while still open (its handler left the loop): cancel it in the
        parent. (A finished call is no longer in ``calls``: its reference died with the entry,
        so this is not called for it.)"""
        with suppress(Exception):  # interpreter shutdown
            for cid, other in list(self.calls.items()):
                if other is ref:
                    del self.calls[cid]
                    self.chan.signal(CANCEL, cid)
                    self.flush()
                    return

    def end_request(self, rid: int) -> None:
        """The request finished: cancel the callbacks it left open."""
        if not self.calls:
            return
        for ref in list(self.calls.values()):
            call = ref()
            if call is not None and call.request_id == rid:
                call._request_ended()

    # -- routing -----------------------------------------------------------------------

    def route(self, frames: list[tuple[int, int, bool, Any, str | None]]) -> None:
        enqueue = self._enqueue
        for kind, fid, final, body, trace in frames:
            if kind in (REQUEST, REQUEST_STREAM, CALL, CALL_STREAM):
                enqueue((kind, fid, body, trace))
            elif kind == RELEASE:
                self.ops.objects.release(body)
            elif kind in (ITEM, END, ERROR):
                ref = self.calls.get(fid)
                call = ref() if ref is not None else None
                if call is not None:
                    call._deliver(kind, final, body)
            elif kind == CREDIT:
                self.server.credit(fid, body)  # type: ignore[union-attr]
            elif kind == CANCEL:
                self.server.cancel(fid)  # type: ignore[union-attr]
            elif kind == SHUTDOWN:
                self.shutdown = True
            elif isinstance(body, BaseException):  # a call's Ref argument did not resolve
                self.chan.error(fid, _error_info.from_exception(body))
            else:
                message = str(body) if isinstance(body, str) else f"unknown frame kind {kind}"
                self.chan.error(fid, _error_info.protocol(message))

    def pump(self, block: bool) -> None:
        """Sync mode: read and route frames (waiting for at least one with ``block``)."""
        frames = self.chan.recv(block)
        if frames is None:
            self.parent_gone()
        else:
            self.route(frames)

    def parent_gone(self) -> None:
        self.eof = True
        for ref in list(self.calls.values()):
            call = ref()
            if call is None:
                continue
            call._deliver(ERROR, True, _error_info.protocol("parent went away"))


_NO_ITEM: Any = object()  # CallbackCall._wait: nothing to return


class CallbackCall:
    """One call of a parent handler: an iterator of the items it yields.

    Use ``async for`` in async handlers and ``for`` in sync ones. Breaking out of the loop (or
    ``close()``/``aclose()``) cancels the parent handler. Awaiting it gives the call itself, so
    ``await kameo.callback_handle(...)`` works in async handlers and the plain call in sync ones.
    """

    __slots__ = (
        "__weakref__",
        "cid",
        "data",
        "done",
        "error",
        "items",
        "path",
        "request_id",
        "rt",
        "trace",
        "unacked",
        "waiter",
    )

    def __init__(self, rt: Runtime, path: str, data: Any) -> None:
        self.rt = rt
        self.path = path
        self.data = data
        self.request_id = current_request.get()
        self.trace = traceparent.get()
        self.cid = 0
        self.items: deque[Any] | None = None  # made for a second item (or a routed one)
        self.done = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.unacked = 0

    def __repr__(self) -> str:
        return f"<kameo callback {self.path} id={self.cid}>"

    def __await__(self) -> Generator[Any, None, CallbackCall]:
        return self
        yield  # a generator that finishes at once

    def _deliver(self, kind: int, final: bool, body: Any) -> None:
        if kind == ITEM:
            items = self.items
            if items is None:
                items = self.items = deque()
            items.append(body)
            if final:
                self._finish()
        elif kind == END:
            self._finish()
        else:
            info = body if isinstance(body, dict) else {"message": str(body)}
            self.error = _error_info.from_peer(info, "the parent", os.getppid())
            self._finish()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _finish(self) -> None:
        self.done = True
        self.rt.calls.pop(self.cid, None)

    def _took(self) -> None:
        self.unacked += 1
        if not self.done and self.unacked >= self.rt.credit_every:
            self.rt.chan.credit(self.cid, self.unacked)
            self.unacked = 0
            self.rt.flush()

    def _next_ready(self) -> tuple[bool, Any]:
        items = self.items
        if items:
            item = items.popleft()
            self._took()
            return True, item
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return False, None

    # sync iteration (sync handlers)
    def __iter__(self) -> Iterator[Any]:
        # A generator: a step costs no Python call, and the end raises no StopIteration.
        rt = self.rt
        if rt.loop is not None:  # a handler thread of the async serving loop
            while True:
                try:
                    item = self.__next__()
                except StopIteration:
                    return
                yield item
        if not self.cid:
            self.cid = rt.open_call(self, flush=False)  # written by the blocking read below
        while True:
            items = self.items
            if items:
                item = items.popleft()
            elif self.error is not None:
                err, self.error = self.error, None
                raise err
            elif self.done:
                return
            else:
                item = self._wait()
                if item is _NO_ITEM:
                    continue
            if not self.done:
                self._took()
            yield item

    def __next__(self) -> Any:
        rt = self.rt
        if rt.loop is not None:
            if get_ident() == rt.loop_thread:
                raise KameoError(
                    f"callback {self.path}: use 'async for' inside an async handler, not 'for'"
                )
            import asyncio  # the worker has a loop

            fut = asyncio.run_coroutine_threadsafe(self._anext_or_stop(), rt.loop)
            ok, item = fut.result()
            if not ok:
                raise StopIteration
            return item
        if not self.cid:
            self.cid = rt.open_call(self, flush=False)  # written by the blocking read below
        while True:
            ok, item = self._next_ready()
            if ok:
                return item
            if self.done:
                raise StopIteration
            item = self._wait()
            if item is not _NO_ITEM:
                self._took()
                return item

    def _wait(self) -> Any:
        """Sync mode, no item buffered: read (and route) the frames that arrive next, at least
        one. The usual answer, one item of this very call, is returned rather than buffered;
        else ``_NO_ITEM``."""
        rt = self.rt
        frames = rt.chan.recv(True)
        item: Any = _NO_ITEM
        if frames is None:
            rt.parent_gone()
        elif len(frames) == 1 and frames[0][1] == self.cid and frames[0][0] == ITEM:
            _, cid, final, item, _ = frames[0]  # what route() would do, inline
            if final:
                self.done = True
                rt.calls.pop(cid, None)
        else:
            rt.route(frames)
        if self.request_id in rt.cancelled:
            self.close()
            raise KameoError(f"callback {self.path}: the request was cancelled by its caller")
        return item

    # async iteration (async handlers)
    def __aiter__(self) -> CallbackCall:
        return self

    async def _anext_or_stop(self) -> tuple[bool, Any]:
        try:
            return True, await self.__anext__()
        except StopAsyncIteration:
            return False, None

    async def __anext__(self) -> Any:
        rt = self.rt
        if rt.loop is None:
            # A coroutine run by the sync server on its own loop (a called async function):
            # it has the loop to itself, so wait for the item with a blocking read.
            try:
                return self.__next__()
            except StopIteration:
                raise StopAsyncIteration from None
        if not self.cid:
            self.cid = rt.open_call(self)
        while True:
            ok, item = self._next_ready()
            if ok:
                return item
            if self.done:
                raise StopAsyncIteration
            if rt.server.wait_here():  # type: ignore[union-attr]
                continue
            self.waiter = rt.loop.create_future()
            try:
                await self.waiter
            except BaseException:  # cancelled: the parent's handler is cancelled too
                self.close()
                raise
            finally:
                self.waiter = None

    def _abandon(self) -> None:
        """Cancel in the parent without flushing (the caller flushes)."""
        if self.cid and not self.done:
            self.done = True
            self.rt.chan.signal(CANCEL, self.cid)
            self.rt.calls.pop(self.cid, None)

    def _request_ended(self) -> None:
        """Its request ended while the call was open: cancel it in the parent, and stop with
        an error whoever still waits for its next item. (In the async server that is a sync
        handler's thread when the request was cancelled: its task is gone, but the thread
        waits on the loop for the item, which would never come.)"""
        if not self.cid or self.done:
            return
        self._abandon()
        self.error = KameoError(
            f"callback {self.path}: the request was cancelled by its caller (or has ended)"
        )
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Stop the call: the parent handler is cancelled (its ``finally`` runs)."""
        if self.cid and not self.done:
            self._abandon()
            with suppress(OSError):
                self.rt.flush()
        self.done = True

    async def aclose(self) -> None:
        self.close()


class CallbackStub:
    """``kameo.<module>.<Type>``: calling it starts a callback to the parent handler."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self, data: Any = None) -> CallbackCall:
        rt = _runtime
        if rt is None:
            raise KameoError(f"{self.path}: callbacks can only be made from inside a kameo worker")
        if self.path not in rt.paths:
            raise rt.not_found(self.path)
        return CallbackCall(rt, self.path, data)

    def __repr__(self) -> str:
        return f"<kameo callback stub {self.path}>"


class CallbackModule:
    """``kameo.<module>``: attribute access gives the registered handler stubs; an unregistered
    type raises :class:`CallbackNotFound` (an ``AttributeError`` too)."""

    def __init__(self, name: str, types: frozenset[str]) -> None:
        self._name = name
        self._types = types
        for t in types:  # plain attributes: `kameo.<module>.<Type>` costs two lookups
            if not t.startswith("_"):  # those could shadow this object's own attributes
                setattr(self, t, CallbackStub(f"{name}.{t}"))

    def __getattr__(self, name: str) -> CallbackStub:
        if name in self._types:
            return CallbackStub(f"{self._name}.{name}")
        rt = _runtime
        if rt is not None and not name.startswith("_"):  # not a probe for a private name
            raise rt.not_found(f"{self._name}.{name}")
        raise AttributeError(f"module 'kameo.{self._name}' has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        return sorted(self._types)

    def __repr__(self) -> str:
        return f"<kameo callback module {self._name!r}>"


def module_attribute(name: str) -> Any:
    """``kameo.<name>`` for a name the package does not have: in a worker, a callback module
    (registered: it is normally a plain attribute already, see :func:`install`) or
    :class:`CallbackNotFound`; else, and for private names, a plain ``AttributeError``."""
    rt = _runtime
    if rt is not None:
        types = rt.modules.get(name)
        if types is not None:
            return CallbackModule(name, types)
        if not name.startswith("_"):  # dunder and private probes keep the plain error
            known = ", ".join(sorted(rt.paths)) or "none"
            raise CallbackNotFound(
                f"module 'kameo' has no attribute {name!r}, and the parent registered no "
                f"callback module {name!r} (registered: {known})"
            )
    raise AttributeError(f"module 'kameo' has no attribute {name!r}")


def install(rt: Runtime) -> None:
    """Make ``rt`` this process's runtime and ``kameo.<module>`` an attribute for each callback
    module (a name kameo itself already has stays kameo's)."""
    global _runtime
    _runtime = rt
    package = sys.modules["kameo"]
    for module, types in rt.modules.items():
        if module not in vars(package):
            setattr(package, module, CallbackModule(module, types))
