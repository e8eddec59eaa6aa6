"""Pipelines: several steps in one round trip (``pool.pipeline()``, ``session.pipeline()``).

Each step returns a :class:`Result` placeholder, usable as an argument (positional or keyword)
of a later step, or as the object of ``call_method``/``getattr``: in the worker it is that
step's live result. Placeholders do not travel: a step carries ``None`` in their place and a
tuple of *links*, ``(position or keyword or None for the object, step index)`` (op layouts in
``kameo._calls``). ``await p.run()`` sends every step in one CALL and returns one entry per
step (a value, or a :class:`~kameo.Ref` for what the codec cannot encode and for ``new``). If
step ``k`` raises, the later steps do not run and :class:`PipelineError` says which (``step``,
``results`` of the steps before, ``__cause__`` the remote error, of its built-in type).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kameo import _error_info, _functions
from kameo.errors import KameoError
from kameo.remote import Ref

if TYPE_CHECKING:
    from kameo.pool import Pool, Target
    from kameo.session import Session

__all__ = ["Pipeline", "PipelineError", "Result"]


class Result(tuple):  # type: ignore[type-arg]
    """The result of step ``index`` of a pipeline, as an argument of a later step (directly:
    not inside a list or another value).

    A tuple ``(pipeline, index)`` underneath: made by ``tuple.__new__`` in C, a third of the
    cost of a class's ``__init__`` (a pipeline makes one per step)."""

    __slots__ = ()

    @property
    def index(self) -> int:  # type: ignore[override]
        """The step's index in its pipeline."""
        index: int = tuple.__getitem__(self, 1)
        return index

    @property
    def _pipeline(self) -> Pipeline:
        pipeline: Pipeline = tuple.__getitem__(self, 0)
        return pipeline

    def __repr__(self) -> str:
        return f"<kameo.pipeline.Result of step {self.index}>"


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
        self._refs: list[Ref] = []  # Refs that are the object of a step (checked at run)

    def __len__(self) -> int:
        return len(self._steps)

    def _add(self, step: tuple[Any, ...]) -> Result:
        self._steps.append(step)
        return Result((self, len(self._steps) - 1))

    def _link(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], obj: Any = None
    ) -> tuple[tuple[Any, ...], dict[str, Any], tuple[Any, ...]]:
        """``args`` and ``kwargs`` with each placeholder replaced by None, and the links that
        say where the worker puts which step's result: (position, step), (keyword, step), or
        (None, step) for the object of a method call or attribute."""
        links: list[tuple[int | str | None, int]] = []
        if type(obj) is Result:
            links.append((None, self._own(obj)))
        if Result in map(type, args):
            links += [(i, self._own(a)) for i, a in enumerate(args) if type(a) is Result]
            args = tuple(None if type(a) is Result else a for a in args)
        if kwargs and Result in map(type, kwargs.values()):
            links += [(k, self._own(v)) for k, v in kwargs.items() if type(v) is Result]
            kwargs = {k: None if type(v) is Result else v for k, v in kwargs.items()}
        return args, kwargs, tuple(links)

    def _own(self, result: Result) -> int:
        if result._pipeline is not self:
            raise ValueError(f"{result!r} is a placeholder of another pipeline")
        return result.index

    def _target(self, obj: Any) -> Any:
        if type(obj) is Result:
            return None
        if type(obj) is not Ref:
            raise TypeError(
                f"the object of a pipeline step must be a Ref or a step's Result, not "
                f"{type(obj).__name__}"
            )
        self._refs.append(obj)
        return obj

    def call(self, target: Target, /, *args: Any, **kwargs: Any) -> Result:
        if type(target) is not str:
            target = self._pool._wire(target)
        steps = self._steps
        if not kwargs:
            for arg in args:
                if type(arg) is Result:
                    break
            else:  # the usual step: positional arguments, no placeholder (its short form)
                steps.append(("call", target, args))
                return Result((self, len(steps) - 1))
        args, kwargs, links = self._link(args, kwargs)
        steps.append(("call", target, args, kwargs, 0, links))
        return Result((self, len(steps) - 1))

    def new(self, target: Target, /, *args: Any, **kwargs: Any) -> Result:
        if type(target) is not str:
            target = self._pool._wire(target)
        args, kwargs, links = self._link(args, kwargs)
        return self._add(("new", target, args, kwargs, 0, links))

    def call_method(self, obj: Any, name: str, /, *args: Any, **kwargs: Any) -> Result:
        """``obj.name(*args, **kwargs)``: ``obj`` a :class:`Result` or a :class:`~kameo.Ref`."""
        args, kwargs, links = self._link(args, kwargs, obj)
        return self._add(("method", self._target(obj), name, args, kwargs, 0, links))

    def getattr(self, obj: Any, name: str) -> Result:
        _, _, links = self._link((), {}, obj)
        return self._add(("getattr", self._target(obj), name, links))

    async def run(self) -> list[Any]:
        """Run every step (one round trip); one entry per step."""
        if not self._steps:
            return []
        session = self._session
        sid = None if session is None else session.id
        op = ("pipeline", sid, self._steps)
        worker = None if session is None else session._bound()
        for ref in self._refs:
            self._pool._refs.check(ref)
        reply = await self._pool._submit_op(op, worker)
        if reply[0] == "ok":
            entries: list[Any] = reply[1]  # a list as it arrives
            return entries
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
            return repr(_functions.describe(s[1]))
        return repr(s[2])
