"""Pipelines: several steps in one round trip (``pool.pipeline()``, ``session.pipeline()``).

Each step returns a :class:`Result` placeholder, usable as an argument (positional or keyword)
of a later step, or as the object of ``call_method``/``getattr``: in the worker it is that
step's live result. ``await p.run()`` sends every step in one CALL and returns one entry per
step (a value, or a :class:`~kameo.Ref` for what the codec cannot encode and for ``new``). If
step ``k`` raises, the later steps do not run and :class:`PipelineError` says which (``step``,
``results`` of the steps before, ``__cause__`` the remote error, of its built-in type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kameo import _error_info
from kameo.errors import KameoError

if TYPE_CHECKING:
    from kameo.pool import Pool
    from kameo.session import Session

__all__ = ["Pipeline", "PipelineError", "Result"]


@dataclass(frozen=True, slots=True)
class Result:
    """The result of step ``index`` of a pipeline, as an argument of a later step."""

    index: int


class PipelineError(KameoError):
    """Step ``step`` of a pipeline raised (``__cause__``); ``results`` holds the results of the
    steps before it. Later steps did not run."""

    def __init__(self, message: str, step: int, results: list[Any]) -> None:
        super().__init__(message)
        self.step = step
        self.results = results


class Pipeline:
    """Steps to run in one round trip, in order, on one worker."""

    def __init__(self, pool: Pool, session: Session | None = None) -> None:
        self._pool = pool
        self._session = session
        self._steps: list[tuple[Any, ...]] = []
        self._keep: list[Any] = []

    def __len__(self) -> int:
        return len(self._steps)

    def _add(self, step: tuple[Any, ...], *keep: Any) -> Result:
        self._steps.append(step)
        self._keep.extend(keep)
        return Result(len(self._steps) - 1)

    def call(self, target: str, /, *args: Any, **kwargs: Any) -> Result:
        return self._add(("call", target, args, kwargs, 0), args, kwargs)

    def new(self, target: str, /, *args: Any, **kwargs: Any) -> Result:
        return self._add(("new", target, args, kwargs, 0), args, kwargs)

    def call_method(self, obj: Any, name: str, /, *args: Any, **kwargs: Any) -> Result:
        """``obj.name(*args, **kwargs)``: ``obj`` a :class:`Result` or a :class:`~kameo.Ref`."""
        return self._add(("method", obj, name, args, kwargs, 0), obj, args, kwargs)

    def getattr(self, obj: Any, name: str) -> Result:
        return self._add(("getattr", obj, name), obj)

    async def run(self) -> list[Any]:
        """Run every step (one round trip); one entry per step."""
        if not self._steps:
            return []
        session = self._session
        sid = None if session is None else session.id
        op = ("pipeline", sid, self._steps)
        worker = None if session is None else session._bound()
        reply = await self._pool._submit_op(op, worker, None, 0, None, *self._keep)
        if reply[0] == "ok":
            return list(reply[1])
        _, step, results, info, wid, pid = reply
        cause = _error_info.from_worker(info, wid, pid)
        error = PipelineError(
            f"pipeline step {step} ({self._steps[step][0]} {self._describe(step)}) raised: {cause}",
            step,
            list(results),
        )
        raise error from cause

    def _describe(self, step: int) -> str:
        s = self._steps[step]
        if s[0] in ("call", "new"):
            return repr(s[1])
        return repr(s[2])
