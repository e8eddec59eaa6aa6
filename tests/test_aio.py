"""kameo._aio: the one module that reads asyncio's private state.

On the CPython running the tests the default loop must be recognised and awaited asks must
really wait outside the loop (switched off, the fast path would cost speed, not correctness).
A loop of another shape must make kameo await through the loop, with the same results.
"""

from __future__ import annotations

import asyncio
import selectors
import sys
from collections.abc import Callable
from typing import Any

import kameo
import pytest
from kameo import _aio

BASIC = "handlers.basic"
BOUND = 10.0


async def _exercise(pool: kameo.Pool, streams: kameo.Pool, callers: kameo.Pool) -> None:
    """Asks (awaited directly, gathered, timed out), a stream and a callback: all correct."""
    for i in range(20):
        assert await pool.ask({"op": "echo", "value": i}, timeout=BOUND) == i
    got = await asyncio.gather(*(pool.ask({"op": "echo", "value": i}) for i in range(50)))
    assert got == list(range(50))
    with pytest.raises(kameo.CallTimeout):
        await pool.ask({"op": "sleep", "seconds": 0.5}, timeout=0.05)
    assert await pool.ask({"op": "echo", "value": "after"}, timeout=BOUND) == "after"
    assert [x async for x in streams.stream({"n": 100})] == list(range(100))
    for i in range(3):
        result = await callers.ask({"path": "probe.Echo", "data": {"i": i}}, timeout=BOUND)
        assert result["items"] == [{"i": i}]


def _callbacks() -> kameo.Callbacks:
    callbacks = kameo.Callbacks()

    @callbacks.handler("probe.Echo")
    async def echo(data: Any) -> Any:
        return data

    return callbacks


async def _scenario() -> tuple[int, int, int]:
    """Run `_exercise` on three pools; return each pool's count of direct waits."""
    async with (
        kameo.Pool(f"{BASIC}:cmd", size=1, cancel_grace=0.5) as pool,
        kameo.Pool("handlers.streaming:count", size=1) as streams,
        kameo.Pool("handlers.callers:collect", size=1, callbacks=_callbacks()) as callers,
    ):
        await asyncio.sleep(0.01)  # nothing else to run: the next ask may wait directly
        await _exercise(pool, streams, callers)
        return pool._answer_waits, streams._answer_waits, callers._answer_waits


def test_the_running_cpython_is_one_whose_loop_shape_is_known() -> None:
    assert sys.version_info[:2] in _aio.KNOWN_VERSIONS, (
        f"CPython {sys.version_info[:2]} is not in kameo._aio.KNOWN_VERSIONS: check its "
        "asyncio against _aio._check and add it, or awaited asks lose their fast path"
    )


async def test_the_default_loop_is_recognised_and_awaited_asks_wait_directly() -> None:
    loop = asyncio.get_running_loop()
    direct = _aio.probe(loop)
    assert direct is not None, f"kameo._aio does not recognise the default loop {loop!r}"
    assert _aio.selector_fd(loop) == direct.fd >= 0
    waits = await _scenario()
    assert waits[0] > 0, "no awaited ask waited outside the loop"
    assert waits[2] > 0, "no awaited callback ask waited outside the loop"


async def test_the_budget_says_no_while_the_loop_has_work() -> None:
    loop = asyncio.get_running_loop()
    assert _aio.direct_wait_budget(loop, 0.05) == 0.05  # nothing ready, no timer
    handle = loop.call_soon(lambda: None)
    assert _aio.direct_wait_budget(loop, 0.05) is None
    handle.cancel()
    await asyncio.sleep(0)
    timer = loop.call_later(0.01, lambda: None)
    budget = _aio.direct_wait_budget(loop, 0.05)
    assert budget is not None and 0 < budget <= 0.01
    timer.cancel()
    await asyncio.sleep(0)
    factory = loop.get_task_factory()
    loop.set_task_factory(lambda lp, coro, **kw: asyncio.Task(coro, loop=lp, **kw))
    try:
        assert _aio.direct_wait_budget(loop, 0.05) is None
    finally:
        loop.set_task_factory(factory)


class _OwnIterationLoop(asyncio.SelectorEventLoop):
    """A loop that runs its iterations its own way (here: the same way, but _aio cannot know)."""

    def _run_once(self) -> None:
        super()._run_once()  # type: ignore[misc]


class _NoSelectorLoop(asyncio.SelectorEventLoop):
    """A loop whose private `_selector` is not where _aio looks for it."""

    def __init__(self) -> None:
        super().__init__()
        self._hidden_selector = self.__dict__.pop("_selector")

    def __getattr__(self, name: str) -> Any:
        if name == "_selector" and "_hidden_selector" in self.__dict__:
            if sys._getframe(1).f_globals.get("__name__") == "kameo._aio":
                raise AttributeError(name)
            return self.__dict__["_hidden_selector"]
        raise AttributeError(name)


FOREIGN_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "poll selector": lambda: asyncio.SelectorEventLoop(selectors.PollSelector()),
    "own _run_once": _OwnIterationLoop,
    "hidden _selector": _NoSelectorLoop,
}


@pytest.mark.parametrize("make_loop", FOREIGN_LOOPS.values(), ids=FOREIGN_LOOPS.keys())
def test_a_loop_of_another_shape_is_awaited_through_the_loop(
    make_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> tuple[int, int, int]:
        assert _aio.probe(asyncio.get_running_loop()) is None
        assert _aio.selector_fd(asyncio.get_running_loop()) is None
        assert _aio.direct_wait_budget(asyncio.get_running_loop(), 0.05) is None
        return await _scenario()

    with asyncio.Runner(loop_factory=make_loop) as runner:
        assert runner.run(main()) == (0, 0, 0)
