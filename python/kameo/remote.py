"""Remote objects and functions: :class:`Ref` and :class:`RemoteFunction` (parent side).

A :class:`Ref` stands for an object that lives in one worker (made by ``Pool.new``, or a result
the codec cannot encode). Its methods and attributes are reached with one request each, pinned
to that worker; passed as an argument of a call it arrives there as the live object. The worker
keeps the object while the parent holds a Ref to it: when the last reference is collected the
pool tells the worker in one RELEASE frame per batch (:class:`RefTable`); ``release()`` frees
it at once. The same class travels as the worker's answer (codec tag 0x1F, see
docs/protocol.md), which is why it is registered with the codec at import.
"""

from __future__ import annotations

from kameo import _native
from kameo._lean import deque, suppress
from kameo.errors import RefError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable
    from typing import Any

    from kameo._future import AskFuture

__all__ = ["Ref", "RefTable", "RemoteFunction"]

RETURN_REF = 1  # op flag (kameo._calls.RETURN_REF)


class RefTable:
    """The Refs of one pool: how many each worker holds (a worker with some is not retired
    before they go), drops to send, and workers that are gone (their Refs fail with why)."""

    def __init__(self, key: int) -> None:
        self.key = key
        self.core: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.held: dict[int, int] = {}  # worker id -> live Refs
        self.gone: dict[int, str] = {}  # worker id -> why its objects are gone
        # (worker id, number) of collected Refs: appended from any thread (a Ref may be
        # collected anywhere), drained on the loop's, never swapped (no append is lost).
        self.drops: deque[tuple[int, int]] = deque()
        self.flushing = False
        self.closed = False  # the pool closed: its workers and their objects are gone
        self.on_empty: Callable[[int], object] | None = None  # a worker holds no Refs any more

    def attach(self, core: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.core, self.loop = core, loop

    def make(self, worker_id: int, number: int, type_name: str, pool: Any) -> Ref:
        """A Ref for an object a worker kept (the core's ref hook, on the loop's thread, as
        everything here but :meth:`dropped`)."""
        self.held[worker_id] = self.held.get(worker_id, 0) + 1
        return Ref._make(worker_id, number, type_name, self.key, pool)

    def dropped(self, worker_id: int, number: int) -> None:
        """A Ref was collected (any thread, any time): free its object soon, in a batch."""
        if self.closed:
            return
        self.drops.append((worker_id, number))
        if not self.flushing:
            self.flushing = True
            loop = self.loop
            if loop is not None:
                with suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self.flush)

    def flush(self) -> None:
        """Send the drops collected so far, one RELEASE frame per worker."""
        self.flushing = False
        drops = self.drops
        if not drops or self.closed:
            return
        by_worker: dict[int, list[int]] = {}
        while drops:
            wid, num = drops.popleft()
            by_worker.setdefault(wid, []).append(num)
        for wid, nums in by_worker.items():
            if wid not in self.gone:
                self.core.release(wid, nums)
            self.forget(wid, len(nums))

    def forget(self, worker_id: int, n: int) -> None:
        left = self.held.get(worker_id, 0) - n
        if left > 0:
            self.held[worker_id] = left
            return
        self.held.pop(worker_id, None)
        if self.on_empty is not None and not self.closed:
            self.on_empty(worker_id)

    def check(self, ref: Ref) -> None:
        """Raise RefError if ``ref`` cannot be used."""
        if ref._released:
            raise RefError(f"{ref!r} was released")
        why = self.gone.get(ref._wid)
        if why is not None:
            raise RefError(f"{ref!r}: its worker is gone ({why}), and the object with it")

    def worker_lost(self, worker_id: int, why: str) -> None:
        self.gone[worker_id] = why
        self.held.pop(worker_id, None)


class Ref:
    """A reference to an object that lives in one worker of a pool.

    ``await ref.name(*args)`` calls a method (any public name; ``call_method`` for names that
    clash with the Ref's own), ``await ref.getattr(name)`` / ``setattr(name, value)`` reach
    attributes, ``await ref.release()`` frees the object at once; otherwise it is freed once the
    last reference to this Ref is gone. Raises :class:`RefError` once released, or when its
    worker died.
    """

    __slots__ = ("__weakref__", "_key", "_num", "_pool", "_released", "_type", "_wid")

    _wid: int
    _num: int
    _type: str
    _key: int
    _pool: Any
    _released: bool

    def __init__(self) -> None:
        raise TypeError("kameo.Ref is made by pool.new() or returned by a call, not directly")

    @classmethod
    def _make(cls, worker_id: int, number: int, type_name: str, key: int, pool: Any) -> Ref:
        """A Ref to object ``number`` of worker ``worker_id``: bound to ``pool`` (of ``key``)
        in the parent; bound to none (key 0) as a worker's answer (``_calls.token``)."""
        ref = cls.__new__(cls)
        ref._wid, ref._num, ref._type, ref._key, ref._pool = (
            worker_id,
            number,
            type_name,
            key,
            pool,
        )
        ref._released = False
        return ref

    @property
    def id(self) -> str:
        """Unique within the pool: ``"<worker id>.<number>"``."""
        return f"{self._wid}.{self._num}"

    @property
    def type_name(self) -> str:
        """The qualified type of the remote object, e.g. ``"collections.Counter"``."""
        return self._type

    @property
    def worker_id(self) -> int:
        """The worker the object lives in."""
        return self._wid

    def __repr__(self) -> str:
        return f"<kameo.Ref {self._type} id={self._wid}.{self._num} worker={self._wid}>"

    def __getattr__(self, name: str) -> Callable[..., AskFuture]:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def call_method(self, name: str, /, *args: Any, **kwargs: Any) -> AskFuture:
        """Call the remote object's method ``name``."""
        return self._submit(("method", None, self, name, args, kwargs, 0))

    def getattr(self, name: str) -> AskFuture:
        """The remote object's attribute ``name`` (a value, or a Ref when not encodable)."""
        return self._submit(("getattr", None, self, name))

    def setattr(self, name: str, value: Any) -> AskFuture:
        """Set the remote object's attribute ``name``."""
        return self._submit(("setattr", None, self, name, value))

    async def release(self) -> None:
        """Free the remote object now (later use raises :class:`RefError`). Idempotent."""
        if self._released or self._pool is None:
            return
        table: RefTable = self._pool._refs
        self._released = True  # from now on (even while the release is on its way)
        if self._wid in table.gone or table.closed:
            return
        await self._pool._submit_op(("release", None, [self._num]), self._wid)
        table.forget(self._wid, 1)

    def _submit(self, op: tuple[Any, ...]) -> AskFuture:
        pool = self._pool
        if pool is None:
            raise RefError(f"{self!r} is not bound to a pool")
        if self._released:
            return pool._refused(RefError(f"{self!r} was released"))  # type: ignore[no-any-return]
        fut: AskFuture = pool._submit_op(op, self._wid)
        return fut

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None and not getattr(self, "_released", True):
            with suppress(Exception):
                pool._refs.dropped(self._wid, self._num)

    def __reduce__(self) -> Any:
        raise TypeError("a kameo.Ref cannot be pickled: pass it as an argument of a call")


class _Method:
    __slots__ = ("name", "ref")

    def __init__(self, ref: Ref, name: str) -> None:
        self.ref = ref
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> AskFuture:
        return self.ref._submit(("method", None, self.ref, self.name, args, kwargs, 0))

    def __repr__(self) -> str:
        return f"<remote method {self.name} of {self.ref!r}>"


class RemoteFunction:
    """``pool.function(target, ...)``: a function in the workers, with its call options."""

    __slots__ = ("idempotent", "pool", "return_ref", "target", "timeout")

    def __init__(
        self,
        pool: Any,
        target: str | bytes,
        timeout: float | None,
        idempotent: bool,
        return_ref: bool,
    ) -> None:
        self.pool = pool
        self.target = target
        self.timeout = timeout
        self.idempotent = idempotent
        self.return_ref = return_ref

    def __call__(self, *args: Any, **kwargs: Any) -> AskFuture:
        flags = RETURN_REF if self.return_ref else 0
        op = ("call", None, self.target, args, kwargs, flags)
        retries = self.pool._max_retries if self.idempotent else 0
        fut: AskFuture = self.pool._submit_op(op, None, self.timeout, retries)
        return fut

    def __repr__(self) -> str:
        from kameo._functions import describe

        return f"<kameo.RemoteFunction {describe(self.target)}>"


_native.set_ref_type(Ref)
