"""Sessions: every call of a session runs on one worker, with state private to it there.

``async with pool.session() as s:`` binds ``s`` to the least-loaded worker (fewest open
sessions, then fewest requests in flight); its calls, objects, asks and streams all go there,
carrying the session id (``kameo.current_session()`` in the worker, and
``kameo.session_state()``, a dict the worker drops when the session closes, with the objects
made in it). If the worker dies, the call in flight fails with ``WorkerCrashed`` and later
ones raise :class:`SessionLost`; ``strict=False`` moves the session to another worker instead
(its state and objects are lost, and a warning says so). A retiring worker keeps its open
sessions until they close and takes no new ones.
"""

from __future__ import annotations

import logging
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kameo.errors import PoolClosed, SessionLost
from kameo.pipeline import Pipeline
from kameo.remote import RETURN_REF, RemoteFunction

if TYPE_CHECKING:
    from kameo._future import AskFuture
    from kameo.pool import Pool, Target
    from kameo.stream import Stream

__all__ = ["Session"]

log = logging.getLogger("kameo")


class Session:
    """A series of calls on one worker. Made by :meth:`kameo.Pool.session`."""

    def __init__(self, pool: Pool, strict: bool = True) -> None:
        self.id = uuid.uuid4().hex
        self.strict = strict
        self._pool = pool
        self._worker: int | None = None
        self._lost: str | None = None
        self._closed = False

    @property
    def worker_id(self) -> int | None:
        """The worker the session runs on (None before its first call)."""
        return self._worker

    def __repr__(self) -> str:
        return f"<kameo.Session {self.id[:8]} worker={self._worker}>"

    async def __aenter__(self) -> Session:
        self._bound()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _bound(self) -> int:
        """The session's worker, picked now if it has none (or lost it, when not strict)."""
        if self._closed:
            raise PoolClosed(f"{self!r} is closed")
        if self._lost is None and self._worker is not None and self._pool._lost(self._worker):
            # Lost, and its loss is still being handled (the process is being reaped): the
            # session is lost from now on, not only once that is done.
            self._lost = f"worker {self._worker} is gone"
        if self._lost is not None:
            if self.strict:
                raise SessionLost(f"session {self.id}: its worker is gone ({self._lost})")
            log.warning(
                "session %s moves to another worker: worker %s is gone (%s); its state and "
                "objects are lost",
                self.id,
                self._worker,
                self._lost,
            )
            self._lost = None
            self._worker = None
        if self._worker is None:
            self._worker = self._pool._bind_session(self)
        return self._worker

    def worker_lost(self, why: str) -> None:
        self._lost = why

    def _op(self, op: tuple[Any, ...]) -> AskFuture:
        fut: AskFuture = self._pool._submit_op(op, self._bound())
        return fut

    def call(self, target: Target | RemoteFunction, /, *args: Any, **kwargs: Any) -> AskFuture:
        """``pool.call`` on the session's worker, in the session. A
        :class:`~kameo.RemoteFunction` brings its options (``timeout``, ``return_ref``; never
        a retry: a session's call runs on its worker or fails)."""
        if type(target) is RemoteFunction:
            flags = RETURN_REF if target.return_ref else 0
            op = ("call", self.id, target.target, args, kwargs, flags)
            fut: AskFuture = self._pool._submit_op(op, self._bound(), target.timeout)
            return fut
        if type(target) is not str:
            target = self._pool._wire(target)
        return self._op(("call", self.id, target, args, kwargs, 0))

    def new(self, target: Target, /, *args: Any, **kwargs: Any) -> AskFuture:
        """``pool.new`` in the session: the object goes when the session closes."""
        if type(target) is not str:
            target = self._pool._wire(target)
        return self._op(("new", self.id, target, args, kwargs, 0))

    def ask(self, msg: Any) -> AskFuture:
        """The pool's handler on ``msg``, on the session's worker, in the session."""
        return self._op(("handler", self.id, msg))

    def stream(self, msg: Any) -> Stream:
        """The pool's generator handler on ``msg``, on the session's worker."""
        return self._pool._call_stream(("handler", self.id, msg), self._bound())

    def call_stream(self, target: Target, /, *args: Any, **kwargs: Any) -> Stream:
        """``pool.call_stream`` on the session's worker, in the session."""
        if type(target) is not str:
            target = self._pool._wire(target)
        op = ("call", self.id, target, args, kwargs, 0)
        return self._pool._call_stream(op, self._bound())

    def pipeline(self) -> Pipeline:
        """A pipeline whose steps run on the session's worker, in the session."""
        return Pipeline(self._pool, self)

    async def close(self) -> None:
        """Drop the session's state and objects in its worker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        wid, self._worker = self._worker, None
        if wid is None:
            return
        pool = self._pool
        try:
            if self._lost is None and pool._state == "running":
                await pool._submit_op(("close_session", self.id), wid, 10.0)
        except Exception as exc:  # the worker died meanwhile, or the pool closes
            log.debug("session %s: close on worker %s: %s", self.id, wid, exc)
        finally:
            pool._unbind_session(self, wid)
