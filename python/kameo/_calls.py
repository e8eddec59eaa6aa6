"""Worker: what CALL and CALL_STREAM frames ask for (dynamic calls, remote objects, sessions).

An *op* is a tuple the parent encodes (``kameo.Pool.call``, ``Pool.new``, ``Ref`` methods,
``Session``, ``Pipeline``); its first two fields are the op's name and the session id (or
None). :meth:`Calls.prepare` turns one into a :class:`Job` (a callable and its arguments)
without running user code, imports aside, so that a server can tell a coroutine from a plain
function before it starts it; the server runs the job as it runs a handler and answers with
:meth:`Calls.answer` (the value, or a reference to it when the codec cannot encode it).

The objects the parent holds ``kameo.Ref``\\ s to live in :class:`Objects`, numbered per
worker. A ``Ref`` in a call's arguments arrives decoded as the live object (the channel's ref
hook, :meth:`Objects.resolve`); one the parent dropped arrives in a RELEASE frame.

Op layouts (``sid``: session id or None; ``flags`` bit 0: return a Ref whatever the result)::

    ("call", sid, target, args, kwargs, flags)        target: "mod:qualname", "mod.name",
    ("new", sid, target, args, kwargs, 0)             a bare adapter method name, or bytes:
                                                      a pickled callable (kameo._functions)
    ("method", sid, obj, name, args, kwargs, flags)   obj: the live object (a Ref's)
    ("getattr", sid, obj, name)
    ("setattr", sid, obj, name, value)
    ("handler", sid, message)                         the pool's handler (a session's ask)
    ("batch", sid, target, items, flags)              target on each item of a list (None:
                                                      the pool's handler); flags bit 1: each
                                                      item is an args tuple
    ("pipeline", sid, steps)                          steps without sid, each ending in its
                                                      links (kameo.pipeline); a call of
                                                      positional args only: ("call", target, args)
    ("release", sid, numbers)                         free at once, answered
    ("close_session", sid)
"""

from __future__ import annotations

import importlib
import itertools
import os

from kameo import _error_info, _functions, _native
from kameo._handler import ASYNC, ASYNCGEN, GEN, SYNC, handler_kind
from kameo.errors import HandlerTypeError, RefError, SerializationError
from kameo.remote import Ref

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

RETURN_REF = 1
#: Op flag of ``batch``: each item is a tuple of arguments.
STAR = 2
#: Pickled targets whose loaded callables are kept (then the oldest half go): a closure's
#: bytes change with what it captured, and each new value must not be kept forever.
MAX_PICKLED_TARGETS = 256

#: The modules this process is importing to load a target, innermost last (``kameo.Pool``
#: refuses to start meanwhile: a script imported by a worker must not start pools).
importing: list[str] = []


class Job:
    """A prepared op: ``fn(*args, **kwargs)``, of handler kind ``kind``."""

    __slots__ = (
        "args",
        "entries",
        "fn",
        "inline",
        "keep",
        "kind",
        "kwargs",
        "return_ref",
        "session",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: str,
        session: str | None,
        return_ref: bool = False,
        *,
        keep: bool = False,
        inline: bool = False,
        entries: bool = False,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.kind = kind
        self.session = session
        self.return_ref = return_ref
        #: The result is always kept as an object (``new``).
        self.keep = keep
        #: Cheap and never blocking (attribute access, the table's own ops): run it in place,
        #: not in a handler thread.
        self.inline = inline
        #: The result is a tuple whose lists hold one entry per step or item (``pipeline``,
        #: ``batch``): an entry the codec cannot encode becomes a Ref, not the whole result.
        self.entries = entries


class SessionState:
    """One session's state in this worker: its dict and the numbers of its objects."""

    __slots__ = ("numbers", "state")

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.numbers: set[int] = set()


def split_target(target: str) -> tuple[str, str]:
    """``"mod:qual.name"`` -> (``mod``, ``qual.name``); a dotted ``"pkg.mod.name"`` is split at
    its longest importable module prefix."""
    module, sep, qualname = target.partition(":")
    if sep:
        if not module or not qualname:
            raise ValueError(f"target {target!r} must be 'module:qualname'")
        return module, qualname
    parts = target.split(".")
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"target {target!r} must be 'module:qualname' or 'module.name'")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        try:
            _import(prefix)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (prefix == exc.name or prefix.startswith(exc.name + ".")):
                continue  # that prefix is not a module: try a shorter one
            raise
        return prefix, ".".join(parts[i:])
    raise ModuleNotFoundError(f"target {target!r}: no module named {parts[0]!r}", name=parts[0])


def load(target: str) -> Any:
    """The object a target names (not necessarily callable)."""
    module_name, qualname = split_target(target)
    if module_name == "__main__":
        raise ImportError(
            f"target {target!r}: a function defined in __main__ cannot be imported by a "
            "worker; move it to a module"
        )
    try:
        obj: Any = _import(module_name)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"target {target!r}: {exc}", name=exc.name) from None
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"target {target!r}: module {module_name!r} has no attribute {qualname!r}"
            ) from None
    return obj


def _import(name: str) -> Any:
    importing.append(name)
    try:
        return importlib.import_module(name)
    finally:
        importing.pop()


def type_name(obj: Any) -> str:
    cls = type(obj)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class Objects:
    """The objects of this worker that the parent holds references to."""

    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.table: dict[int, Any] = {}
        self.owner: dict[int, str] = {}  # number -> session that made it
        self.sessions: dict[str, SessionState] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self.table)

    def keep(self, obj: Any, session: str | None) -> tuple[int, str]:
        """Hold ``obj`` for the parent: its number and type name."""
        self._next = n = self._next + 1
        self.table[n] = obj
        if session is not None:
            self.session(session).numbers.add(n)
            self.owner[n] = session
        return n, type_name(obj)

    def resolve(self, worker_id: int, number: int, _type: str) -> Any:
        """The live object of a reference (the channel's ref hook)."""
        if worker_id != self.worker_id:
            raise RefError(
                f"a reference to an object of worker {worker_id} reached worker {self.worker_id}"
            )
        try:
            return self.table[number]
        except KeyError:
            raise RefError(
                f"worker {self.worker_id} no longer holds object {number} ({_type}): it was "
                "released"
            ) from None

    def release(self, numbers: list[int]) -> None:
        table, owner = self.table, self.owner
        for n in numbers:
            table.pop(n, None)
            sid = owner.pop(n, None)
            if sid is not None:
                s = self.sessions.get(sid)
                if s is not None:
                    s.numbers.discard(n)

    def session(self, sid: str) -> SessionState:
        s = self.sessions.get(sid)
        if s is None:
            s = self.sessions[sid] = SessionState()
        return s

    def close_session(self, sid: str) -> int:
        """Drop a session's objects and state; how many objects went."""
        s = self.sessions.pop(sid, None)
        if s is None:
            return 0
        for n in s.numbers:
            self.table.pop(n, None)
            self.owner.pop(n, None)
        s.state.clear()
        return len(s.numbers)


class Calls:
    """Prepares ops for the servers of one worker."""

    def __init__(self, worker_id: int, adapter: Any = None, allow_pickle: bool = False) -> None:
        self.objects = Objects(worker_id)
        self.adapter = adapter  # the instance of an adapter class target, if any
        self.handler: Callable[[Any], Any] | None = None  # the pool's handler, if any
        self.allow_pickle = allow_pickle  # the pool's: pickled targets are accepted
        self._targets: dict[str | bytes, Callable[..., Any]] = {}
        self._pickled: list[bytes] = []  # the pickled targets in _targets, oldest first
        # handler_kind() of each target and of each (type, method name): inspect is slow.
        self._kinds: dict[Any, str] = {}
        #: Targets known to be plain sync functions, and (type, method name) pairs known to be
        #: plain sync methods of the type: a server may run such calls without preparing a
        #: Job (:meth:`SyncServer.call`).
        self.sync_functions: dict[str | bytes, Callable[..., Any]] = {}
        self.sync_methods: set[tuple[type, str]] = set()
        #: Runs an awaitable to completion from a sync job (set by the server).
        self.wait: Callable[[Any], Any] = _no_loop

    def function(self, target: str | bytes) -> Callable[..., Any]:
        fn = self._targets.get(target)
        if fn is not None:
            return fn
        if isinstance(target, bytes):
            return self._unpickle(target)
        if not isinstance(target, str):
            raise TypeError(f"a call target must be a str or bytes, not {type(target).__name__}")
        if ":" not in target and "." not in target:
            adapter = self.adapter
            if adapter is None:
                raise ValueError(
                    f"target {target!r} must be 'module:qualname' or 'module.name' (a bare "
                    "name calls a method of the pool's adapter class, and this pool has none)"
                )
            try:
                fn = getattr(adapter, target)
            except AttributeError:
                raise AttributeError(
                    f"target {target!r}: adapter {type_name(adapter)} has no method {target!r}"
                ) from None
        else:
            fn = load(target)
        if not callable(fn):
            raise TypeError(f"target {target!r} is not callable (it is {type(fn).__name__})")
        self._targets[target] = fn
        return fn  # type: ignore[no-any-return]

    def _unpickle(self, target: bytes) -> Callable[..., Any]:
        if not self.allow_pickle:
            raise SerializationError("a pickled target needs a pool with allow_pickle=True")
        fn = _functions.load_pickled(target)
        pickled = self._pickled
        if len(pickled) >= MAX_PICKLED_TARGETS:
            for old in pickled[: MAX_PICKLED_TARGETS // 2]:
                self._targets.pop(old, None)
                self._kinds.pop(old, None)
                self.sync_functions.pop(old, None)
            del pickled[: MAX_PICKLED_TARGETS // 2]
        pickled.append(target)
        self._targets[target] = fn
        return fn

    def prepare(self, op: Any) -> Job:
        if not (isinstance(op, tuple) and len(op) >= 2 and isinstance(op[0], str)):
            raise ValueError(f"malformed call op: {type(op).__name__} {str(op)[:80]}")
        try:
            return self._prepare(op)
        except (IndexError, KeyError):
            raise ValueError(f"malformed call op {op[0]!r}: {str(op)[:80]}") from None

    def _prepare(self, op: tuple[Any, ...]) -> Job:
        name, sid = op[0], op[1]
        if name == "call":
            target = op[2]
            fn = self.function(target)
            kind = self._kinds.get(target)
            if kind is None:
                kind = self._kinds[target] = handler_kind(fn)
                if kind == SYNC:
                    self.sync_functions[target] = fn
            return Job(fn, op[3], op[4], kind, sid, bool(op[5] & RETURN_REF))
        if name == "method":
            obj, attr = op[2], op[3]
            if attr.startswith("_"):
                raise AttributeError(f"{type_name(obj)}.{attr}: private names cannot be called")
            fn = getattr(obj, attr)
            if not callable(fn):
                raise TypeError(f"{type_name(obj)}.{attr} is not callable")
            if attr in getattr(obj, "__dict__", ()):  # the instance's own: not cached
                kind = handler_kind(fn)
            else:
                key = (type(obj), attr)
                kind = self._kinds.get(key)
                if kind is None:
                    kind = self._kinds[key] = handler_kind(fn)
                    if kind == SYNC:
                        self.sync_methods.add(key)
            return Job(fn, op[4], op[5], kind, sid, bool(op[6] & RETURN_REF))
        if name == "new":
            cls = self.function(op[2])
            return Job(cls, op[3], op[4], "sync", sid, True, keep=True)
        if name == "getattr":
            return Job(getattr, (op[2], op[3]), {}, "sync", sid, inline=True)
        if name == "setattr":
            return Job(setattr, (op[2], op[3], op[4]), {}, "sync", sid, inline=True)
        if name == "handler":
            handler = self.handler if self.handler is not None else self.adapter
            if handler is None or not callable(handler):
                raise HandlerTypeError("this pool has no handler to ask (no target)")
            return Job(handler, (op[2],), {}, handler_kind(handler), sid)
        if name == "pipeline":
            return Job(self.run_pipeline, (op[2], sid), {}, "sync", sid, entries=True)
        if name == "batch":
            return self._batch(op[2], op[3], op[4], sid)
        if name == "release":
            return Job(self.objects.release, (op[2],), {}, "sync", sid, inline=True)
        if name == "close_session":
            return Job(self.objects.close_session, (sid,), {}, "sync", None, inline=True)
        raise ValueError(f"unknown call op {name!r}")

    def _batch(self, target: Any, items: Any, flags: int, sid: str | None) -> Job:
        if target is None:
            fn = self.handler if self.handler is not None else self.adapter
            if fn is None or not callable(fn):
                raise HandlerTypeError("this pool has no handler to map (no target)")
            kind = handler_kind(fn)
        else:
            fn = self.function(target)
            known = self._kinds.get(target)
            if known is None:
                known = self._kinds[target] = handler_kind(fn)
            kind = known
        if kind in (GEN, ASYNCGEN):
            raise HandlerTypeError(f"{fn!r} is a generator function: map() needs one result each")
        if not isinstance(items, list):
            raise ValueError(f"malformed batch: items must be a list, not {type(items).__name__}")
        star = bool(flags & STAR)
        if kind == ASYNC:
            return Job(self.run_batch_async, (fn, items, star), {}, ASYNC, sid, entries=True)
        return Job(self.run_batch, (fn, items, star), {}, SYNC, sid, entries=True)

    def _batch_answer(self, results: list[Any], errors: dict[int, Any] | None) -> tuple[Any, ...]:
        if errors is None:
            return ("ok", results)
        return ("mixed", results, errors, self.objects.worker_id, os.getpid())

    def run_batch(self, fn: Callable[..., Any], items: list[Any], star: bool) -> tuple[Any, ...]:
        """``fn`` on each item (``fn(*item)`` with ``star``), in order: ``("ok", results)``, or
        ``("mixed", results, {index: error info}, worker id, pid)`` when some raised (their
        results are None); one item's error does not stop the others."""
        results: list[Any] = []
        errors: dict[int, Any] | None = None
        mapped = itertools.starmap(fn, items) if star else map(fn, items)
        while True:
            try:
                results.extend(mapped)  # at C speed; what it made before an error is kept
                break
            except Exception as exc:
                if errors is None:
                    errors = {}
                errors[len(results)] = _error_info.from_exception(exc)
                results.append(None)  # and on with the next item
        return self._batch_answer(results, errors)

    async def run_batch_async(
        self, fn: Callable[..., Any], items: list[Any], star: bool
    ) -> tuple[Any, ...]:
        """:meth:`run_batch` for a coroutine function (one item at a time)."""
        results: list[Any] = []
        errors: dict[int, Any] | None = None
        for i, item in enumerate(items):
            try:
                results.append(await (fn(*item) if star else fn(item)))
            except Exception as exc:
                if errors is None:
                    errors = {}
                errors[i] = _error_info.from_exception(exc)
                results.append(None)
        return self._batch_answer(results, errors)

    def run_pipeline(self, steps: list[tuple[Any, ...]], sid: str | None) -> tuple[Any, ...]:
        """Run a pipeline's steps in order (``kameo.pipeline``): ``("ok", entries)``, or
        ``("error", step, entries before it, error info, worker id, pid)``; an entry is the
        step's value, or a Ref token for what must stay an object (``new``, ``return_ref``;
        :meth:`answer` makes tokens of the values the codec cannot encode). A sync job: in
        place in the sync server, in a handler thread in the async one; an async step is run
        to completion by :attr:`wait` (the server's)."""
        live: list[Any] = []
        entries: list[Any] = []
        sync_functions = self.sync_functions
        for k, step in enumerate(steps):
            try:
                if type(step) is tuple and step and step[0] == "call":
                    # The usual step: a plain sync function, no links, for a value (the short
                    # form of positional arguments, or the full one without flags or links).
                    n = len(step)
                    if n == 3 and (fn := sync_functions.get(step[1])) is not None:
                        value = fn(*step[2])
                        live.append(value)
                        entries.append(value)
                        continue
                    if n == 6 and not step[4] and not step[5]:
                        fn = sync_functions.get(step[1])
                        if fn is not None:
                            value = fn(*step[2], **step[3]) if step[3] else fn(*step[2])
                            live.append(value)
                            entries.append(value)
                            continue
                    if n == 3:
                        step = ("call", step[1], step[2], {}, 0, ())
                if not (type(step) is tuple and len(step) >= 4 and step[0] in _STEP_OPS):
                    raise ValueError(f"malformed pipeline step {k}: {str(step)[:80]}")
                if step[-1]:
                    step = _link(step, live)
                job = self._prepare((step[0], sid, *step[1:-1]))
                value = job.fn(*job.args, **job.kwargs)
                if job.kind == ASYNC:
                    value = self.wait(value)
                entry = value
                if job.keep or job.return_ref:
                    number, type_name = self.objects.keep(value, sid)
                    entry = token(self.objects.worker_id, number, type_name)
            except Exception as exc:
                info = _error_info.from_exception(exc)
                entries = self._entries(entries, sid)
                return ("error", k, entries, info, self.objects.worker_id, os.getpid())
            live.append(value)
            entries.append(entry)
        return ("ok", entries)

    def _entries(self, entries: list[Any], sid: str | None) -> list[Any]:
        """Pipeline entries as they can travel: a Ref token for each the codec cannot
        encode (kept here)."""
        out = []
        for value in entries:
            if not (value is None or type(value) in _PLAIN or type(value) is Ref):
                try:
                    _native.encode(value)
                except Exception:
                    number, type_name = self.objects.keep(value, sid)
                    value = token(self.objects.worker_id, number, type_name)
            out.append(value)
        return out

    def answer(self, chan: Any, rid: int, job: Job, result: Any) -> None:
        """REPLY with ``result``, or with a reference to it (kept here) when it must stay an
        object (``new``, ``return_ref``) or the codec cannot encode it."""
        if not job.keep and not job.return_ref and chan.try_reply(rid, result):
            return
        if job.entries:
            # Some entry cannot be encoded: those become Refs, the others stay values.
            sid = job.session
            chan.reply(rid, tuple(self._entries(x, sid) if type(x) is list else x for x in result))
            return
        number, type_name = self.objects.keep(result, job.session)
        chan.reply(rid, token(self.objects.worker_id, number, type_name))


def token(worker_id: int, number: int, type_name: str) -> Ref:
    """What a kept object travels as: a ``kameo.Ref`` bound to no pool (codec tag 0x1F)."""
    return Ref._make(worker_id, number, type_name, 0, None)


def refuse_generator(job: Job) -> None:
    """A CALL (one answer) of a generator function: say to stream it."""
    if job.kind in (GEN, ASYNCGEN):
        raise HandlerTypeError(
            f"{job.fn!r} is a generator function: use call_stream() (or stream() for a "
            "handler), not call() or ask()"
        )


def apply(job: Job) -> Any:
    """Run a sync job (in a handler thread or in place)."""
    return job.fn(*job.args, **job.kwargs)


def as_stream(job: Job, wait: Callable[[Any], Any]) -> tuple[Callable[[Any], Any], str]:
    """A generator function of one (ignored) argument and its kind, for ``_handler.produce``:
    the job's own generator, or the items of the iterable it returns. An async iterable that
    a sync function returns is iterated with ``wait`` (the server's: it runs an awaitable to
    completion from where the generator runs)."""
    fn, args, kwargs = job.fn, job.args, job.kwargs
    if job.kind in (GEN, ASYNCGEN):
        return (lambda _: fn(*args, **kwargs)), job.kind
    if job.kind == ASYNC:

        async def items_async(_: Any) -> Any:
            it = await fn(*args, **kwargs)
            if hasattr(it, "__aiter__"):
                async for x in it:
                    yield x
            else:
                for x in it:
                    yield x

        return items_async, ASYNCGEN

    def items(_: Any) -> Any:
        it = fn(*args, **kwargs)
        if hasattr(it, "__aiter__"):
            yield from drive(it, wait)
        else:
            yield from it

    return items, GEN


def drive(iterable: Any, wait: Callable[[Any], Any]) -> Any:
    """The items of an async iterable, as a sync generator: each step runs to completion with
    ``wait``; closing the generator closes the async one (its ``finally`` runs)."""
    it = iterable.__aiter__()
    try:
        while True:
            try:
                item = wait(it.__anext__())
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            wait(aclose())


_STEP_OPS = frozenset(("call", "new", "method", "getattr"))
_PLAIN = (bool, int, float, str, bytes)

#: Where a pipeline step of each kind has its args (its kwargs follow), if it has any.
_ARGS_AT = {"call": 2, "new": 2, "method": 3, "getattr": None}


def _link(step: tuple[Any, ...], live: list[Any]) -> tuple[Any, ...]:
    """``step`` with the live results of earlier steps put where its links say (see
    ``kameo.pipeline``), and its links emptied."""
    parts = list(step)
    at = _ARGS_AT[step[0]]
    args = list(step[at]) if at is not None else []
    kwargs = dict(step[at + 1]) if at is not None else {}
    for where, index in step[-1]:
        if not (type(index) is int and 0 <= index < len(live)):
            raise ValueError(f"placeholder of step {index!r} used before that step ran")
        if where is None and step[0] in ("method", "getattr"):
            parts[1] = live[index]
        elif type(where) is int and 0 <= where < len(args):
            args[where] = live[index]
        elif type(where) is str and where in kwargs:
            kwargs[where] = live[index]
        else:
            raise ValueError(f"malformed pipeline link {where!r}")
    if at is not None:
        parts[at], parts[at + 1] = tuple(args), kwargs
    parts[-1] = ()
    return tuple(parts)


def _no_loop(awaitable: Any) -> Any:
    import asyncio

    return asyncio.run(awaitable)


def kind_of(op: Any, handler: str | None) -> tuple[str | None, str | None]:
    """``CallFinished.kind`` and ``target`` of a request: an ask (no op) or a CALL's op
    (layouts in ``kameo._calls``); None for the pool's own housekeeping ops."""
    if op is None:
        return "ask", handler
    name = op[0]
    if name in ("call", "new"):
        return name, _functions.describe(op[2])
    if name in ("method", "getattr", "setattr"):
        return name, str(op[3])
    if name == "handler":
        return "ask", handler
    if name == "batch":
        return "map", handler if op[2] is None else _functions.describe(op[2])
    if name == "pipeline":
        return "pipeline", None
    return None, None
